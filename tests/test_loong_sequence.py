"""Loong's unified vocabulary, sequence layout and video-token loss (Eq. 1) with early-frame re-weighting (Eq. 2)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.components.loong_sequence import (
    EARLY_FRAMES,
    SPECIAL_TOKENS,
    LoongVocab,
    build_prefix,
    build_sequences,
    drop_text_mask,
    frame_range_name,
    frame_weights,
    latent_frames,
    loss_by_frame_range,
    masked_mean,
    next_token_losses,
    video_token_loss,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# text ids 0-9, video ids 10-15 (codes 0-5), then sot 16, eot 17, soi 18, eoi 19, pad 20, reserved 21-25
VOCAB = LoongVocab(text_size=10, video_size=6)
SOT, EOT, SOI, EOI, PAD = 16, 17, 18, 19, 20


def test_paper_vocabulary():
    vocab = LoongVocab()
    assert vocab.size == 40202 and len(SPECIAL_TOKENS) == 10
    assert (vocab.video_offset, vocab.special_offset) == (32000, 40192)
    assert [vocab.sot, vocab.eot, vocab.soi, vocab.eoi, vocab.pad] == [40192, 40193, 40194, 40195, 40196]
    assert vocab.special("reserved_4") == 40201
    assert vocab.describe() == "32000 text + 8192 video + 10 special = 40202"


def test_hand_made_layout():
    assert [VOCAB.sot, VOCAB.eot, VOCAB.soi, VOCAB.eoi, VOCAB.pad, VOCAB.size] == [SOT, EOT, SOI, EOI, PAD, 26]
    codes = torch.tensor([[0, 1, 2], [5, 4, 3]])
    seq = build_sequences([[3, 4], [5]], codes, VOCAB, text_budget=3)
    assert seq.tokens.tolist() == [
        [PAD, SOT, 3, 4, EOT, SOI, 10, 11, 12, EOI],
        [PAD, PAD, SOT, 5, EOT, SOI, 15, 14, 13, EOI],
    ]
    # only the video tokens and <eoi> are targets
    assert seq.loss_mask.tolist() == [[False] * 6 + [True] * 4] * 2
    assert seq.video_start == 6 and seq.num_video_tokens == 3 and seq.video == slice(6, 9)
    assert seq.prefix.tolist() == build_prefix([[3, 4], [5]], VOCAB, 3).tolist()


def test_video_ids_map_back_to_codes_and_other_ids_raise():
    codes = torch.randint(0, 6, (2, 2, 3, 2), generator=torch.Generator().manual_seed(0))  # [B, T', H', W']
    seq = build_sequences([[1], [2, 3]], codes, VOCAB, text_budget=2)
    assert seq.num_video_tokens == 12
    assert torch.equal(VOCAB.video_codes(seq.tokens[:, seq.video]), codes.flatten(1))  # raster order
    for not_video in ([3], [SOT], [EOI], [9, 10], [16], [25]):
        with pytest.raises(ValueError, match="not video tokens"):
            VOCAB.video_codes(torch.tensor(not_video))
    assert VOCAB.video_codes(torch.tensor([10, 15])).tolist() == [0, 5]
    with pytest.raises(ValueError, match=r"video codes must lie in \[0, 6\)"):
        VOCAB.video_ids(torch.tensor([6]))
    with pytest.raises(ValueError, match=r"text ids must lie in \[0, 10\)"):
        build_sequences([[10]], torch.zeros(1, 3, dtype=torch.long), VOCAB, text_budget=2)


def test_truncation_warns_with_the_budget():
    codes = torch.zeros(2, 2, dtype=torch.long)
    with pytest.warns(UserWarning, match="1 of 2 captions are longer than the text budget of 2 tokens"):
        seq = build_sequences([[1, 2, 3, 4], [5]], codes, VOCAB, text_budget=2)
    assert seq.tokens[0].tolist() == [SOT, 1, 2, EOT, SOI, 10, 10, EOI]
    assert seq.tokens[1].tolist() == [PAD, SOT, 5, EOT, SOI, 10, 10, EOI]


def test_dropped_text_is_the_empty_caption():
    codes = torch.tensor([[1, 2], [3, 4], [5, 0]])
    texts = [[1, 2, 3], [4], [5, 6]]
    dropped = build_sequences(texts, codes, VOCAB, text_budget=3, drop_text=torch.tensor([True, False, True]))
    empty = build_sequences([[], [4], []], codes, VOCAB, text_budget=3)
    assert torch.equal(dropped.tokens, empty.tokens) and torch.equal(dropped.loss_mask, empty.loss_mask)
    assert dropped.tokens[0].tolist() == [PAD, PAD, PAD, SOT, EOT, SOI, 11, 12, EOI]
    # what the sampler's unconditional branch starts from
    assert torch.equal(build_prefix([[]] * 3, VOCAB, 3), dropped.prefix[[0, 0, 0]])
    mask = drop_text_mask(10000, 0.1, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and 800 < int(mask.sum()) < 1200


def random_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = build_sequences([[1, 2], [3]], torch.randint(0, 6, (2, 4), generator=g), VOCAB, text_budget=3)
    logits = torch.randn(2, seq.tokens.shape[1], VOCAB.size, generator=g)
    return seq, logits


def test_loss_is_cross_entropy_over_video_targets_only():
    seq, logits = random_case()
    loss = video_token_loss(logits, seq.tokens, seq.loss_mask)
    # logits at positions 5..9 (<soi> and the video) predict tokens 6..10 (the video and <eoi>)
    expected = F.cross_entropy(logits[:, 5:10].reshape(-1, VOCAB.size), seq.tokens[:, 6:11].reshape(-1))
    torch.testing.assert_close(loss, expected)

    changed = logits.clone()
    changed[:, :5] = torch.randn(2, 5, VOCAB.size) * 10  # logits predicting text, pads and markers
    changed[:, -1] = 100.0  # logits after <eoi> predict nothing
    torch.testing.assert_close(video_token_loss(changed, seq.tokens, seq.loss_mask), loss, rtol=0, atol=0)
    for position in (5, 7, 9):  # predicting the first video token, a middle one, <eoi>
        changed = logits.clone()
        changed[0, position] += torch.randn(VOCAB.size)
        assert not torch.isclose(video_token_loss(changed, seq.tokens, seq.loss_mask), loss)


def test_loss_gradient_reaches_only_the_predicting_positions_and_half_precision_logits_work():
    seq, logits = random_case(1)
    logits.requires_grad_(True)
    video_token_loss(logits, seq.tokens, seq.loss_mask).backward()
    reached = logits.grad.abs().sum(-1) > 0
    assert reached.tolist() == [[False] * 5 + [True] * 5 + [False]] * 2
    loss16 = video_token_loss(logits.detach().bfloat16(), seq.tokens, seq.loss_mask)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, video_token_loss(logits.detach(), seq.tokens, seq.loss_mask), rtol=0.02, atol=0)


def logits_with_target_probabilities(tokens, probabilities: dict[int, float], vocab_size: int) -> torch.Tensor:
    """Logits [1, L, V] under which the token at position i has probability probabilities[i] (others uniform)."""
    logits = torch.zeros(1, tokens.shape[1], vocab_size, dtype=torch.float64)
    for i, p in probabilities.items():
        row = torch.full((vocab_size,), (1 - p) / (vocab_size - 1), dtype=torch.float64)
        row[tokens[0, i]] = p
        logits[0, i - 1] = row.log()
    return logits


def test_eq2_weighted_loss_on_a_hand_computed_case():
    # 3 latent frames of 2 tokens; the first latent frame is early; lambda = 1
    weights = frame_weights(3, 2, early_latent_frames=1, lam=1.0)
    assert weights.tolist() == [2, 2, 1, 1, 1, 1]
    seq = build_sequences([[7]], torch.tensor([[0, 1, 2, 3, 4, 5]]), VOCAB, text_budget=2)
    start = seq.video_start  # 5
    p = [0.5, 0.25, 0.8, 0.1, 0.9, 0.4, 0.6]  # the 6 video tokens, then <eoi>
    logits = logits_with_target_probabilities(seq.tokens, {start + k: p[k] for k in range(7)}, VOCAB.size)
    nll = [-math.log(q) for q in p]
    # (1 + lambda) * (early losses) + later losses + <eoi> (the last frame's weight, 1), over 2+2+1+1+1+1+1 = 9
    expected = (2 * nll[0] + 2 * nll[1] + nll[2] + nll[3] + nll[4] + nll[5] + nll[6]) / 9
    target_weights = seq.target_weights(weights)
    assert target_weights.tolist() == [0] * 5 + [2, 2, 1, 1, 1, 1, 1]
    loss = video_token_loss(logits, seq.tokens, seq.loss_mask, target_weights)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert video_token_loss(logits, seq.tokens, seq.loss_mask).item() == pytest.approx(sum(nll) / 7, rel=1e-6)
    # lambda = 0 and a clip with only early frames are the unweighted mean
    for w in (frame_weights(3, 2, 1, lam=0.0), frame_weights(3, 2, 5, lam=1.0)):
        assert video_token_loss(logits, seq.tokens, seq.loss_mask, seq.target_weights(w)).item() == pytest.approx(
            sum(nll) / 7, rel=1e-6)
    with pytest.raises(ValueError, match="target_weights"):
        video_token_loss(logits, seq.tokens, seq.loss_mask, weights)  # per-video-token weights, not aligned


def test_paper_frame_weights():
    assert latent_frames(EARLY_FRAMES) == 5 and latent_frames(65) == 17 and latent_frames(1) == 1
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        latent_frames(16)
    weights = frame_weights(latent_frames(65), 256, latent_frames(EARLY_FRAMES), lam=1.0)
    assert weights.shape == (4352,)  # 17 x 16 x 16 tokens
    assert weights[: 5 * 256].eq(2).all() and weights[5 * 256:].eq(1).all()
    with pytest.raises(ValueError, match="lambda"):
        frame_weights(3, 2, 1, lam=-0.5)


def test_loss_by_frame_range():
    assert [frame_range_name(*r) for r in ((0, 1), (1, 5), (5, 17))] == ["frames_1", "frames_2-17", "frames_18-65"]
    # 17 latent frames (65 frames) of 2 tokens; latent frame j has loss j (batch row 1: j + 1)
    per_frame = torch.arange(17.0).repeat_interleave(2)
    losses = torch.stack([per_frame, per_frame + 1])  # (B, N) = (2, 34)
    report = loss_by_frame_range(losses, tokens_per_latent_frame=2)
    assert list(report) == ["frames_1", "frames_2-17", "frames_18-65"]
    assert report["frames_1"].item() == pytest.approx(0.5)  # (0 + 1) / 2
    assert report["frames_2-17"].item() == pytest.approx(3.0)  # mean of 1..4, +0.5
    assert report["frames_18-65"].item() == pytest.approx(11.0)  # mean of 5..16, +0.5
    # a 9-frame clip (3 latent frames): the ranges are clipped and named by the frames they cover
    short = loss_by_frame_range(losses[:, :6], tokens_per_latent_frame=2)
    assert {k: v.item() for k, v in short.items()} == pytest.approx({"frames_1": 0.5, "frames_2-9": 2.0})


def test_frame_range_report_from_the_model_loss():
    seq, logits = random_case(2)
    losses = next_token_losses(logits, seq.tokens, seq.loss_mask)
    assert losses[:, : seq.video_start].eq(0).all()
    torch.testing.assert_close(masked_mean(losses, seq.loss_mask), video_token_loss(logits, seq.tokens, seq.loss_mask))
    report = loss_by_frame_range(losses[:, seq.video], tokens_per_latent_frame=2)  # 4 video tokens: 2 latent frames
    torch.testing.assert_close(report["frames_1"], losses[:, 6:8].mean())
    torch.testing.assert_close(report["frames_2-5"], losses[:, 8:10].mean())
