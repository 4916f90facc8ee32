"""Shared plumbing for the Hydra entry scripts: clean messages for user errors instead of tracebacks."""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
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


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error's message (no traceback) and exit with status 2; other errors propagate.
    T2V_DEBUG=1 re-raises user errors too, with their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - filtered below
            user_error = user_error_behind(exc)
            if user_error is None or os.environ.get("T2V_DEBUG"):
                raise
            log.error("%s: %s", type(user_error).__name__, user_error)
            print(f"error: {user_error}\n(set T2V_DEBUG=1 for the traceback)", file=sys.stderr)
            sys.exit(2)

    return wrapper


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group mapping (callbacks, loggers) that has a _target_."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]
