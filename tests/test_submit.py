"""pipeline.submit renders every target from one set of values; the results are valid shell or YAML
with what each scheduler or operator needs (checked field by field against the operators' schemas), no
template names a host or a device, and every value that would fail on the cluster is refused first."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.jobs import KUBEFLOW_PORT, TEMPLATES, JobSpec, PredictionJob, SubmitError, render
from pipeline.submit import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/msra_m3e_small_quick.yaml"
SHARED = "/mnt/shared"
TEMPLATE_FILES = [ROOT / "launch" / "multinode.sh", ROOT / "launch" / "slurm.sbatch", ROOT / "launch" / "supervise.sh",
                  *sorted((ROOT / "launch" / "k8s").glob("*.yaml"))]


def spec(target, nodes=3, gpus=4, **extra) -> JobSpec:
    values = dict(target=target, nodes=nodes, gpus_per_node=gpus, config=CONFIG, image="registry.example/ner:1",
                  shared_dir=SHARED, job_name="ner-test", overrides=["epochs=2", "learning_rate=1e-4"])
    values.update(extra)
    return JobSpec(**values)


PREDICT_FLAGS = ["--checkpoint", "outputs/ner/best_model", "--input", f"{SHARED}/corpus.txt", "--output",
                 f"{SHARED}/corpus.jsonl", "--chunk_lines", "256"]


def predict_spec(target, nodes=3, gpus=4, **extra) -> PredictionJob:
    values = dict(target=target, nodes=nodes, gpus_per_node=gpus, image="registry.example/ner:1", shared_dir=SHARED,
                  job_name="ner-test", predict_args=PREDICT_FLAGS)
    values.update(extra)
    return PredictionJob(**values)


def job_of_kind(kind, target, nodes, gpus) -> tuple[JobSpec | PredictionJob, list[str]]:
    """A training or prediction job, and the words its k8s pod command must end with (script on)."""
    if kind == "train":
        return spec(target, nodes=nodes, gpus=gpus), [
            "train_dist.py", "--config", CONFIG, f"checkpoint_dir={SHARED}/checkpoints/ner-test", "epochs=2",
            "learning_rate=1e-4", "save_interval=100", *(["use_gpu=true"] if gpus else [])]
    return predict_spec(target, nodes=nodes, gpus=gpus), ["predict.py", *PREDICT_FLAGS, "--device",
                                                          "gpu" if gpus else "cpu"]


def bash_syntax_ok(path: Path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def container(manifest: dict, target: str) -> tuple[dict, dict]:
    """(replica spec, first container) of either operator's PaddleJob."""
    if target == "k8s-paddle":
        replica = manifest["spec"]["worker"]
    else:
        replica = manifest["spec"]["paddleReplicaSpecs"]["Worker"]
    return replica, replica["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("target", list(TEMPLATES))
def test_every_target_renders_to_a_file(target, tmp_path):
    output = tmp_path / "job.out"
    assert main(["--target", target, "--nodes", "2", "--gpus-per-node", "1", "--config", CONFIG, "--image", "img:1",
                 "--shared-dir", SHARED, "--output", str(output), "epochs=2"]) == 0
    text = output.read_text()
    assert "@@" not in text, "a placeholder was left unfilled"
    assert "train_dist.py" in text or "multinode.sh" in text
    assert CONFIG in text and "epochs=2" in text


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("gpus", [0, 8])
def test_slurm_script(gpus, nodes, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render(spec("slurm", nodes=nodes, gpus=gpus)))
    bash_syntax_ok(path)
    text = path.read_text()
    directives = dict(line.split()[1].lstrip("-").partition("=")[::2] for line in text.splitlines()
                      if line.startswith("#SBATCH"))
    assert directives["nodes"] == str(nodes) and directives["ntasks-per-node"] == "1"
    assert directives.get("gpus-per-node") == (str(gpus) if gpus else None)
    # One task per node runs the launcher and all its workers: 4 CPUs and 8 GiB per worker by default.
    assert directives["cpus-per-task"] == str(4 * max(gpus, 1)) and directives["mem"] == f"{8 * max(gpus, 1)}G"
    assert "requeue" in directives and directives["signal"] == "USR1@120"
    for variable in ("SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        assert variable in text
    # Since Slurm 22.05 srun does not inherit --cpus-per-task.
    assert 'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK"' in text
    assert "scontrol show hostnames" in text and "launch/multinode.sh" in text and 'trap "" USR1' in text
    assert (f"ARGS=(checkpoint_dir={SHARED}/checkpoints/ner-test epochs=2 learning_rate=1e-4 save_interval=100)"
            in text)
    assert "export TASK=train" in text and f"export CONFIG=${{CONFIG:-{CONFIG}}}" in text
    assert "export NERPIPE_JOB=ner-test" in text and "NERPIPE_JOB_INSTANCE=slurm-$SLURM_JOB_ID" in text


# The fields each operator's API defines (training-operator pkg/apis/kubeflow.org/v1 PaddleJob, RunPolicy and
# ReplicaSpec; paddle-operator api/v1/paddlejob_types.go PaddleJobSpec and ResourceSpec), with the allowed values.
KUBEFLOW_RUN_POLICY = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                       "schedulingPolicy", "suspend", "managedBy"}
KUBEFLOW_CLEAN_POD_POLICIES = {"None", "All", "Running"}
KUBEFLOW_REPLICA = {"replicas", "template", "restartPolicy"}
KUBEFLOW_RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
PADDLE_OPERATOR_SPEC = {"cleanPodPolicy", "schedulingPolicy", "intranet", "withGloo", "sampleSetRef", "ps", "worker",
                        "heter", "elastic"}
PADDLE_OPERATOR_CLEAN_POD_POLICIES = {"Always", "Never", "OnFailure", "OnCompletion"}
PADDLE_OPERATOR_INTRANETS = {"PodIP", "Service", "Host"}
PADDLE_OPERATOR_RESOURCE = {"replicas", "requests", "limits", "template"}
QUANTITY = re.compile(r"^[0-9]+(Gi|Mi)?$")


def check_pod_spec(pod: dict, nodes: int, gpus: int, target: str, program: list[str]):
    """What both operators need of the pod template, and what a relaunch needs of the container."""
    assert pod["terminationGracePeriodSeconds"] > 30, "the launcher gives its workers 30 s after SIGTERM"
    (main_container,) = pod["containers"]
    assert main_container["name"] == "paddle"
    assert main_container["image"] == "registry.example/ner:1" and main_container["workingDir"] == f"{SHARED}/nerpipe"
    env = {item["name"]: item["value"] for item in main_container["env"]}
    assert all(isinstance(value, str) for value in env.values()), "Kubernetes env values are strings"
    assert env == {"NERPIPE_JOB": "ner-test", "EXIT_CODES": "kubernetes", "MAX_RESTARTS": "3", "RESTART_DELAY": "30"}
    resources = main_container["resources"]
    workers = max(gpus, 1)
    assert resources["requests"] == {"cpu": str(4 * workers), "memory": f"{8 * workers}Gi"}
    assert all(QUANTITY.match(str(value)) for part in resources.values() for value in part.values())
    assert resources["limits"] == {"memory": f"{8 * workers}Gi", **({"nvidia.com/gpu": gpus} if gpus else {})}
    shell, flag, script = main_container["command"]
    assert (shell, flag) == ("bash", "-c")
    words = shlex.split(script.replace("\\\n", " "), comments=True)
    supervised = words[words.index("launch/supervise.sh") + 1:]
    assert words[words.index("launch/supervise.sh") - 2:][:2] == ["exec", "bash"]
    assert supervised[:3] == ["python", "-m", "paddle.distributed.launch"]
    launch = dict(zip(supervised, supervised[1:]))
    assert launch["--nproc_per_node"] == str(workers) and launch["--job_id"] == "ner-test"
    assert supervised[supervised.index(program[0]):] == program
    assert "--workers" not in supervised
    if target == "k8s-paddle":
        assert launch["--rank"] == "${PADDLE_TRAINER_ID}" and launch["--nnodes"] == "${PADDLE_TRAINERS_NUM}"
    else:
        assert "--master" not in launch and "--nnodes" not in launch  # PADDLE_MASTER, PADDLE_NNODES
    assert ("unset CUDA_VISIBLE_DEVICES" in script) == (gpus == 0)
    mounts = {m["name"]: m["mountPath"] for m in main_container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["shared"] == SHARED and volumes["shared"]["persistentVolumeClaim"]["claimName"] == "ner-test-shared"
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    return main_container, script


@pytest.mark.parametrize("kind", ["train", "predict"])
@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("gpus", [0, 8])
def test_kubeflow_manifest_against_the_operator_schema(gpus, nodes, kind, tmp_path):
    rendered, program = job_of_kind(kind, "k8s-kubeflow", nodes, gpus)
    manifest = yaml.safe_load(render(rendered))
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == (
        "kubeflow.org/v1", "PaddleJob", "ner-test")
    assert set(manifest["spec"]) == {"runPolicy", "paddleReplicaSpecs"}
    run_policy = manifest["spec"]["runPolicy"]
    assert set(run_policy) <= KUBEFLOW_RUN_POLICY and run_policy["cleanPodPolicy"] in KUBEFLOW_CLEAN_POD_POLICIES
    # The bound that applies to ExitCode replicas: backoffLimit counts only OnFailure/Always restarts.
    assert run_policy["activeDeadlineSeconds"] == 72 * 3600 and "backoffLimit" not in run_policy
    assert set(manifest["spec"]["paddleReplicaSpecs"]) == {"Worker"}  # collective mode: no Master replica
    worker = manifest["spec"]["paddleReplicaSpecs"]["Worker"]
    assert set(worker) == KUBEFLOW_REPLICA and worker["replicas"] == nodes
    assert worker["restartPolicy"] == "ExitCode" and worker["restartPolicy"] in KUBEFLOW_RESTART_POLICIES
    main_container, script = check_pod_spec(worker["template"]["spec"], nodes, gpus, "k8s-kubeflow", program)
    # The operator takes PADDLE_MASTER's port from the port named "master" of the container named "paddle".
    assert main_container["ports"] == [{"name": "master", "containerPort": KUBEFLOW_PORT}] and KUBEFLOW_PORT == 36543
    (tmp_path / "command.sh").write_text(script)
    bash_syntax_ok(tmp_path / "command.sh")


@pytest.mark.parametrize("kind", ["train", "predict"])
@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("gpus", [0, 8])
def test_paddle_operator_manifest_against_the_operator_schema(gpus, nodes, kind, tmp_path):
    rendered, program = job_of_kind(kind, "k8s-paddle", nodes, gpus)
    manifest = yaml.safe_load(render(rendered))
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == (
        "batch.paddlepaddle.org/v1", "PaddleJob", "ner-test")
    job = manifest["spec"]
    assert set(job) <= PADDLE_OPERATOR_SPEC and "ps" not in job and "elastic" not in job  # collective, not elastic
    assert job["intranet"] in PADDLE_OPERATOR_INTRANETS and job["cleanPodPolicy"] in PADDLE_OPERATOR_CLEAN_POD_POLICIES
    worker = job["worker"]
    # No requests/limits replica counts: limits > 0 would switch the operator to elastic mode.
    assert set(worker) == {"replicas", "template"} <= PADDLE_OPERATOR_RESOURCE and worker["replicas"] == nodes
    pod = worker["template"]["spec"]
    # Never: exit 2 or 3 fails the pod, and so the job, instead of restarting forever (OnFailure).
    assert pod["restartPolicy"] == "Never" and pod["activeDeadlineSeconds"] == 72 * 3600
    main_container, script = check_pod_spec(pod, nodes, gpus, "k8s-paddle", program)
    assert "ports" not in main_container  # the operator's PADDLE_PORT (36000) and the launcher's own ports
    (tmp_path / "command.sh").write_text(script)
    bash_syntax_ok(tmp_path / "command.sh")


def test_multinode_script_and_rendered_wrapper(tmp_path):
    bash_syntax_ok(ROOT / "launch" / "multinode.sh")
    path = tmp_path / "job.sh"
    path.write_text(render(spec("multinode", nodes=2, gpus=0, shared_dir=None)))
    bash_syntax_ok(path)
    text = path.read_text()
    assert "export NNODES=2" in text and "GPUS_PER_NODE:-0" in text
    assert 'launch/multinode.sh" epochs=2 learning_rate=1e-4 save_interval=100 "$@"' in text
    assert "export NERPIPE_JOB=ner-test" in text


def test_multinode_sh_builds_the_launcher_command(tmp_path):
    """Run multinode.sh with a fake python that prints its arguments: the command every node runs."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "CVD=${CUDA_VISIBLE_DEVICES-unset}"\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12345",
           "NNODES": "2", "NODE_RANK": "1", "CONFIG": CONFIG, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), "max_steps=3"], env=env,
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "CVD=unset", "an empty CUDA_VISIBLE_DEVICES must be removed for CPU workers"
    args = lines[1:]
    assert args[:2] == ["-m", "paddle.distributed.launch"]
    pairs = dict(zip(args, args[1:]))
    assert pairs["--master"] == "127.0.0.1:12345" and pairs["--nnodes"] == "2" and pairs["--rank"] == "1"
    assert pairs["--nproc_per_node"] == "1" and pairs["--log_dir"] == "log/node-1"
    assert args[-4:] == ["train_dist.py", "--config", CONFIG, "max_steps=3"]


@pytest.mark.parametrize("gpus, device", [("", "cpu"), ("0,1", "gpu")])
def test_multinode_sh_runs_predict_py_with_its_flags_when_task_is_predict(gpus, device, tmp_path):
    """TASK=predict: no CONFIG needed, the arguments are predict.py's flags, and the device follows the workers."""
    fake = tmp_path / "python"
    # `-m pipeline.device` is the GPU check before --gpus: it passes here; the launcher prints its arguments.
    fake.write_text('#!/usr/bin/env bash\n[ "$2" = pipeline.device ] && exit 0\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12345",
           "NNODES": "2", "NODE_RANK": "0", "TASK": "predict", "GPUS": gpus}
    flags = ["--checkpoint", "ckpt/best_model", "--input", "in put.txt", "--output", "out.jsonl"]
    result = subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), *flags], env=env,
                            capture_output=True, text=True, check=True)
    args = result.stdout.splitlines()
    assert args[:2] == ["-m", "paddle.distributed.launch"] and "train_dist.py" not in args
    assert args[args.index("predict.py"):] == ["predict.py", "--device", device, *flags]
    assert (("--gpus", "0,1") if gpus else ("--nproc_per_node", "1")) in set(zip(args, args[1:]))


