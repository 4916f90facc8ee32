"""eval/tokenizer_report.py: its scores mean what they say, and it runs on a train.py-style run directory."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from datamodules.synthetic import Attributes, render
from eval.tokenizer_report import report, score
from tests.test_loong_tokenizer import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


def test_scores_tell_kept_objects_from_lost_ones():
    video = render(Attributes("star", "red", "left", "dark"), 5, (32, 32))[None]  # (1, T, H, W, 3)
    recoloured = render(Attributes("star", "blue", "left", "dark"), 5, (32, 32))[None]
    other_shape = render(Attributes("circle", "red", "still", "dark"), 5, (32, 32))[None]
    blank = np.broadcast_to(video[:, :, :1, :1], video.shape)  # the background alone
    assert score(video, video, ["red"]) == {"colour_kept": [1.0], "object_iou": [1.0]}
    moved_on = score(video, recoloured, ["red"])  # same shape and place; only antialiased edge pixels differ
    assert moved_on["colour_kept"] == [0.0] and moved_on["object_iou"][0] > 0.98
    kept = score(video, other_shape, ["red"])
    assert kept["colour_kept"] == [1.0] and 0.2 < kept["object_iou"][0] < 0.9
    assert score(video, blank, ["red"]) == {"colour_kept": [0.0], "object_iou": [0.0]}
    # a faded object (half-way to the background) still reads as its colour if it stays saturated
    faded = ((video.astype(np.float32) + blank) / 2).astype(np.uint8)
    assert score(video, faded, ["red"])["colour_kept"] == [1.0]


def write_run(tmp_path, *overrides: str):
    """A run directory the way train.py leaves it: config.yaml (resolved) and checkpoints/last.ckpt."""
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    resolved = {part: OmegaConf.to_container(cfg[part], resolve=True) for part in ("model", "data")}
    OmegaConf.save(OmegaConf.create(resolved), run / "config.yaml")
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, run / "checkpoints" / "last.ckpt")
    return run, model


def test_report_reconstructs_val_items_through_encode_and_decode(tmp_path):
    run, model = write_run(tmp_path)
    result = report(run / "checkpoints" / "last.ckpt", frames=5, num=3, batch_size=2)
    written = json.loads((run / "report" / "tokenizer_report_5f.json").read_text())
    assert written == result
    assert result["frames"] == 5 and result["videos"] == 3 and result["tokens_per_video"] == 2 * 4 * 4
    assert 0 <= result["colour_kept"] <= 1 and 0 <= result["object_iou"] <= 1
    # psnr and codes used are the module's own measures of decode(encode(x)) on the same val items
    from datamodules.synthetic import SyntheticVideoDataset
    from modules.loong_tokenizer import psnr

    items = SyntheticVideoDataset(3, 5, (32, 32), split="val")
    video = torch.stack([items[i]["video"] for i in range(3)])
    model.eval()
    tokens = model.encode(video)
    expected = np.mean([psnr(r[None], v[None]).item() for r, v in zip(model.decode(tokens), video)])
    assert result["psnr"] == pytest.approx(expected, abs=1e-4)
    assert result["codes_used"] == torch.unique(tokens).numel() / result["num_codes"]
    png = np.asarray(Image.open(run / "report" / "tokenizer_report_5f.png"))
    assert png.shape == (2 * 34, 8 * 3 * 34, 3)  # input row + reconstruction row, 8 slots of 3 frames, 1-px gaps


def test_report_names_what_is_wrong(tmp_path):
    run, _ = write_run(tmp_path)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        report(run / "checkpoints" / "last.ckpt", frames=4, num=1)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        report(run / "checkpoints" / "missing.ckpt", frames=1, num=1)
    (run / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        report(run / "checkpoints" / "last.ckpt", frames=1, num=1)
