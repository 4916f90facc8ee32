"""Pre-tokenised shards (scripts/pretokenize.py, data=video_tokens) give the batches of encoding on the fly.

A tiny random-weight LoongTokenizer and the synthetic dataset at tiny size (12 train + 4 val items of 17 frames at
32x32, 2 images appended to each clip): the shards' batches are the pixel batches encoded, in the same order, with
the same captions, for the same seed, and Loong's loss from them (it reads `video_codes` when a batch has them) is
the loss from the pixels.
Also: an interrupted run is refused by the datamodule and continued by a re-run, a tokenizer mismatch is refused,
and a resumed epoch continues at the same batch.
"""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from datamodules.synthetic import SyntheticDataModule
from datamodules.video_tokens import (
    IncompleteShardsError,
    TokenizerMismatchError,
    VideoTokensDataModule,
    read_meta,
    tokenizer_weights_sha256,
)
from modules.loong import (
    Loong,
    build_sequences,
    drop_text_mask,
    frame_weights,
    latent_frames,
    loss_by_frame_range,
    masked_mean,
    next_token_losses,
)
from scripts import pretokenize as pretokenize_script
from tests.hydra_compose import compose_config
from train import train

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
# experiment=tiny_loong_17 at test size: 3 batches of 4 an epoch, joint mode with 2 images a clip
RECIPE = ["experiment=tiny_loong_17", "data.batch_size=4", "data.images_per_video=2"]
SIZES = ["data.train_size=12", "data.val_size=4"]  # data=synthetic's own settings
# a smaller decoder than loong_tiny's, and fewer captions for its text tokenizer (as tests/test_loong_model.py)
SMALL = ["model.decoder.num_layers=2", "model.decoder.hidden_size=64", "model.decoder.intermediate_size=176",
         "model.decoder.num_heads=2", "model.text_tokenizer.train_captions.size=2000"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=["paths.root_dir=.", "paths.output_dir=.", *overrides])


def save_tokenizer(path: Path, seed: int = 0, *overrides: str) -> Path:
    """A tiny LoongTokenizer with random weights, saved as a Lightning checkpoint (what load_pretrained reads)."""
    torch.manual_seed(seed)
    tokenizer = instantiate(compose_train("model=loong_tokenizer_tiny", *overrides).model, _convert_="all")
    torch.save({"state_dict": tokenizer.state_dict()}, path)
    return path


def load_tokenizer(checkpoint: Path, *overrides: str):
    tokenizer = instantiate(compose_train("model=loong_tokenizer_tiny", *overrides).model, _convert_="all")
    tokenizer.load_pretrained(checkpoint)
    return tokenizer.eval()


def pretokenize_args(files, out: Path, *extra: str) -> list[str]:
    return [*RECIPE, *SIZES, f"model.tokenizer_checkpoint={files.tokenizer}", f"out={out}", *extra]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> types.SimpleNamespace:
    root = tmp_path_factory.mktemp("video_tokens")
    files = types.SimpleNamespace(root=root, tokenizer=save_tokenizer(root / "tokenizer.ckpt"),
                                  cache=root / "text_tokenizers", shards=root / "shards")
    pretokenize_script.main(pretokenize_args(files, files.shards))  # the command's main, in this process
    return files


def source_datamodule() -> SyntheticDataModule:
    return instantiate(compose_train(*RECIPE, *SIZES).data, _convert_="all")


def token_datamodule(files, *overrides: str, path: Path | None = None) -> VideoTokensDataModule:
    cfg = compose_train(*RECIPE, "data=video_tokens", f"data.path={path or files.shards}", *overrides)
    return instantiate(cfg.data, _convert_="all")


def epoch_batches(datamodule, epoch: int) -> list[dict]:
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does at the start of every epoch
    return list(loader)


