"""Loong as a VideoGenerator: training objective, text drop, sampling contract, minute-long extension, configs,
checkpoints and the entry points.

The pieces are tested on their own elsewhere (test_llama_decoder.py, test_loong_sequence.py, test_ar_sampler.py,
test_loong_text_tokenizer.py, test_loong_tokenizer.py); here they are assembled as the configs assemble them, with a
tiny random video tokenizer standing in for a trained one.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import modules.loong as loong_module
from modules.base import validate_model_config
from modules.components.checkpoints import CheckpointKeyError
from modules.components.llama import to_hf_state_dict
from modules.components.loong_sequence import build_prefix
from modules.loong import Loong, MissingWeightsError, warmup_cosine
from utils.generators import model_config_for

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving left on a dark background", "a blue square growing on a light background"]
# a smaller decoder than loong_tiny's, and fewer captions for the text tokenizer: every step well under a second
SMALL = ["model.decoder.num_layers=2", "model.decoder.hidden_size=64", "model.decoder.intermediate_size=176",
         "model.decoder.num_heads=2", "model.text_tokenizer.train_captions.size=2000"]


def compose_model(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"model={name}", "paths.root_dir=.", *overrides]).model


def save_tokenizer(path: Path, *overrides: str) -> Path:
    """A tiny LoongTokenizer with random weights, saved as a Lightning checkpoint (what its load_pretrained reads)."""
    torch.manual_seed(0)
    tokenizer = instantiate(compose_model("loong_tokenizer_tiny", *overrides), _convert_="all")
    torch.save({"state_dict": tokenizer.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> types.SimpleNamespace:
    root = tmp_path_factory.mktemp("loong")
    return types.SimpleNamespace(root=root, tokenizer=save_tokenizer(root / "tokenizer.ckpt"),
                                 cache=root / "text_tokenizers")


def tiny_config(files, *overrides: str):
    return compose_model("loong_tiny", f"model.tokenizer_checkpoint={files.tokenizer}",
                         f"model.text_tokenizer.cache_dir={files.cache}", *SMALL, *overrides)


def tiny_loong(files, *overrides: str) -> Loong:
    torch.manual_seed(0)
    return instantiate(tiny_config(files, *overrides), _convert_="all")


@pytest.fixture(scope="module")
def model(files) -> Loong:
    return tiny_loong(files).eval()


def batch_of(frames: int = 5, batch: int = 2, images: int = 0) -> dict:
    out = {"video": torch.rand(batch, frames + images, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
           "caption": (PROMPTS * batch)[:batch]}
    if images:
        colours = ("red", "green", "blue")[:images]
        out["image_captions"] = [[f"a {c} star on a gray background" for c in colours]] * batch
    return out


# ---------------------------------------------------------------------------------------------- training
def test_training_step_trains_the_decoder_not_the_tokenizer(files):
    model = tiny_loong(files).train()
    assert not model.tokenizer.training  # frozen: stays in eval mode
    loss = model.training_step(batch_of(images=2), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.tokenizer.parameters())


def test_joint_loss_is_video_plus_weighted_image_loss(files):
    model = tiny_loong(files, "model.image_loss_weight=0.5").eval()
    losses = model.losses(batch_of(frames=5, images=2))
    assert torch.allclose(losses["loss"], losses["loss_video"] + 0.5 * losses["loss_image"])
    # per frame range (Figure 3): 5 frames are latent frames 0 (frame 1) and 1 (frames 2-5)
    assert set(losses) == {"loss", "loss_video", "loss_image", "loss_frames_1", "loss_frames_2-5"}
    # an image batch (stage 1) is one-frame sequences
    assert set(model.losses(batch_of(frames=1))) == {"loss", "loss_frames_1"}


def test_early_frames_weigh_one_plus_lambda(files, monkeypatch):
    """Eq. 2: with lambda 1 and early frames 1-5 (latent frames 0-1 of 0-2), those tokens count twice."""
    plain = tiny_loong(files).eval()
    weighted = tiny_loong(files, "model.early_frame_lambda=1.0", "model.early_frames=5").eval()
    token_losses = {}
    original = loong_module.next_token_losses
    monkeypatch.setattr(loong_module, "next_token_losses",
                        lambda *a: token_losses.setdefault("value", original(*a)))
    batch = batch_of(frames=9)
    loss = weighted.losses(batch)["loss"]
    per_token = token_losses["value"][:, -(3 * 16 + 1):]  # (B, 3 latent frames x 16 + <eoi>)
    weights = torch.tensor([2.0] * 32 + [1.0] * 17)
    assert torch.allclose(loss, (per_token * weights).sum() / (weights.sum() * per_token.shape[0]))
    monkeypatch.undo()
    assert torch.allclose(plain.losses(batch)["loss"], per_token.mean())  # same weights: lambda 0 is the mean


class Stop(Exception):
    pass


@pytest.mark.parametrize("rate", [0.1, 1.0])
def test_text_drop_rate_and_the_dropped_prefix_is_the_empty_caption(files, monkeypatch, rate):
    model = tiny_loong(files, f"model.text_drop={rate}").train()
    seen, build = {}, loong_module.build_sequences

    def spy(text_ids, codes, vocab, budget, drop):  # record the sequences, then stop before the decoder runs
        seen["drop"], seen["seq"] = drop, build(text_ids, codes, vocab, budget, drop)
        raise Stop

    monkeypatch.setattr(loong_module, "build_sequences", spy)
    count = 2000 if rate < 1 else 8
    model.tokenizer.encode = lambda frames: torch.zeros(frames.shape[0], 1, 4, 4, dtype=torch.long)  # cheap
    with pytest.raises(Stop):
        model.losses({"video": torch.zeros(count, 1, 3, 32, 32),
                      "caption": ["a red circle on a dark background"] * count})
    dropped = int(seen["drop"].sum())
    if rate < 1:
        assert 140 < dropped < 260  # Binomial(2000, 0.1): mean 200, sd 13.4
    else:
        empty = build_prefix([[]] * count, model.vocab, model.text_budget)
        assert dropped == count and torch.equal(seen["seq"].prefix, empty)
    model.eval()  # validation drops nothing
    with pytest.raises(Stop):
        model.losses({"video": torch.zeros(4, 1, 3, 32, 32), "caption": ["a red circle"] * 4})
    assert seen["drop"] is None


def test_optimizer_takes_only_the_decoder_and_the_schedule_warms_up_then_decays(files):
    model = tiny_loong(files, "model.lr_schedule.warmup_steps=10")
    model._trainer = types.SimpleNamespace(max_steps=110)  # what configure_optimizers reads of the trainer
    config = model.configure_optimizers()
    params = {id(p) for group in config["optimizer"].param_groups for p in group["params"]}
    assert params == {id(p) for p in model.decoder.parameters()}
    assert config["lr_scheduler"]["interval"] == "step"
    assert [warmup_cosine(s, 10, 110) for s in (0, 5, 10, 60, 110, 200)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])


# ---------------------------------------------------------------------------------------------- sampling
def test_generate_shapes(model, monkeypatch):
    calls = []
    original = loong_module.sample_video_tokens
    monkeypatch.setattr(loong_module, "sample_video_tokens",
                        lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    video = model.generate(PROMPTS, num_frames=16, top_k=5)
    assert video.dtype == torch.uint8 and video.shape == (2, 16, 32, 32, 3)
    assert calls == [5 * 16]  # 17 frames generated (5 latent frames of 4x4), the first 16 returned
    assert model.generate(PROMPTS[:1], num_frames=1).shape == (1, 1, 32, 32, 3)


def test_same_seed_same_video_whatever_else_is_in_the_batch(model):
    alone = model.generate([PROMPTS[1]], num_frames=5, seed=[7])
    together = model.generate([PROMPTS[0], PROMPTS[1], "a cyan cross"], num_frames=5, seed=[3, 7, 1])
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])


def test_sampler_settings_and_bad_values(model, files):
    settings = model.sampler_settings()
    assert {k: settings[k] for k in ("top_k", "temperature", "guidance_scale", "extension_overlap", "extend_from")} \
        == {"top_k": 50, "temperature": 1.0, "guidance_scale": 7.5, "extension_overlap": 5, "extend_from": "reencode"}
    assert model.sampler_settings(top_k=3)["top_k"] == 3
    for bad in ({"top_k": 0}, {"guidance_scale": -1.0}, {"extend_from": "pixels"}, {"extension_overlap": 4},
                {"not_a_setting": 1}):
        with pytest.raises(ValueError):
            model.generate(PROMPTS, num_frames=1, **bad)
    with pytest.raises(ValueError, match="top_k"):
        validate_model_config(tiny_config(files, "model.sampler.top_k=0"))


def spy_extension(model, monkeypatch):
    """Record each sampler call (prefixes, tokens, cache), each decoded clip and each cache allocation."""
    record = types.SimpleNamespace(calls=[], decoded=[], caches=0)
    sample, decode, allocate = loong_module.sample_video_tokens, model.tokenizer.decode, model.decoder.allocate_cache

    def sample_spy(decoder, cond, uncond, num_tokens, vocab, **kwargs):
        ids = sample(decoder, cond, uncond, num_tokens, vocab, **kwargs)
        record.calls.append(types.SimpleNamespace(cond=cond, uncond=uncond, ids=ids, cache=kwargs["cache"]))
        return ids

    def decode_spy(tokens):
        record.decoded.append(decode(tokens))
        return record.decoded[-1]

    def allocate_spy(*args, **kwargs):
        record.caches += 1
        return allocate(*args, **kwargs)

    monkeypatch.setattr(loong_module, "sample_video_tokens", sample_spy)
    monkeypatch.setattr(model.tokenizer, "decode", decode_spy)
    monkeypatch.setattr(model.decoder, "allocate_cache", allocate_spy)
    return record


def test_long_video_extends_from_reencoded_frames_with_one_cache(model, monkeypatch):
    """Section 3.3 / Figure 4 with 9-frame windows (3 latent frames): 17 frames = the first clip, then two windows
    that each re-encode the previous clip's last 5 frames (2 latent frames) and add one latent frame (4 frames)."""
    record = spy_extension(model, monkeypatch)
    progress = []
    video = model.generate(PROMPTS, num_frames=17, clip_frames=9, top_k=5,
                           progress=lambda done, total: progress.append((done, total)))
    assert video.shape == (2, 17, 32, 32, 3)  # (a)
    assert [call.ids.shape[1] for call in record.calls] == [48, 16, 16]
    text = build_prefix(model.text_tokenizer.encode_batch(PROMPTS), model.vocab, model.text_budget)
    empty = build_prefix([[]] * 2, model.vocab, model.text_budget)
    clips = [torch.cat(record.decoded[i : i + 2]) for i in range(0, len(record.decoded), 2)]  # decoded per video
    for previous, call in zip(clips, record.calls[1:]):  # (b)
        codes = torch.cat([model.tokenizer.encode(previous[b : b + 1, -5:]) for b in range(2)])  # (2, 2, 4, 4)
        reencoded = model.vocab.video_ids(codes.flatten(1))  # (2, 2 x 16)
        assert torch.equal(call.cond, torch.cat([text, reencoded], 1))
        assert torch.equal(call.uncond, torch.cat([empty, reencoded], 1))
    assert record.caches == 1 and all(call.cache is record.calls[0].cache for call in record.calls)  # (c)
    # the 5 overlapping frames appear once: clip 1, then the new 4 frames of each window
    frames = torch.cat([clips[0], clips[1][:, 5:], clips[2][:, 5:]], 1)
    expected = ((frames + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    assert torch.equal(video, expected)
    assert progress[-1] == (80, 80) and [d for d, _ in progress] == list(range(1, 81))


def test_long_video_can_extend_from_the_raw_tokens(model, monkeypatch):
    """extend_from=tokens (Figure 6's ablation): the next window starts from the previous window's last 2 latent
    frames as sampled, not re-encoded."""
    record = spy_extension(model, monkeypatch)
    video = model.generate(PROMPTS, num_frames=13, clip_frames=9, top_k=5, extend_from="tokens", guidance_scale=1.0)
    assert video.shape == (2, 13, 32, 32, 3)
    first, second = record.calls
    assert second.uncond is None  # guidance 1: conditional only
    assert torch.equal(second.cond[:, -32:], first.ids[:, -32:])
    assert record.caches == 1 and record.calls[0].cache.batch_size == 2


def test_clip_plan():
    assert Loong.clip_plan(1, 65, 5) == [1]
    assert Loong.clip_plan(16, 65, 5) == [5]
    assert Loong.clip_plan(65, 65, 5) == [17]
    # a minute at the paper's 6.5 fps: 65 frames, then 60 new frames per window (15 latent frames)
    plan = Loong.clip_plan(390, 65, 5)
    assert plan == [17, 15, 15, 15, 15, 15, 7] and 65 + 4 * sum(plan[1:]) == 393  # then the first 390 are kept


# ---------------------------------------------------------------------------------------------- configs and weights
def test_paper_size_config_names_every_missing_file(tmp_path):
    cfg = compose_model("loong", f"paths.log_dir={tmp_path}", f"model.pretrained.checkpoint={tmp_path}/lm.pt")
    with pytest.raises(MissingWeightsError) as error:
        validate_model_config(cfg)
    message = str(error.value)
    for text in (f"{tmp_path}/train/loong_tokenizer/clips65/checkpoints/last.ckpt", "model.text_tokenizer.model_file",
                 f"{tmp_path}/lm.pt", "python train.py experiment=tiny_loong_tokenizer", "experiment=tiny_loong "):
        assert text in message, text


def test_paper_size_builds_on_the_meta_device():
    cfg = compose_model("loong", "model.tokenizer_checkpoint=null")
    with torch.device("meta"):
        model = instantiate(cfg, _convert_="all")
    assert model.vocab.size == 40202 and model.decoder.config.vocab_size == 40202
    assert 3.47e9 < sum(p.numel() for p in model.decoder.parameters()) < 3.49e9
    assert model.tokenizer.quantizer.num_codes == 8192


def test_tokenizer_with_another_codebook_size_is_refused(model, files):
    other = save_tokenizer(files.root / "codes256.ckpt", "model.quantizer.num_codes=256")
    with pytest.raises(ValueError, match="has 256 codes, but the model's video vocabulary is 512"):
        model.load_tokenizer(other)


def test_decoder_vocab_must_match_the_tokenizers(files):
    with pytest.raises(Exception, match="set model.decoder.vocab_size=1034"):
        tiny_loong(files, "model.decoder.vocab_size=1000")


def test_checkpoint_restores_the_text_tokenizer_without_the_cache(files, tmp_path):
    cache = tmp_path / "cache"
    trained = tiny_loong(files, f"model.text_tokenizer.cache_dir={cache}")
    with torch.no_grad():
        trained.decoder.lm_head.weight.add_(1.0)  # unlike a fresh model's
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)  # trains the text tokenizer (first use)
    assert cache.is_dir()
    shutil.rmtree(cache)

    restored = tiny_loong(files, f"model.text_tokenizer.cache_dir={cache}")
    restored.load_state_dict(torch.load(path, weights_only=True)["state_dict"])  # Lightning's restore
    assert restored.text_tokenizer.tokenizer.model_bytes == trained.text_tokenizer.tokenizer.model_bytes
    stage2 = tiny_loong(files, f"model.text_tokenizer.cache_dir={cache}", f"model.init_from={path}")  # next stage
    assert not torch.equal(stage2.decoder.lm_head.weight, trained.decoder.lm_head.weight)  # read when training starts
    stage2.setup("fit")
    assert stage2.text_tokenizer.tokenizer.model_bytes == trained.text_tokenizer.tokenizer.model_bytes
    assert torch.equal(stage2.decoder.lm_head.weight, trained.decoder.lm_head.weight)
    assert not cache.exists()  # nothing was retrained
    missing = tiny_loong(files, f"model.text_tokenizer.cache_dir={cache}", f"model.init_from={tmp_path / 'no.ckpt'}")
    with pytest.raises(MissingWeightsError, match="previous stage's checkpoint not found"):
        missing.setup("fit")


def test_load_pretrained_reads_our_keys_and_transformers_keys(files, tmp_path):
    source = tiny_loong(files)
    torch.manual_seed(1)
    ours, hf = tiny_loong(files), tiny_loong(files)
    torch.save(source.decoder.state_dict(), tmp_path / "decoder.pt")
    torch.save(to_hf_state_dict(source.decoder), tmp_path / "hf.pt")
    ours.load_pretrained(tmp_path / "decoder.pt")
    hf.load_pretrained(tmp_path / "hf.pt")
    for model in (ours, hf):
        assert all(torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(),
                                                     source.decoder.state_dict().values()))
    state = source.decoder.state_dict()
    state["not_a_layer.weight"] = state.pop("norm.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointKeyError, match=r"norm\.weight.*\n.*not_a_layer\.weight"):
        ours.load_pretrained(tmp_path / "bad.pt")


def test_stages_chain_through_their_run_folders(tmp_path):
    stages = {"tiny_loong": ("images", 1, 0, None, 0.0), "tiny_loong_17": ("clips17", 17, 4, "images", 0.0),
              "tiny_loong_65": ("clips65", 65, 4, "clips17", 1.0)}
    for experiment, (stage, frames, images, previous, lam) in stages.items():
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.log_dir={tmp_path}"],
                          return_hydra_config=True)
        assert (cfg.data.num_frames, cfg.data.images_per_video) == (frames, images)
        assert cfg.model.sampler.num_frames == frames
        assert cfg.model.early_frame_lambda == lam and cfg.model._target_ == "modules.loong.Loong"
        assert cfg.hydra.run.dir == f"{tmp_path}/train/tiny_loong/{stage}"
        expected = previous and f"{tmp_path}/train/tiny_loong/{previous}/checkpoints/last.ckpt"
        assert cfg.model.init_from == expected


