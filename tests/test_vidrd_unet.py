"""VidRD's video UNet as a whole: the official state-dict layout at paper size (on the meta device), SD 2.1 weights
loading strictly, what the UNet computes with its temporal output layers at zero (the image UNet plus the frame
embedding's effect), where Temp-Conv sits, appended images, the config fragments. Layer-level parity with the
official code is in tests/test_vidrd_unet_parity.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from einops import rearrange
from hydra.utils import instantiate
from omegaconf import OmegaConf

from modules.components.checkpoints import CheckpointKeyError
from modules.components.temporal_conv import TemporalConvLayer
from modules.components.video_unet import (
    VIDRD_UNET_OPTIONS, SpatioTemporalBlock, VideoUNet, config_from_vidrd, frame_position_encoding,
)
from tests.vidrd_fixtures import vidrd_fixture_dir

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "vidrd_unet"


def unet_config(name: str) -> dict:
    """A `configs/model/vidrd_unet/<name>.yaml` fragment as plain SD UNet arguments (no `_target_`)."""
    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> VideoUNet:
    torch.manual_seed(seed)
    return instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml")).to(dtype).eval()


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def randomize_temporal(unet: VideoUNet, seed: int = 1) -> None:
    """Non-zero temporal layers (their output layers start at zero), so their effect can be seen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.temporal_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2)


# ----------------------------------------------------------------------------------------------- state-dict layout
def test_paper_size_layout_is_the_official_one(fixtures_dir):
    """Built on the meta device: exactly keys_unet.json's keys and shapes; its temporal keys are the `temp_` ones;
    without them it is diffusers' SD 2.1-base UNet."""
    official = json.loads((vidrd_fixture_dir(fixtures_dir, ("keys_unet.json",), "VidRD key layout")
                           / "keys_unet.json").read_text())
    with torch.device("meta"):
        video = instantiate(OmegaConf.load(CONFIGS / "sd21_base.yaml"))
        image = UNet2DConditionModel(**unet_config("sd21_base"))
    ours = shapes(video)
    assert sorted(set(ours) - set(official)) == [] and sorted(set(official) - set(ours)) == []
    assert {k: v for k, v in ours.items() if ours[k] != official[k]} == {}
    temporal = {k for k in ours if VideoUNet.is_temporal_key(k)}
    assert temporal == {k for k in official if "temp_" in k}
    assert {k: v for k, v in ours.items() if k not in temporal} == shapes(image)


def test_sd_weights_load_strictly_and_temporal_layers_start_silent(tmp_path):
    """A tiny SD-2.1-like UNet saved by diffusers loads with only the temporal keys absent; a file missing a
    spatial key is refused with that key named."""
    torch.manual_seed(0)
    image = UNet2DConditionModel(**unet_config("tiny"))
    image.save_pretrained(tmp_path / "unet")
    video = build("tiny", seed=1)
    video.load_image_unet_weights(tmp_path / "unet")
    loaded = video.state_dict()
    for key, value in image.state_dict().items():
        assert torch.equal(loaded[key], value), key
    for conv in (m for m in video.modules() if isinstance(m, TemporalConvLayer)):
        assert not conv.convs[-1].weight.any() and not conv.convs[-1].bias.any()
    for block in (m for m in video.modules() if isinstance(m, SpatioTemporalBlock)):
        assert not block.temp_attn.to_out[0].weight.any() and not block.temp_attn.to_out[0].bias.any()

    state = image.state_dict()
    dropped = "mid_block.resnets.1.conv2.weight"
    del state[dropped]
    with pytest.raises(CheckpointKeyError, match=dropped):
        build("tiny").load_image_unet_weights(state)


# ------------------------------------------------------------------------------ what the inflated UNet computes
def image_unet_of(video: VideoUNet) -> UNet2DConditionModel:
    image = UNet2DConditionModel(**unet_config("tiny")).to(video.dtype).eval()
    image.load_state_dict({k: v for k, v in video.state_dict().items() if not video.is_temporal_key(k)}, strict=True)
    return image


