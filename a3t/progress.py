"""Live progress of long steps on the terminal (rich): episodes done, won, tokens/s.

One bar at a time: rich allows a single live display per console, so a step that runs
while another shows its bar (concurrent rollout shards) reports by a line when it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
_live = threading.Lock()


@contextmanager
def step_bar(label: str, total: int) -> Iterator[Callable[[], None]]:
    """A bar of ``total`` units; the callback advances it by one."""
    with _bar(label, total) as (progress, bar):
        yield (lambda: progress.advance(bar)) if progress else (lambda: None)


@contextmanager
def _bar(label: str, total: int):
    """(progress, task id), or (None, None) while another bar is live."""
    if not _live.acquire(blocking=False):
        yield None, None
        return
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            yield progress, progress.add_task(label, total=total)
    finally:
        _live.release()


@contextmanager
def rollout_bar(label: str, tasks: int) -> Iterator[Callable]:
    """A callback for ``rollout(on_progress=...)`` that drives a bar of ``tasks`` episodes
    (retries extend it)."""
    with _bar(label, tasks) as (progress, bar):
        last = []

        def show(stats) -> None:
            last[:] = [stats]
            if progress:
                done = stats.episodes + stats.skipped
                progress.update(bar, completed=done, total=max(tasks, done),
                                description=f"{label}: {stats.successes} won, {stats.tokens_per_s:.0f} tok/s")

        yield show
    if last and not progress:
        s = last[0]
        console.print(f"{label}: {s.episodes} episodes, {s.successes} won, {s.tokens_per_s:.0f} tok/s")
