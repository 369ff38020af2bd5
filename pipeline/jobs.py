"""Cluster jobs (Slurm, paddle-operator, Kubeflow, plain multi-node) rendered from one set of values.

The templates are the files under launch/ (`@@{name}` placeholders, see `LaunchTemplate`); this
module only computes the values and fills them in. Hosts, ports and device ids are never
rendered: they come from the scheduler or the operator when the job runs. The command line is
``python -m pipeline.submit``.
"""
from __future__ import annotations

import json
import re
import shlex
import string
from dataclasses import dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DIR = ROOT / "launch"

TEMPLATES = {
    "slurm": LAUNCH_DIR / "slurm.sbatch",
    "k8s-paddle": LAUNCH_DIR / "k8s" / "paddlejob.yaml",
    "k8s-kubeflow": LAUNCH_DIR / "k8s" / "kubeflow-paddlejob.yaml",
    "multinode": None,  # rendered from MULTINODE_TEMPLATE below; it runs launch/multinode.sh
}
K8S_TARGETS = ("k8s-paddle", "k8s-kubeflow")

# The multi-node target only fixes the job's values; launch/multinode.sh holds the command.
MULTINODE_TEMPLATE = """#!/usr/bin/env bash
# @@{job_name}: @@{nodes} node(s). Run this same file on every node, with that node's values:
#   MASTER_ADDR=<address of node 0> MASTER_PORT=<free port> NODE_RANK=<0..@@{last_rank}> bash @@{script_name}
# NERPIPE_ROOT is the checkout (default: the current directory). Extra arguments: key=value overrides.
set -euo pipefail
export NNODES=@@{nodes}
export CONFIG=${CONFIG:-@@{config}}
export GPUS_PER_NODE=${GPUS_PER_NODE:-@@{gpus_per_node}}
export JOB_ID=${JOB_ID:-@@{job_name}}
export LOG_DIR=${LOG_DIR:-@@{log_root}/node-${NODE_RANK:-$(hostname)}}
exec bash "${NERPIPE_ROOT:-.}/launch/multinode.sh" @@{overrides} "$@"
"""

# DNS-1123 label: Kubernetes object names, also fine for Slurm job names and paths.
JOB_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class SubmitError(ValueError):
    """Invalid submission values: reported as one clear line, before anything is rendered."""


class LaunchTemplate(string.Template):
    """`@@{name}` placeholders: `$` and `%` stay free for the shell (`${VAR}`, `${X%%,*}`, `%j`)."""

    delimiter = "@@"


@dataclass
class JobSpec:
    """Everything a target needs; validated in `__post_init__`."""

    target: str
    nodes: int
    gpus_per_node: int
    config: str
    image: str | None = None
    shared_dir: str | None = None
    job_name: str = "nerpipe"
    pvc: str | None = None
    workdir: str | None = None
    master_port: int = 37777
    backoff_limit: int = 3
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.target not in TEMPLATES:
            raise SubmitError(f"unknown target {self.target!r}: choose one of {', '.join(TEMPLATES)}")
        if self.nodes < 1:
            raise SubmitError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise SubmitError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        config_path = Path(self.config)
        if not (config_path if config_path.is_absolute() else ROOT / config_path).is_file():
            raise SubmitError(f"config file not found: {self.config} (paths are relative to {ROOT})")
        if not JOB_NAME.match(self.job_name):
            raise SubmitError(f"--job-name {self.job_name!r} must be lower-case letters, digits and '-' "
                              "(a Kubernetes name), at most 63 characters")
        for item in self.overrides:
            if not OVERRIDE.match(item) or "\n" in item:
                raise SubmitError(f"override {item!r} is not of the form key=value")
        if self.target in K8S_TARGETS:
            if not self.image:
                raise SubmitError(f"--image is required for {self.target}")
            if not self.shared_dir or not self.shared_dir.startswith("/"):
                raise SubmitError(f"--shared-dir (an absolute mount path for the shared volume) is required "
                                  f"for {self.target}")
        if not 1 <= self.master_port <= 65535:
            raise SubmitError(f"--master-port must be a TCP port, got {self.master_port}")
        if self.backoff_limit < 0:
            raise SubmitError(f"--backoff-limit must be >= 0, got {self.backoff_limit}")

    def all_overrides(self) -> list[str]:
        """The user's overrides, plus checkpoint_dir on the shared storage unless the user chose one."""
        items = list(self.overrides)
        if self.shared_dir and not any(item.startswith("checkpoint_dir=") for item in items):
            # A checkpoint on a pod's own disk disappears with the pod: put it on the shared volume.
            items.insert(0, f"checkpoint_dir={self.shared_dir.rstrip('/')}/checkpoints/{self.job_name}")
        if self.gpus_per_node > 0 and self.target in K8S_TARGETS and not any(
                item.startswith("use_gpu=") for item in items):
            items.append("use_gpu=true")
        return items

    def log_root(self) -> str:
        """Where per-node log directories go: the shared storage if there is one, else ./log."""
        return f"{self.shared_dir.rstrip('/')}/logs/{self.job_name}" if self.shared_dir else "log"


def _shell_words(words) -> str:
    return " ".join(shlex.quote(word) for word in words)


def template_values(spec: JobSpec, script_name: str = "job.sh") -> dict[str, str]:
    """The placeholder values for `spec.target`, quoted for where each placeholder sits."""
    values = {
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "last_rank": str(spec.nodes - 1),
        "gpus_per_node": str(spec.gpus_per_node),
        "config": shlex.quote(spec.config),
        "overrides": _shell_words(spec.all_overrides()),
        "log_root": spec.log_root(),
        "script_name": script_name,
    }
    if spec.target == "slurm":
        values["gpu_directive"] = (f"#SBATCH --gpus-per-node={spec.gpus_per_node}" if spec.gpus_per_node > 0
                                   else "# CPU job: no GPUs requested (gpus-per-node 0)")
    if spec.target in K8S_TARGETS:
        gpus = spec.gpus_per_node
        values.update(
            image=json.dumps(spec.image),
            workdir=json.dumps(spec.workdir or f"{spec.shared_dir.rstrip('/')}/nerpipe"),
            shared_dir=json.dumps(spec.shared_dir),
            pvc=json.dumps(spec.pvc or f"{spec.job_name}-shared"),
            master_port=str(spec.master_port),
            backoff_limit=str(spec.backoff_limit),
            resource_limits=json.dumps({"nvidia.com/gpu": gpus} if gpus > 0 else {}),
            # One worker per GPU the device plugin exposes; on CPU one worker per pod, and no
            # CUDA_VISIBLE_DEVICES at all (even an empty one makes the launcher expect GPUs).
            device_args=f"--nproc_per_node {max(gpus, 1)}",
            device_setup=("# GPUs: the device plugin exposes the nvidia.com/gpu limit to this container"
                          if gpus > 0 else "unset CUDA_VISIBLE_DEVICES"),
        )
    return values


def render(spec: JobSpec, script_name: str = "job.sh") -> str:
    """The job file for `spec.target`, with every placeholder filled (a missing value raises)."""
    path = TEMPLATES[spec.target]
    text = MULTINODE_TEMPLATE if path is None else path.read_text(encoding="utf-8")
    return LaunchTemplate(text).substitute(template_values(spec, script_name))
