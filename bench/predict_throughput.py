"""Prediction throughput on MSRA-NER test: naive PaddleHub-style vs batched dynamic graph vs predict.py's engine.

    python -m pipeline.export --checkpoint outputs/msra_quick/best_model       # once: the static model
    python -m bench.predict_throughput --checkpoint outputs/msra_quick/best_model [--repeats 3] [--json out.json]
    python -m bench.predict_throughput --checkpoint ... --quick                  # ~200 sentences, for a smoke test
    python -m pipeline.export --checkpoint ... --format onnx [--quantize int8]  # once each, for --onnx
    python -m bench.predict_throughput --checkpoint ... --onnx --workers 2      # + ONNX fp32, int8; 1 and 2 processes

Engines, each run in its own subprocess (so peak RSS is per engine), in an
order rotated every repeat:

  (a) naive     dynamic graph, one sentence per call, every window padded to max_seq_len
                (how PaddleHub's token-classification predict feeds a model)
  (b) dynamic   the dynamic graph batched by TokenLabeller (sorted by length, padded to each batch's longest)
  (c) predict   what predict.py runs: Predictor.from_checkpoint(engine="auto") with predict.py's default
                batch size, fed predict.py's chunks of lines (on CPU the ONNX float32 export through ONNX
                Runtime when it is installed and the export current, else the static model via Paddle
                Inference when a current export exists; the row names the engine it ran)

Timed: the predict calls only; model loading and a warm-up call on 16 other
sentences are reported separately as start-up. All engines must give the same
label for every character of every sentence: the count of sentences that differ
is printed and any difference makes the exit status 1. The naive predictor may
be timed on an evenly spaced subset (--naive_sentences); its labels are then
checked on that subset, and the ratio compares sentences/s measured on
different sets (said in the output).

--static_options_sweep, --batch_sizes, --threads and --workers add (c)-like
engines with other Paddle Inference options / batch sizes / thread counts /
numbers of prediction processes (predict.py --workers; CPU time summed over
the workers, peak RSS of the largest), for choosing the defaults.

--onnx adds (d) static, Paddle Inference forced (predict.py --engine static), and
the ONNX Runtime engines of the exports found beside the checkpoint:
(e) onnx (float32, predict.py --engine onnx) and (f) int8 (predict.py --precision
int8), each also with every --workers N. The float32 ones must give (c)'s labels
like the others; int8's differences are counted and reported but do not fail
the run. Every engine's entity F1 against the file's gold labels is printed
(conlleval-style and strict IOB2), with int8's distance from float32 in points.

Ceiling: the matrix products of the forward pass of every timed sentence at its
own length (characters + [CLS]/[SEP], no padding: the least work any engine
must do at fp32), divided by the rate paddle.matmul reaches on this machine at
the shapes of a batch of 32 mean-length sentences (timed in its own process
with the same threads). No fp32 engine can be faster than that here, whatever
it skips; the ceiling's ratio to the naive predictor says which speed-up this
machine allows at all.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common  # machine line, peak RSS, summaries; imports no Paddle
from pipeline.cpu_env import THREAD_VARIABLES  # imports no Paddle

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_TEST_FILE = "~/.cache/nerpipe/data/msra_ner/test.tsv"
QUICK_SENTENCES = 200
WARMUP_SENTENCES = 16
TARGETS = {"predict/naive": 10.0, "predict/dynamic": 1.5}
# Issue 16's for int8 against float32 predict.py (c) and the naive predictor, and its F1 tolerance in points.
INT8_TARGETS = {"int8/predict": 1.5, "int8/naive": 10.0}
INT8_F1_POINTS = 0.3
# The engine and precision each kind of child runs with predict.py's Predictor.
KIND_ENGINES = {"predict": ("auto", None), "static": ("static", None), "onnx": ("onnx", None),
                "int8": ("onnx", "int8")}


def read_test_labels(path: Path) -> list[list[str]]:
    """Gold labels of the sentences ``read_test_texts`` reads, one per character, read as training reads them."""
    from pipeline.readers import read_examples

    return [example.labels for example in read_examples(path)[0]]


def f1_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity F1 of ``predicted`` against ``gold``, conlleval-style and strict IOB2 (pipeline.metrics)."""
    from pipeline.labels import entity_types
    from pipeline.metrics import EntityCounts

    counts = EntityCounts(entity_types(sorted({tag for tags in gold for tag in tags})))
    counts.update(gold, predicted)
    summary = counts.summary()
    return {"f1": summary["f1"], "strict_f1": summary["strict_f1"]}


