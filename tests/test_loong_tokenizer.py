"""The Loong tokenizer as a trainable backbone: encode/decode API, training step, checkpoints and stage chaining.

The networks' own properties (causality, CVQ parity with the official quantiser) are tested in
test_causal_video_cnn.py and test_cvq.py; here they are assembled the way the configs assemble them.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from modules.base import validate_model_config
from modules.components.causal_video_cnn import CODEBOOK_SIZE, PAPER_SIZE, CausalVideoDecoder, CausalVideoEncoder
from modules.loong_tokenizer import LoongTokenizer, psnr
from tests.test_configs import compose_config

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_config(*overrides: str):
    # paths.* resolve through the Hydra runtime, which a composed (not run) config lacks
    return compose_config("train", "experiment=tiny_loong_tokenizer", "paths.root_dir=.", *overrides)


@pytest.fixture(scope="module")
def tokenizer() -> LoongTokenizer:
    torch.manual_seed(0)
    model = instantiate(tiny_config().model, _convert_="all")
    return model.eval()


def clip(frames: int, batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, size, size, generator=g) * 2 - 1  # [B, T, C, H, W] in [-1, 1]


@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (5, 2), (17, 5)])
def test_encode_decode_shapes(tokenizer, frames, latent_frames):
    tokens = tokenizer.encode(clip(frames))
    assert tokens.dtype == torch.long and tokens.shape == (2, latent_frames, 4, 4)
    assert 0 <= tokens.min() and tokens.max() < tokenizer.quantizer.num_codes
    video = tokenizer.decode(tokens)
    assert video.shape == (2, frames, 3, 32, 32)
    assert video.min() >= -1 and video.max() <= 1


def test_image_tokens_are_the_first_tokens_of_a_clip(tokenizer):
    video = clip(17)
    tokens = tokenizer.encode(video)
    assert torch.equal(tokenizer.encode(video[:, :1]), tokens[:, :1])
    assert torch.equal(tokenizer.encode(video[:, :9]), tokens[:, :3])
    # and decoding is causal too: the first frames of a longer token clip are those of its prefix
    assert torch.equal(tokenizer.decode(tokens[:, :2]), tokenizer.decode(tokens)[:, :5])


def test_tokenizing_never_moves_the_codebook(tokenizer):
    tokenizer.train()
    try:
        before = {k: v.clone() for k, v in tokenizer.quantizer.state_dict().items()}
        tokenizer.encode(clip(5))
        for key, value in tokenizer.quantizer.state_dict().items():
            assert torch.equal(value, before[key]), key
        # the modes are restored: training again, one conv per clip
        assert tokenizer.quantizer.training
        assert not any(getattr(m, "frame_by_frame", False) for m in tokenizer.modules())
    finally:
        tokenizer.eval()


def test_decode_rejects_bad_tokens(tokenizer):
    with pytest.raises(ValueError, match="token ids must lie in"):
        tokenizer.decode(torch.full((1, 1, 4, 4), tokenizer.quantizer.num_codes))
    with pytest.raises(ValueError, match="LongTensor"):
        tokenizer.decode(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="1 \\+ 4k|1\\+4k"):
        tokenizer.encode(clip(4))


def test_psnr_of_known_error():
    target = torch.zeros(2, 1, 3, 4, 4)
    # an error of 0.2 on the [-1, 1] scale is 0.1 on the [0, 1] scale: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert psnr(target + 0.2, target).item() == pytest.approx(20.0, abs=1e-4)


def test_training_steps_move_the_networks_and_count_one_step_per_batch(tmp_path):
    """Three batches with the discriminator on from the start: generator, discriminator and codebook all change,
    `global_step` is the number of batches (the discriminator's optimizer does not count), usage is logged."""
    cfg = tiny_config("model.adversarial.start_step=0", "data.batch_size=4", "data.val_size=0")
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all")
    datamodule = instantiate(cfg.data, _convert_="all")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 3
    changed = lambda prefix: any(  # noqa: E731
        not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith(prefix))
    for part in ("encoder.", "decoder.", "discriminator.", "quantizer.embedding."):
        assert changed(part), part
    metrics = trainer.callback_metrics
    for name in ("train/l1", "train/codebook", "train/discriminator", "train/generator_adversarial",
                 "train/codebook_usage", "train/codebook_perplexity", "train/psnr"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert 0 < metrics["train/codebook_usage"] <= 1


def test_discriminator_waits_for_its_start_step(tmp_path):
    cfg = tiny_config("model.adversarial.start_step=100", "data.batch_size=2", "data.val_size=0")
    model = instantiate(cfg.model, _convert_="all")
    before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=instantiate(cfg.data, _convert_="all"))
    assert all(torch.equal(v, before[k]) for k, v in model.discriminator.state_dict().items())
    assert "train/discriminator" not in trainer.callback_metrics


def test_load_pretrained_reads_tokenizer_weights_and_names_bad_keys(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.ckpt"
    torch.save({"state_dict": tokenizer.state_dict(), "global_step": 7}, path)
    fresh = instantiate(tiny_config().model, _convert_="all")
    fresh.load_pretrained(path)
    for part in ("encoder", "quantizer", "decoder"):
        for key, value in getattr(tokenizer, part).state_dict().items():
            assert torch.equal(getattr(fresh, part).state_dict()[key], value), f"{part}.{key}"

    state = dict(tokenizer.state_dict())
    state.pop("decoder.conv_out.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(Exception, match="conv_out.weight") as info:
        fresh.load_pretrained(tmp_path / "bad.ckpt")
    assert "bad.ckpt" in str(info.value)

    torch.save({"state_dict": {"unet.conv_in.weight": torch.zeros(1)}}, tmp_path / "lavie.ckpt")
    with pytest.raises(KeyError, match="not a Loong tokenizer checkpoint"):
        fresh.load_pretrained(tmp_path / "lavie.ckpt")


def test_missing_previous_stage_is_a_clear_error():
    cfg = tiny_config("model.init_from=/nonexistent/stage1/last.ckpt")
    with pytest.raises(FileNotFoundError, match="previous stage"):
        validate_model_config(cfg.model)
    cfg = tiny_config("model.perceptual_weight=0.1", "model.perceptual_weights_path=/nonexistent/vgg16.pth")
    with pytest.raises(FileNotFoundError, match="VGG16"):
        validate_model_config(cfg.model)


def test_progressive_stages_chain_through_their_run_folders(tmp_path):
    """Stage 2's default init_from is stage 1's last.ckpt under the same log dir; stage 3's is stage 2's."""
    stages = {
        "tiny_loong_tokenizer": ("images", 1, None),
        "tiny_loong_tokenizer_17": ("clips17", 17, "images"),
        "tiny_loong_tokenizer_65": ("clips65", 65, "clips17"),
    }
    for experiment, (stage, frames, previous) in stages.items():
        cfg = compose_config("train", f"experiment={experiment}", f"paths.log_dir={tmp_path}")
        assert cfg.data.num_frames == frames
        assert cfg.hydra.run.dir == f"{tmp_path}/train/tiny_loong_tokenizer/{stage}"
        if previous is None:
            assert cfg.model.init_from is None
        else:
            assert cfg.model.init_from == f"{tmp_path}/train/tiny_loong_tokenizer/{previous}/checkpoints/last.ckpt"


def test_paper_stages_follow_section_4_1(tmp_path):
    """Paper-size schedule: images, 17 and 65 frames at 128x128, batch 64, AdamW 1e-4, each from the last stage."""
    stages = {
        "loong_tokenizer_images": ("images", 1, None, "ImageTextDataModule"),  # one-frame items
        "loong_tokenizer_17": ("clips17", 17, "images", "VideoTextDataModule"),
        "loong_tokenizer_65": ("clips65", 65, "clips17", "VideoTextDataModule"),
    }
    total = 0
    for experiment, (stage, frames, previous, datamodule) in stages.items():
        cfg = compose_config("train", f"experiment={experiment}", f"paths.log_dir={tmp_path}")
        assert cfg.data._target_.endswith(datamodule) and cfg.data.get("num_frames") == frames
        assert list(cfg.data.resolution) == [128, 128] and cfg.data.batch_size == 64
        assert cfg.model.encoder.base_channels == PAPER_SIZE["base_channels"] and cfg.model.optimizer.lr == 1e-4
        assert cfg.model.quantizer.num_codes == CODEBOOK_SIZE
        assert cfg.hydra.run.dir == f"{tmp_path}/train/loong_tokenizer/{stage}"
        expected = None if previous is None else f"{tmp_path}/train/loong_tokenizer/{previous}/checkpoints/last.ckpt"
        assert cfg.model.init_from == expected
        total += cfg.trainer.max_steps
    assert total == 400_000  # the paper's iteration count for the tokenizer


def test_stage_two_starts_from_stage_one_weights(tokenizer, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": tokenizer.state_dict()}, ckpt)
    cfg = compose_config("train", "experiment=tiny_loong_tokenizer_17", "paths.root_dir=.", f"model.init_from={ckpt}")
    validate_model_config(cfg.model)
    stage2 = instantiate(cfg.model, _convert_="all")
    assert torch.equal(stage2.encoder.conv_in.weight, tokenizer.encoder.conv_in.weight)
    assert torch.equal(stage2.decoder.conv_out.weight, tokenizer.decoder.conv_out.weight)
    assert torch.equal(stage2.quantizer.embedding.weight, tokenizer.quantizer.embedding.weight)


def test_paper_size_config_builds_on_meta_with_the_paper_parameter_count():
    cfg = compose_config("train", "model=loong_tokenizer", "paths.root_dir=.")
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
        encoder, decoder = CausalVideoEncoder(**PAPER_SIZE), CausalVideoDecoder(**PAPER_SIZE)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tokenizer_params = sum(count(getattr(model, part)) for part in ("encoder", "quantizer", "decoder"))
    assert tokenizer_params == count(encoder) + count(decoder) + CODEBOOK_SIZE * PAPER_SIZE["latent_dim"]
    assert abs(tokenizer_params / 246e6 - 1) < 0.02  # Loong section 4.1: "a total of 246M parameters"
    assert model.quantizer.num_codes == 8192
    # 65 frames at 128x128 -> 17x16x16 tokens
    assert encoder.latent_shape(65, 128, 128) == (17, 16, 16)


def vgg16_feature_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the key names and shapes of torchvision's VGG16 `features` (the file's conv part)."""
    g = torch.Generator().manual_seed(seed)
    widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
              (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv layers in vgg16().features
    state = {}
    for index, (cin, cout) in zip(indices, widths):
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(cout)
    return state


def test_perceptual_loss_loads_local_vgg16_and_measures_distance(tmp_path):
    from modules.components.perceptual import LPIPSLoss

    state = vgg16_feature_state()
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    loss = LPIPSLoss(path)
    conv = loss.lpips.net.slice5._modules["28"]
    assert torch.equal(conv.weight, state["features.28.weight"])  # the file's layers, at their torchvision index
    a, b = clip(1, size=32).transpose(1, 2), clip(1, size=32, seed=1).transpose(1, 2)  # (B, C, T, H, W)
    a.requires_grad_(True)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    distance = loss(a, b)
    assert distance.item() > 0
    distance.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())

    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPSLoss(tmp_path / "absent.pth")
    del state["features.28.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="features.28.weight"):
        LPIPSLoss(tmp_path / "partial.pth")


def test_reconstruction_videos_show_input_and_reconstruction(tmp_path):
    from callbacks.reconstruction_videos import ReconstructionVideos
    from datamodules.video_io import read_video

    cfg = tiny_config("data.batch_size=2", "data.val_size=4")
    model = instantiate(cfg.model, _convert_="all")
    callback = ReconstructionVideos(num_videos=3, every_n_steps=1, dirpath=str(tmp_path / "rec"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, datamodule=instantiate(cfg.data, _convert_="all"))
    folder = tmp_path / "rec" / "step_000001"
    videos = sorted(folder.glob("*.mp4"))
    assert [v.name for v in videos] == ["00.mp4", "01.mp4", "02.mp4"] and (folder / "grid.png").is_file()
    frames = read_video(videos[0])
    assert frames.shape[1:3] == (32, 64)  # input | reconstruction side by side
    # the left half is the first validation clip itself (up to the mp4 codec)
    clip0 = callback._fixed_clips(trainer)[0]  # (T, C, H, W) in [-1, 1]
    expected = ((clip0[0].permute(1, 2, 0) + 1) * 127.5).round()
    assert (frames[0, :, :32].float() - expected).abs().mean() < 8


def test_tokenizer_benchmark_measures_one_operation():
    """benchmarks/tokenizer.py, one in-process measurement at a tiny size (the script runs each in a fresh process)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("benchmarks_tokenizer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [bench.measure_one(op, 5, 1, "cpu", 1) for op in ("encode", "train_step")]
    for row in rows:
        assert row["tokens"] == [2, 4, 4] and row["seconds"] > 0
        assert row["frames_per_second"] == pytest.approx(5 / row["seconds"])
    table = bench.markdown(rows, {"date": "d", "device": "cpu", "processor": "p", "threads": 1, "torch": "t",
                                  "batch": 1, "repeats": 1, "load_average": 0})
    assert "| encode | 5 | (2, 4, 4) |" in table


def test_generator_loss_weights_each_term_as_configured(monkeypatch):
    """Every term of the generator loss from known parts: a reconstruction off by 0.5 everywhere (L1 = 0.5), a
    codebook loss of 0.2, a perceptual distance of 0.7 and discriminator logits of 0.4 (adversarial term -0.4),
    each with its own weight, so a dropped or misweighted term changes the total."""
    from modules.components.cvq import QuantizerOutput

    weights = {"reconstruction_weight": 2.0, "codebook_weight": 3.0, "perceptual_weight": 0.5}
    model = instantiate(tiny_config("model.adversarial.start_step=0",
                                    "model.adversarial.weight=0.25").model, _convert_="all")
    for name, value in weights.items():
        setattr(model, name, value)
    model.perceptual = lambda prediction, target: torch.tensor(0.7)
    model.discriminator.forward = lambda video: torch.full((video.shape[0], 1), 0.4)
    video = clip(5)

    def fake_reconstruct(batch):
        indices = torch.zeros(batch.shape[0], 2, 4, 4, dtype=torch.long)
        return batch + 0.5, QuantizerOutput(None, torch.tensor(0.2), indices, torch.tensor(1.0))

    monkeypatch.setattr(model, "reconstruct", fake_reconstruct)
    losses = model.generator_losses(video)
    torch.testing.assert_close(losses["l1"], torch.tensor(0.5))
    torch.testing.assert_close(losses["generator_adversarial"], torch.tensor(-0.4))
    expected = 2.0 * 0.5 + 3.0 * 0.2 + 0.5 * 0.7 + 0.25 * -0.4
    torch.testing.assert_close(losses["loss"], torch.tensor(expected))


def test_discriminator_hinge_loss_by_hand():
    from modules.loong_tokenizer import hinge_discriminator_loss

    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x): 0, 1, 2 -> mean 1
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
