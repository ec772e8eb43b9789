"""Run an ablation (`experiments.ablation`: grid, zip, seeds, per-arm overrides): one MLflow parent run
with a child run per arm, each tagged ``vidlab.arm`` and ``vidlab.axis.<key>``.

How arms run:

- ``jobs: 1`` (the default): one after another; a single-process arm trains inside this process
  (`experiments.fit.run_fit`), its output on the terminal.
- ``jobs: N`` (``vidlab sweep FILE --jobs N`` or ``jobs:`` in the file): up to N arms at once, each a
  ``vidlab fit ... --run-id CHILD`` process (`experiments.arms`) with the cores split between them
  (``OMP_NUM_THREADS`` = cores // N, capped by the sweep's own ``OMP_NUM_THREADS``) and its output in
  ``<output_dir>/sweeps/<name>-<fingerprint>/<arm>.<run>.log`` (reported, tagged ``vidlab.log_file``
  and attached to the child run under ``logs/``).
- A distributed arm (``trainer.devices > 1``, several nodes, or strategy ``ddp``/``fsdp``) always runs
  as its own process, alone: Lightning's launcher re-executes the command that started it, which
  must be that one arm (`experiments.arms`). Its ranks attach to the child run the sweep created.

The sweep creates each child run before the arm starts, so every arm has exactly one run whatever
runs it. An arm that fails is recorded FAILED with its error in the ``vidlab.error`` tag and the
others go on; Ctrl-C or SIGTERM stops the running arms and records them (and the parent) KILLED.
Every arm is composed before anything runs: a config error in any arm stops the sweep at once,
naming the ablation file and the arm.

Re-running the same file finds its parent run (by a fingerprint of the file, `Ablation.fingerprint`)
and runs only what is unfinished:

- an arm with a FINISHED child is skipped;
- a KILLED arm, or one left RUNNING by a sweep that died, continues its own child run from the
  checkpoint ``checkpoints/<run>/last.ckpt`` when there is one (``vidlab fit --resume`` semantics), so
  the steps done are not redone; without a checkpoint it starts a fresh child run;
- a FAILED arm starts a fresh child run: the failure is kept as it was (with its error and log) and
  `experiments.compare` reads FINISHED runs only.

A child still RUNNING under a live process (another ``vidlab sweep`` of the same file) stops the
re-run with an error rather than training the arm twice.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from rich.console import Console

from experiments.ablation import Ablation, Arm, format_axis_value, load_ablation
from experiments.arms import (STOP_GRACE_S, ArmProcess, arm_env, fit_command, identity_alive, is_distributed,
                              process_identity, threads_per_arm)
from experiments.config import COMMAND_LINE, Composed, ConfigError, compose
from experiments.fit import FitResult, run_fit
from experiments.progress import SweepProgress
from experiments.tracking import experiment_id, git_state, tracking_uri

__all__ = ["Ablation", "Arm", "ArmResult", "SweepBusyError", "format_axis_value", "load_ablation", "run_sweep"]
POLL_S = 0.5  # how often the sweep looks at its running arm processes
STEP_POLL_S = 5.0  # how often it reads their training step from MLflow (live display only)


class SweepBusyError(ConfigError):
    """An arm of this sweep is still being trained by a live process: running it again would train it
    twice into one MLflow parent. (A ConfigError so that ``vidlab sweep`` prints it as one line.)"""


@dataclass
class ArmResult:
    arm: Arm
    run_id: str
    status: str  # FINISHED | FAILED | KILLED | SKIPPED (finished in an earlier invocation)
    final_loss: float | None = None
    samples_dir: str | None = None
    error: str | None = None
    log_file: str | None = None  # arms run as processes: their stdout + stderr
    seconds: float | None = None
    index: int = 0  # position in `Ablation.arms()`


@dataclass
class _Attempt:
    """One arm to run in this invocation: a fresh child run, or `resume` of an existing one."""

    index: int
    arm: Arm
    composed: Composed
    distributed: bool
    resume_run: Run | None = None


@dataclass
class _Running:
    attempt: _Attempt
    run_id: str
    process: ArmProcess
    step_read: float = 0.0


def run_sweep(path: str | Path, fit: Callable[..., FitResult] = run_fit, jobs: int | None = None,
              console: Console | None = None) -> list[ArmResult]:
    """Run every unfinished arm of the ablation in ``path``; returns one result per arm, in order.

    ``jobs``: arms at a time (default: the file's ``jobs:``, else 1); with more than one every arm
    is a process. ``fit`` trains an arm inside this process (``jobs`` 1, single-process arms only).
    ``console``: where the progress goes (default: the terminal, `experiments.progress.SweepProgress`).
    """
    ablation = load_ablation(path)
    jobs = jobs or ablation.jobs or 1
    arms = ablation.arms()
    composed = {arm.key: _compose_arm(ablation, arm) for arm in arms}
    first = composed[arms[0].key].cfg
    if len({c.cfg["tracking"]["experiment"] for c in composed.values()}) > 1:
        raise ConfigError(f"{ablation.path}: every arm must log to the same tracking.experiment")
    client = MlflowClient(tracking_uri(first))
    exp_id = experiment_id(first)
    found = _find_parent(client, exp_id, ablation)
    by_arm = _children(client, exp_id, found.info.run_id) if found else {}
    _check_not_running(ablation, found, by_arm)
    parent = _claim_parent(client, exp_id, ablation, found)

    results: dict[int, ArmResult] = {}
    todo: list[_Attempt] = []
    for index, arm in enumerate(arms):
        runs = by_arm.get(arm.key, [])
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished:
            results[index] = _skipped(index, arm, finished[0])
            continue
        cfg = composed[arm.key].cfg
        todo.append(_Attempt(index, arm, composed[arm.key], is_distributed(cfg), _resumable(client, runs, cfg)))

    width = min(70, max(len(f"arm {len(arms)} of {len(arms)}: {arm.key}") for arm in arms))
    sweep = _Sweep(client, exp_id, parent, ablation, fit, jobs,
                   SweepProgress(ablation.name, len(arms), jobs, console, label_width=width))
    sweep.progress.plan(len(results), len(todo))
    try:
        with _sigterm_as_interrupt():
            results.update(sweep.run(todo))
    except BaseException:
        sweep.stop_all()
        client.set_terminated(parent, status="KILLED")
        raise
    finally:
        sweep.progress.close()
    ordered = [results[i] for i in range(len(arms))]
    failed = any(r.status == "FAILED" for r in ordered)
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    return ordered


def _compose_arm(ablation: Ablation, arm: Arm) -> Composed:
    """The arm's config; an error names the ablation file and the arm, not the command line."""
    try:
        return compose(ablation.experiment, arm.overrides)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{COMMAND_LINE}: ")
        raise ConfigError(f"{ablation.path}: arm [{arm.key}]: {message}") from exc


def _find_parent(client: MlflowClient, exp_id: str, ablation: Ablation) -> Run | None:
    """The parent run of an earlier invocation of this file (same fingerprint), if any."""
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`vidlab.sweep_fingerprint` = '{ablation.fingerprint}' and tags.`vidlab.role` = 'sweep'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return found[0] if found else None


def _check_not_running(ablation: Ablation, parent: Run | None, by_arm: dict[str, list[Run]]) -> None:
    """Stop before touching anything when a live process still runs this sweep or one of its arms."""
    for run in [parent] * (parent is not None) + [r for runs in by_arm.values() for r in runs]:
        owner = run.data.tags.get("vidlab.process", "")
        if run.info.status == "RUNNING" and owner and identity_alive(owner):
            what = f"arm {run.data.tags['vidlab.arm']}" if "vidlab.arm" in run.data.tags else "this sweep"
            raise SweepBusyError(f"{ablation.path}: {what} is still running in process {owner} (run "
                                 f"{run.info.run_id}); wait for it or stop it first")


def _claim_parent(client: MlflowClient, exp_id: str, ablation: Ablation, found: Run | None) -> str:
    """The parent run, RUNNING again under this process, or a new one with the ablation file attached."""
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        client.set_tag(found.info.run_id, "vidlab.process", process_identity())
        return found.info.run_id
    tags = {"vidlab.role": "sweep", "vidlab.sweep": ablation.name, "vidlab.sweep_fingerprint": ablation.fingerprint,
            "vidlab.ablation_file": str(ablation.path), "vidlab.process": process_identity(), **git_state()}
    run = client.create_run(exp_id, run_name=f"sweep:{ablation.name}", tags=tags)
    client.log_text(run.info.run_id, ablation.path.read_text(), "ablation.yaml")
    return run.info.run_id


def _children(client: MlflowClient, exp_id: str, parent: str) -> dict[str, list[Run]]:
    """The parent's child runs by arm key, newest first."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000,
                              order_by=["attributes.start_time DESC"])
    out: dict[str, list[Run]] = {}
    for run in runs:
        if "vidlab.arm" in run.data.tags:
            out.setdefault(run.data.tags["vidlab.arm"], []).append(run)
    return out


def _resumable(client: MlflowClient, runs: list[Run], cfg: dict[str, Any]) -> Run | None:
    """The interrupted child run to continue (KILLED, or RUNNING with its process gone, and with a
    checkpoint), or None (a fresh child run). RUNNING children not continued are recorded KILLED."""
    latest = runs[0] if runs else None
    checkpoint = None if latest is None else Path(cfg["output_dir"]) / "checkpoints" / latest.info.run_id / "last.ckpt"
    resume = latest if latest is not None and latest.info.status in ("RUNNING", "KILLED") and checkpoint.exists() else None
    for run in runs:
        if run.info.status == "RUNNING" and run is not resume:  # left by a sweep that died
            client.set_terminated(run.info.run_id, status="KILLED")
    return resume


def _skipped(index: int, arm: Arm, run: Run) -> ArmResult:
    tags = run.data.tags
    return ArmResult(arm, run.info.run_id, "SKIPPED", run.data.metrics.get("train/loss"), tags.get("vidlab.samples_dir"),
                     log_file=tags.get("vidlab.log_file"), index=index)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill PID`` of the sweep stops it like Ctrl-C: running arms stopped and recorded KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Sweep:
    """The arms of one invocation: when each starts, in which process, and what MLflow records."""

    def __init__(self, client: MlflowClient, exp_id: str, parent: str, ablation: Ablation,
                 fit: Callable[..., FitResult], jobs: int, progress: SweepProgress) -> None:
        self.client, self.exp_id, self.parent, self.ablation, self.fit, self.jobs = client, exp_id, parent, ablation, fit, jobs
        self.progress = progress
        self.running: dict[int, _Running] = {}
        self.log_dir: Path | None = None
        self.git = git_state()  # on every child from the start: a run that fails before training has it too

    def run(self, todo: list[_Attempt]) -> dict[int, ArmResult]:
        """Start arms in file order as slots free up: a distributed arm waits for the running arms to end
        and runs alone; the others share ``jobs`` slots (with ``jobs`` 1 they train in this process)."""
        results: dict[int, ArmResult] = {}
        single = [a for a in todo if not a.distributed]
        self.threads = threads_per_arm(min(self.jobs, len(single))) if self.jobs > 1 and single else None
        pending = deque(todo)
        while pending or self.running:
            while pending and self._can_start(pending[0]):
                attempt = pending.popleft()
                if self.jobs == 1 and not attempt.distributed:
                    results[attempt.index] = self._run_inline(attempt)
                else:
                    self._launch(attempt)
            if self.running:
                time.sleep(POLL_S)
            for index, running in list(self.running.items()):
                code = running.process.poll()
                if code is None:
                    self._read_step(running)
                else:
                    del self.running[index]
                    results[index] = self._reap(running, code)
            self.progress.refresh()
        return results

    def _can_start(self, attempt: _Attempt) -> bool:
        if not self.running:
            return True
        if attempt.distributed or any(r.attempt.distributed for r in self.running.values()):
            return False
        return len(self.running) < self.jobs

    def _tags(self, attempt: _Attempt) -> dict[str, str]:
        arm = attempt.arm
        tags = {"mlflow.parentRunId": self.parent, "vidlab.arm": arm.key, "vidlab.sweep": self.ablation.name,
                **self.git, **{f"vidlab.axis.{k}": format_axis_value(v) for k, v in arm.values.items()}}
        if arm.extra:
            tags["vidlab.arm_overrides"] = " ".join(arm.extra)
        return tags

    def _child(self, attempt: _Attempt, tags: dict[str, str]) -> str:
        """The child run this attempt logs into: the interrupted one it continues, or a new one."""
        attempt.composed.cfg["name"] = arm_name(self.ablation, attempt.arm)
        if attempt.resume_run is not None:
            run_id = attempt.resume_run.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.exp_id, run_name=attempt.composed.cfg["name"], tags=tags).info.run_id

    # -- in this process --------------------------------------------------------------------------

    def _run_inline(self, attempt: _Attempt) -> ArmResult:
        tags = self._tags(attempt)
        child = self._child(attempt, tags)
        self.client.set_tag(child, "vidlab.process", process_identity())
        self.progress.started(attempt.index, attempt.arm.key, None, inline=True)
        start = time.time()
        resume = {"resume": True} if attempt.resume_run is not None else {}
        try:
            result = self.fit(attempt.composed, run_id=child, tags=tags, **resume)
        except Exception as exc:  # noqa: BLE001 - one failed arm must not stop the sweep
            error = f"{type(exc).__name__}: {exc}"
            return self._failed(attempt, child, error, None, time.time() - start)
        except BaseException:
            self.client.set_terminated(child, status="KILLED")
            self.progress.finished(attempt.index, attempt.arm.key, "KILLED")
            raise
        self.client.set_terminated(child, status="FINISHED")
        samples_dir = str(result.samples[0].parent) if result.samples else None
        self.progress.finished(attempt.index, attempt.arm.key, "FINISHED", _loss_text(result.final_loss))
        return ArmResult(attempt.arm, child, "FINISHED", result.final_loss, samples_dir, seconds=time.time() - start,
                         index=attempt.index)

    def _failed(self, attempt: _Attempt, child: str, error: str, log_file: str | None, seconds: float) -> ArmResult:
        self.client.set_tag(child, "vidlab.error", error[:5000])
        self.client.set_terminated(child, status="FAILED")
        self.progress.finished(attempt.index, attempt.arm.key, "FAILED", error + (f" · log: {log_file}" if log_file else ""))
        return ArmResult(attempt.arm, child, "FAILED", error=error, log_file=log_file, seconds=seconds,
                         index=attempt.index)

    # -- as a process -----------------------------------------------------------------------------

    def _launch(self, attempt: _Attempt) -> None:
        tags = self._tags(attempt)
        child = self._child(attempt, tags)
        log_file = self._log_dir(attempt) / f"{_slug(attempt.index, attempt.arm.key)}.{child[:8]}.log"
        # the arm's own name, as inline arms get it (run name, and an autoencoder's export folder)
        overrides = [*attempt.arm.overrides, f"name={json.dumps(arm_name(self.ablation, attempt.arm))}"]
        command = fit_command(self.ablation.experiment, overrides, child, attempt.resume_run is not None)
        process = ArmProcess.launch(command, arm_env(None if attempt.distributed else self.threads), log_file)
        self.running[attempt.index] = _Running(attempt, child, process)  # at once: a Ctrl-C now stops it too
        self.client.set_tag(child, "vidlab.log_file", str(log_file))
        self.client.set_tag(child, "vidlab.process", process_identity(process.proc.pid))
        if not attempt.distributed and self.threads is not None:
            self.client.set_tag(child, "vidlab.threads", str(self.threads))
        self.progress.started(attempt.index, attempt.arm.key, str(log_file), inline=False)

    def _log_dir(self, attempt: _Attempt) -> Path:
        if self.log_dir is None:
            out = Path(attempt.composed.cfg["output_dir"])
            self.log_dir = out / "sweeps" / f"{self.ablation.name}-{self.ablation.fingerprint}"
        return self.log_dir

    def _read_step(self, running: _Running) -> None:
        """The arm's last logged training step, for the live display (MLflow holds it; no pipes needed)."""
        if self.progress.bars is None or time.time() - running.step_read < STEP_POLL_S:
            return
        running.step_read = time.time()
        try:
            history = self.client.get_metric_history(running.run_id, "train/loss")
        except Exception:  # noqa: BLE001 - a busy store only delays the display
            return
        if history:
            max_steps = running.attempt.composed.cfg["trainer"].get("max_steps")
            # MLflow's step is Lightning's global_step when logged, one less than the steps done
            self.progress.step(running.attempt.index, max(m.step for m in history) + 1,
                               max_steps if isinstance(max_steps, int) and max_steps > 0 else None)

    def _reap(self, running: _Running, code: int) -> ArmResult:
        """Record an arm whose process ended: FINISHED on exit code 0, else FAILED with its error (the
        ``vidlab.error`` tag ``vidlab fit`` set, else the log's last exception line and the exit code)."""
        attempt, child, process = running.attempt, running.run_id, running.process
        seconds, log_file = time.time() - process.started, str(process.log_file)
        self._attach_log(child, process.log_file)
        run = self.client.get_run(child)
        if code != 0:
            error = run.data.tags.get("vidlab.error") or f"exit code {code}: {process.last_error_line()}"
            return self._failed(attempt, child, error, log_file, seconds)
        self.client.set_terminated(child, status="FINISHED")
        loss = run.data.metrics.get("train/loss")
        self.progress.finished(attempt.index, attempt.arm.key, "FINISHED", _loss_text(loss))
        return ArmResult(attempt.arm, child, "FINISHED", loss, run.data.tags.get("vidlab.samples_dir"),
                         log_file=log_file, seconds=seconds, index=attempt.index)

    def _attach_log(self, child: str, log_file: Path) -> None:
        try:
            self.client.log_artifact(child, str(log_file), "logs")
        except Exception:  # noqa: BLE001 - the log stays on disk, its path in vidlab.log_file
            pass

    def stop_all(self) -> None:
        """Ctrl-C / SIGTERM: stop every running arm (all at once, then wait) and record it KILLED. A second
        Ctrl-C meanwhile is ignored: it would leave arms running with nobody to stop them."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if self.running and main else None
        try:
            for running in self.running.values():
                running.process.interrupt()
            deadline = time.time() + STOP_GRACE_S
            for index, running in list(self.running.items()):
                running.process.stop(grace=max(0.0, deadline - time.time()))
                self._attach_log(running.run_id, running.process.log_file)
                self.client.set_terminated(running.run_id, status="KILLED")
                self.progress.finished(index, running.attempt.arm.key, "KILLED", f"log: {running.process.log_file}")
            self.running.clear()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def arm_name(ablation: Ablation, arm: Arm) -> str:
    """``<sweep>[<arm key>]``: the arm's run name and config ``name``."""
    return f"{ablation.name}[{arm.key}]"


def _loss_text(loss: float | None) -> str:
    return "" if loss is None else f"train/loss {loss:.4f}"


def _slug(index: int, key: str, limit: int = 80) -> str:
    """A file name for an arm: its position and its key with characters that are awkward in paths replaced."""
    safe = "".join(c if c.isalnum() or c in "._=-," else "_" for c in key)
    return f"{index + 1:03d}-{safe[:limit]}"
