"""What runs on a node decides what a failure means: launch/supervise.sh (Kubernetes containers and
launch/local.sh) run with stub launchers, the rendered Slurm script with stub Slurm commands, and the
variables of local.sh and multinode.sh checked before anything starts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.jobs import RELAUNCH_EXIT_CODE, JobSpec, PredictionJob, render

ROOT = Path(__file__).resolve().parents[1]
SUPERVISE = ROOT / "launch" / "supervise.sh"
CONFIG = "configs/msra_m3e_small_quick.yaml"
PREDICT_FLAGS = ["--checkpoint", "outputs/ner/best_model", "--input", "/mnt/shared/corpus.txt", "--output",
                 "/mnt/shared/corpus.jsonl"]
SIGUSR1_BIT = 1 << (signal.SIGUSR1 - 1)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def supervise(command, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUPERVISE), *command], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60, **kwargs)


def wait_for_file(path: Path, process: subprocess.Popen) -> str:
    """The file's text once it exists (a readiness flag, not a timing assertion)."""
    deadline = time.monotonic() + 30
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.parametrize("code, kubernetes_code", [
    (0, 0), (1, 129), (2, 2), (3, 3), (15, 143), (RELAUNCH_EXIT_CODE, 128 + RELAUNCH_EXIT_CODE), (241, 241)])
def test_exit_codes_are_mapped_for_the_operators(code, kubernetes_code, tmp_path):
    """Kubeflow's ExitCode policy recreates pods only for codes >= 128: retryable codes are moved there,
    the do-not-retry codes 2 and 3 stay below; without EXIT_CODES=kubernetes the code is unchanged."""
    launcher = executable(tmp_path / "launcher", f"#!/usr/bin/env bash\nexit {code}\n")
    assert supervise([str(launcher)], {"EXIT_CODES": "kubernetes"}).returncode == kubernetes_code
    assert supervise([str(launcher)]).returncode == code


def test_sigterm_is_forwarded_once_to_a_launcher_in_its_own_process_group(tmp_path):
    """The container runtime's SIGTERM (sent twice here) reaches the launcher once; nothing is relaunched
    after it, and the exit is retryable for Kubeflow (143)."""
    launcher = executable(tmp_path / "launcher", f"""#!/usr/bin/env bash
trap 'echo TERM >> {tmp_path}/signals; sleep 0.5; exit 15' TERM
echo "$(ps -o pgid= $$) $(awk '/^SigIgn/ {{print $2}}' /proc/$$/status)" > {tmp_path}/ready
while :; do sleep 0.05; done
""")
    job = subprocess.Popen(["bash", str(SUPERVISE), str(launcher)], text=True, stderr=subprocess.PIPE,
                           env={**os.environ, "EXIT_CODES": "kubernetes", "MAX_RESTARTS": "3", "RESTART_DELAY": "0"})
    try:
        pgid, ignored = wait_for_file(tmp_path / "ready", job).split()
        supervisor_group = os.getpgid(job.pid)
        job.send_signal(signal.SIGTERM)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143, stderr
    assert (tmp_path / "signals").read_text() == "TERM\n"
    assert int(pgid) != supervisor_group, "the launcher must not share the supervisor's process group"
    assert int(ignored, 16) & SIGUSR1_BIT, "the launcher must ignore SIGUSR1 (its default action kills it)"
    assert "relaunching" not in stderr and "exited with status 15 after SIGTERM" in stderr


def test_sigusr1_reaches_the_workers_and_their_relaunch_code_is_retryable(tmp_path):
    """SIGUSR1 to the supervisor goes to the launcher's children (the workers), not to the launcher, which
    ignores it; a worker that saves and exits 75 makes the pod retryable."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"""import signal, sys, time, pathlib
def stop(number, frame):
    pathlib.Path({str(tmp_path / 'saved')!r}).write_text("saved")
    sys.exit({RELAUNCH_EXIT_CODE})
signal.signal(signal.SIGUSR1, stop)
pathlib.Path({str(tmp_path / 'ready')!r}).write_text("ready")
while True:
    time.sleep(0.05)
