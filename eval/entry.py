"""The Hydra entry shared by eval/run_*.py: each script names its default protocol; `eval=...` overrides it."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from eval.runner import evaluate
from utils.cli import user_errors_exit


CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")  # absolute: this module is imported, not run


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="evaluate")
@user_errors_exit
def _main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main(default_protocol: str) -> None:
    if not any(arg.startswith(("eval=", "+eval=")) for arg in sys.argv[1:]):
        sys.argv.insert(1, f"eval={default_protocol}")
    _main()