def differing_labels(reference: list[list[str]], labels: list[list[str]]) -> dict:
    """Sentences and characters whose labels differ between two runs over the same sentences."""
    sentences = sum(a != b for a, b in zip(reference, labels))
    characters = sum(x != y for a, b in zip(reference, labels) for x, y in zip(a, b))
    return {"sentences": sentences, "characters": characters, "of_characters": sum(map(len, reference))}


def read_test_texts(path: Path) -> list[str]:
    """Sentences of a labelled file (PaddleHub-style TSV, CoNLL or JSONL), read by the project's own reader."""
    from pipeline.readers import read_examples

    return ["".join(example.tokens) for example in read_examples(path)[0]]


def naive_indices(total: int, wanted: int) -> list[int]:
    """``wanted`` evenly spaced indices of ``range(total)`` (all of them when wanted >= total)."""
    if wanted >= total:
        return list(range(total))
    return sorted({int(i * total / wanted) for i in range(wanted)})


# ---------------------------------------------------------------- child: one engine, one run


class PaddedToMaxLen:
    """PaddleHub-style feeding: every window padded to max_seq_len before it reaches the model."""

    name = "naive"

    def __init__(self, inner, max_seq_len: int, pad_id: int):
        self.inner, self.max_seq_len, self.pad_id = inner, max_seq_len, pad_id

    def logits(self, input_ids):
        import numpy as np

        rows, length = input_ids.shape
        padded = np.full((rows, max(self.max_seq_len, length)), self.pad_id, dtype=np.int64)
        padded[:, :length] = input_ids
        return self.inner.logits(padded)[:, :length]

    def transitions(self):
        return self.inner.transitions()


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"static:onednn=1,bs=64"`` -> ``("static", {"onednn": "1", "bs": "64"})``."""
    kind, _, options = spec.partition(":")
    return kind, dict(item.split("=", 1) for item in options.split(",") if item)


def model_dims(checkpoint: str) -> dict:
    """The encoder's sizes from a checkpoint's config.json, for the FLOP count of the ceiling."""
    config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    return {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "heads": config["num_attention_heads"], "intermediate": config["intermediate_size"],
            "classes": len(config.get("id2label") or {}) or config.get("num_labels", 2)}


def forward_flops(dims: dict, pieces: int) -> float:
    """Matmul FLOPs of one sentence's forward pass at its own length (embeddings excluded)."""
    h, i, layers, n = dims["hidden"], dims["intermediate"], dims["layers"], pieces
    per_layer = 4 * 2 * n * h * h + 2 * 2 * n * h * i + 2 * 2 * n * n * h  # Q,K,V,out; FFN; scores and context
    return layers * per_layer + 2 * n * h * dims["classes"]


def child_ceiling(args) -> int:
    """paddle.matmul's rate at the shapes of one forward pass of 32 mean-length sentences."""
    from pipeline.cpu_env import apply_cpu_settings

    apply_cpu_settings()
    import paddle
    import statistics

    paddle.set_device("cpu")
    dims = model_dims(args.checkpoint)
    texts = read_test_texts(Path(args.test_file).expanduser())
    indices = json.loads(Path(args.indices).read_text()) if args.indices else list(range(len(texts)))
    seq = round(statistics.fmean(len(texts[i]) + 2 for i in indices))
    batch, h, i, heads = 32, dims["hidden"], dims["intermediate"], dims["heads"]
    rows, groups, head_dim = batch * seq, batch * heads, h // heads
    shapes = [(4 * dims["layers"], (rows, h), (h, h)), (dims["layers"], (rows, h), (h, i)),
              (dims["layers"], (rows, i), (i, h)),
              (dims["layers"], (groups, seq, head_dim), (groups, head_dim, seq)),
              (dims["layers"], (groups, seq, seq), (groups, seq, head_dim))]
    flops = seconds = 0.0
    for count, a_shape, b_shape in shapes:
        a, b = paddle.randn(list(a_shape)), paddle.randn(list(b_shape))
        for _ in range(3):
            paddle.matmul(a, b).numpy()  # warm-up
        times = []
        for _ in range(10):
            start = time.perf_counter()
            paddle.matmul(a, b)  # CPU kernels run synchronously
            times.append(time.perf_counter() - start)
        groups_of_a = a_shape[0] if len(a_shape) == 3 else 1
        flops += count * 2.0 * groups_of_a * a_shape[-2] * a_shape[-1] * b_shape[-1]
        seconds += count * statistics.median(times)
    rate = flops / seconds
    sentence_flops = [forward_flops(dims, len(texts[i]) + 2) for i in indices]
    Path(args.result).write_text(json.dumps({
        "rate_flops_per_s": rate, "batch": batch, "mean_pieces": seq, "sentences": len(indices),
        "forward_gflop_per_sentence": statistics.fmean(sentence_flops) / 1e9,
        "ceiling_sentences_per_second": len(sentence_flops) / (sum(sentence_flops) / rate),
        "threads": os.environ.get("OMP_NUM_THREADS")}), encoding="utf-8")
    return 0