""")
    launcher = executable(tmp_path / "launcher", f"#!/usr/bin/env bash\n{sys.executable} {worker} &\nwait $!\n")
    job = subprocess.Popen(["bash", str(SUPERVISE), str(launcher)], text=True, stderr=subprocess.PIPE,
                           env={**os.environ, "EXIT_CODES": "kubernetes"})
    try:
        wait_for_file(tmp_path / "ready", job)
        job.send_signal(signal.SIGUSR1)
        _, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert (tmp_path / "saved").read_text() == "saved"
    assert job.returncode == 128 + RELAUNCH_EXIT_CODE, stderr


def test_retryable_exits_are_relaunched_up_to_max_restarts_and_2_never(tmp_path):
    attempts = tmp_path / "attempts"
    flaky = executable(tmp_path / "flaky", f"#!/usr/bin/env bash\necho x >> {attempts}\n"
                                            f"[ $(wc -l < {attempts}) -ge 3 ] && exit 0\nexit 1\n")
    done = supervise([str(flaky)], {"MAX_RESTARTS": "2", "RESTART_DELAY": "0"})
    assert done.returncode == 0 and attempts.read_text() == "x\nx\nx\n", done.stderr
    assert "relaunching (2 of 2)" in done.stderr
    attempts.unlink()
    assert supervise([str(flaky)], {"MAX_RESTARTS": "1", "RESTART_DELAY": "0"}).returncode == 1
    assert attempts.read_text() == "x\nx\n"
    bad_input = executable(tmp_path / "bad", f"#!/usr/bin/env bash\necho x >> {tmp_path}/bad-attempts\nexit 2\n")
    refused = supervise([str(bad_input)], {"MAX_RESTARTS": "5", "RESTART_DELAY": "0", "EXIT_CODES": "kubernetes"})
    assert refused.returncode == 2 and (tmp_path / "bad-attempts").read_text() == "x\n"


@pytest.mark.parametrize("variable, value", [
    ("MAX_RESTARTS", "forever"), ("MAX_RESTARTS", "-1"), ("RESTART_DELAY", "1.5"), ("EXIT_CODES", "k8s")])
def test_supervise_rejects_bad_variables_before_running_anything(variable, value, tmp_path):
    marker = tmp_path / "ran"
    result = supervise(["touch", str(marker)], {variable: value})
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and variable in result.stderr
    assert not marker.exists()


@pytest.fixture
def fake_python(tmp_path):
    """A `python` that records each run and fails its first run (exit 1), as a lost worker would."""
    return executable(tmp_path / "python", f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/runs
[ $(wc -l < {tmp_path}/runs) -ge 2 ] && exit 0
exit 1
""")