@pytest.mark.parametrize("values, message", [
    (dict(nodes=0), "--nodes must be between 1 and 1024, got 0"),
    (dict(nodes=5000), "--nodes must be between 1 and 1024, got 5000"),
    (dict(gpus=-1), "--gpus-per-node must be between 0 and 16, got -1"),
    (dict(gpus=64), "--gpus-per-node must be between 0 and 16, got 64"),
    (dict(cpus_per_node=0), "--cpus-per-node must be between 1 and 1024"),
    (dict(memory_gb=100_000), "--memory-gb must be between 1 and 4096"),
    (dict(max_restarts=-1), "--max-restarts must be between 0 and 100"),
    (dict(save_interval=0), "--save-interval must be between 1 and"),
    (dict(deadline_hours=0), "--deadline-hours must be > 0"),
    (dict(config="configs/missing.yaml"), "config file not found"),
    (dict(target="k8s-paddle", image=None), "--image is required"),
    (dict(target="k8s-paddle", image="reg/ner:1 --privileged"), "--image 'reg/ner:1 --privileged' must be"),
    (dict(target="k8s-kubeflow", shared_dir=None), "--shared-dir"),
    (dict(target="k8s-kubeflow", shared_dir="/mnt/my data"), "--shared-dir '/mnt/my data' may hold only"),
    (dict(shared_dir='/mnt/a"b'), "may hold only letters"),
    (dict(shared_dir="/mnt/$HOME"), "may hold only letters"),
    (dict(target="k8s-paddle", workdir="nerpipe"), "--workdir 'nerpipe' must be an absolute path"),
    (dict(target="k8s-paddle", workdir="/src/`id`"), "--workdir '/src/`id`' may hold only"),
    (dict(target="k8s-paddle", pvc="Shared_Volume"), "--pvc 'Shared_Volume' must be a Kubernetes name"),
    (dict(job_name="Bad_Name"), "--job-name 'Bad_Name' must be a Kubernetes name"),
    (dict(job_name="1ner"), "starting with a letter"),
    (dict(job_name="ner-"), "--job-name 'ner-'"),
    (dict(job_name="n" * 56, nodes=10), f"the pod name '{'n' * 56}-worker-9' at most 63 characters"),
    (dict(overrides=["not-an-override"]), "key=value"),
    (dict(overrides=["epoch=3"]), "the training config does not load: command-line override: unknown key(s) ['epoch']"),
    (dict(overrides=["epochs=many"]), "epochs must be an integer, got 'many'"),
    (dict(overrides=["resume=off"]), "resume=off: a cluster job relaunches itself"),
    (dict(target="k8s-kubeflow", overrides=["checkpoint_dir=/tmp/ck"]),
     f"checkpoint_dir=/tmp/ck is /tmp/ck in the pod, not on --shared-dir {SHARED}"),
    (dict(target="k8s-paddle", overrides=["checkpoint_dir=../../ck"]), "is /mnt/ck in the pod, not on --shared-dir"),
    (dict(target="k8s-paddle", workdir="/src", overrides=["checkpoint_dir=runs/a"]), "is /src/runs/a in the pod"),
])
def test_invalid_values_are_rejected(values, message):
    values = dict(values)
    target = values.pop("target", "slurm")
    with pytest.raises(SubmitError, match=re.escape(message)):
        spec(target, **values)


