"""Graceful stop and time-based saving: a stop signal ends the run after the current step with a training
state for that step, and a relaunch continues from it to the uninterrupted run's weights.

In one process (the Trainer, signals sent to this very process), then with real processes:
``train_dist.py`` given a second signal while it writes, and two workers under
``paddle.distributed.launch`` (SIGTERM to the launcher; SIGUSR1 to one worker alone).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, clean_env, make_trainer, overrides
from pipeline.stop_signals import RELAUNCH_EXIT_CODE, REPEAT_WINDOW_SECONDS, StopRequest
from pipeline.trainer import Trainer, TrainingInterrupted
from test_faults import complete_states, read_output, start, summary_of, wait_for, worker_pids

LAUNCH = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2"]


def signal_at_step(monkeypatch, signum: int, at_step: int):
    """Send ``signum`` to this process while step ``at_step`` is being logged (inside the step)."""
    original_log = Trainer._log_training

    def log_then_signal(self, step):
        original_log(self, step)
        if step == at_step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Trainer, "_log_training", log_then_signal)
    return original_log


def steps_logged(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "train_metrics.jsonl").read_text().splitlines()]


def assert_same_weights(trainer, reference):
    final = {k: v.numpy() for k, v in trainer.model.state_dict().items()}
    for name, value in reference.model.state_dict().items():
        np.testing.assert_allclose(final[name], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------- one process


def test_a_repeat_within_the_window_is_the_same_request_and_a_later_one_takes_the_default_action(monkeypatch):
    now = [100.0]
    request = StopRequest(clock=lambda: now[0])
    request.handle(signal.SIGTERM)
    now[0] += REPEAT_WINDOW_SECONDS / 5  # Paddle's launcher: three SIGTERMs 0.2 s apart
    request.handle(signal.SIGTERM)
    assert request.requested and request.signal_name == "SIGTERM" and request.count == 2
    sent = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: sent.append(("handler", signum, handler)))
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(("kill", pid, signum)))
    now[0] += REPEAT_WINDOW_SECONDS
    request.handle(signal.SIGINT)
    assert sent == [("handler", signal.SIGINT, signal.SIG_DFL), ("kill", os.getpid(), signal.SIGINT)]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_writes_that_steps_state_and_the_resume_ends_with_the_uninterrupted_weights(
        tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch, signum):
    settings = dict(max_steps=6, save_interval=0, eval_interval=2, do_test=False)
    reference = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "whole", **settings)
    whole = reference.fit()

    out = tmp_path / "stopped"
    original_log = signal_at_step(monkeypatch, signum, at_step=3)
    previous_handler = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match=f"after step 3 of 6 \\({signal.Signals(signum).name} received"):
        make_trainer(tiny_model_dir, tiny_dataset_dir, out, **settings).fit()
    assert signal.getsignal(signum) is previous_handler  # the handler is the training loop's only
    # save_interval=0: the one state is the stop's, for the step the run stopped after, and no later step ran.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    assert steps_logged(out) == [1, 2, 3]

    steps_run = []
    monkeypatch.setattr(Trainer, "_log_training", lambda self, step: (steps_run.append(step), original_log(self, step)))
    resumed_trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, **settings)
    resumed = resumed_trainer.fit()
    assert steps_run == [4, 5, 6] and resumed.global_step == 6
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history] == [2, 4, 6]
    assert_same_weights(resumed_trainer, reference)


@pytest.mark.slow
def test_a_stop_at_the_last_step_resumes_into_the_final_evaluation_without_another_step(
        tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    """The state of the last step (5 of 5) is resumed with no step left: before the fix the relaunch
    trained a sixth step. The final evaluation, which the stopped run never reached, runs once."""
    settings = dict(max_steps=5, save_interval=0, eval_interval=2, do_test=False)
    reference = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "whole", **settings)
    whole = reference.fit()
    assert [r["step"] for r in whole.history] == [2, 4, 5]

    out = tmp_path / "stopped"
    original_log = signal_at_step(monkeypatch, signal.SIGTERM, at_step=5)
    with pytest.raises(TrainingInterrupted, match="after step 5 of 5"):
        make_trainer(tiny_model_dir, tiny_dataset_dir, out, **settings).fit()
    assert [json.loads(line)["step"] for line in (out / "dev_metrics.jsonl").read_text().splitlines()] == [2, 4]

    steps_run = []
    monkeypatch.setattr(Trainer, "_log_training", lambda self, step: (steps_run.append(step), original_log(self, step)))
    resumed_trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, **settings)
    resumed = resumed_trainer.fit()
    assert steps_run == [] and resumed.global_step == 5
    assert [r["step"] for r in resumed.history] == [2, 4, 5]
    assert resumed.best_metric == whole.best_metric
    assert_same_weights(resumed_trainer, reference)


@pytest.mark.slow
def test_save_minutes_writes_a_state_each_time_that_many_minutes_have_passed(tiny_model_dir, tiny_dataset_dir,
                                                                             tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=7, save_minutes=2.5, keep_checkpoints=9,
                           do_test=False)
    trainer.save_timer.clock = lambda: trainer.progress.step * 60.0  # each step takes a minute
    trainer.fit()
    # 2.5 minutes after the start (step 0) falls in step 3; 2.5 minutes after that state, in step 6.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


# ---------------------------------------------------------------- real processes


@pytest.mark.slow
def test_a_second_signal_after_the_window_kills_at_once_and_the_previous_state_stays_usable(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "run"
    settings = overrides(tiny_model_dir, tiny_dataset_dir, out, max_steps=12, save_interval=2, eval_interval=0,
                         do_test=False, use_vdl=False)
    # Every save pauses half-way for 4 s (only training states are written: no evaluation before the end).
    job = start([sys.executable, "train_dist.py", *settings], {**clean_env(), "NERPIPE_TEST_SAVE_DELAY": "4"})
    try:
        wait_for(lambda: "step-00000002" in complete_states(out), 240, "the step-2 state", job)
        job.send_signal(signal.SIGINT)
        first = time.monotonic()
        time.sleep(0.2)
        job.send_signal(signal.SIGINT)  # a repeat inside the window: still the same graceful stop
        # The stop's own state (the step after 2) is being written: its weights are there, the pause follows.
        wait_for(lambda: list((out / "checkpoints").glob(".step-*.tmp-*/model.pdparams")), 60,
                 "the stop's state being written", job)
        time.sleep(max(0.0, first + REPEAT_WINDOW_SECONDS + 0.3 - time.monotonic()))
        job.send_signal(signal.SIGINT)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    output = read_output(job)
    assert job.returncode == -signal.SIGINT, output[-3000:]  # the default action, in the middle of the write
    assert "stopped after step" not in output
    assert complete_states(out) == ["step-00000002"], output[-3000:]

    rerun = subprocess.run([sys.executable, "train_dist.py", *settings], cwd=ROOT, env=clean_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "step-00000002 at step 2" in rerun.stdout + rerun.stderr
    assert summary_of(rerun.stdout)["global_step"] == 12
    assert not list((out / "checkpoints").glob(".*tmp*")), "the half-written state was left behind"


def final_digest(worker_log: str) -> str:
    return [line.split()[-1] for line in worker_log.splitlines() if "final weights sha256" in line][-1]


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_workers_after_one_step_and_the_relaunch_ends_as_if_uninterrupted(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    # save_interval=0: the only training state can be the stop's own.
    def settings(out_dir):
        return overrides(tiny_model_dir, tiny_dataset_dir, out_dir, max_steps=40, epochs=20, save_interval=0,
                         eval_interval=8, do_test=False, use_vdl=False)

    whole = subprocess.run([*LAUNCH, "--log_dir", str(tmp_path / "logs-whole"), "train_dist.py",
                            *settings(tmp_path / "whole")], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stdout[-3000:]
    expected = final_digest((tmp_path / "logs-whole" / "workerlog.0").read_text())

    out, logs1 = tmp_path / "run", tmp_path / "logs1"
    # A 1 s pause inside every save: the launcher's three SIGTERMs (0.2 s apart) reach a worker still writing.
    env = {**clean_env(), "NERPIPE_TEST_SAVE_DELAY": "1"}
    job = start([*LAUNCH, "--log_dir", str(logs1), "train_dist.py", *settings(out)], env)
    try:
        wait_for(lambda: (out / "train_metrics.jsonl").is_file() and len(steps_logged(out)) >= 10, 240,
                 "step 10", job)
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=90)  # the launcher waits up to 30 s for its workers, then kills them
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = read_output(job)
    assert job.returncode == signal.SIGTERM, output[-3000:]  # the launcher's own code: sys.exit(signal number)
    rank_logs = [(logs1 / f"workerlog.{rank}").read_text() for rank in (0, 1)]
    stopped = [[line for line in log.splitlines() if line.startswith("stopped after step ")] for log in rank_logs]
    assert all(lines for lines in stopped), rank_logs[1][-3000:]
    step = int(stopped[0][-1].split("after step ")[1].split()[0])
    assert f"after step {step} of 40 (" in stopped[1][-1]  # the same step on both ranks
    assert 10 <= step < 40
    assert complete_states(out) == [f"step-{step:08d}"]
    assert steps_logged(out)[-1] == step  # no step ran after the one the state holds
    # The launcher's burst came while rank 0 was writing, and did not kill it.
    assert "signals in all" in stopped[0][-1], stopped[0]

    logs2 = tmp_path / "logs2"
    second = subprocess.run([*LAUNCH, "--log_dir", str(logs2), "train_dist.py", *settings(out)], cwd=ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    rank0 = (logs2 / "workerlog.0").read_text()
    assert second.returncode == 0, second.stdout[-3000:] + rank0[-3000:]
    assert f"step-{step:08d} at step {step}" in rank0
    assert steps_logged(out) == list(range(1, 41))
    assert summary_of(rank0)["global_step"] == 40
    assert final_digest(rank0) == final_digest((logs2 / "workerlog.1").read_text()) == expected


@pytest.mark.slow
def test_sigusr1_to_one_worker_stops_both_after_the_same_step_and_the_launcher_exits_75(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Slurm's pre-timeout signal reaching a worker (the launcher itself dies on SIGUSR1): the other rank,
    never signalled, stops after the same step; both exit 75, which the launcher passes on."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    settings = overrides(tiny_model_dir, tiny_dataset_dir, out, max_steps=40, epochs=20, save_interval=0,
                         eval_interval=8, do_test=False, use_vdl=False)
    job = start([*LAUNCH, "--log_dir", str(logs), "train_dist.py", *settings])
    try:
        wait_for(lambda: (out / "train_metrics.jsonl").is_file() and len(steps_logged(out)) >= 5, 240, "step 5", job)
        os.kill(worker_pids(job.pid)[1], signal.SIGUSR1)
        job.wait(timeout=90)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = read_output(job)
    assert job.returncode == RELAUNCH_EXIT_CODE, output[-3000:]
    rank0, rank1 = ((logs / f"workerlog.{rank}").read_text() for rank in (0, 1))
    step = int(rank1.split("stopped after step ")[1].split()[0])
    assert f"stopped after step {step} of 40 (SIGUSR1 received)" in rank1
    assert f"stopped after step {step} of 40 (another rank received a stop signal)" in rank0
    assert complete_states(out) == [f"step-{step:08d}"] and steps_logged(out)[-1] == step
    assert not (out / "run.lock").exists()
