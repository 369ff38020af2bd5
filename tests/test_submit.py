"""pipeline.submit renders every target from one set of values; the results are valid shell or YAML
with what each scheduler or operator needs, and no template names a host or a device."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.jobs import TEMPLATES, JobSpec, SubmitError, render
from pipeline.submit import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/msra_m3e_small_quick.yaml"
SHARED = "/mnt/shared"
TEMPLATE_FILES = [ROOT / "launch" / "multinode.sh", ROOT / "launch" / "slurm.sbatch",
                  *sorted((ROOT / "launch" / "k8s").glob("*.yaml"))]


def spec(target, nodes=3, gpus=4, **extra) -> JobSpec:
    values = dict(target=target, nodes=nodes, gpus_per_node=gpus, config=CONFIG, image="registry.example/ner:1",
                  shared_dir=SHARED, job_name="ner-test", overrides=["epochs=2", "learning_rate=1e-4"])
    values.update(extra)
    return JobSpec(**values)


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


@pytest.mark.parametrize("gpus", [0, 2])
def test_slurm_script(gpus, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render(spec("slurm", gpus=gpus)))
    bash_syntax_ok(path)
    text = path.read_text()
    assert "#SBATCH --nodes=3" in text and "#SBATCH --ntasks-per-node=1" in text
    assert ("#SBATCH --gpus-per-node=2" in text) == (gpus > 0)
    for variable in ("SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        assert variable in text
    assert "scontrol show hostnames" in text and "srun" in text and "launch/multinode.sh" in text
    assert f"OVERRIDES=(checkpoint_dir={SHARED}/checkpoints/ner-test epochs=2 learning_rate=1e-4)" in text


@pytest.mark.parametrize("target", ["k8s-paddle", "k8s-kubeflow"])
@pytest.mark.parametrize("gpus", [0, 4])
def test_k8s_manifest(target, gpus):
    manifest = yaml.safe_load(render(spec(target, nodes=3, gpus=gpus)))
    assert manifest["apiVersion"] == {"k8s-paddle": "batch.paddlepaddle.org/v1", "k8s-kubeflow": "kubeflow.org/v1"}[target]
    assert manifest["kind"] == "PaddleJob"
    assert manifest["metadata"]["name"] == "ner-test"
    replica, main_container = container(manifest, target)
    assert replica["replicas"] == 3
    assert main_container["image"] == "registry.example/ner:1"
    command = " ".join(main_container["command"] + main_container.get("args", []))
    assert "paddle.distributed.launch" in command and "train_dist.py" in command
    assert f"--config {CONFIG}" in command and "epochs=2" in command
    assert f"checkpoint_dir={SHARED}/checkpoints/ner-test" in command
    limits = main_container["resources"]["limits"]
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus and "use_gpu=true" in command
    else:
        assert "nvidia.com/gpu" not in limits and "unset CUDA_VISIBLE_DEVICES" in command
    mounts = {m["name"]: m["mountPath"] for m in main_container["volumeMounts"]}
    volumes = {v["name"]: v for v in replica["template"]["spec"]["volumes"]}
    assert mounts["shared"] == SHARED and "persistentVolumeClaim" in volumes["shared"]
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    if target == "k8s-kubeflow":
        assert replica["restartPolicy"] == "ExitCode"
        assert main_container["name"] == "paddle"
        assert {"name": "master", "containerPort": 37777} in main_container["ports"]
    else:
        assert replica["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_multinode_script_and_rendered_wrapper(tmp_path):
    bash_syntax_ok(ROOT / "launch" / "multinode.sh")
    path = tmp_path / "job.sh"
    path.write_text(render(spec("multinode", nodes=2, gpus=0, shared_dir=None)))
    bash_syntax_ok(path)
    text = path.read_text()
    assert "export NNODES=2" in text and "GPUS_PER_NODE:-0" in text
    assert 'launch/multinode.sh" epochs=2 learning_rate=1e-4 "$@"' in text


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


@pytest.mark.parametrize("values, message", [
    (dict(nodes=0), "--nodes must be >= 1"),
    (dict(gpus=-1), "--gpus-per-node must be >= 0"),
    (dict(config="configs/missing.yaml"), "config file not found"),
    (dict(target="k8s-paddle", image=None), "--image is required"),
    (dict(target="k8s-kubeflow", shared_dir=None), "--shared-dir"),
    (dict(job_name="Bad_Name"), "--job-name"),
    (dict(overrides=["not-an-override"]), "key=value"),
])
def test_invalid_values_are_rejected(values, message):
    values = dict(values)
    target = values.pop("target", "slurm")
    with pytest.raises(SubmitError, match=re.escape(message)):
        spec(target, **values)


def test_cli_reports_errors_in_one_line():
    result = subprocess.run([sys.executable, "-m", "pipeline.submit", "--target", "slurm", "--nodes", "0",
                             "--config", CONFIG], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "error: --nodes must be >= 1, got 0"


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
    assert {field.name for field in with_defaults} >= {"job_name", "master_port", "backoff_limit"}
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


def test_rendered_k8s_command_quotes_overrides():
    manifest = yaml.safe_load(render(spec("k8s-paddle", overrides=["note=a b"])))
    script = container(manifest, "k8s-paddle")[1]["command"][-1]
    assert shlex.split(script.splitlines()[-1])[-2:] == ["note=a b", "use_gpu=true"]
