"""Memory over a long training run: does any worker's resident memory grow with the number of steps?

    python -m bench.memory_trend                          # 2 workers, 800 steps of the main job's config
    python -m bench.memory_trend --workers 1 --steps 300  # one plain process
    python -m bench.memory_trend --quick                  # 20 steps, to check that everything runs

The real job runs unmodified: ``train_dist.py`` under ``paddle.distributed.launch``
(or plain, for one worker) with the config plus step, evaluation and saving
overrides, so evaluations, best-model saves and training-state checkpoints
happen during the run as they do in a real one. This script samples, from the
outside (with psutil), the resident set size of every worker process every
``--interval`` seconds and pairs each sample with the newest step that rank 0
has logged (train_metrics.jsonl, every ``log_interval`` steps).

Printed per worker: RSS at the quarters of the run, the peak, and the slope of a
least-squares line through the samples of the second half of the run (MiB per
100 steps). The first half holds the warm-up (allocator pools, the first
evaluation, the first save); a leak shows as a slope that stays positive after
it. Verdict: flat when the second half's slope, extrapolated over the whole run,
adds less than ``--tolerance`` (default 3%) of the median RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench import common

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_CONFIG = "configs/msra_m3e_small_quick.yaml"
TRAIN_LOG = "train_metrics.jsonl"


def rss_mib(pid: int) -> float | None:
    """Current resident set size of a process in MiB, None once it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:  # gone, or no longer ours to read
        return None


def training_workers(root_pid: int) -> list[int]:
    """Processes under root_pid (itself included) that run train_dist.py, sorted by pid."""
    return common.script_processes(root_pid, "train_dist.py")


def last_logged_step(train_log: Path) -> int:
    """Newest step in rank 0's train_metrics.jsonl (0 before the first log line)."""
    try:
        lines = train_log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def job_command(args, out_dir: Path) -> list[str]:
    """The unmodified training job (launcher or one process) with the run's step, evaluation and save overrides."""
    overrides = [f"max_steps={args.steps}", f"eval_interval={args.eval_interval}",
                 f"save_interval={args.save_interval}", f"max_dev_examples={args.dev_examples}",
                 f"log_interval={args.log_interval}", "do_test=false", "resume='off'", "overwrite=true",
                 f"checkpoint_dir={out_dir}"]
    train = [str(ROOT / "train_dist.py"), "--config", str(ROOT / args.config), *overrides]
    if args.workers == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(args.workers),
            "--log_dir", str(out_dir / "logs"), *train]


def run_job(args, out_dir: Path) -> tuple[int, list[dict], float]:
    """Start the job, sample every worker's RSS until it ends; (exit code, samples, seconds)."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the launcher reads any value, even empty, as a GPU request
    log = open(out_dir / "job.log", "w", encoding="utf-8")
    start = time.time()
    job = subprocess.Popen(job_command(args, out_dir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples = []
    try:
        while job.poll() is None:
            step = last_logged_step(out_dir / TRAIN_LOG)
            for rank, pid in enumerate(training_workers(job.pid)):
                rss = rss_mib(pid)
                if rss is not None:
                    samples.append({"t": round(time.time() - start, 1), "worker": rank, "pid": pid, "step": step,
                                    "rss_mib": round(rss, 1)})
            time.sleep(args.interval)
    except KeyboardInterrupt:
        job.send_signal(signal.SIGINT)
        job.wait()
        raise
    finally:
        log.close()
    return job.returncode, samples, time.time() - start


def slope_per_100_steps(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of RSS against step, in MiB per 100 steps."""
    if len(points) < 3 or len({s for s, _ in points}) < 2:
        return None
    mean_s = statistics.fmean(s for s, _ in points)
    mean_r = statistics.fmean(r for _, r in points)
    num = sum((s - mean_s) * (r - mean_r) for s, r in points)
    den = sum((s - mean_s) ** 2 for s, _ in points)
    return 100 * num / den


