"""`model=vidrd_vae`, VidRD's temporal VAE decoder stage (modules/vidrd_vae.py): only the Temp-Convs train (encoder and
spatial decoder frozen, as the paper), the loss falls on a repeated batch, a checkpoint goes back into
`TemporalKLAutoencoder`, the paper-size config builds on the meta device with the official layout, and a missing SD
VAE folder is named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import Trainer
from torch.utils.data import DataLoader

from modules.base import validate_model_config
from modules.components.checkpoints import CheckpointKeyError
from modules.components.patchgan3d import PatchGAN3D
from modules.components.temporal_vae import TemporalKLAutoencoder, is_temporal_key, rename_deprecated_attention
from modules.vidrd_vae import VidRDTemporalVAE, frame_difference_error
from tests.vidrd_fixtures import vidrd_fixture_dir

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                act_fn="silu", latent_channels=4, norm_num_groups=8, sample_size=16)


def stage(discriminator=True, lr=1e-3, seed=0, **kwargs) -> VidRDTemporalVAE:
    torch.manual_seed(seed)
    adam = lambda params: torch.optim.Adam(params, lr=lr)  # noqa: E731
    return VidRDTemporalVAE(
        TemporalKLAutoencoder(TINY_VAE, temporal_dropout=0.0, clip_frames=4), optimizer=adam,
        discriminator=PatchGAN3D(base_channels=8, num_layers=2, norm_groups=4) if discriminator else None,
        discriminator_optimizer=adam if discriminator else None, **kwargs)


def clips(seed=1, batch=2, frames=4, size=16) -> torch.Tensor:
    """Smooth clips in [-1, 1] with a bright square moving one pixel a frame: temporal structure to learn."""
    generator = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, 1, 3, size, size, generator=generator).mul(0.4).sub(0.7).repeat(1, frames, 1, 1, 1)
    for t in range(frames):
        video[:, t, :, 4:10, 2 + t:8 + t] = 0.8
    return video


def fit(module: VidRDTemporalVAE, steps: int, root: Path, video: torch.Tensor) -> Trainer:
    """`steps` training steps on the same batch."""
    loader = DataLoader([{"video": v} for v in video] * steps, batch_size=len(video))
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def snapshot(module: VidRDTemporalVAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.autoencoder.vae.state_dict().items()}


def test_only_temporal_parameters_get_gradients():
    module = stage(discriminator=False)
    losses = module.generator_losses(clips())
    losses["loss"].backward()
    named = dict(module.autoencoder.vae.named_parameters())
    with_grad = {k for k, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    temporal = {k for k in named if is_temporal_key(k)}
    assert temporal and with_grad <= temporal
    # every Temp-Conv's zero-initialised last Conv3d gets a gradient (through the others it cannot at the start)
    assert {k for k in temporal if k.endswith("convs.11.weight")} <= with_grad
    assert {k for k, p in named.items() if p.requires_grad} == temporal


def test_a_step_changes_only_temporal_weights_encoder_unchanged(tmp_path):
    module = stage(discriminator=True)  # the adversarial path (adaptive weight, discriminator step) included
    before = snapshot(module)
    discriminator_before = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    fit(module, 2, tmp_path, clips())
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_temporal_key(k) for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(v, module.discriminator.state_dict()[k]) for k, v in discriminator_before.items())


def test_loss_is_finite_and_falls_on_a_repeated_batch(tmp_path):
    module = stage(discriminator=False, lr=3e-3)
    video = clips()

    def reconstruction_error():
        with torch.no_grad():
            module.eval()
            error = (module.reconstruct(video)[0] - video).abs().mean()
            module.train()
            return error

    torch.manual_seed(0)
    first = module.generator_losses(video)["loss"].detach()
    start = reconstruction_error()
    fit(module, 40, tmp_path, video)
    torch.manual_seed(0)
    last = module.generator_losses(video)["loss"].detach()
    assert torch.isfinite(first) and torch.isfinite(last)
    assert last < 0.9 * first
    assert reconstruction_error() < start


def test_whole_vae_trains_in_the_2d_stage():
    module = stage(discriminator=False, trainable="all")
    module.generator_losses(clips(frames=1))["loss"].backward()
    encoder = [p for k, p in module.autoencoder.vae.named_parameters() if k.startswith("encoder.")]
    assert all(p.grad is not None for p in encoder)


def test_checkpoint_round_trip_into_temporal_autoencoder(tmp_path):
    module = stage(discriminator=True)
    trainer = fit(module, 2, tmp_path, clips())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    loaded = TemporalKLAutoencoder(TINY_VAE, clip_frames=4)
    assert not torch.equal(loaded.vae.state_dict()["decoder.up_blocks.0.temp_convs.0.convs.11.weight"],
                           module.autoencoder.vae.state_dict()["decoder.up_blocks.0.temp_convs.0.convs.11.weight"])
    loaded.load_checkpoint(path)
    trained = module.autoencoder.vae.state_dict()
    assert loaded.vae.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[key]) for key, value in loaded.vae.state_dict().items())
    # and the same file starts a new stage (init_from), or is refused by a VAE of another shape
    again = stage(discriminator=False, init_from=str(path))
    assert all(torch.equal(value, trained[key]) for key, value in again.autoencoder.vae.state_dict().items())
    wider = TemporalKLAutoencoder({**TINY_VAE, "block_out_channels": [16, 48]})
    with pytest.raises(CheckpointKeyError, match="last.ckpt"):
        wider.load_checkpoint(path)


def test_frame_difference_error_sees_flicker():
    video = clips(frames=6)
    assert frame_difference_error(video, video) == 0
    flicker = video.clone()
    flicker[:, 1::2] += 0.1
    assert frame_difference_error(flicker, video) > frame_difference_error(video + 0.1, video)
    with pytest.raises(ValueError, match="2 frames"):
        frame_difference_error(video[:, :1], video[:, :1])


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        # paths.root_dir: what the entry scripts take from Hydra's runtime (absent outside an app)
        return compose("train", overrides=[*overrides, f"paths.root_dir={CONFIGS.parent}"]).model


def test_paper_size_config_builds_on_meta_with_official_layout(fixtures_dir):
    path = vidrd_fixture_dir(fixtures_dir, ("keys_vae.json",), "VidRD VAE key layout") / "keys_vae.json"
    official = {k: tuple(v) for k, v in rename_deprecated_attention(json.loads(path.read_text())).items()}
    cfg = compose_model("model=vidrd_vae")
    with torch.device("meta"):
        module = instantiate(cfg, _convert_="all")
    state = module.autoencoder.vae.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == official
    assert all(v.is_meta for v in state.values())
    # the paper's trainable set: exactly the Temp-Convs
    trainable = {k for k, p in module.autoencoder.vae.named_parameters() if p.requires_grad}
    assert trainable == {k for k in official if is_temporal_key(k)}
    assert sum(p.numel() for p in module.trainable_parameters()) == sum(
        torch.Size(shape).numel() for key, shape in official.items() if is_temporal_key(key))


def test_missing_sd_vae_folder_is_named(tmp_path):
    missing = tmp_path / "sd21"
    cfg = compose_model("model=vidrd_vae", f"model.pretrained.sd_path={missing}")
    with pytest.raises(FileNotFoundError, match=str(missing / "vae")):
        validate_model_config(cfg)
    with pytest.raises(ValueError, match="model.pretrained.sd_path"):
        validate_model_config(compose_model("model=vidrd_vae"))
    # the constructor (no validate_config first) names it too
    with pytest.raises(FileNotFoundError, match=str(missing / "vae")):
        stage(discriminator=False, pretrained={"sd_path": str(missing)})


def test_sd_vae_folder_loads_with_identity_temp_convs(tmp_path):
    """An SD-layout vae/ folder (2D keys only) loads; the Temp-Convs start as identities, so the temporal decoder
    equals frame-by-frame decoding until trained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "sd" / "vae")
    module = stage(discriminator=False, pretrained={"sd_path": str(tmp_path / "sd")}).eval()
    video = clips()
    with torch.no_grad():
        torch.testing.assert_close(module.reconstruct(video)[0], module.reconstruct(video, temporal=False)[0])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="model.trainable"):
        stage(trainable="spatial")
    with pytest.raises(ValueError, match="model.reconstruction_loss"):
        stage(reconstruction_loss="huber")