def test_local_sh_relaunches_through_supervise(fake_python, tmp_path):
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake_python), "CONFIG": CONFIG, "MAX_RESTARTS": "1",
           "RESTART_DELAY": "0", "NPROC": "3"}
    result = subprocess.run(["bash", "launch/local.sh", "max_steps=3"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "relaunching (1 of 1)" in result.stderr, result.stderr
    runs = (tmp_path / "runs").read_text().splitlines()
    assert len(runs) == 2 and runs[0].startswith("-m paddle.distributed.launch --nproc_per_node 3")


@pytest.mark.parametrize("script, variables", [
    ("local.sh", {"MAX_RESTARTS": "forever"}),
    ("local.sh", {"RESTART_DELAY": "soon"}),
    ("local.sh", {"NPROC": "0"}),
    ("local.sh", {"NPROC": "two"}),
    ("multinode.sh", {"GPUS_PER_NODE": "all"}),
    ("multinode.sh", {"NPROC": "x"}),
    ("multinode.sh", {"NNODES": "two"}),
    ("multinode.sh", {"NODE_RANK": "first"}),
    ("multinode.sh", {"NODE_RANK": "2"}),  # NNODES=2: ranks 0 and 1
    ("multinode.sh", {"NNODES": "0"}),
    ("multinode.sh", {"NNODES": "4:2"}),
    ("multinode.sh", {"CONFIG": "configs/missing.yaml"}),
    ("multinode.sh", {"MASTER_PORT": "70000"}),
    ("multinode.sh", {"GPUS": "all"}),
    ("multinode.sh", {"TASK": "serve"}),
])
def test_launch_scripts_reject_words_where_numbers_belong(script, variables, fake_python, tmp_path):
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake_python), "CONFIG": CONFIG, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "12345", "NNODES": "2", **variables}
    result = subprocess.run(["bash", f"launch/{script}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    (name,) = variables
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"launch/{script}: {name} must be"), result.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start with a bad variable"


@pytest.fixture
def slurm_job(tmp_path):
    """The rendered Slurm script with stub srun (exits SRUN_STATUS) and scontrol (records requeues)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", f'#!/usr/bin/env bash\necho "$*" > {tmp_path}/srun\nexit "$SRUN_STATUS"\n')
    executable(bin_dir / "scontrol", f'#!/usr/bin/env bash\nif [ "$1 $2" = "show hostnames" ]; then echo node-a; '
                                     f'else echo "$*" >> {tmp_path}/scontrol; fi\n')
    executable(bin_dir / "getent", "#!/usr/bin/env bash\nexit 2\n")
    script = tmp_path / "job.sbatch"
    script.write_text(render(JobSpec(target="slurm", nodes=2, gpus_per_node=0, config=CONFIG, job_name="ner-s",
                                     max_restarts=3)))

    def run(srun_status: int, restart_count: int):
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_STATUS": str(srun_status),
               "SLURM_RESTART_COUNT": str(restart_count), "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "ner-s",
               "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "4",
               "SLURM_SUBMIT_DIR": str(ROOT)}
        result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        requeues = (tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else ""
        (tmp_path / "scontrol").unlink(missing_ok=True)
        return result, requeues, (tmp_path / "srun").read_text()
    return run


@pytest.mark.parametrize("status, restart_count, requeued, exit_code", [
    (0, 0, False, 0),
    (2, 0, False, 2),
    (3, 0, False, 3),
    (RELAUNCH_EXIT_CODE, 10, True, 0),  # saved before the time limit: always requeued, it made progress
    (1, 2, True, 0),                   # a failure, within MAX_REQUEUES (3)
    (241, 3, False, 241),              # a failure after 3 requeues
])
def test_slurm_job_requeues_itself(status, restart_count, requeued, exit_code, slurm_job):
    result, requeues, srun = slurm_job(status, restart_count)
    assert result.returncode == exit_code, result.stderr
    assert requeues == ("requeue 42\n" if requeued else ""), requeues
    assert srun.startswith("--nodes=2 --ntasks-per-node=1 --cpus-per-task=4 --kill-on-bad-exit=1 bash -c")


def container_command(target: str, job=JobSpec) -> tuple[str, dict]:
    """The rendered pod's shell script and environment (as the operator would start it)."""
    import yaml

    what = dict(config=CONFIG) if job is JobSpec else dict(predict_args=PREDICT_FLAGS)
    manifest = yaml.safe_load(render(job(target=target, nodes=2, gpus_per_node=0, image="registry.example/ner:1",
                                         shared_dir="/mnt/shared", job_name="ner-k", **what)))
    replica = manifest["spec"]["worker"] if target == "k8s-paddle" else manifest["spec"]["paddleReplicaSpecs"]["Worker"]
    (main_container,) = replica["template"]["spec"]["containers"]
    operator_env = {"PADDLE_TRAINERS": "10.1.0.1,10.1.0.2", "PADDLE_PORT": "36000", "PADDLE_TRAINERS_NUM": "2",
                    "PADDLE_TRAINER_ID": "0"} if target == "k8s-paddle" else {}
    env = {item["name"]: item["value"] for item in main_container["env"]}
    return main_container["command"][-1], {**operator_env, **env}


@pytest.fixture
def stub_launcher(tmp_path):
    """`python` on PATH for the container command: records each start, then exits STUB_STATUS, or with
    STUB_STATUS=wait waits for SIGTERM (recording it) and exits 15 as Paddle's launcher does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "python", f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/starts
if [ "$STUB_STATUS" = wait ]; then
  trap 'echo TERM >> {tmp_path}/signals; exit 15' TERM
  touch {tmp_path}/ready
  while :; do sleep 0.05; done
fi
exit "$STUB_STATUS"
""")
    return bin_dir


@pytest.mark.parametrize("target", ["k8s-kubeflow", "k8s-paddle"])
@pytest.mark.parametrize("code, pod_exit, starts", [
    (0, 0, 1), (1, 129, 4), (2, 2, 1), (3, 3, 1), (15, 143, 4), (241, 241, 4)])
def test_the_rendered_container_command_maps_the_launchers_exit(target, code, pod_exit, starts, stub_launcher,
                                                                  tmp_path):
    """The pod's own command with a stub launcher: retryable exits are relaunched in place MAX_RESTARTS (3)
    times, then leave as >= 128; 0, 2 and 3 leave at once, as they are."""
    script, env = container_command(target)
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{stub_launcher}:{os.environ['PATH']}", **env, "RESTART_DELAY": "0",
                                 "STUB_STATUS": str(code), "HOSTNAME": "ner-k-worker-0"})
    assert result.returncode == pod_exit, result.stderr
    launches = (tmp_path / "starts").read_text().splitlines()
    assert len(launches) == starts and launches[0].startswith("-m paddle.distributed.launch")


