"""Render a cluster job (Slurm, paddle-operator, Kubeflow, plain multi-node) from one set of values.

    python -m pipeline.submit --target slurm --nodes 2 --gpus-per-node 4 --config configs/X.yaml \
        --output job.sbatch -- epochs=3
    python -m pipeline.submit --target k8s-paddle --nodes 2 --gpus-per-node 8 --config configs/X.yaml \
        --image REGISTRY/nerpipe:TAG --shared-dir /mnt/shared | kubectl apply -f -
    python -m pipeline.submit predict --target slurm --nodes 2 --gpus-per-node 4 --output job.sbatch \
        -- --checkpoint outputs/X/best_model --input corpus.txt --output corpus.jsonl --chunk_lines 1024

A training job runs train_dist.py with the config and the key=value overrides after --; a prediction
job (`predict` first) runs predict.py with the flags after -- (checked as predict.py checks them; the
device follows --gpus-per-node). The command line of ``pipeline.jobs``, which computes the values and
fills in the templates under launch/. Hosts, ports (but the rendezvous port Kubeflow's operator reads
from the manifest) and device ids are never rendered: they come from the scheduler or the operator when
the job runs.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .cli import OneLineErrorParser
from .jobs import (CPUS_PER_WORKER, LIMITS, MEMORY_GB_PER_WORKER, TEMPLATES, ClusterJob, JobSpec, PredictionJob,
                   SubmitError, render)

PREDICT = "predict"  # the first word of a prediction job's command line


def build_parser(job: type[ClusterJob] = JobSpec) -> argparse.ArgumentParser:
    """The command line of ``job`` (``JobSpec`` or ``PredictionJob``): one flag per field, its choices and
    defaults taken from this module."""
    default = {f.name: f.default for f in fields(job)}
    prog = "python -m pipeline.submit" + (f" {PREDICT}" if job is PredictionJob else "")
    parser = OneLineErrorParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, choices=list(TEMPLATES), help="scheduler or operator")
    parser.add_argument("--nodes", type=int, required=True, help=f"number of nodes (pods), 1 to {LIMITS['nodes']}")
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help=f"GPUs per node, up to {LIMITS['gpus_per_node']}; 0 runs one CPU worker per node")
    if job is JobSpec:
        parser.add_argument("--config", required=True, help="YAML preset, relative to the checkout")
    parser.add_argument("--image", help="container image (k8s targets)")
    parser.add_argument("--shared-dir", help="shared storage path on every node: data, checkpoints, logs "
                                             "(mount path of the PVC on k8s)")
    parser.add_argument("--job-name", default=default["job_name"], help="job name (a Kubernetes name)")
    parser.add_argument("--pvc", help="PersistentVolumeClaim of the shared volume (default JOB_NAME-shared)")
    parser.add_argument("--workdir", help="k8s: the checkout inside the container (default SHARED_DIR/nerpipe)")
    parser.add_argument("--cpus-per-node", type=int,
                        help=f"CPUs requested per node (default {CPUS_PER_WORKER} per worker)")
    parser.add_argument("--memory-gb", type=int,
                        help=f"memory per node in GiB, requested and the limit "
                             f"(default {MEMORY_GB_PER_WORKER} per worker)")
    if job is JobSpec:
        parser.add_argument("--save-interval", type=int, default=default["save_interval"],
                            help="training state every N steps, unless the config or an override sets save_interval")
    # A training job's multinode wrapper has no relaunches (launch/multinode.sh runs the launcher itself).
    in_place = "k8s and multinode" if job is PredictionJob else "k8s"
    parser.add_argument("--max-restarts", type=int, default=default["max_restarts"],
                        help=f"{in_place}: relaunches inside a pod or node after a retryable exit; "
                             "slurm: requeues after a failure")
    parser.add_argument("--restart-delay", type=int, default=default["restart_delay"],
                        help=f"{in_place}: seconds between relaunches inside a pod or node")
    parser.add_argument("--deadline-hours", type=float, default=default["deadline_hours"],
                        help="k8s: the job fails after this long (activeDeadlineSeconds), relaunches included")
    parser.add_argument("--output", help="write the job file here instead of printing it")
    if job is JobSpec:
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, after --")
    else:
        parser.add_argument("predict_args", nargs="*", metavar="predict.py-flag",
                            help="predict.py's flags, after --: --checkpoint DIR --input FILE --output FILE "
                                 "[--chunk_lines N --batch_size N --precision P ...]; paths are relative to the "
                                 "checkout")
    return parser


def main(argv=None) -> int:
    """Render the job the flags describe; exit status 2, with one line on stderr, for invalid values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    job = PredictionJob if argv[:1] == [PREDICT] else JobSpec
    args = build_parser(job).parse_args(argv[1:] if job is PredictionJob else argv)
    try:
        spec = job(**{f.name: getattr(args, f.name) for f in fields(job)})
        text = render(spec, script_name=Path(args.output).name if args.output else "job.sh")
        if args.output:
            try:
                Path(args.output).write_text(text, encoding="utf-8")
            except OSError as error:
                raise SubmitError(f"cannot write --output {args.output}: {error.strerror or error}") from None
    except SubmitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output:
        print(f"wrote {args.output} ({spec.task_values()['what']} on {spec.target}, {spec.nodes} node(s), "
              f"{spec.gpus_per_node} GPU(s) each)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