# ---------------------------------------------------------------------------------------------- entry points
def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, script, *overrides], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_train_then_sample_from_the_command_line(files, tmp_path):
    """Stage 1 for 2 steps, then sample.py from its last.ckpt: the README's commands, with the tokenizer checkpoint
    and the text tokenizer's cache in tmp_path."""
    model_files = [f"model.tokenizer_checkpoint={files.tokenizer}", f"model.text_tokenizer.cache_dir={tmp_path}/cache",
                   "model.text_tokenizer.train_captions.size=2000"]
    run_dir = tmp_path / "run"
    run("train.py", "experiment=tiny_loong", *model_files, "trainer.max_steps=2", "data.train_size=16",
        "data.val_size=2", "data.batch_size=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}", "callbacks.sample_videos.prompts=[a red circle on a dark background]")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["state_dict"]["text_tokenizer._extra_state"].dtype == torch.uint8
    rows = list(csv.DictReader(next((run_dir / "csv").rglob("metrics.csv")).open()))
    assert [r["train/loss_frames_1"] != "" for r in rows if r.get("train/loss")] == [True, True]
    assert any(r.get("val/loss") for r in rows)
    assert list((run_dir / "samples").rglob("*.mp4"))
    out = tmp_path / "samples"
    # the checkpoint holds the video tokenizer's weights too: sampling needs no tokenizer file (checkpoint_supersedes)
    files_for_sampling = [f"model.tokenizer_checkpoint={tmp_path}/moved_away.ckpt", *model_files[1:]]
    run("sample.py", "experiment=tiny_loong", *files_for_sampling, f"ckpt_path={checkpoint}", "num_frames=5",
        "prompts=[a red circle moving left on a dark background]", f"hydra.run.dir={out}")
    assert len(list(out.glob("*.mp4"))) == 1 and (out / "samples.json").is_file()


def test_a_training_checkpoint_supersedes_the_tokenizer_file(tmp_path):
    cfg = OmegaConf.create({"model": {"_target_": "modules.loong.Loong", "tokenizer_checkpoint": "tok.ckpt"},
                            "ckpt_path": None})
    assert model_config_for(cfg).tokenizer_checkpoint == "tok.ckpt"  # no checkpoint: the file is needed
    cfg.ckpt_path = str(tmp_path / "last.ckpt")
    assert model_config_for(cfg).tokenizer_checkpoint is None and cfg.model.tokenizer_checkpoint == "tok.ckpt"
