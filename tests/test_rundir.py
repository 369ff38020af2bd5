"""checkpoint_dir ownership: the run lock, stale locks, and previous runs never overwritten unasked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline import rundir
from pipeline.files import restore_interrupted_replacements
from pipeline.rundir import RunDirError, RunLock, prepare_run_directory


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    owner = json.loads((tmp_path / "run.lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    with pytest.raises(RunDirError, match=rf"in use by another training run: pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / "run.lock").exists()
    second = RunLock(tmp_path)
    second.acquire()  # free again
    second.release()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = RunLock(tmp_path)
    (tmp_path / "run.lock").write_text(json.dumps({**lock.owner, "pid": int(dead.stdout), "start_time": "1"}))
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert "no longer exists" in caplog.text
    lock.release()


def test_a_reused_pid_does_not_keep_a_stale_lock_alive(tmp_path, caplog):
    # Our own pid, alive, but a different start time: the pid was reused, the owner is gone.
    lock = RunLock(tmp_path)
    (tmp_path / "run.lock").write_text(json.dumps({**lock.owner, "create_time": 12345.0, "since": "earlier"}))
    lock.acquire()
    assert "taking over" in caplog.text and "(since earlier): its process no longer exists" in caplog.text
    assert json.loads((tmp_path / "run.lock").read_text()) == lock.owner  # the new owner, with our start time
    assert lock.owner["create_time"] != 12345.0
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_a_live_owner_of_an_older_lock_format_is_not_taken_for_dead(tmp_path):
    # Locks written before psutil held the start time in clock ticks since boot: it cannot be
    # compared with a create time, so a live pid keeps the lock.
    lock = RunLock(tmp_path)
    older = {key: value for key, value in lock.owner.items() if key != "create_time"}
    (tmp_path / "run.lock").write_text(json.dumps({**older, "start_time": "12345"}))
    with pytest.raises(RunDirError, match=rf"in use by another training run: pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["start_time"] == "12345"


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path, monkeypatch, caplog):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(RunDirError, match="host elsewhere"):
        RunLock(tmp_path).acquire()
    assert json.loads(path.read_text())["host"] == "elsewhere"  # refused: the lock is untouched
    old = time.time() - rundir.STALE_AFTER_SECONDS - 60
    os.utime(path, (old, old))
    lock = RunLock(tmp_path)
    with caplog.at_level("WARNING", logger=rundir.logger.name):
        lock.acquire()
    assert f"from pid 1 on host elsewhere (since then): its heartbeat stopped {rundir.STALE_AFTER_SECONDS // 60 + 1:.0f} minutes ago" in caplog.text
    assert json.loads(path.read_text()) == lock.owner and lock.owner["host"] != "elsewhere"
    lock.release()


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_SECONDS", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 5
    lock.release()


def make_previous_run(directory):
    (directory / "best_model").mkdir(parents=True)
    (directory / "best_model" / "model.pdparams").write_bytes(b"weights")
    (directory / "dev_metrics.jsonl").write_text('{"step": 1}\n')
    (directory / "train_metrics.jsonl").write_text('{"step": 1}\n')
    (directory / "vdl").mkdir()


def test_starting_fresh_over_a_previous_run_needs_overwrite(tmp_path):
    make_previous_run(tmp_path)
    with pytest.raises(RunDirError, match=r"holds a previous run \(best_model, dev_metrics.jsonl\).*overwrite=true"):
        prepare_run_directory(tmp_path, resuming=False, overwrite=False)
    assert (tmp_path / "best_model" / "model.pdparams").read_bytes() == b"weights"  # untouched
    prepare_run_directory(tmp_path, resuming=True, overwrite=False)  # resuming continues the run
    assert (tmp_path / "best_model").is_dir()
    prepare_run_directory(tmp_path, resuming=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_logs_of_a_run_that_never_saved_anything_are_cleared_silently(tmp_path):
    (tmp_path / "train_metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "train_config.yaml").write_text("seed: 1\n")
    (tmp_path / "checkpoints").mkdir()  # empty: no state was ever completed
    prepare_run_directory(tmp_path, resuming=False, overwrite=False)
    assert not (tmp_path / "train_metrics.jsonl").exists() and not (tmp_path / "train_config.yaml").exists()


def test_an_interrupted_replacement_is_rolled_back(tmp_path):
    # Killed between the two renames of files.atomic_directory: only the old copy exists.
    (tmp_path / ".best_model.old-123").mkdir()
    (tmp_path / ".best_model.old-123" / "model.pdparams").write_bytes(b"old")
    (tmp_path / ".best_model.tmp-123").mkdir()  # half of the new copy
    restored = restore_interrupted_replacements(tmp_path)
    assert restored == [tmp_path / "best_model"]
    assert (tmp_path / "best_model" / "model.pdparams").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]


def test_train_dist_refuses_a_directory_in_use_before_loading_anything(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "out"
    holder = RunLock(out)
    holder.acquire()
    try:
        done = subprocess.run([sys.executable, "train_dist.py", f"model={tiny_model_dir}",
                               f"dataset={tiny_dataset_dir}", f"checkpoint_dir={out}", "max_steps=1"],
                              capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    finally:
        holder.release()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "in use by another training run" in done.stderr and f"pid {os.getpid()}" in done.stderr
    assert "train features" not in done.stdout  # stopped before tokenising


def test_a_relaunched_job_continues_its_own_directory_and_other_runs_are_refused(tmp_path):
    """A cluster job (NERPIPE_JOB) records itself in job.json; its relaunch is never refused as a previous run,
    even before its first training state; another job, or a run outside any job, is refused there."""
    prepare_run_directory(tmp_path, resuming=False, overwrite=False, job="ner-a")
    assert json.loads((tmp_path / rundir.JOB_FILE).read_text()) == {"job": "ner-a"}
    make_previous_run(tmp_path)  # evaluated once, killed before the first training state
    prepare_run_directory(tmp_path, resuming=False, overwrite=False, job="ner-a")
    assert not (tmp_path / "best_model").exists() and not (tmp_path / "dev_metrics.jsonl").exists()
    assert rundir.owning_job(tmp_path) == "ner-a"
    make_previous_run(tmp_path)
    prepare_run_directory(tmp_path, resuming=True, overwrite=False, job="ner-a")  # a state to resume: kept
    assert (tmp_path / "best_model" / "model.pdparams").read_bytes() == b"weights"
    for job, message in (("ner-b", "holds the results of cluster job 'ner-a' .* not of job 'ner-b'"),
                         (None, "holds the results of cluster job 'ner-a' .* NERPIPE_JOB=ner-a to continue")):
        for resuming in (False, True):
            with pytest.raises(RunDirError, match=message):
                prepare_run_directory(tmp_path, resuming=resuming, overwrite=False, job=job)
    assert (tmp_path / "best_model" / "model.pdparams").read_bytes() == b"weights"  # untouched
    prepare_run_directory(tmp_path, resuming=False, overwrite=True, job=None)  # replaced by a plain run
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    make_previous_run(tmp_path)
    with pytest.raises(RunDirError, match="holds the results of a run outside any job .* not of job 'ner-a'"):
        prepare_run_directory(tmp_path, resuming=True, overwrite=False, job="ner-a")


def test_a_lock_left_by_an_earlier_attempt_of_the_same_job_is_taken_over(tmp_path, monkeypatch, caplog):
    """A requeued Slurm job can start on another node within the other host's heartbeat period: the same
    NERPIPE_JOB_INSTANCE marks the lock as its own earlier attempt; another instance still waits."""
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then", "job_instance": "slurm-41"}))
    monkeypatch.setenv(rundir.JOB_INSTANCE_ENV, "slurm-42")
    with pytest.raises(RunDirError, match="host elsewhere"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv(rundir.JOB_INSTANCE_ENV, "slurm-41")
    lock = RunLock(tmp_path)
    with caplog.at_level("WARNING", logger=rundir.logger.name):
        lock.acquire()
    assert "it was an earlier attempt of this job (NERPIPE_JOB_INSTANCE=slurm-41)" in caplog.text
    assert json.loads(path.read_text()) == lock.owner and lock.owner["job_instance"] == "slurm-41"
    lock.release()


def test_claim_reads_the_job_from_the_environment(tmp_path, monkeypatch):
    from pipeline.config import TrainConfig

    config = TrainConfig(checkpoint_dir=str(tmp_path))
    monkeypatch.setenv(rundir.JOB_ENV, "ner-a")
    rundir.claim_checkpoint_dir(config).release()
    assert rundir.owning_job(tmp_path) == "ner-a"
    make_previous_run(tmp_path)
    monkeypatch.setenv(rundir.JOB_ENV, "ner-b")
    with pytest.raises(RunDirError, match="not of job 'ner-b'"):
        rundir.claim_checkpoint_dir(config)
    assert not (tmp_path / "run.lock").exists()  # released after the refusal
