"""The feature networks of `eval=synthetic`: joint classes, prompt parsing, training, saving, loading, caching."""
from __future__ import annotations

import json

import pytest
import torch

from datamodules.synthetic import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SyntheticVideoDataset, attributes_for, caption_for
from eval import synthetic_nets as sn
from eval.metrics.c3d import load_c3d
from eval.metrics.frechet import FrechetVideoDistance
from eval.metrics.i3d import load_i3d
from eval.metrics.inception_score import VideoInceptionScore

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {  # a few steps of a tiny net: seconds, not minutes
    "i3d": dict(width=0.0625, net_resolution=32, steps=2, batch_size=4, val_size=4, bn_batches=1),
    "c3d": dict(width=0.0625, fc_dim=16, steps=2, batch_size=4, val_size=4),
}


def _videos(n: int, num_frames: int = 8, resolution: int = 32, split: str = "val") -> torch.Tensor:
    return sn._batch(SyntheticVideoDataset(n, num_frames, resolution, split=split), range(n))[0]


def test_joint_classes_cover_exactly_what_the_dataset_draws():
    assert sn.NUM_CLASSES == len(set(sn.JOINT_CLASSES)) == len(SHAPES) * len(COLOURS) * len(MOTIONS) - len(COLOURS)
    assert ("circle", "red", "rotate") not in sn.JOINT_CLASSES
    for k in range(sn.NUM_CLASSES):
        assert sn.joint_class(sn.attributes_of_class(k)) == k
    seen = {sn.joint_class(attributes_for(i, split=split)) for split in ("train", "val") for i in range(3000)}
    assert seen == set(range(sn.NUM_CLASSES))  # every class reachable, every item a class
    attrs = attributes_for(7)
    k = sn.joint_class(attrs)  # an Attributes (with its background) works as is
    assert sn.joint_class(attrs._asdict()) == sn.joint_class(tuple(attrs)) == k
    with pytest.raises(ValueError, match="rotating circle"):
        sn.joint_class(("circle", "red", "rotate"))
    with pytest.raises(ValueError, match="unknown colour"):
        sn.joint_class(("circle", "pink", "left"))
    with pytest.raises(IndexError):
        sn.attributes_of_class(sn.NUM_CLASSES)


def test_prompt_attributes_parse_every_caption():
    for shape, colour, motion in sn.JOINT_CLASSES:
        for background in BACKGROUNDS:
            assert sn.prompt_attributes(caption_for(shape, colour, motion, background)) == (shape, colour, motion)
    assert sn.prompt_attributes(caption_for("star", "cyan", None, "light")) == ("star", "cyan", None)
    assert sn.prompt_attributes("Two BLUE stars spinning") == ("star", "blue", "rotate")
    assert sn.prompt_attributes("a cat on a checkered background") == (None, None, None)
    assert sn.prompt_attributes("a square") == sn.PromptAttributes("square", None, None)


def test_marginals_agree_with_a_peaked_joint():
    logits = torch.full((sn.NUM_CLASSES, sn.NUM_CLASSES), -20.0).fill_diagonal_(20.0)  # row k peaked on class k
    marginals = sn.marginals(logits.softmax(-1))
    log_marginals = sn.marginal_log_probs(logits)
    for a in sn.ATTRIBUTES:
        expected = sn.CLASS_ATTRIBUTE_INDEX[a]
        assert torch.equal(marginals[a].argmax(-1), expected)
        assert torch.allclose(log_marginals[a].exp(), marginals[a], atol=1e-6)
        assert torch.allclose(marginals[a].sum(-1), torch.ones(sn.NUM_CLASSES))


