"""Terminal output: results on stdout, progress and messages on stderr (so --json stays clean)."""

from __future__ import annotations

import contextlib
import json
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True, markup=False)  # results may contain [brackets]


MAX_MESSAGE = 300  # an error is one readable line, whatever a library put into its message


def one_line(msg, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def info(msg: str) -> None:
    err.print(f"[dim]•[/dim] {escape(str(msg))}")


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(one_line(msg))}")


def error(msg: str, label: str = "error") -> None:
    err.print(f"[red]{label}:[/red] {escape(one_line(msg))}")


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def eta(elapsed: float, done: int, total: int) -> str:
    """' (12s, ~36s left)': elapsed time and the remaining time at the rate so far ('' before the first step)."""
    if done <= 0 or elapsed <= 0:
        return ""
    if done >= total:
        return f" ({elapsed:.0f}s)"
    return f" ({elapsed:.0f}s, ~{elapsed / done * (total - done):.0f}s left)"


@contextlib.contextmanager
def progress(quiet: bool = False):
    """Yield a callback `update(label, done, total)` that drives one bar per label."""
    if quiet or not err.is_terminal and not sys.stderr.isatty():
        last, started = {}, {}

        def plain(label, done, total):  # non-interactive: a line per 25% so CI logs show life, with an ETA
            now = time.monotonic()
            t0, d0 = started.setdefault(label, (now, done))  # the first report: the rate counts from there
            step = max(total // 4, 1)
            if done == total or done // step != last.get(label, -1):
                last[label] = done // step
                if not quiet:
                    err.print(f"  {escape(label)}: {done}/{total}{escape(eta(now - t0, done - d0, total - d0))}")

        yield plain
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)
    tasks = {}
    with bars:
        def update(label, done, total):
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total)
            bars.update(tasks[label], completed=done, total=total)

        yield update
