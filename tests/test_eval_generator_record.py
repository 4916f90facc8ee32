"""The generator record behind an evaluation folder names every file the model config points to, by content."""
from __future__ import annotations

from types import SimpleNamespace

from omegaconf import OmegaConf

from eval.runner import files_in_config, generator_record


def record(cfg):
    return generator_record(cfg, SimpleNamespace(sampler_settings=lambda: {"steps": 2}))


def config(tmp_path, stage_ckpt):
    return OmegaConf.create({
        "model": {"_target_": "modules.lavie_cascade.LaVieCascade",
                  "base": {"ckpt_path": str(stage_ckpt), "pretrained": {"sd_path": str(tmp_path)}},
                  "stages": [{"checkpoint": str(stage_ckpt)}, {"checkpoint": None}]},
        "ckpt_path": None, "precision": "fp32", "seed": 0})


def test_a_stage_checkpoint_replaced_at_the_same_path_changes_the_record(tmp_path):
    stage = tmp_path / "base.ckpt"
    stage.write_bytes(b"weights one")
    first = record(config(tmp_path, stage))
    assert set(first["model_files_sha256"]) == {"model.base.ckpt_path", "model.stages.0.checkpoint"}
    stage.write_bytes(b"weights two")
    second = record(config(tmp_path, stage))
    assert second["model_files_sha256"]["model.base.ckpt_path"] != first["model_files_sha256"]["model.base.ckpt_path"]
    assert second != first


def test_folders_and_missing_paths_are_not_files(tmp_path):
    found = files_in_config({"sd_path": str(tmp_path), "ckpt": str(tmp_path / "absent.ckpt"), "name": "lavie"})
    assert found == {}
