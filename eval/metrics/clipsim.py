"""CLIPSIM: text-video similarity with CLIP ViT-B/32, as in the MSR-VTT protocol of text-to-video papers.

Per frame, the cosine similarity between the L2-normalised image embedding of the frame and the L2-normalised
text embedding of the video's prompt; averaged over the frames of a video, then over videos. Raw cosine in
[-1, 1] (papers report ~0.29-0.32 on MSR-VTT); no x100 and no clipping at 0 (unlike torchmetrics' CLIPScore).

The network is open_clip's `ViT-B-32` with OpenAI's weights, from a local file (never downloaded); OpenAI's CLIP
uses QuickGELU, so the model is built with `force_quick_gelu=True` (open_clip's tag `ViT-B-32`/`openai` does the
same). The prompt tokenizer is open_clip's bundled BPE (`get_tokenizer('ViT-B-32')`, offline).

Preprocessing reproduces CLIP's PIL pipeline (resize the shorter side to 224 bicubic with antialiasing, centre
crop 224, scale to [0, 1], normalise with CLIP's mean/std) on batched uint8 frames with torchvision's uint8 kernel,
which follows PIL's integer arithmetic to within 1-2 grey levels. That resize always runs on the CPU in uint8
(on a GPU, torchvision resizes in float, which can differ from PIL by more near sharp edges when upscaling), so a
score does not depend on the device; the network itself runs on the model's device.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from modules.components.checkpoints import load_state_dict_checked

OFFICIAL = ("OpenAI's CLIP ViT-B/32 (open_clip model `ViT-B-32`, pretrained tag `openai`: the OpenAI release "
            "`ViT-B-32.pt` or the open_clip file of the Hugging Face repo `timm/vit_base_patch32_clip_224.openai`)")
# Entries that OpenAI's TorchScript archive carries besides the weights.
_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def _read_clip_state(path: Path) -> dict[str, Tensor]:
    """State dict from .safetensors, a torch pickle (raw or {'state_dict': ...}), or OpenAI's TorchScript archive."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as err:  # OpenAI's ViT-B-32.pt is a TorchScript archive, which weights_only refuses
            if "TorchScript" not in str(err):
                raise
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _JIT_EXTRAS}
    return state


def load_clip(path: str | Path, model_name: str = "ViT-B-32", quick_gelu: bool = True,
              device: str | torch.device = "cpu", **model_kwargs: Any) -> nn.Module:
    """An open_clip CLIP model in eval mode (float32) with weights from a local file.

    `model_name` is an open_clip config name; `model_kwargs` override its fields (tests build tiny models with
    `vision_cfg=...`, `text_cfg=...`, `embed_dim=...`). Keys must match exactly (CheckpointKeyError otherwise).
    """
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weight file not found: {path}. CLIPSIM uses {OFFICIAL}, from a local file.")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # silence open_clip's "initialized randomly": the weights are loaded next
    try:
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu, **model_kwargs)
    finally:
        root.setLevel(level)
    state = _read_clip_state(path)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    load_state_dict_checked(model, {k: v.float() for k, v in state.items()}, path)
    return model.to(device).eval()


def clip_preprocess(frames: Tensor, image_size: int = 224, mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> Tensor:
    """uint8 frames (N, H, W, 3) RGB -> CLIP input (N, 3, S, S) float32 on the CPU, as CLIP's PIL transform."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    x = frames.cpu().permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    x = TF.resize(x, image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)  # shorter side -> S
    x = TF.center_crop(x, [image_size, image_size])
    x = x.float() / 255.0
    return TF.normalize(x, list(mean or OPENAI_DATASET_MEAN), list(std or OPENAI_DATASET_STD))


class CLIPSIM(Metric):
    """Mean over videos of the frame-averaged cosine similarity between CLIP frame and prompt embeddings.

    `model`: an open_clip CLIP module, or the path of a weight file for `load_clip(path, model_name, quick_gelu,
    **model_kwargs)`. `update(videos, prompts)` takes generator-contract uint8 videos (B, T, H, W, 3) and one prompt
    per video; frames go through the network in chunks of `chunk_size`. `compute()` -> float64 scalar tensor.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, model: nn.Module | str | Path, model_name: str = "ViT-B-32", quick_gelu: bool = True,
                 chunk_size: int = 64, model_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        import open_clip

        if isinstance(model, (str, Path)):
            model = load_clip(model, model_name, quick_gelu, **(model_kwargs or {}))
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.image_mean = getattr(model.visual, "image_mean", None)
        self.image_std = getattr(model.visual, "image_std", None)
        self.chunk_size = chunk_size
        self.add_state("sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> "CLIPSIM":
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def video_scores(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """Per-video CLIPSIM (B,) float64: frame cosines averaged over T."""
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"expected uint8 videos (B, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}")
        b, t = videos.shape[:2]
        if len(prompts) != b:
            raise ValueError(f"{b} videos but {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(device), normalize=True)  # (B, D)
        text = text.float().repeat_interleave(t, dim=0)  # (B*T, D), frame order of `frames`
        frames = videos.reshape(b * t, *videos.shape[2:])
        cos = []
        for start in range(0, b * t, self.chunk_size):
            x = clip_preprocess(frames[start:start + self.chunk_size], self.image_size, self.image_mean,
                                self.image_std)
            image = self.model.encode_image(x.to(device), normalize=True).float()  # (n, D)
            cos.append((image * text[start:start + len(x)]).sum(dim=-1))
        return torch.cat(cos).double().reshape(b, t).mean(dim=1)

    def update(self, videos: Tensor, prompts: list[str]) -> None:
        scores = self.video_scores(videos, prompts)
        self.sum += scores.sum().to(self.sum.device)
        self.count += len(scores)

    def compute(self) -> Tensor:
        return self.sum / self.count
