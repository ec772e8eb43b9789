"""One sweep arm as its own ``vidlab fit`` process: the command, its environment, its log file, stopping
it, and telling whether an arm left RUNNING in MLflow is still being trained by a live process.

Why processes at all: a distributed arm cannot run inside the sweep's own process. Lightning's DDP
launcher re-executes the script that started it (``sys.argv``) once per extra rank; inside a sweep
loop those ranks would re-run the whole sweep (Hydra multirun's breakage). As ``vidlab fit ...
--run-id ID`` the re-executed command is exactly one arm, attached to the child run the sweep created.
Arms that run N at a time are processes for the same reason as any parallel job: separate memory,
separate threads, a crash that takes down one arm only.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.ranks import RUN_ID_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 10.0  # after SIGINT, before SIGKILL: Lightning's graceful shutdown, MLflow's last writes
SINGLE_PROCESS_STRATEGIES = {"auto", "single_device", "None", ""}


def is_distributed(cfg: dict[str, Any]) -> bool:
    """Whether ``cfg`` trains on several processes (``trainer.devices > 1``, ``-1``/``auto``, several
    nodes, or a ``ddp``/``fsdp``-like strategy), so it must run as a process of its own, alone."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        many = len(devices) > 1
    elif isinstance(devices, str):  # "auto", "-1", "2", "0,1"
        many = devices.strip() in ("auto", "-1") or "," in devices or (devices.strip().isdigit() and int(devices) > 1)
    else:
        many = devices == -1 or int(devices or 1) > 1
    nodes = int(trainer.get("num_nodes", 1) or 1)
    return many or nodes > 1 or str(trainer.get("strategy", "auto")) not in SINGLE_PROCESS_STRATEGIES


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_arm(concurrent: int) -> int:
    """OMP/MKL/torch threads for each of ``concurrent`` single-process arms: the cores split evenly, and
    never more than ``OMP_NUM_THREADS`` when the sweep itself was started with it (a per-process cap)."""
    share = max(1, cpu_count() // max(1, concurrent))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(cap)) if cap.isdigit() and int(cap) > 0 else share


def fit_command(experiment: str, overrides: list[str], run_id: str, resume: bool) -> list[str]:
    """``vidlab fit EXPERIMENT OVERRIDES --run-id RUN`` (a fresh child run the sweep created), or
    ``vidlab fit --resume RUN`` (continue that child from its last checkpoint with its logged config)."""
    base = [sys.executable, "-m", "experiments.cli", "fit"]
    return [*base, "--resume", run_id] if resume else [*base, experiment, *overrides, "--run-id", run_id]


def arm_env(threads: int | None) -> dict[str, str]:
    """The sweep's environment for an arm: vidlab importable from any working directory, output not
    buffered (the log file shows progress as it happens), no run id inherited from an arm that ran
    in this process earlier, and ``threads`` per process when set (None: Lightning's own choice,
    cores ÷ processes, unless the sweep's environment sets OMP_NUM_THREADS)."""
    env = dict(os.environ)
    env.pop(RUN_ID_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@dataclass
class ArmProcess:
    """A running ``vidlab fit`` and the file its stdout and stderr go to (every rank's)."""

    proc: subprocess.Popen
    log_file: Path
    started: float

    @classmethod
    def launch(cls, command: list[str], env: dict[str, str], log_file: Path) -> ArmProcess:
        """Start ``command`` in a session of its own: a Ctrl-C on the terminal reaches the sweep only,
        which then stops every arm itself and records them KILLED (`stop`)."""
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as sink:
            sink.write(f"$ {shlex.join(command)}\n".encode())
            sink.flush()
            proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                    start_new_session=True)
        return cls(proc, log_file, time.time())

    def poll(self) -> int | None:
        return self.proc.poll()

    def interrupt(self) -> None:
        """SIGINT to the arm's process group: every rank gets Ctrl-C (Lightning shuts down gracefully)."""
        self._signal_group(signal.SIGINT)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """`interrupt`, then SIGKILL to whatever of the group is left after ``grace`` seconds (a rank
        the group leader started may outlive it)."""
        self.interrupt()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def last_error_line(self) -> str:
        """The last line of the log that names an exception (``ValueError: ...``), else its last line."""
        try:
            lines = [ln.strip() for ln in self.log_file.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        for line in reversed(lines):
            head = line.split(":", 1)[0]
            if ":" in line and (head.endswith(("Error", "Exception", "Interrupt")) or line.startswith("error:")):
                return line
        return lines[-1] if lines else ""


# -- is an arm left RUNNING still running? ----------------------------------------------------------


def _start_ticks(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot, Linux ``/proc``), '' where that cannot be read: with
    the pid it names one process, not a later one that was given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised name
    except (OSError, IndexError):
        return ""


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (this one by default), tagged on the runs it trains."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def identity_alive(identity: str) -> bool:
    """Whether the process `process_identity` named is still alive. A process on another host cannot
    be checked and counts as gone (its run is then re-run, so a sweep spread over hosts needs care)."""
    try:
        host, pid_text, ticks = identity.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return not ticks or _start_ticks(pid) == ticks
