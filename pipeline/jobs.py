"""Cluster jobs (Slurm, paddle-operator, Kubeflow, plain multi-node) rendered from one set of values.

A training job (`JobSpec`: train_dist.py, a config and overrides) or a prediction job (`PredictionJob`:
predict.py and its flags); both share where they run and how they are relaunched (`ClusterJob`).

The templates are the files under launch/ (`@@{name}` placeholders, see `LaunchTemplate`); this
module only computes the values and fills them in. Hosts, ports and device ids are never
rendered (except the rendezvous port Kubeflow's operator reads from the manifest): they come from the
scheduler or the operator when the job runs. The command line is
``python -m pipeline.submit``.
"""
from __future__ import annotations

import json
import posixpath
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .stop_signals import RELAUNCH_EXIT_CODE  # imports nothing heavy: no Paddle

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
# @@{job_name}: @@{what} on @@{nodes} node(s). Run this same file on every node, with that node's values:
#   MASTER_ADDR=<address of node 0> MASTER_PORT=<free port> NODE_RANK=<0..@@{last_rank}> bash @@{script_name}
# NERPIPE_ROOT is the checkout (default: the current directory). Extra arguments: @@{extra_arguments}.
set -euo pipefail
export TASK=@@{task}
export NNODES=@@{nodes}
@@{config_export}
export GPUS_PER_NODE=${GPUS_PER_NODE:-@@{gpus_per_node}}
export JOB_ID=${JOB_ID:-@@{job_name}}
export NERPIPE_JOB=@@{job_name}   # a training job owns its checkpoint_dir: a rerun of this file continues it
export LOG_DIR=${LOG_DIR:-@@{log_root}/node-${NODE_RANK:-$(hostname)}}
@@{multinode_exec}
"""
# A prediction's wrapper relaunches it in place (every node's launcher fails when one node's does, and all
# of them relaunch and meet again); each relaunch continues the output.
MULTINODE_SUPERVISED = """# launch/supervise.sh relaunches a failed prediction (not exit 2, bad input) up to MAX_RESTARTS times,
# RESTART_DELAY seconds apart; each relaunch continues the output after its last complete chunk.
export MAX_RESTARTS=${MAX_RESTARTS:-@@{max_restarts}} RESTART_DELAY=${RESTART_DELAY:-@@{restart_delay}}
exec bash "${NERPIPE_ROOT:-.}/launch/supervise.sh" """

# launch/supervise.sh and the Slurm template relaunch the training's RELAUNCH_EXIT_CODE ("stopped on a
# signal after saving a training state"); 2 (bad input) and 3 (NaN/Inf stop) are never relaunched.
DO_NOT_RETRY_EXIT_CODES = (2, 3)

# Object names: a DNS-1035 label (Kubeflow creates a Service per pod, and Service names must start with a
# letter), at most 63 characters for the longest pod name, <name>-worker-<last index>.
JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
NAME_LIMIT = 63
# A PersistentVolumeClaim name: a DNS-1123 subdomain.
PVC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Paths that go into mount paths and shell lines unchanged: no spaces, quotes, `$`, `:` or backslashes.
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+@-]+$")
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Kubeflow's PaddleJob controller reads the rendezvous port from the container port named "master" of the
# container named "paddle" (training-operator PaddleJobDefaultPortName/ContainerName; 36543 is its default).
KUBEFLOW_CONTAINER = "paddle"
KUBEFLOW_PORT = 36543
# A rendered job always writes training states, so that a relaunch loses at most this many steps.
DEFAULT_SAVE_INTERVAL = 100
# Upper bounds: larger values are typing mistakes, and a scheduler would only queue them forever.
LIMITS = {"nodes": 1024, "gpus_per_node": 16, "cpus_per_node": 1024, "memory_gb": 4096, "max_restarts": 100,
          "restart_delay": 3600, "save_interval": 10_000_000, "deadline_hours": 24 * 90}
# Per worker (one per GPU, or one CPU worker per node) when --cpus-per-node / --memory-gb are not given.
CPUS_PER_WORKER = 4
MEMORY_GB_PER_WORKER = 8
# Kubernetes' grace period between SIGTERM and SIGKILL: Paddle's launcher gives its workers 30 s to save
# and stop after its SIGTERM, then kills them.
GRACE_SECONDS = 60


class SubmitError(ValueError):
    """Invalid submission values: reported as one clear line, before anything is rendered."""


class LaunchTemplate(string.Template):
    """`@@{name}` placeholders: `$` and `%` stay free for the shell (`${VAR}`, `${X%%,*}`, `%j`)."""

    delimiter = "@@"


@dataclass(kw_only=True)
class ClusterJob:
    """Where a job runs and how it is relaunched: what a training and a prediction job share; validated in
    `__post_init__`. Keyword-only, so that each kind of job adds its own required fields."""

    target: str
    nodes: int
    gpus_per_node: int
    image: str | None = None
    shared_dir: str | None = None
    job_name: str = "nerpipe"
    pvc: str | None = None
    workdir: str | None = None
    cpus_per_node: int | None = None
    memory_gb: int | None = None
    max_restarts: int = 3
    restart_delay: int = 30
    deadline_hours: float = 72.0

    task: ClassVar[str]  # what launch/multinode.sh runs (its TASK): train or predict
    # The smallest value of each whole-number flag; the largest are in LIMITS.
    minimums: ClassVar[dict[str, int]] = {"nodes": 1, "gpus_per_node": 0, "cpus_per_node": 1, "memory_gb": 1,
                                          "max_restarts": 0, "restart_delay": 0}

    def __post_init__(self):
        if self.target not in TEMPLATES:
            raise SubmitError(f"unknown target {self.target!r}: choose one of {', '.join(TEMPLATES)}")
        self._check_sizes()
        self._check_names_and_paths()
        if self.target in K8S_TARGETS:
            if not self.image:
                raise SubmitError(f"--image is required for {self.target}")
            if not self.shared_dir or not self.shared_dir.startswith("/"):
                raise SubmitError(f"--shared-dir (an absolute mount path for the shared volume) is required "
                                  f"for {self.target}")

    def _check_sizes(self):
        for name, low in self.minimums.items():
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool) or not isinstance(value, int):
                raise SubmitError(f"{flag} must be a whole number, got {value!r}")
            if not low <= value <= LIMITS[name]:
                raise SubmitError(f"{flag} must be between {low} and {LIMITS[name]}, got {value}")
        if not 0 < self.deadline_hours <= LIMITS["deadline_hours"]:
            raise SubmitError(f"--deadline-hours must be > 0 and at most {LIMITS['deadline_hours']}, "
                              f"got {self.deadline_hours}")

    def _check_names_and_paths(self):
        longest = f"{self.job_name}-worker-{self.nodes - 1}"
        if not JOB_NAME.match(self.job_name) or len(longest) > NAME_LIMIT:
            raise SubmitError(f"--job-name {self.job_name!r} must be a Kubernetes name: lower-case letters, digits "
                              f"and '-', starting with a letter, and the pod name {longest!r} at most "
                              f"{NAME_LIMIT} characters")
        if self.pvc is not None and not PVC_NAME.match(self.pvc):
            raise SubmitError(f"--pvc {self.pvc!r} must be a Kubernetes name (lower-case letters, digits, '-', '.')")
        if self.image is not None and (not self.image or any(c.isspace() or c in "\"'$`\\" for c in self.image)):
            raise SubmitError(f"--image {self.image!r} must be an image reference without spaces or quotes")
        for flag, path in (("--shared-dir", self.shared_dir), ("--workdir", self.workdir)):
            if path is not None and not SAFE_PATH.match(path):
                raise SubmitError(f"{flag} {path!r} may hold only letters, digits and . _ / + @ - (it goes into "
                                  "mount paths and shell lines)")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise SubmitError(f"--workdir {self.workdir!r} must be an absolute path inside the container")

    def _check_on_shared_volume(self, what: str, path: str, relaunch_needs: str) -> None:
        """On k8s, ``path`` (relative to the container's working directory) must lie on --shared-dir."""
        if self.target not in K8S_TARGETS:
            return
        where = posixpath.normpath(posixpath.join(self.k8s_workdir(), path))
        if not where.startswith(self.shared_dir.rstrip("/") + "/"):
            raise SubmitError(f"{what} is {where} in the pod, not on --shared-dir {self.shared_dir}: a pod's own disk "
                              f"goes away with it, and a relaunch could not {relaunch_needs}")

    def program(self) -> list[str]:
        """The script the launcher starts and what comes before the job's arguments (k8s command lines)."""
        raise NotImplementedError

    def arguments(self) -> list[str]:
        """The words after `program()`: what launch/multinode.sh passes on, and the k8s command's last words."""
        raise NotImplementedError

    def task_values(self) -> dict[str, str]:
        """The placeholders whose text differs between training and prediction (comments and messages)."""
        raise NotImplementedError

    def workers_per_node(self) -> int:
        """One worker per GPU, or one CPU worker per node."""
        return max(self.gpus_per_node, 1)

    def cpus(self) -> int:
        return self.cpus_per_node or CPUS_PER_WORKER * self.workers_per_node()

    def memory(self) -> int:
        return self.memory_gb or MEMORY_GB_PER_WORKER * self.workers_per_node()

    def log_root(self) -> str:
        """Where per-node log directories go: the shared storage if there is one, else ./log."""
        return f"{self.shared_dir.rstrip('/')}/logs/{self.job_name}" if self.shared_dir else "log"

    def k8s_workdir(self) -> str:
        """The container's working directory: the checkout, on the shared volume unless --workdir says where."""
        return self.workdir or f"{self.shared_dir.rstrip('/')}/nerpipe"


@dataclass(kw_only=True)
class JobSpec(ClusterJob):
    """A training job: train_dist.py with a config and overrides on every node; it resumes after a relaunch."""

    config: str
    save_interval: int = DEFAULT_SAVE_INTERVAL
    overrides: list[str] = field(default_factory=list)

    task = "train"
    minimums = {**ClusterJob.minimums, "save_interval": 1}

    def __post_init__(self):
        super().__post_init__()
        if "\n" in self.config:
            raise SubmitError(f"--config {self.config!r} holds a line break")
        for item in self.overrides:
            if not OVERRIDE.match(item) or "\n" in item:
                raise SubmitError(f"override {item!r} is not of the form key=value")
        self._check_training_config()

    def _check_training_config(self):
        """The config and overrides load and validate as train_dist.py will load them; the job must resume."""
        from .config import ConfigError, load_config  # the renderer needs no Paddle; config imports none

        config_path = Path(self.config)
        resolved = config_path if config_path.is_absolute() else ROOT / config_path
        if not resolved.is_file():
            raise SubmitError(f"config file not found: {self.config} (paths are relative to {ROOT})")
        try:
            self._preset = load_config(str(resolved))  # what the file alone sets: see all_overrides
            config = load_config(str(resolved), self.all_overrides())
        except ConfigError as error:
            raise SubmitError(f"the training config does not load: {error}") from None
        if config.resume != "auto":
            raise SubmitError(f"resume={config.resume}: a cluster job relaunches itself and must continue from "
                              "its newest training state (resume=auto, which the job sets unless overridden)")
        # Each pod would see only its own states (the ranks then disagree and stop with exit 2), and a recreated
        # pod none at all.
        self._check_on_shared_volume(f"checkpoint_dir={config.checkpoint_dir}", config.checkpoint_dir,
                                     "resume (leave checkpoint_dir out to get one on the shared volume)")

    def _user_sets(self, key: str) -> bool:
        return any(item.startswith(f"{key}=") for item in self.overrides)

    def all_overrides(self) -> list[str]:
        """The user's overrides, plus what a relaunchable cluster job needs unless the user chose it:
        checkpoint_dir on the shared storage, training states every save_interval steps, resume=auto."""
        items = list(self.overrides)
        if self.shared_dir and not self._user_sets("checkpoint_dir"):
            # A checkpoint on a pod's own disk disappears with the pod: put it on the shared volume.
            items.insert(0, f"checkpoint_dir={self.shared_dir.rstrip('/')}/checkpoints/{self.job_name}")
        if not self._user_sets("save_interval") and self._preset.save_interval == 0:
            # Without training states a relaunch starts from step 0 (quick presets save none).
            items.append(f"save_interval={self.save_interval}")
        if not self._user_sets("resume") and self._preset.resume != "auto":
            items.append("resume=auto")
        if self.gpus_per_node > 0 and self.target in K8S_TARGETS and not self._user_sets("use_gpu"):
            items.append("use_gpu=true")
        return items

    def program(self) -> list[str]:
        return ["train_dist.py", "--config", self.config]

    def arguments(self) -> list[str]:
        return self.all_overrides()

    def task_values(self) -> dict[str, str]:
        return {
            "what": "training",
            "summary": "config $CONFIG",
            "config_export": f"export CONFIG=${{CONFIG:-{shlex.quote(self.config)}}}",
            "extra_arguments": "key=value overrides",
            "continues": "it resumes from the newest training state",
        }


# What predict.py reads as "standard input/output": refused in a job, whose ranks run under the launcher.
PREDICT_STDIO = "-"


def _refuse_predict_flags(message: str):
    """predict.py's parser's `error`, for the renderer: one line, no usage text, no exit."""
    raise SubmitError(f"predict.py flags (after --): {message}")


@dataclass(kw_only=True)
class PredictionJob(ClusterJob):
    """A prediction job: predict.py under the launcher on every node (rank 0 reads the input and writes the
    output), relaunched by launch/supervise.sh or requeued by Slurm; a relaunch continues the output."""

    predict_args: list[str] = field(default_factory=list)
    # Not the training job's name: its PaddleJob and its logs may still be there.
    job_name: str = "nerpipe-predict"

    task = "predict"

    def __post_init__(self):
        super().__post_init__()
        self._check_predict_flags()

    def _check_predict_flags(self):
        """predict.py's own parser and checks, with the device this job gives it, before anything is rendered;
        then what only a job refuses: standard streams, --overwrite (each relaunch would start over), --workers,
        a device of the user's, a pod-local output."""
        import predict  # the script at the checkout's top: its flags and their checks (it imports no Paddle)

        for word in self.predict_args:
            if any(ord(c) < 32 or ord(c) == 127 for c in word):
                raise SubmitError(f"predict.py flag {word!r} holds a control character (a line break?): the flags "
                                  "go into shell lines")
        parser = predict.build_parser()
        parser.error = _refuse_predict_flags
        given = parser.parse_args(self.predict_args)
        if given.device is not None or given.use_gpu:
            raise SubmitError("--device/--use_gpu after --: a prediction job sets the device from --gpus-per-node "
                              "(0: CPU workers)")
        if given.overwrite:
            raise SubmitError(f"--overwrite after --: every relaunch of the job would start the output over; to "
                              f"start anew, delete {given.output}.partial before submitting")
        if given.workers != 1:
            raise SubmitError(f"--workers {given.workers} after --: a job's prediction processes are the launcher's "
                              "ranks (--nodes, --gpus-per-node)")
        for flag, path in (("--input", given.input), ("--output", given.output)):
            if path == PREDICT_STDIO:
                raise SubmitError(f"predict.py {flag} {path}: a prediction job reads and writes files, not standard "
                                  "input/output (give predict.py --input FILE --output FILE after --)")
        predict.parse_args([*self.predict_args, *self._device_flags()], parser)  # values, precision on the device
        # A relaunch may run rank 0 in another pod (Kubeflow ranks pods by arrival; pods are recreated).
        self._check_on_shared_volume(f"predict.py --output {given.output}", given.output, "continue the output")

    def _device_flags(self) -> list[str]:
        return ["--device", "gpu" if self.gpus_per_node > 0 else "cpu"]

    def program(self) -> list[str]:
        return ["predict.py"]

    def arguments(self) -> list[str]:
        # launch/multinode.sh adds --device from the GPUs it finds on the node; a pod's are known here.
        return [*self.predict_args, *(self._device_flags() if self.target in K8S_TARGETS else [])]

    def task_values(self) -> dict[str, str]:
        return {
            "what": "prediction",
            "summary": "predict.py",
            "config_export": "# prediction: predict.py's flags (below) say what it reads and writes; no config",
            "extra_arguments": "more predict.py flags",
            "continues": "it continues the output after its last complete chunk",
        }


def _shell_words(words) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _k8s_resources(spec: ClusterJob) -> str:
    """Requests for CPU and memory as well as GPUs: a pod that requests only GPUs is among the first evicted
    under memory pressure. Memory is also the limit (a leak ends this pod, not its neighbours); CPU has no
    limit, so data loading may use idle cores. GPUs are an extended resource: the limit is the request."""
    resources = {"requests": {"cpu": str(spec.cpus()), "memory": f"{spec.memory()}Gi"},
                 "limits": {"memory": f"{spec.memory()}Gi"}}
    if spec.gpus_per_node > 0:
        resources["limits"]["nvidia.com/gpu"] = spec.gpus_per_node
    return json.dumps(resources)


def template_values(spec: ClusterJob, script_name: str = "job.sh") -> dict[str, str]:
    """The placeholder values for `spec.target`, quoted for where each placeholder sits."""
    values = {
        "job_name": spec.job_name,
        "task": spec.task,
        "nodes": str(spec.nodes),
        "last_rank": str(spec.nodes - 1),
        "gpus_per_node": str(spec.gpus_per_node),
        "arguments": _shell_words(spec.arguments()),
        "program": _shell_words([*spec.program(), *spec.arguments()]),
        "log_root": shlex.quote(spec.log_root()),
        "script_name": shlex.quote(script_name),
        "max_restarts": str(spec.max_restarts),
        "restart_delay": str(spec.restart_delay),
        "relaunch_exit_code": str(RELAUNCH_EXIT_CODE),
        **spec.task_values(),
    }
    if spec.target == "multinode":
        supervisor = (LaunchTemplate(MULTINODE_SUPERVISED).substitute(values) if isinstance(spec, PredictionJob)
                      else "exec ")
        values["multinode_exec"] = (f'{supervisor}bash "${{NERPIPE_ROOT:-.}}/launch/multinode.sh" '
                                    f'{values["arguments"]} "$@"')
    if spec.target == "slurm":
        values["gpu_directive"] = (f"#SBATCH --gpus-per-node={spec.gpus_per_node}" if spec.gpus_per_node > 0
                                   else "# CPU job: no GPUs requested (gpus-per-node 0)")
        values.update(cpus_per_task=str(spec.cpus()), memory=f"{spec.memory()}G")
    if spec.target in K8S_TARGETS:
        gpus = spec.gpus_per_node
        values.update(
            image=json.dumps(spec.image),
            workdir=json.dumps(spec.k8s_workdir()),
            shared_dir=json.dumps(spec.shared_dir),
            pvc=json.dumps(spec.pvc or f"{spec.job_name}-shared"),
            container_name=KUBEFLOW_CONTAINER,
            master_port=str(KUBEFLOW_PORT),
            deadline_seconds=str(round(spec.deadline_hours * 3600)),
            grace_seconds=str(GRACE_SECONDS),
            resources=_k8s_resources(spec),
            # One worker per GPU the device plugin exposes; on CPU one worker per pod, and no
            # CUDA_VISIBLE_DEVICES at all (even an empty one makes the launcher expect GPUs).
            device_args=f"--nproc_per_node {spec.workers_per_node()}",
            device_setup=("# GPUs: the device plugin exposes the nvidia.com/gpu limit to this container"
                          if gpus > 0 else "unset CUDA_VISIBLE_DEVICES"),
        )
    return values


def render(spec: ClusterJob, script_name: str = "job.sh") -> str:
    """The job file for `spec.target`, with every placeholder filled (a missing value raises)."""
    path = TEMPLATES[spec.target]
    text = MULTINODE_TEMPLATE if path is None else path.read_text(encoding="utf-8")
    return LaunchTemplate(text).substitute(template_values(spec, script_name))