def encoded(tokenizer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel batch's codes as Loong encodes them on the fly: video [B, T', h, w], images [B*M, 1, h, w]."""
    video, images = batch["video"], len(batch["image_captions"][0])
    frames = video.shape[1] - images
    return tokenizer.encode(video[:, :frames]), tokenizer.encode(video[:, frames:].reshape(-1, 1, *video.shape[2:]))


def assert_same_batch(tokens: dict, pixels: dict, tokenizer) -> None:
    codes, image_codes = encoded(tokenizer, pixels)
    assert tokens["video_codes"].dtype == torch.long and torch.equal(tokens["video_codes"], codes)
    assert torch.equal(tokens["image_codes"].flatten(0, 1), image_codes)
    assert tokens["caption"] == pixels["caption"] and tokens["image_captions"] == pixels["image_captions"]
    assert set(tokens) == set(pixels) - {"video"} | {"video_codes", "image_codes"}
    for key in ("is_image", "fps"):
        assert torch.equal(tokens[key], pixels[key])
    assert all(torch.equal(tokens["label"][k], pixels["label"][k]) for k in pixels["label"])


# ---------------------------------------------------------------------------------------------- the bar
def test_shard_format(files):
    meta = read_meta(files.shards)
    assert meta["complete"] and meta["splits"] == {"train": {"items": 12, "complete": True, "skipped": 0},
                                                   "val": {"items": 4, "complete": True, "skipped": 0}}
    assert meta["tokenizer"]["num_codes"] == 512 and meta["codes"] == {"dtype": "uint16", "latent_shape": [5, 4, 4]}
    assert meta["video"] == {"num_frames": 17, "resolution": [32, 32], "frame_stride": 1, "images_per_video": 2}
    assert meta["tokenizer"]["weights_sha256"] == tokenizer_weights_sha256(load_tokenizer(files.tokenizer))
    codes = np.load(files.shards / "train" / "codes.npy", mmap_mode="r")
    assert codes.dtype == np.uint16 and codes.shape == (12, 5, 4, 4)
    assert np.load(files.shards / "val" / "image_codes.npy", mmap_mode="r").shape == (4, 2, 1, 4, 4)
    lines = (files.shards / "train" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 12 and set(json.loads(lines[0])) == {"caption", "label", "is_image", "fps", "image_captions"}
    assert not list(files.shards.glob("*.partial")) and not list(files.shards.glob("*.tmp"))


def test_token_batches_are_the_pixel_batches_encoded(files):
    """Same codes, captions and order as encoding the synthetic batches on the fly: two epochs and validation."""
    tokenizer = load_tokenizer(files.tokenizer)
    source, tokens = source_datamodule(), token_datamodule(files)
    assert tokens.seed == source.seed and tokens.batch_size == source.batch_size == 4
    for epoch in (0, 1):
        pixel_batches, token_batches = epoch_batches(source, epoch), epoch_batches(tokens, epoch)
        assert len(pixel_batches) == len(token_batches) == 3
        for got, want in zip(token_batches, pixel_batches):
            assert_same_batch(got, want, tokenizer)
    assert [b["caption"] for b in epoch_batches(tokens, 0)] != [b["caption"] for b in epoch_batches(tokens, 1)]
    (val_tokens,), (val_pixels,) = list(tokens.val_dataloader()), list(source.val_dataloader())
    assert_same_batch(val_tokens, val_pixels, tokenizer)




def test_loong_loss_from_tokens_equals_loss_from_pixels(files, monkeypatch):
    cfg = compose_train(*RECIPE, *SMALL, f"model.tokenizer_checkpoint={files.tokenizer}",
                        f"model.text_tokenizer.cache_dir={files.cache}", "model.init_from=null",
                        "model.early_frame_lambda=1.0", "model.early_frames=5")
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all").eval()
    tokens, pixels = epoch_batches(token_datamodule(files), 0)[1], epoch_batches(source_datamodule(), 0)[1]
    expected = model.losses(pixels)
    assert set(expected) >= {"loss", "loss_video", "loss_image"}

    def no_encoding(_):
        raise AssertionError("a pre-tokenised batch must not run the tokenizer")

    monkeypatch.setattr(model.tokenizer, "encode", no_encoding)
    got = model.losses(tokens)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    monkeypatch.undo()
    model.train()  # text drop draws from torch's RNG: the same draws give the same loss
    torch.manual_seed(1)
    expected = model.training_step(pixels, 0)
    torch.manual_seed(1)
    assert torch.equal(model.training_step(tokens, 0), expected)


def test_a_resumed_epoch_continues_at_the_same_batch(files):
    tokenizer = load_tokenizer(files.tokenizer)
    whole = epoch_batches(token_datamodule(files), 1)
    state = {"epoch": 1, "batches_done": 1, "seed": 0, "batch_size": 4}  # a checkpoint after one batch of epoch 1
    resumed, source = token_datamodule(files), source_datamodule()
    resumed.load_state_dict(state)
    source.load_state_dict(state)
    got, want = next(iter(resumed.train_dataloader())), next(iter(source.train_dataloader()))
    assert got["caption"] == whole[1]["caption"] and torch.equal(got["video_codes"], whole[1]["video_codes"])
    assert_same_batch(got, want, tokenizer)


def test_train_py_trains_from_the_shards(files, tmp_path):
    """python train.py experiment=tiny_loong_17 data=video_tokens data.path=DIR: two steps and a validation, after
    the datamodule checked the model's tokenizer; with another tokenizer checkpoint the run stops before a step."""
    def overrides(checkpoint: Path) -> list[str]:
        return [*RECIPE, "data=video_tokens", f"data.path={files.shards}", *SMALL,
                f"model.tokenizer_checkpoint={checkpoint}", f"model.text_tokenizer.cache_dir={files.cache}",
                "model.init_from=null", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=none",
                "~callbacks.lr_monitor", "~callbacks.sample_videos"]

    metrics = train(compose_config("train", overrides(files.tokenizer), tmp_path / "run"))
    assert {"train/loss", "train/loss_image", "val/loss"} <= set(metrics)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    other = save_tokenizer(files.root / "other_for_train.ckpt", 1)
    with pytest.raises(TokenizerMismatchError, match="another video tokenizer"):
        train(compose_config("train", overrides(other), tmp_path / "other"))


