"""The project's Hydra configs composed in-process, as the entry scripts compose them, for tests that call
train() / sample() / evaluate() directly instead of paying a new interpreter per case."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]


def compose_config(config_name: str, overrides: list[str], output_dir: str | Path) -> DictConfig:
    """`config_name` (train, sample, evaluate) with `overrides`; the run folder is `output_dir` (what
    `hydra.run.dir` gives the entry scripts) and relative paths resolve against the repository."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name, overrides=[*overrides, f"paths.output_dir={output_dir}",
                                               f"paths.root_dir={REPO}"])