def child(args) -> int:
    """One engine (or the matmul ceiling) in this process, which the parent started for it alone."""
    if args.child == "ceiling":
        return child_ceiling(args)
    from pipeline.cpu_env import apply_cpu_settings

    apply_cpu_settings()  # before Paddle is imported, as predict.py does
    import predict  # its default batch size
    from pipeline.prediction_io import CHUNK_LINES
    from pipeline.predictor import Predictor

    kind, options = parse_spec(args.child)
    texts = read_test_texts(Path(args.test_file).expanduser())
    indices = json.loads(Path(args.indices).read_text()) if args.indices else list(range(len(texts)))
    timed = [texts[i] for i in indices]
    chosen = set(indices)
    warmup = [t for i, t in enumerate(texts) if i not in chosen][:WARMUP_SENTENCES] or texts[:WARMUP_SENTENCES]
    default_batch = predict.parse_args(["--checkpoint", "x", "--input", "-"]).batch_size
    batch_size = int(options.get("bs", default_batch))
    static_options = {k: options[k] == "1" for k in ("onednn", "ir_optim") if k in options}

    start = time.perf_counter()
    engine, precision = KIND_ENGINES.get(kind, (None, None))
    # --inference_dir names the static model: the ONNX exports are found beside the checkpoint.
    inference_dir = args.inference_dir if engine in ("auto", "static") else None
    if kind == "naive":
        predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=1, engine="dynamic")
        aligner = predictor.labeller.aligner
        predictor.labeller.engine = PaddedToMaxLen(predictor.labeller.engine, aligner.max_seq_len, aligner.pad_id)
    elif kind == "dynamic":
        predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=batch_size, engine="dynamic")
    elif engine and int(options.get("workers", 1)) > 1:  # predict.py --workers N
        from pipeline.predict_workers import ParallelPredictor

        predictor = ParallelPredictor(int(options["workers"]), directory=args.checkpoint, batch_size=batch_size,
                                      engine=engine, precision=precision, inference_dir=inference_dir)
        predictor.start()
    elif engine:
        predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=batch_size, engine=engine,
                                              precision=precision, inference_dir=inference_dir,
                                              static_options=static_options)
    else:
        raise SystemExit(f"unknown engine {kind!r}")
    if kind == "naive":
        for text in warmup:
            predictor.predict([text])
    else:
        predictor.predict(warmup)
    startup = time.perf_counter() - start
    workers = getattr(predictor, "workers", 1)  # ParallelPredictor's process count, 1 for Predictor

    labels = []
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if kind == "naive":  # one sentence per call, as a per-request service would
        for text in timed:
            labels.append(predictor.predict([text])[0]["labels"])
    else:  # predict.py's chunks of lines (CHUNK_LINES per worker)
        worker_usage = predictor.usage() if workers > 1 else []
        chunk = CHUNK_LINES * workers
        start = time.perf_counter()
        for begin in range(0, len(timed), chunk):
            labels.extend(r["labels"] for r in predictor.predict(timed[begin: begin + chunk]))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    peak_rss = common.peak_rss_mib()
    if workers > 1:  # the workers' CPU time and memory, not the idle parent's
        worker_after = predictor.usage()
        cpu_seconds += sum(a["cpu_seconds"] - b["cpu_seconds"] for a, b in zip(worker_after, worker_usage))
        peak_rss = max(w["peak_rss_mib"] for w in worker_after)  # per worker, as for training
        engine_name, batch, engine_options = predictor.engine_name, batch_size, None
        predictor.close()
    else:
        engine = predictor.labeller.engine
        engine_name, batch = getattr(engine, "name", type(engine).__name__), predictor.labeller.batch_size
        engine_options = getattr(engine, "options", None)
    Path(args.result).write_text(json.dumps({
        "spec": args.child, "engine": engine_name,
        "static_options": engine_options, "batch_size": batch,
        "sentences": len(timed), "characters": sum(map(len, timed)), "seconds": seconds,
        "sentences_per_second": len(timed) / seconds, "startup_seconds": startup,
        "cpu_seconds": cpu_seconds, "sentences_per_cpu_second": len(timed) / cpu_seconds,
        "peak_rss_mib": peak_rss, "threads": os.environ.get("OMP_NUM_THREADS"),
        "workers": workers, "labels": labels,
    }, ensure_ascii=False), encoding="utf-8")
    return 0