def add_frame_embedding_after_cross_attention(image: UNet2DConditionModel, frames: int) -> list:
    """Hooks making the image UNet add pe[frame] to the residual stream of every transformer block right after
    cross-attention (where VidRD's temporal sub-block adds it): rows are (b f), frames fastest."""
    def hook(module, args, output):
        pe = frame_position_encoding(frames, output.shape[-1], output.device, output.dtype)
        return output + pe.repeat(output.shape[0] // frames, 1)[:, None, :]
    return [block.attn2.register_forward_hook(hook) for block in image.modules()
            if isinstance(block, BasicTransformerBlock)]


def run_image_unet(image: UNet2DConditionModel, sample: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
    frames = sample.shape[2]
    with torch.no_grad():
        out = image(rearrange(sample, "b c f h w -> (b f) c h w"), t, text.repeat_interleave(frames, dim=0)).sample
    return rearrange(out, "(b f) c h w -> b c f h w", f=frames)


@pytest.mark.parametrize("frames", [8, 1])
def test_with_temporal_outputs_at_zero_it_is_the_image_unet_plus_the_frame_embedding(frames):
    """Temp-Conv's last conv and Temp-Attn's output projection at zero (their initialisation): the video UNet is the
    2D UNet on each frame whose transformer blocks add the frame's sinusoid pe[f] to the residual stream after
    cross-attention; for a one-frame video, pe[0] (the single-frame behaviour). Without that embedding the two
    differ clearly: even then the video UNet is not the image UNet frame by frame."""
    video = build("tiny", torch.float64)
    image = image_unet_of(video)
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, frames, 8, 8, generator=generator, dtype=torch.float64)
    text = torch.randn(2, 5, 64, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = video(sample, 500, text)
    plain = run_image_unet(image, sample, 500, text)
    hooks = add_frame_embedding_after_cross_attention(image, frames)
    with_embedding = run_image_unet(image, sample, 500, text)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(out, with_embedding, atol=1e-10, rtol=0)
    assert (out - plain).abs().max() > 1e-2


def test_appended_images_are_the_image_unet_exactly():
    """Joint image-video inputs: frames after the video's are images and skip Temp-Conv, Temp-Attn and the frame
    embedding, so they are SD's UNet on each image (with non-zero temporal layers)."""
    video = build("tiny", torch.float64)
    randomize_temporal(video)
    image = image_unet_of(video)
    generator = torch.Generator().manual_seed(3)
    video_frames, images = 4, 2
    sample = torch.randn(1, 4, video_frames + images, 8, 8, generator=generator, dtype=torch.float64)
    text = torch.randn(1, 1 + images, 5, 64, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = video(sample, 300, text, num_image_frames=images)
    for m in range(images):
        frame = sample[:, :, video_frames + m : video_frames + m + 1]
        expected = run_image_unet(image, frame, 300, text[:, 1 + m])
        torch.testing.assert_close(out[:, :, video_frames + m : video_frames + m + 1], expected, atol=1e-10, rtol=0)


def test_temporal_conv_follows_every_resnet_in_the_official_order():
    """ResNet -> its Temp-Conv -> the block's next layer, in the mid block (then attention) and in an
    attention-free up block (then the next ResNet); the Temp-Conv pools its GroupNorms over the frames."""
    video = build("tiny")
    randomize_temporal(video)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, output=None: seen.__setitem__(name, output if output is not None else args[0])

    mid, up = video.mid_block, video.up_blocks[0]
    assert not hasattr(up, "attentions") or up.attentions is None
    hooks = [
        mid.resnets[0].register_forward_hook(keep("mid_resnet"), prepend=True),  # before the Temp-Conv hook
        mid.temp_convs[0].register_forward_pre_hook(keep("mid_conv_in")),
        mid.temp_convs[0].register_forward_hook(keep("mid_conv_out")),
        mid.attentions[0].register_forward_pre_hook(keep("mid_attention_in")),
        up.resnets[0].register_forward_hook(keep("up_resnet"), prepend=True),
        up.temp_convs[0].register_forward_pre_hook(keep("up_conv_in")),
        up.temp_convs[0].register_forward_hook(keep("up_conv_out")),
        up.resnets[1].register_forward_pre_hook(keep("up_next_in")),
    ]
    frames = 4
    with torch.no_grad():
        video(torch.randn(1, 4, frames, 8, 8), 100, torch.randn(1, 5, 64))
    for hook in hooks:
        hook.remove()
    for where, after in (("mid", "mid_attention_in"), ("up", "up_next_in")):
        resnet_out = rearrange(seen[f"{where}_resnet"], "(b f) c h w -> b c f h w", f=frames)
        assert torch.equal(seen[f"{where}_conv_in"], resnet_out)
        assert not torch.equal(seen[f"{where}_conv_out"], seen[f"{where}_conv_in"])  # it does something
        conv_out = rearrange(seen[f"{where}_conv_out"], "b c f h w -> (b f) c h w")
        assert torch.equal(seen[after][:, : conv_out.shape[1]], conv_out)


# --------------------------------------------------------------------------------------------- configs and errors
def test_tiny_config_is_small_and_runs_forward():
    video = build("tiny")
    assert sum(p.numel() for p in video.parameters()) < 8_000_000
    sample = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        out = video(sample, 10, torch.randn(1, 7, 64))
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_config_from_vidrd_maps_the_official_3d_config_and_refuses_other_flags():
    official = {**unet_config("tiny"), "_class_name": "UNet3DConditionModel", "add_temp_embed": True,
                "add_temp_conv": True, "add_temp_transformer": False, "prepend_first_frame": False,
                "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
                "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"]}
    arguments = config_from_vidrd(official)
    assert arguments["down_block_types"] == unet_config("tiny")["down_block_types"]
    assert {k: arguments[k] for k in VIDRD_UNET_OPTIONS} == VIDRD_UNET_OPTIONS
    assert not any(k.startswith(("_", "add_temp")) for k in arguments)
    with pytest.raises(ValueError, match="add_temp_transformer"):
        config_from_vidrd({**official, "add_temp_transformer": True})
    with pytest.raises(ValueError, match="temporal_keys"):
        VideoUNet(**{**arguments, "temporal_keys": "animatediff"})
    with pytest.raises(ValueError, match="temporal_conv_layers"):
        VideoUNet(**{**arguments, "temporal_conv_layers": -1})


def test_a_deep_copy_hooks_its_own_temporal_convs():
    """EMA and checkpoint callbacks deep-copy the UNet: the copy's ResNets must run the copy's Temp-Convs, which
    read the copy's frame layout."""
    import copy

    video = build("tiny")
    twin = copy.deepcopy(video)
    for block in [*twin.down_blocks, twin.mid_block, *twin.up_blocks]:
        for resnet, temp_conv in zip(block.resnets, block.temp_convs):
            hooked = [h.__self__ for h in resnet._forward_hooks.values()]
            assert hooked == [temp_conv]
            assert temp_conv.layout is twin.frame_layout
    randomize_temporal(twin)
    sample, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 5, 64)
    with torch.no_grad():
        before = video(sample, 10, text)
        twin(sample, 10, text)
        assert torch.equal(video(sample, 10, text), before)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Paper-size training checkpoints activations: the Temp-Conv hooks run again in the recomputation, so loss
    and gradients (temporal layers included) equal those without checkpointing (dropout off: eval mode)."""
    video = build("tiny", torch.float64)
    randomize_temporal(video)
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(1, 4, 4, 8, 8, generator=generator, dtype=torch.float64)
    text = torch.randn(1, 5, 64, generator=generator, dtype=torch.float64)

    def gradients() -> dict[str, torch.Tensor]:
        video.zero_grad()
        video(sample, 200, text).square().mean().backward()
        return {k: p.grad.clone() for k, p in video.named_parameters()}

    calls = []  # a pre-hook: the recomputation stops (torch's early stop) once its last saved tensor is back
    video.down_blocks[0].temp_convs[0].register_forward_pre_hook(lambda *args: calls.append(1))
    plain = gradients()
    assert len(calls) == 1
    video.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert len(calls) == 3  # forward, then recomputed in backward: the Temp-Conv is inside the checkpoint
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in video.temporal_parameters())
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, atol=1e-12, rtol=0, msg=key)
