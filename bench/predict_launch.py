"""Distributed prediction: predict.py under paddle.distributed.launch with 2 ranks against 1 process.

    python -m bench.predict_launch --checkpoint outputs/msra_quick/best_model [--lines 2500,10000] [--repeats 2]
    python -m bench.predict_launch --checkpoint ... --quick        # 200 lines, one repeat: does it run?

For each input size, a text file of MSRA-NER test sentences (cycled to reach the size, one sentence a
line, as a user's corpus would be) is predicted, unmodified, by each of these commands, in an order
rotated every repeat:

  single   python predict.py                                            one process, all cores' threads
  launch1  python -m paddle.distributed.launch --nproc_per_node 1 predict.py    the launcher's own cost
  launch2  python -m paddle.distributed.launch --nproc_per_node 2 predict.py    two ranks, a core each

Timed: the whole command (start-up, model loading and the launcher included) and, from rank 0's
summary line, prediction alone (sentences/s). Memory: the peak resident set (VmHWM) of every
predict.py process, read from /proc every 0.2 s; "flat" means the peak per rank does not grow
with the input (compare the sizes). Every output must be byte-identical to ``single``'s for the
same input: any difference is printed and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

from bench import common
from bench.predict_throughput import read_test_texts  # the project's reader; imports no Paddle
from pipeline.files import sha256_of

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST_FILE = "~/.cache/nerpipe/data/msra_ner/test.tsv"
MODES = ("single", "launch1", "launch2")
QUICK_LINES = 200
# predict.py's summary: "... this run: N sentence(s) in S s, R sentences/s"
SPEED = re.compile(r"this run: (\d+) sentence\(s\) in ([\d.]+) s, ([\d.]+) sentences/s")


def corpus_lines(test_file: Path, lines: int) -> list[str]:
    """``lines`` sentences of the test file, cycled from its first one."""
    return list(islice(cycle(read_test_texts(test_file)), lines))


def command(mode: str, checkpoint: str, source: Path, output: Path, log_dir: Path) -> list[str]:
    """The unmodified prediction command of one mode."""
    predict = [str(ROOT / "predict.py"), "--checkpoint", checkpoint, "--input", str(source), "--output", str(output)]
    if mode == "single":
        return [sys.executable, *predict]
    ranks = {"launch1": "1", "launch2": "2"}[mode]
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", ranks, "--log_dir",
            str(log_dir), *predict]


def run(mode: str, checkpoint: str, source: Path, work: Path, interval: float = 0.2) -> dict:
    """One command to its end: wall seconds, rank 0's sentences/s, each predict.py process's peak RSS."""
    output, log_dir = work / f"{mode}.jsonl", work / f"{mode}_logs"
    for stale in (output, Path(f"{output}.partial"), Path(f"{output}.progress.json")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(log_dir, ignore_errors=True)  # the launcher appends to an existing workerlog.0
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the launcher reads any value, even empty, as a GPU request
    stderr_path = work / f"{mode}.stderr"
    start = time.perf_counter()
    with open(stderr_path, "w", encoding="utf-8") as stderr_file:  # a file: a full pipe would stall the job
        job = subprocess.Popen(command(mode, checkpoint, source, output, log_dir), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=stderr_file)
        peaks: dict[int, float] = {}
        while job.poll() is None:
            for pid in common.script_processes(job.pid, "predict.py"):
                rss = common.peak_rss_mib(pid)
                if rss is not None:
                    peaks[pid] = max(rss, peaks.get(pid, 0.0))
            time.sleep(interval)
    seconds = time.perf_counter() - start
    stderr = stderr_path.read_text(encoding="utf-8", errors="replace")
    log = stderr if mode == "single" else (log_dir / "workerlog.0").read_text(encoding="utf-8")
    if job.returncode != 0:
        raise SystemExit(f"{mode} failed (exit {job.returncode}):\n{stderr[-2000:]}\n{log[-3000:]}")
    speed = SPEED.findall(log)
    if len(speed) != 1:
        raise SystemExit(f"{mode}: no single summary line in rank 0's output:\n{log[-3000:]}")
    sentences, predict_seconds, per_second = speed[0]
    return {"mode": mode, "wall_seconds": seconds, "sentences": int(sentences),
            "predict_seconds": float(predict_seconds), "sentences_per_second": float(per_second),
            "peak_rss_mib_per_process": [round(peaks[pid], 1) for pid in sorted(peaks)], "output": str(output)}


def measure(args, sizes: list[int]) -> tuple[dict, int]:
    """Every size x mode x repeat; (results by size and mode, number of outputs differing from single's)."""
    test_file = Path(args.test_file).expanduser()
    results: dict[int, dict[str, list[dict]]] = {}
    differing = 0
    with tempfile.TemporaryDirectory(prefix="predict_launch_") as tmp:
        for size in sizes:
            work = Path(tmp) / str(size)
            work.mkdir()
            source = work / "corpus.txt"
            source.write_text("\n".join(corpus_lines(test_file, size)) + "\n", encoding="utf-8")
            results[size] = {mode: [] for mode in args.modes}
            for repeat in range(args.repeats):
                shift = repeat % len(args.modes)
                for mode in args.modes[shift:] + args.modes[:shift]:
                    result = run(mode, args.checkpoint, source, work)
                    result["output_sha256"] = sha256_of(result.pop("output"))
                    results[size][mode].append(result)
                    print(f"  {size} lines, repeat {repeat + 1}/{args.repeats} {mode:<8} "
                          f"{result['wall_seconds']:6.1f} s wall, {result['sentences_per_second']:6.1f} sent/s "
                          f"predicting, peak RSS {result['peak_rss_mib_per_process']} MiB", flush=True)
            # Every output of every mode against single's first (or, without single, the first mode's).
            expected = results[size].get("single", results[size][args.modes[0]])[0]["output_sha256"]
            differing += sum(r["output_sha256"] != expected for runs in results[size].values() for r in runs)
    return results, differing


def report(results: dict, differing: int) -> str:
    """Per size, a row per mode (medians with min..max), then the ratios against one process."""
    lines = []
    for size, by_mode in results.items():
        rows = []
        stats = {}
        for mode, runs in by_mode.items():
            stats[mode] = {
                "wall": common.summary([r["wall_seconds"] for r in runs]),
                "speed": common.summary([r["sentences_per_second"] for r in runs]),
                "rss": common.summary([max(r["peak_rss_mib_per_process"], default=None) for r in runs]),
            }
            processes = max(len(r["peak_rss_mib_per_process"]) for r in runs)
            rows.append([mode, str(processes), common.fmt_mmm(stats[mode]["wall"]),
                         common.fmt_mmm(stats[mode]["speed"]),
                         common.fmt_mmm(stats[mode]["rss"], "{:.0f}")])
        lines.append(f"\n{size} lines:")
        lines.append(common.table(rows, ["mode", "predict.py processes", "wall s", "sentences/s predicting",
                                         "peak RSS per process MiB"]))
        if "single" in stats:
            for mode in (m for m in stats if m != "single"):
                speed = common.ratio(stats[mode]["speed"]["median"], stats["single"]["speed"]["median"])
                wall = common.ratio(stats["single"]["wall"]["median"], stats[mode]["wall"]["median"])
                lines.append(f"  {mode} / single: {speed:.2f}x sentences/s predicting, {wall:.2f}x whole command")
    sizes = list(results)
    if len(sizes) > 1:
        lines.append("\npeak RSS per process, largest input against smallest (flat memory: about 1.0x):")
        for mode in results[sizes[0]]:
            small = max(max(r["peak_rss_mib_per_process"]) for r in results[sizes[0]][mode])
            large = max(max(r["peak_rss_mib_per_process"]) for r in results[sizes[-1]][mode])
            lines.append(f"  {mode}: {small:.0f} MiB at {sizes[0]} lines, {large:.0f} MiB at {sizes[-1]} lines "
                         f"({large / small:.2f}x for {sizes[-1] / sizes[0]:.0f}x the lines)")
    lines.append(f"\noutputs differing from one process's: {differing}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "outputs/msra_quick/best_model"))
    parser.add_argument("--test_file", default=DEFAULT_TEST_FILE)
    parser.add_argument("--lines", default="2500,10000", help="input sizes, comma-separated (default 2500,10000)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of {','.join(MODES)}")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LINES} lines, one repeat")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; known: {list(MODES)}")
    if args.quick:
        args.lines, args.repeats = str(QUICK_LINES), 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (Path(args.checkpoint) / "model.pdparams").is_file():
        print(f"error: {args.checkpoint} is not a checkpoint directory (no model.pdparams); pass --checkpoint",
              file=sys.stderr)
        return 2
    try:
        sizes = [int(part) for part in args.lines.split(",") if part.strip()]
    except ValueError:
        print(f"error: --lines must be whole numbers separated by commas, got {args.lines!r}", file=sys.stderr)
        return 2
    info = common.machine_info()
    print(f"# distributed prediction, MSRA-NER test sentences cycled to {sizes} lines, {args.repeats} repeat(s)")
    print(f"machine: {common.machine_line(info)}; load average at start {info['load_average']}")
    print(f"date: {common.now_utc()}")
    print(f"command: {common.command_line()}")
    print(f"checkpoint: {args.checkpoint}", flush=True)
    results, differing = measure(args, sizes)
    print(report(results, differing))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "date": common.now_utc(),
                                               "command": common.command_line(), "checkpoint": args.checkpoint,
                                               "results": results, "differing_outputs": differing}, indent=1),
                                   encoding="utf-8")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