# ---------------------------------------------------------------- parent: schedule, compare, report


def run_child(args, spec: str, indices_file: str | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    # Run from the repository root (cwd below), where `bench`, `pipeline` and predict.py are importable.
    command = [sys.executable, "-m", "bench.predict_throughput", "--child", spec, "--checkpoint", args.checkpoint,
               "--test_file", args.test_file, "--result", result_path]
    if indices_file:
        command += ["--indices", indices_file]
    if args.inference_dir:
        command += ["--inference_dir", args.inference_dir]
    env = dict(os.environ)
    threads = parse_spec(spec)[1].get("threads")
    if threads:  # pipeline.cpu_env keeps what the environment already says
        env.update({name: threads for name in THREAD_VARIABLES})
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        if completed.returncode != 0:
            raise SystemExit(f"engine {spec} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        result = json.loads(Path(result_path).read_text(encoding="utf-8"))
    finally:
        Path(result_path).unlink(missing_ok=True)
    result["warnings"] = [line for line in completed.stderr.splitlines() if "StaticModelWarning" in line
                          or "using the dynamic graph" in line][:3]
    return result


def parse_args(argv=None):
    """The command line of the parent and of its children (``--child``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "outputs/msra_quick/best_model"))
    parser.add_argument("--inference_dir", default=None,
                        help="as predict.py's flag (default: found next to the checkpoint)")
    parser.add_argument("--test_file", default=DEFAULT_TEST_FILE)
    parser.add_argument("--sentences", type=int, default=None, help="first N test sentences (default: all 5,000)")
    parser.add_argument("--naive_sentences", type=int, default=1000,
                        help="time the naive predictor on N evenly spaced sentences of those (default 1000; "
                             "0 = all)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SENTENCES} sentences for every engine")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_sizes", default="", help="also time (c) at these batch sizes, e.g. 32,64,128")
    parser.add_argument("--workers", default="", help="also time (c) as predict.py --workers N, e.g. 2 "
                        "(N processes with cores/N threads each; peak RSS is the largest worker's)")
    parser.add_argument("--threads", default="", help="also time (c) with these CPU thread counts, e.g. 1,2")
    parser.add_argument("--static_options_sweep", action="store_true",
                        help="also time the static engine with oneDNN on/off x IR optimisation on/off")
    parser.add_argument("--onnx", action="store_true",
                        help="also time the static engine forced, and the ONNX fp32 and int8 engines (their exports "
                             "beside the checkpoint: python -m pipeline.export --format onnx [--quantize int8]), "
                             "with every --workers N too")
    parser.add_argument("--json", default=None, help="write every figure (not the labels) to this file")
    # Internal: one engine in a child process.
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--indices", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences = args.sentences or QUICK_SENTENCES
        args.naive_sentences = min(args.naive_sentences or QUICK_SENTENCES, QUICK_SENTENCES)
    return args


def main(argv=None) -> int:
    """A child's one measurement, or the parent's schedule of children, comparison and report."""
    args = parse_args(argv)
    if args.child:
        return child(args)
    if not (Path(args.checkpoint) / "model.pdparams").is_file():
        print(f"error: {args.checkpoint} is not a checkpoint directory (no model.pdparams); pass --checkpoint",
              file=sys.stderr)
        return 2
    texts = read_test_texts(Path(args.test_file).expanduser())
    total = min(len(texts), args.sentences or len(texts))
    all_indices = list(range(total))
    naive_count = total if not args.naive_sentences else min(args.naive_sentences, total)
    naive_subset = naive_indices(total, naive_count)
    work = tempfile.mkdtemp(prefix="predict_bench_")
    files = {}
    for name, indices in (("all", all_indices), ("naive", naive_subset)):
        files[name] = str(Path(work) / f"{name}.json")
        Path(files[name]).write_text(json.dumps(indices))

    specs = ["naive", "dynamic", "predict"]
    specs += [f"predict:bs={b}" for b in args.batch_sizes.split(",") if b.strip()]
    specs += [f"predict:threads={t}" for t in args.threads.split(",") if t.strip()]
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    specs += [f"predict:workers={w}" for w in workers]
    if args.static_options_sweep:
        specs += [f"static:onednn={o},ir_optim={i}" for o in (0, 1) for i in (1, 0)]
    if args.onnx:
        specs += ["static", "onnx", "int8"] + [f"{kind}:workers={w}" for kind in ("onnx", "int8") for w in workers]
    info = common.machine_info()
    print(f"# predict throughput, MSRA-NER test ({total} sentences; naive on {len(naive_subset)}"
          f"{' evenly spaced' if len(naive_subset) < total else ''})")
    print(f"machine: {common.machine_line(info)}; load average at start {info['load_average']}")
    print(f"date: {common.now_utc()}")
    print(f"command: {common.command_line()}")
    print(f"checkpoint: {args.checkpoint}", flush=True)

    runs: dict[str, list[dict]] = {spec: [] for spec in specs}
    for repeat in range(args.repeats):
        shift = repeat % len(specs)
        for spec in specs[shift:] + specs[:shift]:  # rotate the order: no engine always runs first
            result = run_child(args, spec, files["naive" if spec == "naive" else "all"])
            runs[spec].append(result)
            print(f"  repeat {repeat + 1}/{args.repeats} {spec:<28} {result['engine']:<8} "
                  f"{result['sentences_per_second']:8.1f} sent/s ({result['sentences_per_cpu_second']:.1f} per CPU s)  "
                  f"start-up {result['startup_seconds']:.1f} s  "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)

    ceiling = run_child(args, "ceiling", files["all"])
    print(f"  matmul ceiling: {ceiling['ceiling_sentences_per_second']:.1f} sent/s "
          f"({ceiling['forward_gflop_per_sentence']:.2f} GFLOP of forward matmuls per sentence, paddle.matmul at "
          f"{ceiling['rate_flops_per_s'] / 1e9:.0f} GFLOP/s)", flush=True)

    # Labels: every run against the first run of (c), sentence by sentence.
    reference = runs["predict"][0]["labels"]
    differing = {}
    for spec, results in runs.items():
        worst = 0
        for result in results:
            positions = naive_subset if spec == "naive" else all_indices
            worst = max(worst, sum(labels != reference[i] for i, labels in zip(positions, result["labels"])))
        differing[spec] = worst
    # int8 may differ from float32 by design: its differences are reported, not counted as failures.
    reduced = {spec for spec in runs if parse_spec(spec)[0] == "int8"}
    gold = read_test_labels(Path(args.test_file).expanduser())
    scores = {spec: f1_scores([gold[i] for i in (naive_subset if spec == "naive" else all_indices)],
                              results[0]["labels"]) for spec, results in runs.items()}
    int8_changes = {spec: differing_labels(reference, runs[spec][0]["labels"]) for spec in reduced}

    summary = {}
    for spec, results in runs.items():
        summary[spec] = {
            "engine": results[0]["engine"], "batch_size": results[0]["batch_size"],
            "static_options": results[0]["static_options"], "sentences": results[0]["sentences"],
            "sentences_per_second": common.summary([r["sentences_per_second"] for r in results]),
            "sentences_per_cpu_second": common.summary([r["sentences_per_cpu_second"] for r in results]),
            "startup_seconds": common.summary([r["startup_seconds"] for r in results]),
            "peak_rss_mib": common.summary([r["peak_rss_mib"] for r in results]),
            "differing_sentences": differing[spec], "warnings": results[0]["warnings"],
            "precision": "int8" if spec in reduced else "fp32", "scores": scores[spec],
            "ceiling_share": None,  # filled in below, once the ceiling is known
        }
    limit = ceiling["ceiling_sentences_per_second"]
    for s in summary.values():
        s["ceiling_share"] = s["sentences_per_second"]["median"] / limit
    rows = [[spec, s["engine"], s["precision"], str(s["batch_size"]), str(s["sentences"]),
             common.fmt_mmm(s["sentences_per_second"]), common.fmt_mmm(s["sentences_per_cpu_second"]),
             f"{s['ceiling_share']:.0%}", common.fmt_mmm(s["startup_seconds"]),
             common.fmt_mmm(s["peak_rss_mib"], "{:.0f}"), f"{s['scores']['f1']:.4f} / {s['scores']['strict_f1']:.4f}",
             str(s["differing_sentences"])] for spec, s in summary.items()]
    print()
    print(common.table(rows, ["run", "engine", "precision", "batch", "sentences", "sent/s median (min..max)",
                              "sent per CPU s", "of fp32 ceiling", "start-up s", "peak RSS MiB", "F1 / strict F1",
                              "sentences differing from (c)"]))
    median = {spec: s["sentences_per_second"]["median"] for spec, s in summary.items()}
    ratios = {"predict/naive": common.ratio(median["predict"], median["naive"]),
              "predict/dynamic": common.ratio(median["predict"], median["dynamic"])}
    print(f"\nmatmul ceiling (forward matrix products of these sentences, no padding, at paddle.matmul's rate "
          f"here): {limit:.1f} sent/s = {common.ratio(limit, median['naive']):.2f}x the naive predictor; (c) reaches "
          f"{median['predict'] / limit:.0%} of it")
    cpu_median = {spec: s["sentences_per_cpu_second"]["median"] for spec, s in summary.items()}
    cpu_ratios = {"predict/naive": common.ratio(cpu_median["predict"], cpu_median["naive"]),
                  "predict/dynamic": common.ratio(cpu_median["predict"], cpu_median["dynamic"])}
    print()
    for name, value in cpu_ratios.items():
        print(f"ratio {name} in sentences per CPU second (a check on a busy machine): {value:.2f}x")
    for name, value in ratios.items():
        note = " (naive timed on a subset: sentences/s on different sets)" \
            if name == "predict/naive" and len(naive_subset) < total else ""
        verdict = "meets" if value >= TARGETS[name] else "MISSES"
        print(f"ratio {name}: {value:.2f}x (target >= {TARGETS[name]}x: {verdict}){note}")
    if "int8" in runs:
        for name, (numerator, denominator) in {"int8/predict": ("int8", "predict"),
                                               "int8/naive": ("int8", "naive")}.items():
            ratios[name] = value = common.ratio(median[numerator], median[denominator])
            verdict = "meets" if value >= INT8_TARGETS[name] else "MISSES"
            print(f"ratio {name}: {value:.2f}x (target >= {INT8_TARGETS[name]}x: {verdict})")
        for key in ("f1", "strict_f1"):
            points = 100 * (scores["int8"][key] - scores["predict"][key])
            verdict = "within" if abs(points) <= INT8_F1_POINTS else "OUTSIDE"
            print(f"int8 {key}: {scores['int8'][key]:.4f} vs (c) {scores['predict'][key]:.4f}: {points:+.2f} points "
                  f"({verdict} {INT8_F1_POINTS})")
        for spec, change in int8_changes.items():
            print(f"int8 labels vs (c), {spec}: {change['sentences']} sentence(s), {change['characters']} of "
                  f"{change['of_characters']} characters differ (reported, not a failure)")
    if summary["predict"]["engine"] != "static":
        print("note: (c) ran the dynamic graph: no current static export was found "
              f"(python -m pipeline.export --checkpoint {args.checkpoint}); {summary['predict']['warnings']}")
    total_differing = sum(v for k, v in differing.items() if k not in reduced)
    print(f"label check (float32 engines): {total_differing} sentence(s) differ from (c) "
          f"({', '.join(f'{k}: {v}' for k, v in differing.items() if k not in reduced)})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "date": common.now_utc(), "command": common.command_line(),
            "checkpoint": args.checkpoint, "sentences": total, "naive_sentences": len(naive_subset),
            "repeats": args.repeats, "engines": summary, "ratios": ratios, "cpu_ratios": cpu_ratios,
            "ceiling": ceiling, "int8_label_changes": int8_changes,
            "runs": {spec: [{k: v for k, v in r.items() if k != "labels"} for r in results]
                     for spec, results in runs.items()},
        }, indent=2), encoding="utf-8")
        print(f"figures -> {args.json}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if total_differing else 0


if __name__ == "__main__":
    sys.exit(main())
