"""LaVie from official weights on disk: a Stable Diffusion 1.4 folder (diffusers layout) and `lavie_base.pt`.

The folders are tiny random-weight versions written exactly as diffusers / transformers save them
(tests/sd_layout.py); the model is configs/model/lavie_base.yaml with the component sizes shrunk to match.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from modules.components.checkpoints import CheckpointKeyError
from modules.components.video_unet import VideoUNet
from modules.lavie import LaVie, PretrainedConfigError
from tests.sd_layout import (
    CONFIGS,
    randomize_,
    tiny_lavie_base_config,
    write_lavie_checkpoint,
    write_tiny_sd_folder,
)

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = [
    "a red circle moving left on a dark background",
    "An astronaut riding a HORSE on Mars, 4k; photorealistic!",
    "a man's dog (running) in 2023 -- cafe",
]




@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sd-v1-4")
    return root, write_tiny_sd_folder(root)


@pytest.fixture(scope="module")
def model(sd_folder) -> LaVie:
    root, configs = sd_folder
    torch.manual_seed(0)
    return instantiate(tiny_lavie_base_config(configs, sd_path=root)).eval()


def scratch_model(configs: dict) -> LaVie:
    """The same architecture, randomly initialised, nothing loaded."""
    return instantiate(tiny_lavie_base_config(configs, pretrained={"init_from_sd": False})).eval()


def message(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------------------------ the test folder
def test_tiny_folder_has_the_sd_layout(sd_folder):
    from diffusers import StableDiffusionPipeline
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    root, configs = sd_folder
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/config.json", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json", "model_index.json"):
        assert (root / name).is_file(), name
    scheduler = OmegaConf.load(root / "scheduler" / "scheduler_config.json")
    assert scheduler._class_name == "PNDMScheduler"
    assert (scheduler.beta_start, scheduler.beta_end, scheduler.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert OmegaConf.load(root / "unet" / "config.json").cross_attention_dim == configs["text_encoder"]["hidden_size"]

    # diffusers reads it as a Stable Diffusion pipeline
    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae).__name__ == "AutoencoderKL"

    # the tokenizer transformers reads gives open_clip's CLIP BPE ids (special tokens are named differently)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    assert len(tokenizer) == 49408
    reference = SimpleTokenizer()
    hf_ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    for ids, ref in zip(hf_ids, reference(PROMPTS).tolist()):
        end = ref.index(reference.eot_token_id) + 1
        assert len(ids) == 77
        assert ids[:end] == ref[:end]
        assert ids[0] == tokenizer.bos_token_id == reference.sot_token_id == 49406
        assert ids[end - 1] == tokenizer.eos_token_id == reference.eot_token_id == 49407
        assert end > 5  # real words, not just the special tokens


# ------------------------------------------------------------------------------------------ SD 1.4 folder
def test_sd_folder_loads_every_component(sd_folder, model):
    root, _ = sd_folder
    # UNet: every 2D key from the file, exactly; only the temporal keys are new, and they start as identity
    unet_file = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    unet_state = model.unet.state_dict()
    spatial = {k for k in unet_state if not VideoUNet.is_temporal_key(k)}
    assert spatial == set(unet_file)
    temporal = set(unet_state) - spatial
    assert temporal and all(".attn_temp." in k or ".norm_temp." in k for k in temporal)
    for key in spatial:
        assert torch.equal(unet_state[key], unet_file[key]), key
    for key in ("conv_in.weight", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "up_blocks.2.resnets.1.norm1.weight"):
        assert torch.equal(unet_state[key], unet_file[key]) and unet_file[key].std() > 0
    for block in model.unet.temporal_blocks():
        assert not block.attn_temp.to_out[0].weight.any() and not block.attn_temp.to_out[0].bias.any()

    # VAE and text encoder: strict, every tensor equal
    vae_file = load_file(root / "vae" / "diffusion_pytorch_model.safetensors")
    vae_state = model.autoencoder.vae.state_dict()
    assert set(vae_state) == set(vae_file)
    assert all(torch.equal(vae_state[k], vae_file[k]) for k in vae_file)
    text_file = load_file(root / "text_encoder" / "model.safetensors")
    text_state = model.text_encoder.model.state_dict()
    assert set(text_file) - {"text_model.embeddings.position_ids"} <= set(text_state)
    assert all(torch.equal(text_state[k], v) for k, v in text_file.items() if k in text_state)
    assert set(text_state) - set(text_file) <= {"text_model.embeddings.position_ids"}  # a buffer, not a weight

    # the tokenizer is the folder's
    assert Path(model.text_encoder.tokenizer.name_or_path).resolve() == (root / "tokenizer").resolve()


@torch.no_grad()
def test_loaded_components_compute_what_the_libraries_compute(sd_folder, model):
    """The same numbers as diffusers / transformers loading the folder themselves."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root, _ = sd_folder
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    text = CLIPTextModel.from_pretrained(root / "text_encoder").eval()(ids).last_hidden_state
    context = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(context, text, atol=1e-5, rtol=1e-5)

    # zero temporal output projections: on a video of identical frames the video UNet is SD's UNet on every frame.
    # Only there: its ResNet GroupNorms pool over the video's frames, as the official LaVie UNet's do, so on a moving
    # video the official outputs are the reference (tests/test_lavie_official_parity.py).
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, c, T, h, w)
    still = latents[:, :, :1].expand_as(latents).contiguous()
    timesteps = torch.tensor([10, 900])
    out = model.unet(still, timesteps, context[:2])
    per_frame = torch.stack([unet(still[:, :, f], timesteps, context[:2]).sample for f in range(3)], dim=2)
    torch.testing.assert_close(out, per_frame, atol=1e-5, rtol=1e-4)

    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    decoded = model.autoencoder.decode(latents)  # (B, T, C, H, W)
    expected = vae.decode(latents[:, :, 1] / 0.18215).sample
    torch.testing.assert_close(decoded[:, 1], expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ lavie_base.pt
def random_video_unet_state(configs: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    unet = VideoUNet(**configs["unet"])
    return randomize_(unet, seed).state_dict()  # temporal layers nonzero too


def test_lavie_checkpoint_loads_strictly(sd_folder, tmp_path):
    root, configs = sd_folder
    state = random_video_unet_state(configs, seed=11)
    path = write_lavie_checkpoint(tmp_path / "lavie_base.pt", state)
    assert set(torch.load(path, weights_only=True)) == {"ema"}

    model = instantiate(tiny_lavie_base_config(configs, sd_path=root, checkpoint=path))
    loaded = model.unet.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    to_out = "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_out.0.weight"
    assert loaded[to_out].abs().max() > 0  # the checkpoint's temporal weights, not the zero initialisation
    # the other components still come from the SD folder
    vae_file = load_file(root / "vae" / "diffusion_pytorch_model.safetensors")
    vae_state = model.autoencoder.vae.state_dict()
    assert torch.equal(vae_state["decoder.conv_out.weight"], vae_file["decoder.conv_out.weight"])


def test_lavie_checkpoint_without_temporal_keys_is_refused(sd_folder, tmp_path):
    """Unlike the SD folder, the LaVie checkpoint must hold the temporal layers: a 2D UNet there is an error."""
    root, configs = sd_folder
    image_unet = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    path = write_lavie_checkpoint(tmp_path / "lavie_base.pt", image_unet)
    model = scratch_model(configs)
    with pytest.raises(CheckpointKeyError) as excinfo:
        model.load_pretrained(checkpoint=path)
    text = message(excinfo)
    assert str(path) in text and "missing keys" in text
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.weight" in text


def test_checkpoint_key_mismatch_names_missing_and_unexpected_keys(sd_folder, tmp_path):
    _, configs = sd_folder
    state = random_video_unet_state(configs, seed=12)
    renamed = "mid_block.attentions.0.transformer_blocks.0.attn_temp.to_q.weight"
    state["mid_block.attentions.0.transformer_blocks.0.attn_temporal.to_q.weight"] = state.pop(renamed)
    state["extra_head.weight"] = torch.zeros(3)
    path = write_lavie_checkpoint(tmp_path / "renamed.pt", state)
    model = scratch_model(configs)
    before = model.unet.state_dict()["conv_in.weight"].clone()
    with pytest.raises(CheckpointKeyError) as excinfo:
        model.load_pretrained(checkpoint=path)
    text = message(excinfo)
    assert str(path) in text
    assert "missing keys" in text and renamed in text
    assert "unexpected keys" in text
    assert "mid_block.attentions.0.transformer_blocks.0.attn_temporal.to_q.weight" in text
    assert "extra_head.weight" in text
    assert torch.equal(model.unet.state_dict()["conv_in.weight"], before)  # nothing half-loaded


def test_checkpoint_shape_mismatch_is_reported(sd_folder, tmp_path):
    _, configs = sd_folder
    state = random_video_unet_state(configs, seed=13)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn_temp.time_rel_pos_bias.relative_attention_bias.weight"
    assert tuple(state[key].shape) == (32, 2)
    state[key] = torch.zeros(32, 8)  # 8 heads (paper size) for a 2-head model
    path = write_lavie_checkpoint(tmp_path / "shapes.pt", state)
    with pytest.raises(CheckpointKeyError) as excinfo:
        scratch_model(configs).load_pretrained(checkpoint=path)
    text = message(excinfo)
    assert str(path) in text and "shape" in text and key in text
    assert "(32, 8)" in text and "(32, 2)" in text


# ------------------------------------------------------------------------------------------ config errors
def test_missing_sd_folder_names_the_path(sd_folder, tmp_path):
    _, configs = sd_folder
    missing = tmp_path / "no-such-sd-folder"
    cfg = tiny_lavie_base_config(configs, sd_path=missing)
    with pytest.raises(PretrainedConfigError) as excinfo:
        LaVie.validate_config(cfg)  # before anything is built
    assert str(missing) in message(excinfo) and "model.pretrained.sd_path" in message(excinfo)
    with pytest.raises(InstantiationException) as excinfo:
        instantiate(cfg)
    assert isinstance(excinfo.value.__cause__, PretrainedConfigError) and str(missing) in str(excinfo.value.__cause__)
    with pytest.raises(PretrainedConfigError, match="no-such-sd-folder"):
        scratch_model(configs).load_pretrained(sd_path=missing)


def test_missing_checkpoint_file_names_the_path(sd_folder, tmp_path):
    _, configs = sd_folder
    missing = tmp_path / "lavie_base.pt"
    with pytest.raises(PretrainedConfigError) as excinfo:
        LaVie.validate_config(tiny_lavie_base_config(configs, checkpoint=missing, pretrained={"init_from_sd": False}))
    assert str(missing) in message(excinfo) and "model.pretrained.checkpoint" in message(excinfo)


def test_sd_folder_without_vae_is_named(sd_folder, tmp_path):
    root, configs = sd_folder
    broken = tmp_path / "sd-no-vae"
    shutil.copytree(root, broken, ignore=lambda d, names: ["vae"] if Path(d) == root else [])
    assert not (broken / "vae").exists() and (broken / "unet").is_dir()
    with pytest.raises(PretrainedConfigError) as excinfo:
        scratch_model(configs).load_pretrained(sd_path=broken)
    text = message(excinfo)
    assert str(broken) in text and "missing vae/" in text


def test_init_from_sd_without_sd_path_says_what_to_set(sd_folder):
    _, configs = sd_folder
    # the paper-size config as shipped: refused before any weights are built
    paper = OmegaConf.load(CONFIGS / "model" / "lavie_base.yaml")
    assert paper.pretrained.init_from_sd is True and paper.pretrained.sd_path is None
    with pytest.raises(PretrainedConfigError) as excinfo:
        LaVie.validate_config(paper)
    assert "model.pretrained.sd_path" in message(excinfo) and "experiment=tiny_lavie" in message(excinfo)
    # and when built directly
    with pytest.raises(InstantiationException) as excinfo:
        instantiate(tiny_lavie_base_config(configs))
    cause = excinfo.value.__cause__
    assert isinstance(cause, PretrainedConfigError)
    assert "model.pretrained.sd_path" in str(cause) and "experiment=tiny_lavie" in str(cause)


# ------------------------------------------------------------------------------------------ generation
def test_generate_from_the_sd_folder(model):
    factor = model.autoencoder.downsample_factor
    assert factor == 4 and model.autoencoder.latent_channels == 4
    video = model.generate(PROMPTS[:2], num_frames=3, seed=5, num_inference_steps=2, height=8 * factor,
                           width=6 * factor)
    assert video.dtype == torch.uint8 and video.shape == (2, 3, 32, 24, 3)
    assert video.float().std() > 1  # not a constant image
    again = model.generate(PROMPTS[:2], num_frames=3, seed=5, num_inference_steps=2, height=32, width=24)
    assert torch.equal(video, again)
    one = model.generate(PROMPTS[1:2], num_frames=3, seed=6, num_inference_steps=2, height=32, width=24)
    assert torch.equal(one[0], video[1])  # video i uses seed + i, independent of the batch
    with pytest.raises(ValueError, match="multiples of 4"):
        model.generate(PROMPTS[:1], num_frames=3, num_inference_steps=2, height=30, width=32)
