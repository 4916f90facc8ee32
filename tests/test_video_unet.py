"""VideoUNet: an SD UNet inflated with LaVie's temporal attention, its ResNet GroupNorms pooled over the frames.

With zero-initialised temporal layers it is the 2D UNet per frame on a video of identical frames (on any video when
its GroupNorms are per frame); the official LaVie outputs are the reference for the rest
(tests/test_lavie_official_parity.py). Image frames of joint training skip temporal attention and are normalised on
their own; at paper size the state dict is exactly the official checkpoint's (`<fixtures root>/lavie/keys_base.json`).
"""
from __future__ import annotations

from pathlib import Path

import json
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from hydra.utils import instantiate
from omegaconf import OmegaConf

from modules.components.checkpoints import CheckpointKeyError
from modules.components.video_group_norm import VideoGroupNorm
from modules.components.video_unet import SpatioTemporalBlock, VideoUNet, coordinate_grid
from tests.sd_layout import TINY_UNET, randomize_

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# the tiny SD folder's UNet (SD block types, 2 heads of 16/32 channels) with a narrower text context
SMALL_UNET = {**TINY_UNET, "cross_attention_dim": 16}
B, F, C, H, W, L, D = 2, 4, 4, 8, 8, 5, 16
ATOL, RTOL = 1e-5, 1e-4




@pytest.fixture(scope="module")
def unet2d() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return randomize_(UNet2DConditionModel(**SMALL_UNET), seed=1).eval()


def inflate(unet2d: UNet2DConditionModel, **options) -> VideoUNet:
    torch.manual_seed(2)
    video = VideoUNet(**SMALL_UNET, **options)
    video.load_image_unet_weights(unet2d.state_dict())
    return video.eval()


def inputs(seed: int = 3, frames: int = F, prompts: int | None = None):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(B, C, frames, H, W, generator=g)
    timesteps = torch.tensor([17, 803])  # a different timestep per sample
    context_shape = (B, L, D) if prompts is None else (B, prompts, L, D)
    return sample, timesteps, torch.randn(context_shape, generator=g)


@torch.no_grad()
def per_frame(unet2d: UNet2DConditionModel, sample, timesteps, context) -> torch.Tensor:
    """The 2D UNet on each frame separately: (B, C, F, H, W) -> (B, C, F, H, W)."""
    frames = [unet2d(sample[:, :, f], timesteps, context).sample for f in range(sample.shape[2])]
    return torch.stack(frames, dim=2)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def still(sample: torch.Tensor) -> torch.Tensor:
    """The first frame repeated over the frame axis: pooled statistics over identical frames are that frame's."""
    return sample[:, :, :1].expand_as(sample).contiguous()


def test_resnet_and_output_group_norms_pool_over_frames(unet2d):
    """LaVie's ResNet norms and conv_norm_out see the whole video; the transformers' input norm stays per frame.
    Same parameters and keys either way."""
    video, per_frame_norms = inflate(unet2d), inflate(unet2d, group_norm_over_frames=False)
    pooled = {name for name, m in video.named_modules() if isinstance(m, VideoGroupNorm)}
    assert pooled and all(name.endswith((".norm1", ".norm2")) or name == "conv_norm_out" for name in pooled)
    assert len(pooled) == 2 * sum(isinstance(m, ResnetBlock2D) for m in video.modules()) + 1
    transformer_norms = [m for name, m in video.named_modules() if re.search(r"attentions\.\d+\.norm$", name)]
    assert transformer_norms and all(type(m) is torch.nn.GroupNorm for m in transformer_norms)
    assert not any(isinstance(m, VideoGroupNorm) for m in per_frame_norms.modules())
    assert video.state_dict().keys() == per_frame_norms.state_dict().keys()
    assert all(torch.equal(v, per_frame_norms.state_dict()[k]) for k, v in video.state_dict().items())


@torch.no_grad()
def test_zero_initialised_temporal_layers_give_the_2d_unet_on_a_still_video(unet2d):
    """The 2D UNet on each frame is what the video UNet computes at initialisation only where pooled statistics are
    per-frame ones: a video of identical frames. On a moving video the frames share their GroupNorm statistics."""
    video = inflate(unet2d)
    blocks = list(video.temporal_blocks())
    assert len(blocks) == 7  # 2 down + 1 mid + 2x2 up transformer blocks at layers_per_block=1
    for block in blocks:
        assert block.attn_temp.to_out[0].weight.abs().max() == 0 and block.attn_temp.to_out[0].bias.abs().max() == 0
        assert block.attn_temp.to_q.weight.abs().max() > 0  # the rest of the temporal layer is random, not zero
    # every 2D weight is the image UNet's
    reference = unet2d.state_dict()
    for name, tensor in video.state_dict().items():
        if not VideoUNet.is_temporal_key(name):
            assert torch.equal(tensor, reference[name]), name

    sample, timesteps, context = inputs()
    frozen = still(sample)
    expected = per_frame(unet2d, frozen, timesteps, context)
    out = video(frozen, timesteps, context)
    assert out.shape == (B, C, F, H, W)
    assert expected.abs().mean() > 0.1  # a non-trivial output
    assert_close(out, expected)

    # a moving video: pooled statistics differ from each frame's, and every frame's output depends on every frame
    out = video(sample, timesteps, context)
    assert (out - per_frame(unet2d, sample, timesteps, context)).abs().max() > 1e-2
    changed = sample.clone()
    changed[:, :, 0] += 1.0
    assert (video(changed, timesteps, context)[:, :, 1:] - out[:, :, 1:]).abs().amax() > 1e-3


