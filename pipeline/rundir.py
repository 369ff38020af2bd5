"""Who owns a ``checkpoint_dir``, and what a previous run left in it.

One training run writes into a checkpoint directory at a time. Rank 0 holds a
lock file there naming its host, pid and process start time, refreshed by a
heartbeat thread. A second run stops with an error naming the owner; a lock
whose owner is gone (same host: the process no longer exists; another host:
no heartbeat for ``STALE_AFTER_SECONDS``) is taken over.

A directory holding a previous run's outputs is never silently overwritten:
resuming continues it, ``overwrite: true`` clears it, anything else is an error.

Cluster jobs rendered by ``pipeline.submit`` name themselves in the environment (``NERPIPE_JOB``,
and ``NERPIPE_JOB_INSTANCE`` for one submission's attempts). The first run of a job records its
name in ``checkpoint_dir/job.json``; a relaunch of that job continues there, or starts again over
its own partial results when it never wrote a training state, and is never refused as "a previous
run". Another job, or a plain run, aimed at a directory holding that job's results is refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil

from .files import read_json_object, restore_interrupted_replacements, write_json

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
JOB_FILE = "job.json"
# Set by the rendered cluster jobs (pipeline/jobs.py): the job's name, and one submission's id (Slurm's job id,
# the same across its requeues), whose earlier attempt has always ended when the next one starts.
JOB_ENV = "NERPIPE_JOB"
JOB_INSTANCE_ENV = "NERPIPE_JOB_INSTANCE"
HEARTBEAT_SECONDS = 30
# A lock from another host cannot be checked for a live process; only a silent heartbeat proves it dead.
# The heartbeat is hand-written: no library tells whether a process on another host is alive
# (psutil sees this host's processes only, and file locks are unreliable on shared storage).
STALE_AFTER_SECONDS = 10 * 60
# Two create times this close belong to the same process.
_SAME_START_SECONDS = 1.0
# What a run writes at the top of checkpoint_dir. Results are never deleted without `overwrite`;
# the rest, left alone by a run that died before its first evaluation or checkpoint, is cleared.
RUN_RESULTS = ("best_model", "checkpoints", "dev_metrics.jsonl", "test_metrics.json")
RUN_LOGS = ("train_config.yaml", "train_metrics.jsonl", "test_predictions.jsonl", "vdl")


class RunDirError(RuntimeError):
    """checkpoint_dir is in use by another run, or holds a previous run that may not be overwritten."""


def _process_create_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), to tell a reused pid from the owner; None if unknown."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def _process_alive(pid: int, create_time) -> bool:
    if pid <= 0:
        return True  # not a process id of its own: nothing proves the owner gone
    try:
        current = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # exists, but cannot be inspected (owned by someone else)
    # A lock written before create_time was recorded (its start_time was in clock ticks) cannot
    # be compared: its owner counts as alive. Equal start times are the same process; the margin
    # only absorbs rounding, a reused pid starts later than its predecessor died.
    if not isinstance(create_time, (int, float)):
        return True
    return abs(current - create_time) < _SAME_START_SECONDS


class RunLock:
    """An exclusive claim on a checkpoint directory, held by one process until ``release``."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "create_time": _process_create_time(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        if os.environ.get(JOB_INSTANCE_ENV):
            self.owner["job_instance"] = os.environ[JOB_INSTANCE_ENV]
        self._stop = threading.Event()
        self._thread = None

    def describe(self, owner: dict) -> str:
        return f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('since')})"

    def _stale_reason(self, owner: dict) -> str | None:
        """Why the lock's owner is known to be gone, or None when it may still be running."""
        if self.owner.get("job_instance") and owner.get("job_instance") == self.owner["job_instance"]:
            # A requeued Slurm job may start on other nodes before the old host's heartbeat goes stale;
            # the scheduler starts an attempt only after the previous one has ended.
            return f"it was an earlier attempt of this job ({JOB_INSTANCE_ENV}={owner['job_instance']})"
        if owner.get("host") == self.owner["host"]:
            if not _process_alive(int(owner.get("pid", -1)), owner.get("create_time")):
                return "its process no longer exists"
            return None
        try:
            silent = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was released"
        if silent > STALE_AFTER_SECONDS:
            return f"its heartbeat stopped {silent / 60:.0f} minutes ago"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                except (OSError, json.JSONDecodeError):
                    owner = {}  # a lock being written right now, or garbage: treat it by its age below
                reason = self._stale_reason(owner)
                if reason is None:
                    raise RunDirError(
                        f"{self.path.parent} is in use by another training run: {self.describe(owner)} holds "
                        f"{self.path}. Wait for it to finish, use another checkpoint_dir, or delete the lock "
                        f"file if you are sure that run is dead.") from None
                logger.warning("taking over %s from %s: %s", self.path, self.describe(owner), reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(self.owner, handle)
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunDirError(f"could not take {self.path}: other processes keep creating it")

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        if owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)


