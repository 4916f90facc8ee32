"""Progress of the long loops (sampling, evaluation) in a form a terminal and a log file can both follow.

On a terminal: a Rich bar with the work done, the time elapsed and the time left. The time left is measured over
the whole run (work done in this run / time since it started): Rich's own estimate looks at the last 30 s only,
so when one update takes longer than that it shows nothing, and once finished it shows "0:00:00".
Not on a terminal (nohup, a cluster job, output redirected to a file), where a live bar prints only its final
state: a plain line at most every `every_seconds`, and one at the end, e.g.

    generating: 40/100 steps  elapsed 0:12  left 0:18
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def format_duration(seconds: float | None) -> str:
    """3:12, 1:02:03; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def time_left(done: float, elapsed: float, remaining: float) -> float | None:
    """Seconds left for `remaining` units of work at the rate of `done` units in `elapsed` seconds."""
    if remaining <= 0:
        return 0.0
    if done <= 0 or elapsed <= 0:
        return None
    return remaining * elapsed / done


def _amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


class WorkProgress:
    """A unit of work counted towards a total: `update(completed)` / `advance(amount)`, inside `with`.

    `completed` at construction is work already done before this run (resumed videos): it counts towards the bar
    but not towards the rate that the time left is computed from. `total` may be set later (`set_total`), e.g.
    once the first denoising step says how many steps a call takes. `plain=None` chooses by `on_terminal()`.
    """

    def __init__(self, description: str, total: float | None = None, completed: float = 0.0, unit: str = "",
                 enabled: bool = True, plain: bool | None = None, every_seconds: float = 30.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.description, self.unit = description, unit
        self.total, self.completed, self.initial = total, float(completed), float(completed)
        self.enabled = enabled
        self.stream = stream
        self.plain = (not on_terminal(stream)) if plain is None else plain
        self.every_seconds = every_seconds
        self.clock = clock
        self.started = self.last_line = clock()
        self.printed = False
        self._rich: Progress | None = None
        self._task: Any = None

    # ------------------------------------------------------------------ reporting
    def elapsed(self) -> float:
        return self.clock() - self.started

    def seconds_left(self) -> float | None:
        if self.total is None:
            return None
        return time_left(self.completed - self.initial, self.elapsed(), self.total - self.completed)

    def status(self) -> str:
        """'40/100 steps  elapsed 0:12  left 0:18'"""
        unit = f" {self.unit}" if self.unit else ""
        done = _amount(self.completed) + (f"/{_amount(self.total)}" if self.total is not None else "")
        return f"{done}{unit}  elapsed {format_duration(self.elapsed())}  left {format_duration(self.seconds_left())}"

    def line(self) -> str:
        return f"{self.description}: {self.status()}"

    # ------------------------------------------------------------------ updates
    def set_total(self, total: float) -> None:
        self.total = total
        self._refresh()

    def update(self, completed: float) -> None:
        self.completed = float(completed)
        self._refresh()

    def advance(self, amount: float = 1.0) -> None:
        self.update(self.completed + amount)

    def _refresh(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, total=self.total, completed=self.completed)
        elif self.plain and self.clock() - self.last_line >= self.every_seconds:
            self._print_line()

    def _print_line(self) -> None:
        print(self.line(), file=self.stream or sys.stdout, flush=True)
        self.last_line = self.clock()
        self.printed = True

    # ------------------------------------------------------------------ context
    def __enter__(self) -> WorkProgress:
        self.started = self.last_line = self.clock()
        if self.enabled and not self.plain:
            self._rich = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(bar_width=20),
                                  _StatusColumn(self), transient=False)
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, completed=self.completed)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.update(self._task, total=self.total, completed=self.completed)
            self._rich.stop()
            self._rich = None
        elif self.enabled and self.plain and (exc[0] is None or self.printed):
            self._print_line()  # the final state, or where an interrupted run stopped


class _StatusColumn(ProgressColumn):
    """done/total, elapsed and time left as WorkProgress computes them (over the whole run)."""

    def __init__(self, work: WorkProgress):
        super().__init__()
        self.work = work

    def render(self, task: Any) -> Text:
        return Text(self.work.status(), style="progress.remaining")