@torch.no_grad()
def test_per_frame_group_norms_give_the_2d_unet_on_every_frame(unet2d):
    """`group_norm_over_frames=False` (the 2D UNet per frame, what a backbone with per-frame ResNets chooses): with
    zero temporal output projections the frames of any video stay independent."""
    video = inflate(unet2d, group_norm_over_frames=False)
    sample, timesteps, context = inputs()
    out = video(sample, timesteps, context)
    assert_close(out, per_frame(unet2d, sample, timesteps, context))
    changed = sample.clone()
    changed[:, :, 0] += 1.0
    assert_close(video(changed, timesteps, context)[:, :, 1:], out[:, :, 1:])


@torch.no_grad()
def test_random_temporal_layers_mix_frames(unet2d):
    video = inflate(unet2d)
    randomize_(torch.nn.ModuleList(b.attn_temp for b in video.temporal_blocks()), seed=4)
    randomize_(torch.nn.ModuleList(b.norm_temp for b in video.temporal_blocks()), seed=5)
    sample, timesteps, context = inputs()
    out = video(sample, timesteps, context)
    expected = per_frame(unet2d, sample, timesteps, context)
    assert (out - expected).abs().max() > 1e-2  # the equality test above can fail

    changed = sample.clone()
    changed[:, :, 0] += 1.0
    out_changed = video(changed, timesteps, context)
    assert (out_changed[:, :, F - 1] - out[:, :, F - 1]).abs().max() > 1e-3  # frame 0 reaches frame 3
    # samples of a batch stay independent
    changed_sample1 = sample.clone()
    changed_sample1[1] += 1.0
    assert_close(video(changed_sample1, timesteps, context)[0], out[0])


@torch.no_grad()
def test_image_frames_skip_temporal_attention(unet2d):
    video = inflate(unet2d)
    randomize_(torch.nn.ModuleList(b.attn_temp for b in video.temporal_blocks()), seed=6)
    images = 2
    sample, timesteps, context = inputs(seed=7, frames=F + images, prompts=1 + images)  # context (B, 1+M, L, D)
    out = video(sample, timesteps, context, num_image_frames=images)
    assert out.shape == (B, C, F + images, H, W)

    # each image frame is the 2D UNet on that image with its own prompt
    for m in range(images):
        expected = unet2d(sample[:, :, F + m], timesteps, context[:, 1 + m]).sample
        assert_close(out[:, :, F + m], expected)
    # the video frames are the video-only forward with the video prompt, and mix (temporal weights are random)
    video_only = video(sample[:, :, :F], timesteps, context[:, 0])
    assert_close(out[:, :, :F], video_only)
    assert (video_only - per_frame(unet2d, sample[:, :, :F], timesteps, context[:, 0])).abs().max() > 1e-2

    # changing an image changes its own output only
    changed = sample.clone()
    changed[:, :, F] += 1.0
    out_changed = video(changed, timesteps, context, num_image_frames=images)
    assert_close(out_changed[:, :, :F], out[:, :, :F])
    assert_close(out_changed[:, :, F + 1], out[:, :, F + 1])
    assert (out_changed[:, :, F] - out[:, :, F]).abs().max() > 1e-3
    # an image's output does not depend on the video beside it: the images are normalised on their own, not pooled
    # with the video's frames (whose outputs do change)
    other_video = sample.clone()
    other_video[:, :, :F] = 2.0 * other_video[:, :, :F] + 0.5
    out_other = video(other_video, timesteps, context, num_image_frames=images)
    assert (out_other[:, :, :F] - out[:, :, :F]).abs().max() > 1e-2
    assert_close(out_other[:, :, F:], out[:, :, F:])

    with pytest.raises(ValueError, match="image prompts"):
        video(sample, timesteps, context[:, :2], num_image_frames=images)


def test_loading_a_2d_unet_is_strict_except_for_temporal_keys(unet2d):
    video = VideoUNet(**SMALL_UNET)
    state = dict(unet2d.state_dict())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    state["renamed." + name] = state.pop(name)
    with pytest.raises(CheckpointKeyError) as info:
        video.load_image_unet_weights(state)
    assert name in str(info.value) and "renamed." + name in str(info.value)
    assert "attn_temp" not in str(info.value)  # temporal keys are allowed to be absent


