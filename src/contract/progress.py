"""Progress bars on the terminal for long operations: fetching a model's shards (bytes),
importing a GGUF file (tensors), the coordinator waiting for its workers to load (one
bar a worker).

Bars are drawn (with rich, on stderr, so stdout stays for what a command prints) when
stdout is a terminal, or when asked: `MLX_CLUSTER_PROGRESS=1` (what `mlx-cluster
--progress` sets, so that the processes it starts draw them too); `=0` keeps them off.
Off, every call here still works and draws nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

PROGRESS_ENV = "MLX_CLUSTER_PROGRESS"
Unit = Literal["bytes", "tensors", "layers"]


def asked() -> bool | None:
    """What MLX_CLUSTER_PROGRESS asks: bars (True), none (False), or nothing (None)."""
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    return None


def wanted() -> bool:
    """Whether to draw bars: as MLX_CLUSTER_PROGRESS says, else when stdout is a terminal."""
    explicit = asked()
    return sys.stdout.isatty() if explicit is None else explicit


class _Figures(ProgressColumn):
    """`done/total unit`, bytes in kB/MB/GB."""

    def render(self, task: Task) -> Text:
        unit: Unit = task.fields["unit"]
        if unit == "bytes":
            done, total = decimal(int(task.completed)), decimal(int(task.total or 0))
            return Text(f"{done}/{total}")
        return Text(f"{int(task.completed)}/{int(task.total or 0)} {unit}")


class Bar:
    """One bar; every change is drawn at once (when bars are drawn at all)."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: float) -> None:
        self._progress.update(self._task, advance=amount, refresh=True)

    def set(
        self, *, completed: float | None = None, total: float | None = None, note: str = ""
    ) -> None:
        """Set the figures and the note after the description."""
        self._progress.update(self._task, completed=completed, total=total, note=note, refresh=True)

    def finish(self, note: str = "") -> None:
        task = self._progress.tasks[self._task]
        self.set(completed=task.total, note=note)


class Bars:
    """The bars of one operation, drawn while it runs (`with bars():` ... `bars.add`)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def add(self, description: str, total: float, unit: Unit) -> Bar:
        task = self._progress.add_task(description, total=total, unit=unit, note="")
        return Bar(self._progress, task)


@contextmanager
def bars(draw: bool | None = None) -> Iterator[Bars]:
    """Bars drawn on stderr while the block runs; `draw` defaults to `wanted()`. Asked
    for, they are drawn as on a terminal even where stderr is not one."""
    draw = wanted() if draw is None else draw
    console = Console(file=sys.stderr, force_terminal=True if draw and asked() else None)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        _Figures(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        disable=not draw,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with progress:
        yield Bars(progress)
