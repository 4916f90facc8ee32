"""Video Inception Score: exp(E_x KL(p(y|x) || p(y))) over C3D class probabilities, as TGAN2 computes it.

Reference: pfnet-research/tgan2 `tgan2/evaluations/inception_score.py` `inception_score`: probabilities in float64,
`splits` consecutive parts `ys[i*n//splits:(i+1)*n//splits]` (no shuffling), `+ eps` on every probability, the
score of each part exp(mean_x sum_y p log(p / mean_x p)), reported as (mean, std with ddof 0) over the parts.
TGAN2's UCF-101 protocol uses splits=1 on 2,048 videos and repeats 10 sampling loops. StyleGAN-V's `isv2048_ucf`
shuffles rows with RandomState(42) and uses 10 splits (about 20% lower here). Both are named presets that call this
formula on subsets of the generated videos: eval/presets/inception_score.py.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from eval.metrics.c3d import C3D, videos_to_c3d_input


def inception_score(probs: Tensor, splits: int = 1, eps: float = 1e-20) -> tuple[float, float]:
    """(mean, std) of the Inception Score of class probabilities `probs` (N, num_classes), TGAN2's formula."""
    ys = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    n = ys.shape[0]
    if ys.ndim != 2 or n < splits or splits < 1:
        raise ValueError(f"need (N, classes) probabilities with N >= splits >= 1; "
                         f"got {tuple(ys.shape)}, splits={splits}")
    scores = []
    for i in range(splits):
        part = ys[i * n // splits:(i + 1) * n // splits] + eps  # to avoid log(0)
        kl = part * (part.log() - part.mean(dim=0, keepdim=True).log())
        scores.append(kl.sum(dim=1).mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(correction=0).item()


class VideoInceptionScore(Metric):
    """Accumulates C3D class probabilities; `compute()` -> (IS mean, IS std) as float64 tensors.

    With a `classifier` (a `C3D`) and its `mean_crop_bgr` (from `load_c3d`), `update(videos)` takes generator-contract
    uint8 videos (B, T, H, W, 3), preprocesses them as TGAN2 does (`videos_to_c3d_input`) and runs the net under
    no_grad in chunks of `chunk_size` on the classifier's device; probabilities are kept on the CPU in float64.
    Without one, feed precomputed probabilities with `update_probs(probs)`.
    Across processes the probabilities are concatenated (in rank order), then split as in TGAN2.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, classifier: C3D | None = None, mean_crop_bgr: Tensor | None = None, splits: int = 1,
                 eps: float = 1e-20, chunk_size: int = 8, **kwargs):
        super().__init__(**kwargs)
        if classifier is not None and mean_crop_bgr is None:
            raise ValueError("a classifier needs its mean_crop_bgr (load_c3d returns both)")
        self.splits, self.eps, self.chunk_size = splits, eps, chunk_size
        self.classifier = classifier.eval() if classifier is not None else None
        self.register_buffer("mean_crop_bgr", None if mean_crop_bgr is None else mean_crop_bgr.float(),
                             persistent=False)
        self.add_state("probs", default=[], dist_reduce_fx="cat")

    def train(self, mode: bool = True) -> "VideoInceptionScore":
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()  # the scoring net never runs in training mode (dropout)
        return self

    def update(self, videos: Tensor | None = None, *, probs: Tensor | None = None) -> None:
        """Score generator-contract videos, uint8 (B, T, H, W, 3) RGB; or add precomputed `probs` (N, classes)."""
        if (videos is None) == (probs is None):
            raise ValueError("pass either videos or probs=")
        if probs is not None:
            self.probs.append(probs.detach().to("cpu", torch.float64))
            return
        if self.classifier is None:
            raise RuntimeError("VideoInceptionScore was built without a classifier; use update_probs(probs)")
        device = next(self.classifier.parameters()).device
        with torch.no_grad():
            for chunk in videos.split(self.chunk_size):
                x = videos_to_c3d_input(chunk.to(device), self.mean_crop_bgr.to(device))
                self.probs.append(self.classifier.probs(x).to("cpu", torch.float64))

    def update_probs(self, probs: Tensor) -> None:
        """Add precomputed class probabilities (N, num_classes) (goes through `update`, so caching stays right)."""
        self.update(probs=probs)

    def compute(self) -> tuple[Tensor, Tensor]:
        mean, std = inception_score(dim_zero_cat(self.probs), self.splits, self.eps)
        return torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
