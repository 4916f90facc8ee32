"""Shared plumbing for the Hydra entry scripts: clean messages for user errors instead of tracebacks, and no empty
run folder left behind by a run that stopped before writing anything."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from callbacks.finite_guard import NonFiniteTrainingError
from modules.components.checkpoints import CheckpointKeyError

log = logging.getLogger("t2v")

# Errors that mean "the input is wrong" (a path, a checkpoint, a config value), not "the code is wrong"; a run that
# diverged (NaN loss) is reported the same way: its message names the step and the settings to look at.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError, CheckpointKeyError,
                                                NonFiniteTrainingError)


def user_error_behind(exc: BaseException) -> BaseException | None:
    """The user error behind `exc`, looking through Hydra's InstantiationException wrapping."""
    while exc is not None:
        if isinstance(exc, USER_ERRORS) and not isinstance(exc, InstantiationException):
            return exc
        exc = exc.__cause__
    return None


# what Hydra writes into a run folder before the task starts: <output_subdir>/{config,hydra,overrides}.yaml
HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def hydra_run_dir() -> tuple[Path, str | None] | None:
    """(the run folder Hydra made for this job, its output_subdir); None outside @hydra.main (compose API, tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.runtime.output_dir), hydra_cfg.output_subdir


def _job_log_handlers(run_dir: Path) -> list[logging.FileHandler]:
    """Hydra's job log file handler(s) (<run dir>/<job name>.log)."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run_dir]


def holds_only_hydra_files(run_dir: Path, output_subdir: str | None, empty_logs: bool) -> bool:
    """Whether `run_dir` holds nothing but what Hydra writes itself (the .hydra/ configs and the job log, which must
    be empty when `empty_logs`)."""
    if not run_dir.is_dir():
        return False
    logs = {Path(h.baseFilename) for h in _job_log_handlers(run_dir)}
    for entry in run_dir.iterdir():
        if output_subdir and entry.name == output_subdir and entry.is_dir() and not entry.is_symlink():
            if all(f.is_file() and f.name in HYDRA_FILES for f in entry.iterdir()):
                continue
        elif entry in logs and entry.is_file() and not (empty_logs and entry.stat().st_size):
            continue
        return False
    return True


def remove_empty_run_dir(run_dir: Path, output_subdir: str | None) -> bool:
    """Remove a run folder that holds nothing but Hydra's own files; True if it was removed."""
    if not holds_only_hydra_files(run_dir, output_subdir, empty_logs=False):
        return False
    for handler in _job_log_handlers(run_dir):
        logging.getLogger().removeHandler(handler)
        handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


def log_to_files(message: str) -> None:
    """An ERROR record in the job log file only: the console already shows the message once, on stderr."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error's message once (stderr, no traceback; the job log gets it too) and exit with status 2;
    other errors propagate. T2V_DEBUG=1 re-raises user errors too, with their traceback.

    A run that fails before writing anything leaves nothing behind: when the run folder was new (nothing in it but
    what Hydra writes before the task: .hydra/ and an empty job log) and still holds nothing else, it is removed.
    A folder that held anything before the run (a resumed evaluation, hydra.run.dir=.) is never removed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run = hydra_run_dir()
        fresh = run is not None and holds_only_hydra_files(*run, empty_logs=True)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if fresh:
                remove_empty_run_dir(*run)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit
            user_error = user_error_behind(exc)
            if user_error is None or os.environ.get("T2V_DEBUG"):
                raise
            log_to_files(f"{type(user_error).__name__}: {user_error}")
            print(f"error: {user_error}\n(set T2V_DEBUG=1 for the traceback)", file=sys.stderr)
            sys.exit(2)

    return wrapper


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group mapping (callbacks, loggers) that has a _target_."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]
