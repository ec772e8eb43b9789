"""What a person watching a sweep sees: arm k of N, elapsed time and an ETA, printed by the sweep's
own process.

The rest has its bars already: training draws Lightning's `RichProgressBar` (Lightning's default
when rich is installed), dataset generation (`datamodules.shapes.generate_shapes`) and latent
caching (`datamodules.latent_cache.build_latent_cache`) draw ``rich.progress.track`` bars.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Column


def clock(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03``; ``?`` when not known yet."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class SweepProgress:
    """The sweep's progress, drawn by the parent process. ETA: the mean time of the arms finished in
    this invocation × the work left (arms waiting, plus what running arms have left of that mean),
    divided by the arms that run at once.

    ``live`` (default: several arms at once on a terminal) draws a rich bar for the sweep and one per
    running arm (its training step, read from MLflow). Otherwise one line per event: arms that train
    in this process print Lightning's own bar below the line, and rich allows one live display at a time.
    """

    def __init__(self, name: str, total: int, jobs: int, console: Console | None = None,
                 live: bool | None = None, label_width: int = 60) -> None:
        self.console = console or Console()
        self.name, self.total, self.jobs = name, total, jobs
        self.start = time.time()
        self.durations: list[float] = []
        self.running: dict[int, float] = {}  # arm index -> start time
        self.waiting = 0
        self.done = 0
        use_live = (jobs > 1 and self.console.is_terminal) if live is None else live
        self.bars: Progress | None = None
        self.tasks: dict[int, TaskID] = {}
        self.steps_seen: set[int] = set()
        if use_live:
            label = Column(width=label_width, no_wrap=True, overflow="ellipsis")  # bars stay put as arms come and go
            self.bars = Progress(TextColumn("{task.description}", markup=False, table_column=label), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[timing]}", markup=False),
                                 console=self.console, transient=False)
            self.overall = self.bars.add_task(f"sweep {name}", total=total, timing="")
            self.bars.start()

    def eta(self) -> float | None:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        now = time.time()
        left = self.waiting * mean + sum(max(0.0, mean - (now - t)) for t in self.running.values())
        return left / max(1, min(self.jobs, self.waiting + len(self.running)))

    def timing(self) -> str:
        return f"elapsed {clock(time.time() - self.start)} · ETA {clock(self.eta())}"

    def plan(self, skipped: int, to_run: int) -> None:
        self.done, self.waiting = skipped, to_run
        if skipped:
            self._print(f"sweep {self.name}: {skipped} of {self.total} arms finished in an earlier run (skipped); "
                        f"{to_run} to run, {self.jobs} at a time")
        self.refresh()

    def started(self, index: int, key: str, log_file: str | None, inline: bool) -> None:
        self.waiting -= 1
        self.running[index] = time.time()
        where = f" · log: {log_file}" if log_file else ""
        head = f"arm {index + 1} of {self.total}: {key}"
        if self.bars is not None:  # the log path once above the bars, which stay short enough to draw
            self._print(escape(f"{head} · started{where}"))
            self.tasks[index] = self.bars.add_task(head, total=None, timing="starting")
        elif inline:
            self.console.rule(escape(f"{head} · {self.timing()}"), align="left")
        else:
            self._print(escape(f"{head} · started · {self.timing()}{where}"))
        self.refresh()

    def step(self, index: int, steps_done: int, max_steps: int | None) -> None:
        """Training progress of a running arm (live display only)."""
        if self.bars is not None and index in self.tasks:
            self.bars.update(self.tasks[index], completed=steps_done, total=max_steps)
            self.steps_seen.add(index)

    def finished(self, index: int, key: str, status: str, detail: str = "") -> None:
        started = self.running.pop(index, None)
        seconds = None if started is None else time.time() - started
        if seconds is not None and status == "FINISHED":
            self.durations.append(seconds)
        self.done += 1
        if self.bars is not None and index in self.tasks:
            self.bars.remove_task(self.tasks.pop(index))
        colour = {"FINISHED": "green", "FAILED": "red"}.get(status, "yellow")
        self._print(f"arm {index + 1} of {self.total} [{colour}]{status}[/] in {clock(seconds)}: "
                    + escape(f"{key}" + (f" · {detail}" if detail else "") + f" · {self.timing()}"))
        self.refresh()

    def refresh(self) -> None:
        if self.bars is not None:
            self.bars.update(self.overall, completed=self.done, timing=self.timing())
            for index in self.steps_seen & set(self.tasks):  # an arm shows "starting · log" until it trains
                self.bars.update(self.tasks[index], timing=f"running {clock(time.time() - self.running[index])}")

    def close(self) -> None:
        if self.bars is not None:
            self.refresh()
            self.bars.stop()
            self.bars = None

    def _print(self, text: str) -> None:
        (self.bars.console if self.bars is not None else self.console).print(text, soft_wrap=True, highlight=False)
