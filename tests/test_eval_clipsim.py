"""CLIPSIM against a direct per-frame computation with open_clip's own preprocessing and encoders.

A small random-weight open_clip CLIP (the ViT-B-32 family with 2-layer towers; `load_clip` builds any open_clip
config through `model_kwargs`) is written to a file and loaded back, so nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from eval.metrics.clipsim import CLIPSIM, clip_preprocess, load_clip
from modules.components.checkpoints import CheckpointKeyError

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(embed_dim=32,
            vision_cfg=dict(image_size=224, layers=2, width=64, patch_size=32, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
PROMPTS = ["a red ball bouncing on grass", "a person playing the guitar", "waves on a beach at sunset"]
# Preprocessing differs from CLIP's PIL pipeline by at most 2 grey levels on a few pixels (torchvision's uint8
# kernel vs PIL's fixed point; measured 0.030 = 2/255/0.261 here); allowed: 3 levels in normalised units. The
# similarity moves far less (measured 4e-6).
PRE_ATOL = 3 / 255 / 0.26
SIM_ATOL = 1e-4


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, **TINY).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model


@pytest.fixture(scope="module")
def videos():
    """Smooth random uint8 videos (B=3, T=4, 40x56): upscaled noise, as generated frames are smooth."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(3 * 4, 3, 5, 7, generator=g) * 255
    frames = F.interpolate(low, size=(40, 56), mode="bilinear", align_corners=False).round().clamp(0, 255)
    return frames.to(torch.uint8).permute(0, 2, 3, 1).reshape(3, 4, 40, 56, 3)


def _reference(model, videos, prompts) -> tuple[float, torch.Tensor]:
    """Per-frame CLIP cosine with open_clip's PIL preprocessing, averaged over frames, then videos."""
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    per_video, pixels = [], []
    with torch.no_grad():
        for video, prompt in zip(videos, prompts):
            x = torch.stack([preprocess(Image.fromarray(frame.numpy())) for frame in video])
            pixels.append(x)
            image = model.encode_image(x, normalize=True)
            text = model.encode_text(tokenizer([prompt]), normalize=True)
            per_video.append((image @ text.T).squeeze(1).mean().item())
    return float(np.mean(per_video)), torch.cat(pixels)


def test_load_clip_round_trip(clip_file):
    path, model = clip_file
    loaded = load_clip(path, **TINY)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_preprocess_matches_open_clip(clip_file, videos):
    _, model = clip_file
    _, pixels = _reference(model, videos[:1], PROMPTS[:1])
    ours = clip_preprocess(videos[0])
    assert ours.shape == (4, 3, 224, 224)
    torch.testing.assert_close(ours, pixels, atol=PRE_ATOL, rtol=0)
    # non-square and downscaling inputs: shorter side to 224, centre crop, as torchvision/PIL do
    tall = torch.randint(0, 256, (2, 300, 260, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    preprocess = open_clip.image_transform(224, is_train=False)
    ref = torch.stack([preprocess(Image.fromarray(frame.numpy())) for frame in tall])
    torch.testing.assert_close(clip_preprocess(tall), ref, atol=PRE_ATOL, rtol=0)


def test_clipsim_matches_direct_computation(clip_file, videos):
    path, model = clip_file
    expected, _ = _reference(model, videos, PROMPTS)
    metric = CLIPSIM(path, model_kwargs=TINY, chunk_size=5)  # chunks straddle videos (B*T = 12)
    metric.update(videos[:2], PROMPTS[:2])
    metric.update(videos[2:], PROMPTS[2:])
    score = metric.compute()
    assert score.dtype == torch.float64 and -1.0 <= score.item() <= 1.0
    assert abs(score.item() - expected) <= SIM_ATOL
    # the same frames through our preprocessing give the direct computation to float32 precision
    with torch.no_grad():
        image = model.encode_image(clip_preprocess(videos.reshape(-1, 40, 56, 3)), normalize=True)
        text = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(PROMPTS), normalize=True)
    direct = (image.reshape(3, 4, -1) * text[:, None]).sum(-1).mean(1)
    torch.testing.assert_close(metric.video_scores(videos, PROMPTS), direct.double(), atol=1e-6, rtol=0)
    assert metric.count.item() == 3
    metric.reset()
    metric.update(videos, PROMPTS)
    assert abs(metric.compute().item() - score.item()) <= 1e-6


class _SameEmbedding(torch.nn.Module):
    """Image and text towers that both return one fixed unit vector (a CLIP stand-in for the cosine check)."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.image_size = (224, 224)
        self.vector = torch.nn.Parameter(F.normalize(torch.ones(1, 32), dim=-1))

    def encode_image(self, x, normalize=False):
        return self.vector.expand(len(x), -1)

    def encode_text(self, tokens, normalize=False):
        return self.vector.expand(len(tokens), -1)


def test_clipsim_of_identical_embeddings_is_one():
    metric = CLIPSIM(_SameEmbedding())
    metric.update(torch.zeros(2, 3, 8, 8, 3, dtype=torch.uint8), ["a", "b"])
    torch.testing.assert_close(metric.compute(), torch.tensor(1.0, dtype=torch.float64))


def test_other_checkpoint_formats(clip_file, tmp_path):
    path, model = clip_file
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    loaded = load_clip(wrapped, **TINY)
    assert torch.equal(loaded.visual.proj, model.visual.proj)


def test_errors(clip_file, tmp_path, videos):
    path, model = clip_file
    with pytest.raises(FileNotFoundError, match=r"(?s)nope\.safetensors.*ViT-B/32.*openai"):
        load_clip(tmp_path / "nope.safetensors")
    state = {k: v for k, v in model.state_dict().items() if k != "text_projection"}
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointKeyError, match=r"(?s)missing keys.*text_projection.*unexpected keys.*extra\.weight"):
        load_clip(tmp_path / "bad.safetensors", **TINY)
    metric = CLIPSIM(model)
    with pytest.raises(ValueError, match="prompts"):
        metric.update(videos, PROMPTS[:2])
    with pytest.raises(ValueError, match="uint8"):
        metric.update(videos.float(), PROMPTS)
