"""A/B of one training setting: ours with and without config overrides, alternating, same batches.

    python -m bench.config_ab --workers 2 --repeats 3 --b embedding_grad_rows=true --a embedding_grad_rows=false

Each run is bench.train_throughput's `ours` child (pipeline.Trainer.fit() on the first --examples
MSRA-NER training sentences: warm-up batches, then one whole pass, timed), in a fresh process, under
paddle.distributed.launch when --workers > 1. A and B alternate (A first), time the same batches
(checked), and the report gives each run and the ratio of the medians, B / A, in real tokens/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench import common
from bench import train_throughput as tt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="overrides of side A")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="overrides of side B")
    parser.add_argument("--workers", type=int, default=1, help="processes per run (1: one process, 2 threads)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (3)")
    parser.add_argument("--config", default=tt.DEFAULT_CONFIG)
    parser.add_argument("--head", choices=("linear", "crf"), default="linear")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workdir", help="child logs and JSON (default: a new temporary directory)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    args = parser.parse_args(argv)
    if not args.a and not args.b:
        parser.error("give the overrides of at least one side (--a or --b)")
    if args.a == args.b:
        parser.error("--a and --b are the same: there is nothing to compare")
    return args


def side_args(args, overrides: list[str]):
    """bench.train_throughput's arguments for one side."""
    return tt.parse_args(["--config", args.config, "--head", args.head, "--examples", str(args.examples),
                          "--warmup", str(args.warmup), "--workdir", args.workdir,
                          *[f"--set={override}" for override in overrides]])


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="config_ab-")
    info = common.machine_info()
    print(f"machine: {common.machine_line(info)}\nA: {' '.join(args.a) or '(the config)'}\n"
          f"B: {' '.join(args.b) or '(the config)'}\nlogs: {args.workdir}", flush=True)
    sides = {"A": side_args(args, args.a), "B": side_args(args, args.b)}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    workers = args.workers if args.workers > 1 else 0
    for repeat in range(1, args.repeats + 1):
        for name, side in sides.items():
            run = tt.run_side(side, "ours", repeat, workers, label=f"ours_{name}")
            if runs["A"] and (reason := tt.batches_differ(runs["A"][0], run)):
                raise SystemExit(f"side {name} did not time the batches A did: {reason}")
            runs[name].append(run)
    medians = {name: statistics.median(r["tokens_per_second"] for r in side_runs) for name, side_runs in runs.items()}
    print(f"\nreal tokens/s, {args.workers} worker(s), {args.repeats} runs a side, alternating:")
    for name in runs:
        figures = " / ".join(f"{r['tokens_per_second']:.0f}" for r in runs[name])
        print(f"  {name}: {figures} (median {medians[name]:.0f}; s/step "
              f"{statistics.median(r['seconds_per_step'] for r in runs[name]):.3f})")
    print(f"B / A: {medians['B'] / medians['A']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": common.now_utc(), "command": common.command_line(),
                                               "machine": info, "a": args.a, "b": args.b, "workers": args.workers,
                                               "runs": runs, "medians": medians}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