# ---------------------------------------------------------------------------------------------- paper size
# transformer blocks per width in SD 1.4: down 2+2+2 (320, 640, 1280), mid 1 (1280), up 3+3+3 (1280, 640, 320)
SD14_BLOCK_WIDTHS = [320] * 5 + [640] * 5 + [1280] * 6
HEADS, BUCKETS = 8, 32


def temporal_params(channels: int) -> int:
    """to_q, to_k, to_v (no bias), to_out (weight + bias), norm_temp (weight + bias), relative-position table."""
    return 4 * channels * channels + channels + 2 * channels + BUCKETS * HEADS


@pytest.fixture(scope="module")
def official_base_keys(fixtures_dir: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the state dict the official sampling script loads strictly from lavie_base.pt (README)."""
    path = fixtures_dir / "lavie" / "keys_base.json"
    if not path.is_file():
        pytest.fail(f"official key layout not found: {path}")
    return {key: tuple(shape) for key, shape in json.loads(path.read_text()).items()}


@pytest.fixture(scope="module")
def paper_unets():
    cfg = OmegaConf.load(CONFIGS / "model" / "lavie_base.yaml").unet
    with torch.device("meta"):
        video = instantiate(cfg)
        plain = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_")}
        image = UNet2DConditionModel(**plain)
    return video, image


def test_paper_size_state_dict_is_the_official_checkpoints(paper_unets, official_base_keys):
    """Every key and shape of the official base UNet, and nothing else: lavie_base.pt loads strictly."""
    video, _ = paper_unets
    state = {k: tuple(v.shape) for k, v in video.state_dict().items()}
    assert state.keys() - official_base_keys.keys() == set()
    assert official_base_keys.keys() - state.keys() == set()
    assert state == official_base_keys


def test_paper_size_parameters(paper_unets, official_base_keys):
    """SD 1.4's parameters plus LaVie's temporal layers; the state dict repeats the one shared rotary `freqs` tensor
    under every block (official layout), so its element count is the unique parameters plus those repeats."""
    video, image = paper_unets
    assert type(video) is VideoUNet
    params = dict(video.named_parameters())
    temporal = sum(p.numel() for k, p in params.items() if VideoUNet.is_temporal_key(k))
    spatial = sum(p.numel() for k, p in params.items() if not VideoUNet.is_temporal_key(k))
    assert spatial == sum(p.numel() for p in image.parameters())
    assert temporal == sum(temporal_params(c) for c in SD14_BLOCK_WIDTHS)

    freqs = {k: s for k, s in official_base_keys.items() if k.endswith("rotary_emb.freqs")}
    assert len(freqs) == len(SD14_BLOCK_WIDTHS) == len(list(video.temporal_blocks()))
    official_elements = sum(torch.Size(s).numel() for s in official_base_keys.values())
    assert spatial + temporal + sum(torch.Size(s).numel() for s in freqs.values()) == official_elements


def test_paper_size_state_dict_layout(paper_unets):
    video, image = paper_unets
    state = {k: tuple(v.shape) for k, v in video.state_dict().items()}
    temporal = {k: s for k, s in state.items() if VideoUNet.is_temporal_key(k)}
    spatial = {k: s for k, s in state.items() if not VideoUNet.is_temporal_key(k)}
    assert spatial == {k: tuple(v.shape) for k, v in image.state_dict().items()}  # names and shapes
    assert len(list(video.temporal_blocks())) == len(SD14_BLOCK_WIDTHS)

    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert temporal[f"{block}.attn_temp.to_q.weight"] == (320, 320)
    assert temporal[f"{block}.attn_temp.time_rel_pos_bias.relative_attention_bias.weight"] == (BUCKETS, HEADS)
    for proj in ("to_q", "to_k", "to_v"):
        assert not any(k.endswith(f"attn_temp.{proj}.bias") for k in state)
    # the 9 keys per block, in every block
    suffixes = {k.split(".transformer_blocks.0.", 1)[1] for k in temporal}
    assert suffixes == {
        "attn_temp.to_q.weight", "attn_temp.to_k.weight", "attn_temp.to_v.weight", "attn_temp.to_out.0.weight",
        "attn_temp.to_out.0.bias", "attn_temp.rotary_emb.freqs",
        "attn_temp.time_rel_pos_bias.relative_attention_bias.weight", "norm_temp.weight", "norm_temp.bias",
    }
    assert len(temporal) == len(suffixes) * len(SD14_BLOCK_WIDTHS)


def test_from_config_keeps_the_video_class(unet2d):
    video = VideoUNet(**SMALL_UNET)
    rebuilt = VideoUNet.from_config(video.config)
    assert type(rebuilt) is VideoUNet
    assert len(list(rebuilt.temporal_blocks())) == len(list(video.temporal_blocks())) == 7
    assert all(isinstance(b, SpatioTemporalBlock) for b in rebuilt.temporal_blocks())
    assert rebuilt.state_dict().keys() == video.state_dict().keys()
    assert dict(rebuilt.config) == dict(video.config)
    # and from the 2D UNet's config: the image config inflates
    from_2d = VideoUNet.from_config(unet2d.config)
    assert type(from_2d) is VideoUNet and len(list(from_2d.temporal_blocks())) == 7


# ------------------------------------------------------------------ position options of the CPU-sized recipe
def _randomized_video_unet(**options) -> VideoUNet:
    torch.manual_seed(4)
    unet = VideoUNet(**{**SMALL_UNET, **options})
    return randomize_(unet, seed=5).eval()  # temporal output projections non-zero, so temporal attention acts


@torch.no_grad()
def test_position_options_off_keep_official_keys_and_outputs():
    """Both options are off by default, add no weights, and a model with them off is the plain VideoUNet."""
    plain, off = _randomized_video_unet(), _randomized_video_unet(frame_positions=False, coordinate_channels=False)
    assert plain.state_dict().keys() == _randomized_video_unet(frame_positions=True).state_dict().keys()
    sample, timesteps, context = inputs()
    assert_close(off(sample, timesteps, context), plain(sample, timesteps, context))


@torch.no_grad()
def test_frame_positions_tell_identical_frames_apart():
    """With relative positions only, a clip of identical frames gives identical frames out (no frame can tell where
    it is); the sinusoidal frame encoding breaks that, which is what lets a model place a moving object."""
    sample, timesteps, context = inputs()
    still = sample[:, :, :1].expand(-1, -1, F, -1, -1).contiguous()
    relative = _randomized_video_unet()(still, timesteps, context)
    assert_close(relative[:, :, 1:], relative[:, :, :1].expand_as(relative[:, :, 1:]))
    absolute = _randomized_video_unet(frame_positions=True)(still, timesteps, context)
    assert (absolute[:, :, 1:] - absolute[:, :, :1]).abs().amax() > 1e-3


@torch.no_grad()
def test_coordinate_channels_are_x_y_and_frame_time_appended_to_the_input():
    sample, timesteps, context = inputs(frames=F + 2)  # F video frames, then 2 image frames
    grid = coordinate_grid(sample, video_frames=F)
    assert grid.shape == (B, 3, F + 2, H, W)
    assert_close(grid[0, 0, 0, 0], torch.linspace(-1, 1, W))  # x across the columns
    assert_close(grid[0, 1, 0, :, 0], torch.linspace(-1, 1, H))  # y down the rows
    assert_close(grid[0, 2, :, 0, 0], torch.cat([torch.linspace(-1, 1, F), torch.zeros(2)]))  # images are stills
    with_coordinates = _randomized_video_unet(coordinate_channels=True, in_channels=C + 3)
    plain = VideoUNet(**{**SMALL_UNET, "in_channels": C + 3}).eval()
    plain.load_state_dict(with_coordinates.state_dict())
    assert_close(with_coordinates(sample, timesteps, context, num_image_frames=2),
                 plain(torch.cat([sample, grid], dim=1), timesteps, context, num_image_frames=2))


@torch.no_grad()
def test_frame_embedding_starts_as_the_plain_unet():
    """The frame embedding's output layer is zero at initialisation: loaded with a plain VideoUNet's weights, only
    the embedding's own keys are missing and the outputs are the plain model's, image frames included."""
    plain = _randomized_video_unet()
    torch.manual_seed(6)
    embedded = VideoUNet(**SMALL_UNET, frame_embedding=True).eval()
    missing, unexpected = embedded.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("class_embedding.") for key in missing)
    sample, timesteps, context = inputs(frames=F + 2)
    assert_close(embedded(sample, timesteps, context, num_image_frames=2),
                 plain(sample, timesteps, context, num_image_frames=2))


@torch.no_grad()
def test_frame_embedding_tells_video_frames_apart_and_leaves_images_alike():
    """Trained (here: random) frame embeddings give each video frame of a still clip its own output; appended image
    frames all get the same index, so identical images stay identical."""
    sample, timesteps, context = inputs(frames=F + 2)
    still = sample[:, :, :1].expand(-1, -1, F + 2, -1, -1).contiguous()
    out = _randomized_video_unet(frame_embedding=True)(still, timesteps, context, num_image_frames=2)
    video, images = out[:, :, :F], out[:, :, F:]
    assert min((video[:, :, i] - video[:, :, j]).abs().amax() for i in range(F) for j in range(i)) > 1e-3
    assert_close(images[:, :, 1], images[:, :, 0])
