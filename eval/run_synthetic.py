"""Evaluate a backbone with the synthetic protocol (configs/eval/synthetic.yaml); see eval/runner.py for the options."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run as a script

from eval.entry import main  # noqa: E402

if __name__ == "__main__":
    main("synthetic")
