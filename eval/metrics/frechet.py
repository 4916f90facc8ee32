"""Frechet distance between Gaussian fits of two feature sets, and FVD as a torchmetrics Metric.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^1/2 S2 S1^1/2)^1/2 )

tr((S1 S2)^1/2) is computed as tr((S1^1/2 S2 S1^1/2)^1/2): the two matrices are similar, and the second is
symmetric positive semi-definite, so two symmetric eigendecompositions (float64) replace scipy's general
`sqrtm` and never produce complex parts. Covariances are unbiased (/(N-1)), as in TF-GAN (google-research FVD),
TATS and torchmetrics; StyleGAN-V and cd-fvd use the biased /N, which changes FVD by ~0.1% at N ~ 500, d = 400.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torchmetrics import Metric

from eval.metrics.i3d import MIN_FRAMES, InceptionI3d, i3d_input


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu", torch.float64)


def _sqrtm_psd(sigma: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix; eigenvalues below 0 (rounding) are clamped to 0."""
    vals, vecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


@contextlib.contextmanager
def _one_thread():
    """LAPACK's eigh on a 400x400 matrix gains nothing from threads, and on a busy CPU its threads spin: measured
    0.08 s on one thread vs 3-5 s on two while other processes ran (benchmarks/eval_throughput.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64 (tensors or arrays, (D,), (D, D))."""
    with _one_thread():
        return _frechet_distance(*map(_f64, (mu1, sigma1, mu2, sigma2)))


