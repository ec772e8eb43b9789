"""Which process this is, and how every rank of one job agrees on one MLflow run.

Rank 0 creates the run (params, config, tags); the other ranks log nothing but need its id, for the
checkpoint folder (``checkpoints/<run_id>/``, where FSDP2 ranks write their shards). Two ways:

- ranks that Lightning's launcher starts (``trainer.devices: 2`` from one ``vidlab fit``) are
  started by rank 0 after the run exists and inherit ``VIDLAB_RUN_ID`` from its environment;
- ranks started from outside (torchrun, SLURM's srun) start together: rank 0 writes the id to
  ``<output_dir>/.ranks/<job key>.json`` (atomically) and the others wait for a file written after
  they started. The job key comes from the launcher's variables (MASTER_ADDR/PORT,
  TORCHELASTIC_RUN_ID, SLURM_JOB_ID), so the folder must be shared by the nodes, as the
  checkpoints are.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

RUN_ID_ENV = "VIDLAB_RUN_ID"
_STARTED = time.time()


def global_rank() -> int:
    """This process's rank from the launcher's environment (0 when not distributed)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    node, local = int(os.environ.get("NODE_RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0) or 0)
    return node * per_node + local if per_node else local + node


def job_key() -> str:
    parts = [os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def publish_run_id(output_dir: str | os.PathLike, run_id: str) -> None:
    """Rank 0: make ``run_id`` known to the ranks it will start and to ranks started beside it."""
    os.environ[RUN_ID_ENV] = run_id
    folder = Path(output_dir) / ".ranks"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{job_key()}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "written": time.time()}))
    os.replace(tmp, folder / f"{job_key()}.json")


def shared_run_id(output_dir: str | os.PathLike, timeout: float = 600.0) -> str:
    """Ranks > 0: the run id rank 0 published (environment, else the job's file, waiting for it)."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    file = Path(output_dir) / ".ranks" / f"{job_key()}.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            blob = json.loads(file.read_text())
            if blob["written"] >= _STARTED - 120:  # not a file left by an earlier job on the same port
                return blob["run_id"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"rank {global_rank()}: rank 0 did not publish its MLflow run id in {file} within "
                       f"{timeout:.0f} s; is {Path(output_dir).resolve()} shared by every node?")