@pytest.mark.parametrize("target", ["k8s-kubeflow", "k8s-paddle"])
def test_the_rendered_container_command_forwards_one_sigterm(target, stub_launcher, tmp_path):
    script, env = container_command(target)
    job = subprocess.Popen(["bash", "-c", script], cwd=ROOT, text=True, stderr=subprocess.PIPE,
                           env={"PATH": f"{stub_launcher}:{os.environ['PATH']}", **env, "STUB_STATUS": "wait",
                                "HOSTNAME": "ner-k-worker-0"})
    try:
        wait_for_file(tmp_path / "ready", job)
        job.send_signal(signal.SIGTERM)
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 143, stderr
    assert (tmp_path / "signals").read_text() == "TERM\n" and len((tmp_path / "starts").read_text().splitlines()) == 1


@pytest.mark.parametrize("target", ["k8s-kubeflow", "k8s-paddle"])
@pytest.mark.parametrize("code, pod_exit, starts", [(0, 0, 1), (1, 129, 4), (2, 2, 1)])
def test_the_rendered_prediction_pod_runs_predict_py_through_supervise(target, code, pod_exit, starts, stub_launcher,
                                                                       tmp_path):
    """A prediction pod relaunches its launcher like a training pod (a relaunch continues the output); 2, bad
    input, is not retried."""
    script, env = container_command(target, PredictionJob)
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{stub_launcher}:{os.environ['PATH']}", **env, "RESTART_DELAY": "0",
                                 "STUB_STATUS": str(code), "HOSTNAME": "ner-k-worker-0"})
    assert result.returncode == pod_exit, result.stderr
    launches = (tmp_path / "starts").read_text().splitlines()
    assert len(launches) == starts and len(set(launches)) == 1, "every relaunch runs the same command"
    assert launches[0].startswith("-m paddle.distributed.launch")
    assert launches[0].endswith("predict.py " + " ".join(PREDICT_FLAGS) + " --device cpu")


def test_the_rendered_multinode_prediction_wrapper_relaunches_the_same_command(fake_python, tmp_path):
    """The wrapper runs launch/multinode.sh (TASK=predict) under supervise.sh: a lost node (exit 1) is
    relaunched with the same command, which continues the output."""
    wrapper = tmp_path / "job.sh"
    wrapper.write_text(render(PredictionJob(target="multinode", nodes=2, gpus_per_node=0, job_name="ner-p",
                                            predict_args=PREDICT_FLAGS)))
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake_python), "NERPIPE_ROOT": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12345", "NODE_RANK": "1", "RESTART_DELAY": "0"}
    result = subprocess.run(["bash", str(wrapper), "--batch_size", "8"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "relaunching (1 of 3)" in result.stderr, result.stderr
    first, second = (tmp_path / "runs").read_text().splitlines()
    assert first == second == (
        "-m paddle.distributed.launch --master 127.0.0.1:12345 --nnodes 2 --job_id ner-p --log_dir log/node-1 "
        "--rank 1 --nproc_per_node 1 predict.py --device cpu " + " ".join(PREDICT_FLAGS) + " --batch_size 8")


def test_the_rendered_slurm_prediction_job_requeues_after_a_failure_not_after_bad_input(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "srun", f'#!/usr/bin/env bash\necho "TASK=$TASK $*" > {tmp_path}/srun\nexit "$SRUN_STATUS"\n')
    executable(bin_dir / "scontrol", f'#!/usr/bin/env bash\nif [ "$1 $2" = "show hostnames" ]; then echo node-a; '
                                     f'else echo "$*" >> {tmp_path}/scontrol; fi\n')
    executable(bin_dir / "getent", "#!/usr/bin/env bash\nexit 2\n")
    script = tmp_path / "job.sbatch"
    script.write_text(render(PredictionJob(target="slurm", nodes=2, gpus_per_node=0, job_name="ner-s",
                                           predict_args=PREDICT_FLAGS)))
    for status, exit_code, requeues in ((1, 0, "requeue 42\n"), (2, 2, "")):
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_STATUS": str(status), "SLURM_RESTART_COUNT": "0",
               "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "ner-s", "SLURM_JOB_NODELIST": "node-[a-b]",
               "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "4", "SLURM_SUBMIT_DIR": str(ROOT)}
        result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == exit_code, result.stderr
        assert ((tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else "") == requeues
        (tmp_path / "scontrol").unlink(missing_ok=True)
        srun = (tmp_path / "srun").read_text()
        # Each task runs launch/multinode.sh with TASK=predict and predict.py's flags.
        assert srun.startswith("TASK=predict --nodes=2") and srun.rstrip().endswith("bash " + " ".join(PREDICT_FLAGS))