def _frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    if mu1.shape != mu2.shape or mu1.ndim != 1 or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"expected means (D,) and covariances (D, D), got {tuple(mu1.shape)}, {tuple(sigma1.shape)}, "
                         f"{tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    root1 = _sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1  # (D, D), symmetric PSD, similar to sigma1 @ sigma2
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def mean_and_covariance(count, total, outer) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (outer - n mu mu^T) / (n - 1) from raw float64 moments."""
    n = float(count)
    mu = total / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)


class FrechetDistance(Metric):
    """Frechet distance between features of real and generated samples, accumulated as float64 raw moments.

    States (count, sum (D,), sum of outer products (D, D) per side) are summed across processes, so the result
    equals a single-process run over all samples. `real_stats()` / `load_real_stats(...)` save and restore the
    real side, so real-data statistics are computed once and cached on disk. Loaded statistics are kept apart
    from the synced states (every process loads the same file; summing them across processes would count them
    once per process); real features passed to `update` afterwards are added to them.
    With `reset_real_features=False`, `reset()` keeps the real side (accumulated or loaded).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_features: int, reset_real_features: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.num_features, self.reset_real_features = num_features, reset_real_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(num_features, num_features, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self._loaded_real: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def update(self, features: torch.Tensor, real: bool) -> None:
        """Add a batch of features (N, num_features) to the real or the generated side."""
        self._accumulate(features, real)

    def forward(self, *args, **kwargs) -> None:
        """Same as `update`: a distance between distributions has no per-batch value."""
        self.update(*args, **kwargs)

    def _accumulate(self, features: torch.Tensor, real: bool) -> None:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be (N, {self.num_features}), got {tuple(features.shape)}")
        x = features.detach().to(self.real_sum.device, torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or Inf")
        side = "real" if real else "fake"
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + x.shape[0])
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + x.sum(dim=0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + x.T @ x)

    def _real_totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        totals = (self.real_count, self.real_sum, self.real_outer)
        if self._loaded_real is not None:
            totals = tuple(t + c.to(t.device) for t, c in zip(totals, self._loaded_real))
        return totals

    def compute(self) -> torch.Tensor:
        """The Frechet distance (unbiased covariances), a float64 scalar tensor."""
        real = self._real_totals()
        fake = (self.fake_count, self.fake_sum, self.fake_outer)
        for name, (count, _, _) in (("real", real), ("generated", fake)):
            if count < 2:
                raise ValueError(f"Frechet distance needs at least 2 {name} samples, got {int(count)}")
        mu1, sigma1 = mean_and_covariance(*(t.cpu() for t in real))
        mu2, sigma2 = mean_and_covariance(*(t.cpu() for t in fake))
        return torch.tensor(frechet_distance(mu1, sigma1, mu2, sigma2), dtype=torch.float64)

    def real_stats(self) -> dict[str, torch.Tensor]:
        """The real side's raw moments over all processes, float64 on the CPU: {"count", "sum", "outer"}."""
        if self._is_synced:
            totals = self._real_totals()
        else:
            with self.sync_context(should_unsync=True):
                totals = self._real_totals()
        return {k: v.detach().cpu().clone() for k, v in zip(("count", "sum", "outer"), totals)}

    def load_real_stats(self, count, sum, outer) -> None:  # noqa: A002 (the names `real_stats()` returns)
        """Use cached real statistics (as returned by `real_stats()`) in place of any real features so far."""
        count, total, outer = _f64(count).reshape(()), _f64(sum), _f64(outer)
        d = self.num_features
        if total.shape != (d,) or outer.shape != (d, d):
            raise ValueError(f"real stats must be sum ({d},) and outer ({d}, {d}), got {tuple(total.shape)} "
                             f"and {tuple(outer.shape)}")
        for name in ("real_count", "real_sum", "real_outer"):
            setattr(self, name, torch.zeros_like(getattr(self, name)))
        self._loaded_real = (count, total, outer)
        self._computed = None

    def reset(self) -> None:
        if self.reset_real_features:
            self._loaded_real = None
            super().reset()
            return
        kept = {name: getattr(self, name).clone() for name in ("real_count", "real_sum", "real_outer")}
        super().reset()
        for name, value in kept.items():
            setattr(self, name, value)


class FrechetVideoDistance(FrechetDistance):
    """FVD: Frechet distance between I3D embeddings (time-averaged Kinetics-400 logits) of uint8 videos.

    `update(videos, real)` takes generator output uint8 (B, T, H, W, 3); videos are fed to the extractor's
    device in chunks of `batch_size` (all at once if None) and only float64 features stay behind (on this
    metric's device). The extractor stays in eval mode, and is not saved in this metric's state dict.
    """

    def __init__(self, extractor: InceptionI3d, size: int = 224, crop: str = "center", batch_size: int | None = None,
                 min_frames: int = MIN_FRAMES, reset_real_features: bool = True, **kwargs):
        super().__init__(extractor.num_classes, reset_real_features=reset_real_features, **kwargs)
        self.extractor = extractor.eval().requires_grad_(False)
        self.size, self.crop, self.batch_size, self.min_frames = size, crop, batch_size, min_frames

    def train(self, mode: bool = True) -> FrechetVideoDistance:
        super().train(mode)
        self.extractor.eval()  # BatchNorm must keep its running statistics
        return self

    @torch.no_grad()
    def embed(self, videos: torch.Tensor) -> torch.Tensor:
        """I3D embeddings (B, num_classes) of uint8 videos (B, T, H, W, 3), float64 on this metric's device."""
        if not isinstance(videos, torch.Tensor):
            raise ValueError(f"videos must be a uint8 torch.Tensor (B, T, H, W, 3), got {type(videos).__name__}")
        device = next(self.extractor.parameters()).device
        step = self.batch_size or max(len(videos), 1)
        out = []
        for chunk in videos.split(step):
            x = i3d_input(chunk.to(device), self.size, self.crop, self.min_frames)
            out.append(self.extractor.logits(x).to(self.real_sum.device, torch.float64))
        return torch.cat(out)

    def update(self, videos: torch.Tensor, real: bool) -> None:
        """Add uint8 videos (B, T, H, W, 3) to the real or the generated side."""
        self._accumulate(self.embed(videos), real)