def previous_run_results(directory) -> list[str]:
    """Names of a previous run's results present in ``directory``."""
    directory = Path(directory)
    return [name for name in RUN_RESULTS
            if (directory / name).exists() and not ((directory / name).is_dir() and not any((directory / name).iterdir()))]


def _delete(paths) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def owning_job(directory) -> str | None:
    """The cluster job whose results ``directory`` holds (``job.json``), or None."""
    path = Path(directory) / JOB_FILE
    if not path.is_file():
        return None
    return str(read_json_object(path, RunDirError, f"{path} is damaged: delete it if no job owns "
                                                   f"{Path(directory)}").get("job", "")) or None


def _check_job_ownership(directory: Path, job: str | None, found: list[str], overwrite: bool) -> bool:
    """Refuse a run that is not the job owning ``directory``'s results; True when this is that job's relaunch."""
    owner = owning_job(directory)
    if owner is not None and owner == job:
        return True
    if not found or overwrite:
        return False
    if job is None:
        raise RunDirError(
            f"{directory} holds the results of cluster job {owner!r} ({', '.join(found)}). Run with "
            f"{JOB_ENV}={owner} to continue that job, set overwrite=true to replace it, or choose another "
            f"checkpoint_dir.")
    raise RunDirError(
        f"{directory} holds the results of {f'cluster job {owner!r}' if owner else 'a run outside any job'} "
        f"({', '.join(found)}), not of job {job!r}: a job continues only its own run. Choose another "
        f"checkpoint_dir, or set overwrite=true to replace it.")


def prepare_run_directory(directory, resuming: bool, overwrite: bool, job: str | None = None) -> None:
    """Refuse to start fresh over a previous run unless ``overwrite``; clear it when told to.

    ``job`` (a cluster job's name): that job's own results are continued or, with nothing to resume,
    replaced by its relaunch; any other run's are refused (unless ``overwrite``) even when resuming."""
    directory = Path(directory)
    # Under the lock: nobody else is replacing anything here now.
    for where in (directory, directory / "checkpoints"):
        for restored in restore_interrupted_replacements(where):
            logger.warning("restored %s from an interrupted replacement", restored)
    found = previous_run_results(directory)
    if job is not None or owning_job(directory) is not None:
        if _check_job_ownership(directory, job, found, overwrite) and not resuming and found:
            logger.warning("job %s was relaunched before its first training state: starting it again over "
                           "its own partial results (%s)", job, ", ".join(found))
            overwrite = True
        if job is not None:
            directory.mkdir(parents=True, exist_ok=True)
            write_json(directory / JOB_FILE, {"job": job})
    if resuming:
        return
    if found and not overwrite:
        raise RunDirError(
            f"{directory} holds a previous run ({', '.join(found)}) and there is no training state to resume "
            f"from (resume: auto finds checkpoints/step-* written every save_interval steps). Set overwrite=true "
            f"to delete it and start again, or choose another checkpoint_dir.")
    if found:
        logger.warning("overwrite: deleting the previous run's %s in %s", ", ".join(found), directory)
    # Logs of the previous run would otherwise mix with this one's; a run outside any job owns what it writes.
    replaced = (*found, *RUN_LOGS, *(() if job is not None else (JOB_FILE,)))
    _delete([directory / name for name in replaced if (directory / name).exists()])


def claim_checkpoint_dir(config) -> RunLock | None:
    """Rank 0 locks and prepares ``config.checkpoint_dir``; every rank learns whether that worked.

    Returns rank 0's lock (None elsewhere); raises RunDirError on every rank when it failed.
    """
    import numpy as np

    from . import dist
    from .checkpoint import resume_source

    lock, failure = None, ""
    if dist.is_main_process():
        try:
            candidate = RunLock(config.checkpoint_dir)
            candidate.acquire()
            lock = candidate
            prepare_run_directory(config.checkpoint_dir, resuming=resume_source(config) is not None,
                                  overwrite=config.overwrite, job=os.environ.get(JOB_ENV) or None)
        except (RunDirError, OSError) as error:
            failure = str(error)
            if lock is not None:
                lock.release()
                lock = None
    if dist.all_reduce_max(np.array([1 if failure else 0], dtype=np.int64))[0]:
        raise RunDirError(failure or f"rank 0 could not claim {config.checkpoint_dir}; its log says why")
    return lock