# ---------------------------------------------------------------------------------------------- clear errors
class Interrupt(Exception):
    pass


def test_an_interrupted_run_is_refused_then_continued(files, monkeypatch):
    out = files.root / "interrupted"
    args = pretokenize_args(files, out, "encode_batch=4")
    write, calls = pretokenize_script.SplitWriter.write, []

    def stop_after_one(self, *a):
        if calls:
            raise Interrupt("killed")
        calls.append(1)
        write(self, *a)

    monkeypatch.setattr(pretokenize_script.SplitWriter, "write", stop_after_one)
    with pytest.raises(Interrupt):
        pretokenize_script.pretokenize(args)
    monkeypatch.undo()
    assert not (out / "train").exists()  # only the partial folder: nothing that looks complete
    with pytest.raises(IncompleteShardsError, match=r"incomplete \(train 4/12 items, val 0/4 items\).*interrupted"
                                                    r".*Run it again.*\n  python scripts/pretokenize.py .*out="):
        read_meta(out)
    with pytest.raises(InstantiationException) as error:
        token_datamodule(files, path=out)
    assert isinstance(error.value.__cause__, IncompleteShardsError)

    encoded_items = []
    encode = pretokenize_script.build_tokenizer

    def counting_tokenizer(*a):
        tokenizer, checkpoint = encode(*a)
        original = tokenizer.encode
        tokenizer.encode = lambda video: encoded_items.append(video.shape[0]) or original(video)
        return tokenizer, checkpoint

    monkeypatch.setattr(pretokenize_script, "build_tokenizer", counting_tokenizer)
    pretokenize_script.pretokenize(args)  # the same command again continues
    assert sum(encoded_items) == (8 + 4) * 3  # the 8 train and 4 val items left, each a clip and 2 images
    for split in ("train", "val"):
        for name in ("codes.npy", "image_codes.npy", "items.jsonl"):
            assert (out / split / name).read_bytes() == (files.shards / split / name).read_bytes()
    assert read_meta(out)["complete"] and not (out / "train.partial").exists()
    encoded_items.clear()
    pretokenize_script.pretokenize(args)  # complete: nothing to do
    assert encoded_items == []


def test_other_settings_into_the_same_folder_are_refused(files, capsys):
    """As the command reports a user error: one line on stderr, exit status 2; the shards stay as they were."""
    with pytest.raises(SystemExit) as exit_status:
        pretokenize_script.main(pretokenize_args(files, files.shards, "data.train_size=8"))
    assert exit_status.value.code == 2
    assert re.search(r"error: .* holds token shards made with other settings \(data, items differ; made by: "
                     r"python scripts/pretokenize.py .*\): choose another out=", capsys.readouterr().err)
    assert read_meta(files.shards)["splits"]["train"]["items"] == 12


def test_missing_shards_name_the_command(files):
    with pytest.raises(FileNotFoundError, match=r"(?s)no token shards at .*\n  python scripts/pretokenize.py experiment="):
        VideoTokensDataModule(path=str(files.root / "nowhere"))


def test_a_recipe_the_shards_do_not_fit_is_refused(files):
    with pytest.raises(InstantiationException) as error:
        token_datamodule(files, "data.num_frames=65")
    assert isinstance(error.value.__cause__, ValueError)
    assert "hold num_frames 17, but the recipe asks for data.num_frames=65" in str(error.value.__cause__)


def test_a_tokenizer_mismatch_is_refused(files):
    datamodule = token_datamodule(files)
    datamodule.check_tokenizer(load_tokenizer(files.tokenizer))  # the shards' own: fine
    other = load_tokenizer(save_tokenizer(files.root / "other.ckpt", 1))
    with pytest.raises(TokenizerMismatchError, match="another video tokenizer than the model's"):
        datamodule.check_tokenizer(other)
    small = load_tokenizer(save_tokenizer(files.root / "small.ckpt", 0, "model.quantizer.num_codes=256"),
                           "model.quantizer.num_codes=256")
    with pytest.raises(TokenizerMismatchError, match="512-code tokenizer, but the model's video tokenizer has 256"):
        datamodule.check_tokenizer(small)
    # what training does: Lightning asks for the dataloader, the datamodule checks the training module's tokenizer
    datamodule.trainer = types.SimpleNamespace(lightning_module=types.SimpleNamespace(tokenizer=other),
                                               global_rank=0, world_size=1)
    with pytest.raises(TokenizerMismatchError):
        datamodule.train_dataloader()
    datamodule.trainer.lightning_module = types.SimpleNamespace()  # a pixel model (LaVie)
    with pytest.raises(ValueError, match="has no video tokenizer"):
        datamodule.val_dataloader()
