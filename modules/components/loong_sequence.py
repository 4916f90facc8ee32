"""Loong's unified vocabulary, its token sequence and its training loss (Wang et al. 2024, sections 3.1, 3.2, 4.1).

Vocabulary (`LoongVocab`): text ids [0, T), video ids [T, T + K), then 10 special tokens; the paper's is
32,000 + 8,192 + 10 = 40,202. Text ids are the text tokenizer's own (`text_tokenizer.py`); video id = T + code of the
video tokenizer's codebook.

Sequence (`build_sequences`), one row per sample, every row the same length:

    <pad> ... <pad> <sot> t_1 ... t_n <eot> <soi> v_1 ... v_N <eoi>
    '-- budget-n --'                        ^ video_start = text_budget + 3 for every row

- The text is left-padded to `text_budget` tokens, so every video starts at the same position. Batched sampling
  then steps all rows together: one position index for the batch, a static KV cache [B, L], a rectangular prompt
  tensor, no per-row offsets. The pads go before `<sot>`, not between `<eot>` and `<soi>`, so a caption ends right
  before its video as in an unpadded sequence: `<eot> <soi>` and every video token sit at fixed positions, and the
  relative (RoPE) distance from a video token to the end of its caption is the same for every caption.
- The pads are attended, not masked out of attention. They are a fixed function of the caption length, the same in
  training and sampling, so attending to them is no train/test mismatch; no mask keeps plain causal attention
  (`is_causal=True`, the flash kernels) and avoids rows whose keys are all masked (a leading pad would have nothing
  to attend to). The cost is `text_budget - n` spare positions per row, small beside the 4,352 video tokens of a
  65-frame clip. A model that wants to mask them can: `tokens != vocab.pad`.
- The loss covers the video tokens and `<eoi>` only (Eq. 1): text, pads and the markers before the video are
  inputs, never targets (`loss_mask`).
- Classifier-free guidance: a dropped caption (`drop_text`) is the empty caption, `<pad>*budget <sot> <eot> <soi>`,
  padded the same way; `build_prefix([[]] * B, ...)` is what sampling feeds the unconditional branch, so the
  unconditional sequence of sampling is exactly the one training saw.

Loss re-weighting (Eq. 2): the tokens of the first 17 frames, the first 5 latent frames of the causal tokenizer
(1 + 4k frames -> 1 + k latent frames), weigh 1 + lambda, the rest 1 (`frame_weights`). Eq. 2 is a sum; we divide
it by the sum of the weights of the batch's target tokens (`masked_mean`), see there for why.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: the 10 special tokens, in id order after the video ids (section 4.1: "10 special tokens"); the paper names
#: <sot>, <eot>, <soi> (Fig. 4); the rest are ours, the last five reserved
SPECIAL_TOKENS = ("sot", "eot", "soi", "eoi", "pad", "reserved_0", "reserved_1", "reserved_2", "reserved_3",
                  "reserved_4")
#: the video tokenizer's temporal compression: frames 1 + 4k -> latent frames 1 + k, latent 0 from frame 0 alone
TEMPORAL_STRIDE = 4
#: Eq. 2's early frames: the first 17 frames (1-based frames 1-17)
EARLY_FRAMES = 17
#: the frame ranges of the paper's Figure 3 as latent-frame ranges [start, stop): frame 1, frames 2-17, frames 18-65
PAPER_LATENT_RANGES = ((0, 1), (1, 5), (5, 17))
IGNORE_INDEX = -100


def latent_frames(num_frames: int, temporal_stride: int = TEMPORAL_STRIDE) -> int:
    """Latent frames of a clip of `num_frames` = 1 + stride * k frames: 1 + k (17 -> 5, 65 -> 17)."""
    if num_frames < 1 or (num_frames - 1) % temporal_stride:
        raise ValueError(f"the causal video tokenizer takes 1 + {temporal_stride}k frames, got {num_frames}")
    return 1 + (num_frames - 1) // temporal_stride


@dataclass(frozen=True)
class LoongVocab:
    """Id layout of the unified vocabulary: text [0, text_size), video [text_size, text_size + video_size), then
    `SPECIAL_TOKENS`. The defaults are the paper's (LLaMA's 32,000 text pieces, the 8,192-code video codebook)."""

    text_size: int = 32000
    video_size: int = 8192

    def __post_init__(self) -> None:
        if self.text_size < 1 or self.video_size < 1:
            raise ValueError(f"vocabulary sizes must be positive, got text {self.text_size}, video {self.video_size}")

    @property
    def video_offset(self) -> int:
        return self.text_size

    @property
    def special_offset(self) -> int:
        return self.text_size + self.video_size

    @property
    def size(self) -> int:
        """Total vocabulary: text + video + 10 (paper: 40,202)."""
        return self.special_offset + len(SPECIAL_TOKENS)

    @property
    def video_slice(self) -> slice:
        """The video ids as a slice of the vocabulary axis (e.g. to keep only video logits when sampling)."""
        return slice(self.video_offset, self.special_offset)

    def special(self, name: str) -> int:
        if name not in SPECIAL_TOKENS:
            raise KeyError(f"unknown special token {name!r}; the special tokens are {SPECIAL_TOKENS}")
        return self.special_offset + SPECIAL_TOKENS.index(name)

    @property
    def sot(self) -> int:
        return self.special("sot")

    @property
    def eot(self) -> int:
        return self.special("eot")

    @property
    def soi(self) -> int:
        return self.special("soi")

    @property
    def eoi(self) -> int:
        return self.special("eoi")

    @property
    def pad(self) -> int:
        return self.special("pad")

    def is_video(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.video_offset) & (ids < self.special_offset)

    def video_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Video codebook indices (any shape) -> vocabulary ids."""
        if codes.dtype != torch.long:
            raise ValueError(f"video codes must be a LongTensor, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.video_size):
            raise ValueError(f"video codes must lie in [0, {self.video_size}), got {codes.min()}..{codes.max()}")
        return codes + self.video_offset

    def video_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids (any shape) -> video codebook indices; any id that is not a video token is an error."""
        not_video = ~self.is_video(ids)
        if not_video.any():
            bad = ids[not_video].unique()[:8].tolist()
            raise ValueError(f"ids {bad} are not video tokens (video ids are [{self.video_offset}, "
                             f"{self.special_offset}) of {self.describe()})")
        return ids - self.video_offset

    def describe(self) -> str:
        return f"{self.text_size} text + {self.video_size} video + {len(SPECIAL_TOKENS)} special = {self.size}"


@dataclass
class LoongSequences:
    """A batch of token sequences in the layout of the module docstring.

    tokens:     LongTensor [B, L], L = text_budget + 4 + num_video_tokens.
    loss_mask:  BoolTensor [B, L], True at the tokens the model learns to predict (each from the positions before
                it): the video tokens and `<eoi>`.
    video_start: position of the first video token, the same for every row (text_budget + 3).
    num_video_tokens: N.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    video_start: int
    num_video_tokens: int

    @property
    def video(self) -> slice:
        """The video tokens' positions: `tokens[:, seq.video]` are the video ids."""
        return slice(self.video_start, self.video_start + self.num_video_tokens)

    @property
    def prefix(self) -> torch.Tensor:
        """The conditioning sampling starts from: everything up to and including `<soi>`, [B, text_budget + 3]."""
        return self.tokens[:, : self.video_start]

    def target_weights(self, video_weights: torch.Tensor) -> torch.Tensor:
        """Per-video-token weights [N] or [B, N] (e.g. `frame_weights`) -> weights aligned with `tokens`, [L] or
        [B, L]: the video weights at the video positions, at `<eoi>` the weight of the last video token (the
        token it follows, so uniform video weights stay uniform), 0 elsewhere (not targets)."""
        if video_weights.shape[-1] != self.num_video_tokens:
            raise ValueError(f"expected {self.num_video_tokens} video-token weights, got shape "
                             f"{tuple(video_weights.shape)}")
        length = self.tokens.shape[1]
        weights = video_weights.new_zeros(*video_weights.shape[:-1], length)
        weights[..., self.video] = video_weights
        weights[..., self.video.stop] = video_weights[..., -1]  # <eoi>
        return weights.to(self.tokens.device)


def drop_text_mask(batch_size: int, probability: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """BoolTensor [B]: which captions to drop for classifier-free guidance (True with `probability`, e.g. 0.1)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"text drop probability must lie in [0, 1], got {probability}")
    return (torch.rand(batch_size, generator=generator) < probability).to(device)


def build_prefix(text_ids: Sequence[Sequence[int]], vocab: LoongVocab, text_budget: int,
                 drop_text: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The sequence up to the video, `<pad>* <sot> text <eot> <soi>`: LongTensor [B, text_budget + 3].

    `text_ids`: B lists of text-tokenizer ids in [0, vocab.text_size); captions longer than `text_budget` keep their
    first `text_budget` tokens (with a warning). `drop_text` (BoolTensor [B]) replaces a row's caption by the empty
    caption. Sampling builds its prompts with this function, training its sequences (`build_sequences`) on top of it.
    """
    if text_budget < 0:
        raise ValueError(f"text_budget must be >= 0, got {text_budget}")
    batch = len(text_ids)
    if drop_text is not None and tuple(drop_text.shape) != (batch,):
        raise ValueError(f"drop_text must be a BoolTensor [{batch}], got shape {tuple(drop_text.shape)}")
    dropped = [False] * batch if drop_text is None else [bool(d) for d in drop_text.tolist()]

    rows, truncated = [], 0
    for ids, drop in zip(text_ids, dropped):
        ids = [] if drop else [int(i) for i in ids]
        if any(i < 0 or i >= vocab.text_size for i in ids):
            raise ValueError(f"text ids must lie in [0, {vocab.text_size}), got {min(ids)}..{max(ids)}")
        if len(ids) > text_budget:
            truncated += 1
            ids = ids[:text_budget]
        pads = [vocab.pad] * (text_budget - len(ids))
        rows.append(pads + [vocab.sot] + ids + [vocab.eot, vocab.soi])
    if truncated:
        warnings.warn(f"{truncated} of {batch} captions are longer than the text budget of {text_budget} tokens; "
                      f"kept their first {text_budget} tokens", stacklevel=2)
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(batch, text_budget + 3)


def build_sequences(text_ids: Sequence[Sequence[int]], video_codes: torch.Tensor, vocab: LoongVocab,
                    text_budget: int, drop_text: torch.Tensor | None = None) -> LoongSequences:
    """Training sequences `<pad>* <sot> text <eot> <soi> video <eoi>` (layout and choices: module docstring).

    video_codes: LongTensor [B, N] of codebook indices, or the video tokenizer's [B, T', H', W'] (flattened in
    raster order: latent frame, row, column). See `build_prefix` for `text_ids`, `text_budget` and `drop_text`.
    """
    if video_codes.ndim < 2:
        raise ValueError(f"expected video codes [B, N] or [B, T', H', W'], got shape {tuple(video_codes.shape)}")
    batch = video_codes.shape[0]
    if len(text_ids) != batch:
        raise ValueError(f"{len(text_ids)} captions for {batch} videos")
    video = vocab.video_ids(video_codes.flatten(1))  # (B, N)
    prefix = build_prefix(text_ids, vocab, text_budget, drop_text, device=video.device)  # (B, budget + 3)
    eoi = video.new_full((batch, 1), vocab.eoi)
    tokens = torch.cat([prefix, video, eoi], dim=1)  # (B, L)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, prefix.shape[1]:] = True  # video tokens and <eoi>
    return LoongSequences(tokens, loss_mask, video_start=prefix.shape[1], num_video_tokens=video.shape[1])


# ---------------------------------------------------------------------------------------------------------- loss
def next_token_losses(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross entropy, aligned with the tokens: float32 [B, L] whose entry i is
    -log p(tokens[:, i] | tokens[:, :i]) from logits[:, i - 1], where `loss_mask` is True, and 0 elsewhere.

    Only the columns between the first and last target are scored (for our layout: the video and `<eoi>`), so the
    text positions cost no log-softmax over the vocabulary. Logits are scored in float32.
    """
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape or loss_mask.shape != tokens.shape:
        raise ValueError(f"expected logits [B, L, V] with tokens and loss_mask [B, L], got {tuple(logits.shape)}, "
                         f"{tuple(tokens.shape)}, {tuple(loss_mask.shape)}")
    columns = loss_mask.any(0).nonzero().flatten()
    if columns.numel() == 0:
        raise ValueError("loss_mask marks no target token")
    lo, hi = int(columns[0]), int(columns[-1]) + 1
    if lo == 0:
        raise ValueError("loss_mask marks position 0, which no earlier position predicts")
    targets = tokens[:, lo:hi].masked_fill(~loss_mask[:, lo:hi], IGNORE_INDEX)  # (B, S)
    span = logits[:, lo - 1 : hi - 1].float().transpose(1, 2)  # (B, V, S): position i - 1 predicts token i
    losses = logits.new_zeros(tokens.shape, dtype=torch.float32)
    losses[:, lo:hi] = F.cross_entropy(span, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses


def masked_mean(token_losses: torch.Tensor, loss_mask: torch.Tensor, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Weighted mean of per-token losses [B, L] over the targets: sum(w * loss) / sum(w), both over `loss_mask`.

    Eq. 2 normalised by the sum of its weights. Why not the plain sum, or the sum over the token count:
    - the result stays a per-token cross entropy in nats: with lambda = 0, or when every token is equally hard, it is
      the unweighted mean, so stage 3's loss reads on the same scale as stages 1-2 and as the per-range reports;
    - within a stage every batch has the same layout, so sum(w) is a constant: the gradient points exactly where
      Eq. 2's does, only scaled by a constant. Dividing by the token count instead would grow the loss and its
      gradient by (1 + lambda K / L) when re-weighting starts (x1.29 at 65 frames, lambda 1), a jump in the
      effective learning rate and in the gradient norm that clipping sees; the plain sum would scale them with the
      clip length and batch size.
    `weights`: [L] or [B, L] aligned with the tokens (`LoongSequences.target_weights`); None weighs all targets 1.
    """
    w = loss_mask.to(token_losses.dtype)
    if weights is not None:
        if weights.shape[-1] != token_losses.shape[-1]:
            raise ValueError(
                f"weights must be aligned with the tokens ([L] or [B, L], L = {token_losses.shape[-1]}), got shape "
                f"{tuple(weights.shape)}; map per-video-token weights with LoongSequences.target_weights")
        if (weights < 0).any():
            raise ValueError("loss weights must be >= 0")
        w = w * weights.to(token_losses)
    return (token_losses * w).sum() / w.sum()


def video_token_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar next-token cross entropy over the targets of `loss_mask` (video tokens and `<eoi>`; Eq. 1), weighted
    by `weights` when given (Eq. 2, normalised by the weights' sum: `masked_mean`).

    logits: [B, L, V], logits[:, i] predicting tokens[:, i + 1]; tokens, loss_mask: [B, L] (`build_sequences`).
    """
    return masked_mean(next_token_losses(logits, tokens, loss_mask), loss_mask, weights)


def frame_weights(num_latent_frames: int, tokens_per_latent_frame: int, early_latent_frames: int,
                  lam: float = 1.0) -> torch.Tensor:
    """Eq. 2's weights, one per video token in raster order: FloatTensor [num_latent_frames * tokens_per_latent_frame],
    1 + lam for the tokens of the first `early_latent_frames` latent frames, 1 for the rest.

    The paper's early frames are the first 17, `latent_frames(EARLY_FRAMES)` = 5 latent frames; lam = 1.0 (Sec. 4.1).
    A clip with no more than `early_latent_frames` latent frames weighs every token 1 + lam, which `masked_mean`
    normalises back to the unweighted loss.
    """
    if num_latent_frames < 1 or tokens_per_latent_frame < 1 or early_latent_frames < 0:
        raise ValueError(f"need num_latent_frames, tokens_per_latent_frame >= 1 and early_latent_frames >= 0, got "
                         f"{num_latent_frames}, {tokens_per_latent_frame}, {early_latent_frames}")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0 (Eq. 2 strengthens the early frames), got {lam}")
    per_frame = torch.ones(num_latent_frames)
    per_frame[:early_latent_frames] = 1.0 + lam
    return per_frame.repeat_interleave(tokens_per_latent_frame)


def frame_range_name(start: int, stop: int, temporal_stride: int = TEMPORAL_STRIDE) -> str:
    """Latent frames [start, stop) -> the 1-based video frames they cover: (0, 1) "frames_1", (1, 5) "frames_2-17",
    (5, 17) "frames_18-65" (latent 0 is frame 1; latent j >= 1 is frames stride*(j-1)+2 .. stride*j+1)."""
    first = 1 if start == 0 else temporal_stride * (start - 1) + 2
    last = temporal_stride * (stop - 1) + 1
    return f"frames_{first}" if first == last else f"frames_{first}-{last}"


def loss_by_frame_range(video_losses: torch.Tensor, tokens_per_latent_frame: int,
                        latent_ranges: Sequence[tuple[int, int]] = PAPER_LATENT_RANGES,
                        temporal_stride: int = TEMPORAL_STRIDE) -> dict[str, torch.Tensor]:
    """Mean loss of the video tokens of each frame range, as in the paper's Figure 3.

    video_losses: [B, N] per-video-token losses, e.g. `next_token_losses(...)[:, seq.video]`; N is a whole number of
    latent frames. `latent_ranges`: [start, stop) latent-frame ranges, clipped to the clip (ranges past its end are
    left out); keys name the video frames each range covers (`frame_range_name`): for a 65-frame clip with the
    default ranges "frames_1", "frames_2-17", "frames_18-65"; for a 17-frame clip only the first two.
    """
    batch, count = video_losses.shape
    if count % tokens_per_latent_frame:
        raise ValueError(f"{count} video tokens are not a whole number of latent frames of "
                         f"{tokens_per_latent_frame} tokens")
    per_frame = video_losses.reshape(batch, count // tokens_per_latent_frame, tokens_per_latent_frame)  # (B, T', P)
    report = {}
    for start, stop in latent_ranges:
        stop = min(stop, per_frame.shape[1])
        if start < stop:
            report[frame_range_name(start, stop, temporal_stride)] = per_frame[:, start:stop].mean()
    return report