def test_a_checkpoint_dir_the_user_puts_on_the_shared_volume_is_kept():
    """Relative paths are the checkout's, SHARED_DIR/nerpipe in the pod unless --workdir says otherwise."""
    for overrides in (["checkpoint_dir=runs/a"], [f"checkpoint_dir={SHARED}/runs/a"]):
        job = spec("k8s-paddle", overrides=overrides)
        assert job.all_overrides()[0] == overrides[0] and overrides[0] in render(job)


def test_a_name_of_63_characters_with_the_pod_suffix_is_accepted():
    spec("k8s-kubeflow", job_name="n" * (63 - len("-worker-9")), nodes=10)


def test_a_bad_config_file_is_rejected_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nbatchsize: 8\n")
    with pytest.raises(SubmitError, match=r"bad.yaml: unknown key\(s\) \['batchsize'\]"):
        spec("slurm", config=str(path))


def test_training_states_and_resume_are_always_set_unless_the_user_set_them(tmp_path):
    assert spec("slurm", overrides=[]).all_overrides()[-1] == "save_interval=100"
    assert spec("slurm", overrides=[], save_interval=25).all_overrides()[-1] == "save_interval=25"
    assert spec("slurm", overrides=["save_interval=7"]).all_overrides()[-1] == "save_interval=7"
    preset = tmp_path / "preset.yaml"
    preset.write_text("save_interval: 50\nresume: 'off'\n")
    assert spec("slurm", config=str(preset), overrides=[]).all_overrides() == [
        f"checkpoint_dir={SHARED}/checkpoints/ner-test", "resume=auto"]


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "error: --nodes must be between 1 and 1024, got 0"),
    (["--nodes", "1", "--output", "/nonexistent/dir/job.sbatch"],
     "error: cannot write --output /nonexistent/dir/job.sbatch: No such file or directory"),
    (["--nodes", "1", "--", "resume=off"], "error: resume=off: a cluster job relaunches itself"),
    # argparse's own errors too: no usage block in front of the reason.
    (["--nodes", "two"], "python -m pipeline.submit: error: argument --nodes: invalid int value: 'two' (see --help)"),
    (["--nodes", "1", "--target", "lsf"], "python -m pipeline.submit: error: argument --target: invalid choice: 'lsf'"),
    ([], "python -m pipeline.submit: error: the following arguments are required: --nodes"),
])
def test_cli_reports_errors_in_one_line(argv, message):
    result = subprocess.run([sys.executable, "-m", "pipeline.submit", "--target", "slurm", "--config", CONFIG, *argv],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr


def test_cli_output_into_a_directory_is_one_line(tmp_path):
    assert main(["--target", "slurm", "--nodes", "1", "--config", CONFIG, "--output", str(tmp_path)]) == 2


@pytest.mark.parametrize("target", list(TEMPLATES))
def test_the_overrides_a_job_adds_are_config_keys(target):
    """What submit adds (checkpoint_dir on the shared storage, use_gpu on k8s) is read by pipeline.config."""
    from pipeline.config import load_config

    job = spec(target, gpus=2)
    config = load_config(str(ROOT / CONFIG), job.all_overrides())
    assert config.checkpoint_dir == f"{SHARED}/checkpoints/ner-test" and config.epochs == 2
    assert config.use_gpu == ("true" if target in ("k8s-paddle", "k8s-kubeflow") else "auto")


def test_cli_defaults_are_the_job_spec_defaults():
    from dataclasses import MISSING, fields

    parsed = build_parser().parse_args(["--target", "slurm", "--nodes", "1", "--config", CONFIG])
    with_defaults = [field for field in fields(JobSpec) if field.default is not MISSING]
    assert {field.name for field in with_defaults} >= {"job_name", "save_interval", "max_restarts", "deadline_hours"}
    for field in with_defaults:
        assert getattr(parsed, field.name) == field.default, field.name


# Literal IPv4 addresses, localhost, hostnames with a domain, and pinned device lists.
FORBIDDEN = [
    re.compile(r"\b\d{1,3}(\.\d{1,3}){3}\b"),
    re.compile(r"\blocalhost\b"),
    re.compile(r"\b[a-z0-9-]+\.(com|org|net|io|local|internal|cluster)\b(?!/v1)"),
    re.compile(r"(CUDA|NVIDIA)_VISIBLE_DEVICES=\d"),
    re.compile(r"--(gpus|devices)[ =]\d"),
]


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.name)
def test_templates_name_no_host_or_device(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("#") and "github.com" in line:
            continue  # a comment citing the operator's repository
        code = line.replace("batch.paddlepaddle.org/v1", "").replace("kubeflow.org/v1", "").replace("nvidia.com/gpu", "")
        for pattern in FORBIDDEN:
            assert not pattern.search(code), f"{path.name}:{number}: {line.strip()!r} matches {pattern.pattern}"
    if path.suffix == ".yaml":
        assert "@@{image}" in path.read_text() and "@@{nodes}" in path.read_text()


@pytest.mark.parametrize("target", list(TEMPLATES))
def test_values_with_spaces_and_quotes_are_quoted_for_the_shell(target, tmp_path):
    """A config path and an override with a space, a quote and a `$` reach train_dist.py as written."""
    config = tmp_path / "it's $x.yaml"
    config.write_text("epochs: 1\n")
    odd = "checkpoint_dir=/mnt/shared/a b'$c"
    text = render(spec(target, config=str(config), overrides=[odd]))
    if target in ("k8s-paddle", "k8s-kubeflow"):
        text = container(yaml.safe_load(text), target)[1]["command"][-1]
    (tmp_path / "job.sh").write_text(text)
    bash_syntax_ok(tmp_path / "job.sh")
    assert shlex.quote(str(config)) in text and shlex.quote(odd) in text


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("gpus", [0, 8])
@pytest.mark.parametrize("target", list(TEMPLATES))
def test_every_rendered_script_passes_bash_n(target, gpus, nodes, tmp_path):
    text = render(spec(target, nodes=nodes, gpus=gpus))
    if target in ("k8s-paddle", "k8s-kubeflow"):
        text = container(yaml.safe_load(text), target)[1]["command"][-1]
    (tmp_path / "job.sh").write_text(text)
    bash_syntax_ok(tmp_path / "job.sh")


# Prediction jobs: `python -m pipeline.submit predict ... -- PREDICT.PY FLAGS`.

@pytest.mark.parametrize("target", list(TEMPLATES))
def test_every_target_renders_a_prediction_job_to_a_file(target, tmp_path, capsys):
    output = tmp_path / "job.out"
    assert main(["predict", "--target", target, "--nodes", "2", "--gpus-per-node", "1", "--image", "img:1",
                 "--shared-dir", SHARED, "--output", str(output), "--", *PREDICT_FLAGS]) == 0
    assert f"wrote {output} (prediction on {target}, 2 node(s), 1 GPU(s) each)" in capsys.readouterr().err
    text = output.read_text()
    assert "@@" not in text, "a placeholder was left unfilled"
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "train_dist.py" not in code and "--config" not in code
    assert "--workers" not in text and " ".join(PREDICT_FLAGS) in text
    if target in ("k8s-paddle", "k8s-kubeflow"):
        assert "predict.py " + " ".join(PREDICT_FLAGS) + " --device gpu" in text
    else:
        assert "export TASK=predict" in text  # launch/multinode.sh adds predict.py and --device on the node


@pytest.mark.parametrize("gpus", [0, 8])
def test_slurm_prediction_script(gpus, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render(predict_spec("slurm", nodes=2, gpus=gpus)))
    bash_syntax_ok(path)
    text = path.read_text()
    directives = dict(line.split()[1].lstrip("-").partition("=")[::2] for line in text.splitlines()
                      if line.startswith("#SBATCH"))
    assert directives["nodes"] == "2" and directives.get("gpus-per-node") == (str(gpus) if gpus else None)
    # predict.py stops after the chunk in flight on SIGUSR1 and exits 75, which the script requeues.
    assert "requeue" in directives and directives["signal"] == "USR1@120"
    assert f"ARGS=({' '.join(PREDICT_FLAGS)})" in text and "export TASK=predict" in text
    assert "export CONFIG" not in text and "launch/multinode.sh" in text
    assert "it continues the output after its last complete chunk" in text


def test_multinode_prediction_wrapper_runs_multinode_sh_through_supervise(tmp_path):
    path = tmp_path / "job.sh"
    path.write_text(render(predict_spec("multinode", nodes=2, gpus=0, shared_dir=None, max_restarts=5,
                                        restart_delay=7)))
    bash_syntax_ok(path)
    text = path.read_text()
    assert "export TASK=predict" in text and "export NNODES=2" in text and "export CONFIG" not in text
    assert "MAX_RESTARTS=${MAX_RESTARTS:-5} RESTART_DELAY=${RESTART_DELAY:-7}" in text
    assert (f'exec bash "${{NERPIPE_ROOT:-.}}/launch/supervise.sh" bash "${{NERPIPE_ROOT:-.}}/launch/multinode.sh" '
            f'{" ".join(PREDICT_FLAGS)} "$@"') in text
    # A training wrapper stays as it was: multinode.sh runs the launcher itself.
    assert "supervise.sh" not in render(spec("multinode", nodes=2, gpus=0, shared_dir=None))


F = PREDICT_FLAGS  # a later flag replaces an earlier one, in predict.py as here


@pytest.mark.parametrize("flags, values, message", [
    ([], {}, "predict.py flags (after --): the following arguments are required: --checkpoint, --input"),
    (["--checkpoint", "ck", "--input", "in.txt"], {}, "predict.py --output -: a prediction job reads and writes files"),
    (F + ["--input", "-"], {}, "predict.py --input -: a prediction job reads and writes files"),
    (F + ["--overwrite"], {}, "--overwrite after --: every relaunch of the job would start the output over; to "
                              f"start anew, delete {SHARED}/corpus.jsonl.partial"),
    (F + ["--workers", "2"], {}, "--workers 2 after --: a job's prediction processes are the launcher's ranks"),
    (F + ["--device", "gpu"], {}, "--device/--use_gpu after --: a prediction job sets the device from --gpus-per-node"),
    (F + ["--use_gpu"], {}, "--device/--use_gpu after --"),
    (F + ["--chunk_lines", "0"], {}, "predict.py flags (after --): --chunk_lines must be >= 1"),
    (F + ["--batch_size", "many"], {}, "argument --batch_size: invalid int value: 'many'"),
    (F + ["--precision", "int8"], dict(gpus=2), "--precision int8 is not available on GPU"),
    (F + ["--bogus"], {}, "predict.py flags (after --): unrecognized arguments: --bogus"),
    (F + ["--inference_dir", "a\nb"], {}, "predict.py flag 'a\\nb' holds a control character"),
    (F + ["--output", "/tmp/out.jsonl"], dict(target="k8s-kubeflow"),
     f"predict.py --output /tmp/out.jsonl is /tmp/out.jsonl in the pod, not on --shared-dir {SHARED}"),
    (F + ["--output", "../../out.jsonl"], dict(target="k8s-paddle"), "is /mnt/out.jsonl in the pod, not on --shared-dir"),
    (F + ["--output", "out.jsonl"], dict(target="k8s-paddle", workdir="/src"), "is /src/out.jsonl in the pod"),
    (F, dict(nodes=0), "--nodes must be between 1 and 1024, got 0"),
    (F, dict(job_name="Bad_Name"), "--job-name 'Bad_Name' must be a Kubernetes name"),
    (F, dict(target="k8s-paddle", image=None), "--image is required"),
])
def test_invalid_prediction_jobs_are_rejected(flags, values, message):
    """The flags after -- are predict.py's, checked by its own parser; what only a job refuses is refused too."""
    values = dict(values)
    target = values.pop("target", "slurm")
    with pytest.raises(SubmitError, match=re.escape(message)):
        predict_spec(target, predict_args=flags, **values)


def test_a_relative_prediction_output_on_the_shared_volume_is_accepted():
    """Relative paths are the checkout's: on k8s the working directory, SHARED_DIR/nerpipe by default."""
    flags = ["--checkpoint", "outputs/ner/best_model", "--input", "corpus.txt", "--output", "out/corpus.jsonl"]
    for target in ("k8s-paddle", "k8s-kubeflow"):
        text = render(predict_spec(target, predict_args=flags))
        assert "predict.py " + " ".join(flags) + " --device gpu" in text


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0", "--"] + PREDICT_FLAGS, "error: --nodes must be between 1 and 1024, got 0"),
    (["--nodes", "1", "--output", "/nonexistent/dir/job.sbatch", "--"] + PREDICT_FLAGS,
     "error: cannot write --output /nonexistent/dir/job.sbatch: No such file or directory"),
    (["--nodes", "1", "--", "--checkpoint", "ck"], "error: predict.py flags (after --): the following arguments are"),
    (["--nodes", "1", "--", *PREDICT_FLAGS, "--workers", "4"], "error: --workers 4 after --"),
    (["--nodes", "1", "--max-restarts", "x", "--"] + PREDICT_FLAGS,
     "python -m pipeline.submit predict: error: argument --max-restarts: invalid int value: 'x' (see --help)"),
])
def test_prediction_cli_reports_errors_in_one_line(argv, message):
    result = subprocess.run([sys.executable, "-m", "pipeline.submit", "predict", "--target", "slurm", *argv],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr


def test_prediction_cli_has_no_config_and_its_defaults_are_the_job_defaults():
    from dataclasses import MISSING, fields

    parser = build_parser(PredictionJob)
    parsed = parser.parse_args(["--target", "slurm", "--nodes", "1", "--", *PREDICT_FLAGS])
    assert parsed.predict_args == PREDICT_FLAGS and not hasattr(parsed, "config")
    assert parsed.job_name == "nerpipe-predict" != build_parser().get_default("job_name")
    for field in fields(PredictionJob):
        if field.default is not MISSING:
            assert getattr(parsed, field.name) == field.default, field.name
    with pytest.raises(SystemExit):
        parser.parse_args(["--target", "slurm", "--nodes", "1", "--config", CONFIG])


@pytest.mark.parametrize("target", list(TEMPLATES))
def test_prediction_paths_with_spaces_and_quotes_are_quoted_for_the_shell(target, tmp_path):
    """An input and an output with a space, a quote and a `$` reach predict.py as written."""
    odd_input, odd_output = f"{SHARED}/my corpus's $x.txt", f"{SHARED}/out put.jsonl"
    flags = ["--checkpoint", "ck", "--input", odd_input, "--output", odd_output]
    text = render(predict_spec(target, predict_args=flags))
    if target in ("k8s-paddle", "k8s-kubeflow"):
        text = container(yaml.safe_load(text), target)[1]["command"][-1]
        words = shlex.split(text.replace("\\\n", " "), comments=True)
        assert words[words.index("predict.py"):] == ["predict.py", *flags, "--device", "gpu"]
    (tmp_path / "job.sh").write_text(text)
    bash_syntax_ok(tmp_path / "job.sh")
    assert shlex.quote(odd_input) in text and shlex.quote(odd_output) in text


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("gpus", [0, 8])
@pytest.mark.parametrize("target", list(TEMPLATES))
def test_every_rendered_prediction_script_passes_bash_n(target, gpus, nodes, tmp_path):
    text = render(predict_spec(target, nodes=nodes, gpus=gpus))
    if target in ("k8s-paddle", "k8s-kubeflow"):
        text = container(yaml.safe_load(text), target)[1]["command"][-1]
    (tmp_path / "job.sh").write_text(text)
    bash_syntax_ok(tmp_path / "job.sh")