@pytest.mark.parametrize("kind", sn.KINDS)
def test_attribute_predictions_follow_a_peaked_net(kind):
    net = sn.build_feature_net(sn.resolve_settings(kind, **TINY[kind])).eval()
    head = net.backbone.classifier.conv3d if kind == "i3d" else net.backbone.fc8
    k = sn.joint_class(("triangle", "purple", "shrink"))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[k] = 30.0
    predictions = net.attribute_predictions(_videos(3))
    assert {a: p.tolist() for a, p in predictions.items()} == {
        "shape": [SHAPES.index("triangle")] * 3, "colour": [COLOURS.index("purple")] * 3,
        "motion": [MOTIONS.index("shrink")] * 3}
    assert all(p.dtype == torch.long for p in predictions.values())


@pytest.mark.parametrize("kind", sn.KINDS)
def test_tiny_training_saves_a_net_that_reloads_identically(kind, tmp_path):
    net, meta = sn.fit_feature_net(kind, progress=False, **TINY[kind])
    assert set(meta["accuracy"]["val"]) == {"shape", "colour", "motion", "joint"}
    path = sn.save_feature_net(net, meta, tmp_path / f"{kind}.safetensors")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["settings"]["kind"] == kind and sidecar["num_classes"] == sn.NUM_CLASSES

    loaded = sn.load_feature_net(path)
    videos = _videos(3)
    assert not loaded.training
    assert torch.equal(loaded.probs(videos), net.probs(videos))
    assert torch.equal(loaded.embedding(videos), net.embedding(videos))
    assert loaded.probs(videos).shape == (3, sn.NUM_CLASSES)
    # The real metrics, fed the same backbone, preprocess the same way.
    if kind == "i3d":
        fvd = FrechetVideoDistance(loaded.backbone, **loaded.fvd_kwargs)
        assert torch.allclose(fvd.embed(videos).float(), loaded.embedding(videos), atol=1e-6)
        assert isinstance(load_i3d(path), torch.nn.Module)  # the file is a plain I3D state dict
    else:
        metric = VideoInceptionScore(loaded.backbone, loaded.c3d_mean)
        metric.update(videos)
        assert torch.allclose(torch.cat(metric.probs).float(), loaded.probs(videos), atol=1e-6)
        c3d, mean = load_c3d(path, num_classes=sn.NUM_CLASSES, width=0.0625, input_size=(8, 32, 32), fc_dim=16)
        assert torch.equal(mean, loaded.c3d_mean)
    with pytest.raises(ValueError, match="8-frame"):
        loaded.probs(_videos(2, num_frames=4))


def test_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python eval/train_synthetic_nets.py"):
        sn.load_feature_net(tmp_path / "i3d.safetensors")


def test_ensure_feature_net_trains_once_per_settings(tmp_path, monkeypatch):
    calls = []
    fit = sn.fit_feature_net

    def counting_fit(*args, **kwargs):
        calls.append(kwargs)
        return fit(*args, **kwargs)

    monkeypatch.setattr(sn, "fit_feature_net", counting_fit)
    settings = TINY["c3d"]
    first = sn.ensure_feature_net("c3d", tmp_path, settings, progress=False)
    second = sn.ensure_feature_net("c3d", tmp_path, settings, progress=False)
    assert len(calls) == 1 and first.meta == second.meta
    assert sn.feature_net_path("c3d", tmp_path, settings).is_file()
    assert sn.feature_net_path("c3d", tmp_path, settings | {"seed": 1}) != sn.feature_net_path("c3d", tmp_path,
                                                                                                 settings)
    with pytest.raises(ValueError, match="unknown c3d feature-net settings"):
        sn.resolve_settings("c3d", depth=3)


def test_cli_writes_the_requested_nets(tmp_path):
    from eval.train_synthetic_nets import main

    paths = main(["--kind", "c3d", "--out-dir", str(tmp_path), "--steps", "1", "--batch-size", "2", "--width",
                  "0.0625", "--val-size", "2", "--threads", "0", "--no-progress"])
    assert paths == [tmp_path / "c3d.safetensors"]
    assert sn.load_feature_net(paths[0]).meta["settings"]["steps"] == 1