def summarise(samples: list[dict], steps: int, tolerance: float) -> list[dict]:
    """Per worker: RSS at the quarters, peak, second-half slope and verdict."""
    summaries = []
    for worker in sorted({s["worker"] for s in samples}):
        mine = [s for s in samples if s["worker"] == worker and s["step"] > 0]
        if not mine:
            continue
        at = {}
        for quarter in (1, 2, 3, 4):
            target = steps * quarter // 4
            near = [s["rss_mib"] for s in mine if abs(s["step"] - target) <= max(steps // 20, 10)]
            at[f"step_{target}"] = round(statistics.median(near), 1) if near else None
        second_half = [(s["step"], s["rss_mib"]) for s in mine if s["step"] >= steps // 2]
        slope = slope_per_100_steps(second_half)
        median = statistics.median(s["rss_mib"] for s in mine)
        growth = slope * steps / 100 if slope is not None else None
        summaries.append({
            "worker": worker, "samples": len(mine), "rss_by_step": at, "peak_mib": max(s["rss_mib"] for s in mine),
            "median_mib": round(median, 1),
            "second_half_slope_mib_per_100_steps": round(slope, 2) if slope is not None else None,
            "flat": growth is not None and growth < tolerance * median,
        })
    return summaries


def report(args, info: dict, summaries: list[dict], seconds: float, code: int) -> str:
    """The printed report: the machine, the job, then one table row per worker."""
    lines = [f"# memory over {args.steps} training steps, {args.workers} worker(s)",
             f"machine: {common.machine_line(info)}", f"date: {common.now_utc()}",
             f"command: {common.command_line()}",
             f"job: {args.config} + evaluation every {args.eval_interval} steps on {args.dev_examples} dev sentences, "
             f"training state saved every {args.save_interval}; exit code {code}, {seconds / 60:.1f} min", ""]
    quarters = list(summaries[0]["rss_by_step"]) if summaries else []
    header = "| worker | " + " | ".join(q.replace("step_", "RSS at step ") for q in quarters) + \
        " | peak | slope, 2nd half (MiB/100 steps) | verdict |"
    lines += [header, "|" + "---|" * (len(quarters) + 4)]
    for summary in summaries:
        cells = [f"{v:.0f} MiB" if v is not None else "-" for v in summary["rss_by_step"].values()]
        slope = summary["second_half_slope_mib_per_100_steps"]
        lines.append(f"| {summary['worker']} | " + " | ".join(cells) + f" | {summary['peak_mib']:.0f} MiB | "
                     f"{slope if slope is not None else '-'} | {'flat' if summary['flat'] else 'GROWS'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    """The command line; ``--quick`` shrinks every value to check that everything runs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config (default {DEFAULT_CONFIG})")
    parser.add_argument("--workers", type=int, default=2, help="workers under paddle.distributed.launch (2)")
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps (800)")
    parser.add_argument("--eval-interval", type=int, default=200, help="dev evaluation every N steps (200)")
    parser.add_argument("--save-interval", type=int, default=200, help="training state every N steps (200)")
    parser.add_argument("--dev-examples", type=int, default=500, help="dev sentences per evaluation (500)")
    parser.add_argument("--log-interval", type=int, default=10, help="train log every N steps (10)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples (5)")
    parser.add_argument("--tolerance", type=float, default=0.03,
                        help="largest growth over the run, extrapolated from the second half, as a share of the "
                             "median RSS, still called flat (0.03)")
    parser.add_argument("--workdir", help="job output directory (default: a new temporary directory)")
    parser.add_argument("--json", metavar="PATH", help="also write samples and summaries as JSON")
    parser.add_argument("--quick", action="store_true", help="20 steps, evaluation and save every 10")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_interval, args.save_interval, args.dev_examples = 20, 10, 10, 50
        args.log_interval, args.interval = 2, 1.0
    if args.workers < 1 or args.steps < 1:
        parser.error("--workers and --steps must be at least 1")
    return args


def main(argv=None) -> int:
    """Run the job, sample it, report; exit status 1 when a worker's memory grows, the job's own when it fails."""
    args = parse_args(argv)
    info = common.machine_info()
    out_dir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nerpipe-memory-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"job output in {out_dir}", flush=True)
    code, samples, seconds = run_job(args, out_dir)
    summaries = summarise(samples, args.steps, args.tolerance)
    print(report(args, info, summaries, seconds, code))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "exit_code": code,
                                               "seconds": seconds, "summaries": summaries, "samples": samples},
                                              indent=1), encoding="utf-8")
    if code != 0:
        print(f"the training job failed (exit {code}); see {out_dir / 'job.log'}", file=sys.stderr)
        return code
    return 0 if summaries and all(s["flat"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
