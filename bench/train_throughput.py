"""Training throughput on CPU: our loop vs PaddleNLP's Trainer, 1 vs 2 workers, and the matmul floor.

    python -m bench.train_throughput                      # full benchmark (defaults below)
    python -m bench.train_throughput --quick              # tiny values, to check that everything runs
    python -m bench.train_throughput --repeats 5 --json results.json

What is compared (same model m3e-small, same first N MSRA-NER training
sentences, same per-worker batch, same optimiser settings, same thread
settings from pipeline.cpu_env applied before Paddle is imported):

  ours       pipeline.Trainer.fit() of the config (length-grouped batches),
             one process. The real fit() loop runs; the benchmark only wraps
             the learning-rate schedule's step() to time-stamp the end of each
             optimiser step, wraps token_logits to record batch shapes, and
             stops the run after the last measured step.
  paddlenlp  paddlenlp.trainer.Trainer as PaddleNLP's ERNIE 3.0 token-
             classification example uses it: the same *ForTokenClassification
             model, characters tokenised with is_split_into_words=True and the
             labels aligned to the pieces (-100 on [CLS]/[SEP]),
             DataCollatorForTokenClassification, its default random sampler,
             TrainingArguments with the same batch size, learning rate, weight
             decay, warmup ratio, max_grad_norm, AdamW and max_steps, no
             evaluation, no saving, no logging. A callback time-stamps
             on_step_end; training_step is wrapped to record batch shapes.
  ours x2    ours under `python -m paddle.distributed.launch --nproc_per_node 2`
             (1 thread per worker), same per-worker batch; afterwards each
             worker times all-reduces of a tensor as large as all gradients.

Each run is a fresh subprocess (peak RSS per run) doing W warm-up steps and M
measured steps; time = wall time from the end of step W to the end of step
W+M (data loading included). Real tokens = non-padding tokens ([CLS]/[SEP]
included) of the measured batches; padding share = padding / computed tokens.
A/B runs alternate (ours first in odd repeats, PaddleNLP first in even ones).

The matmul floor counts the matmul FLOPs of each measured step (encoder
projections, attention scores and context, FFN, classifier; embeddings
excluded; forward + input-gradient + weight-gradient matmuls = 3x forward),
times paddle.matmul at the same shapes (forward and both backward layouts)
in a fresh process with the same thread settings, and divides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common  # no Paddle import: thread variables come first

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_CONFIG = "configs/msra_m3e_small_quick.yaml"
QUICK = {"examples": 200, "warmup": 1, "steps": 2, "repeats": 1, "matmul_reps": 2, "allreduce_reps": 2}


# ====================================================================== children
# Each child runs in its own process and writes one JSON file; nothing here runs in the parent.


class _StopAfterMeasurement(Exception):
    """Raised inside fit() once the last measured step has ended."""


def _load_config(args):
    from pipeline.config import load_config

    overrides = [f"max_train_examples={args.examples}", f"batch_size={args.batch_size}",
                 f"max_steps={args.warmup + args.steps}", "do_test=false", "max_dev_examples=1",
                 "use_vdl=false", "eval_interval=0", "resume='off'", "save_interval=0",
                 f"checkpoint_dir={args.child_dir}"]
    return load_config(str(ROOT / args.config) if not os.path.isabs(args.config) else args.config, overrides)


def _child_prelude(args):
    """Thread settings before Paddle, then config, data, tokenizer and model, as train_dist.py builds them."""
    from pipeline.cpu_env import apply_cpu_settings

    applied = apply_cpu_settings()
    config = _load_config(args)
    from pipeline import dist
    from pipeline.splits import load_splits
    from pipeline.models import build_token_classifier, build_tokenizer, resolve_model
    from pipeline.device import choose_device
    from pipeline.runtime import set_device, set_seed

    set_device(choose_device("false"))
    dist.init_distributed(on_gpu=False)
    splits = load_splits(config)
    spec = resolve_model(config.model)
    set_seed(config.seed)
    tokenizer = build_tokenizer(spec, config.lower_case)
    model = build_token_classifier(spec, splits.labels)
    set_seed(config.seed + dist.get_rank())
    threads = common.thread_settings()
    return config, splits, tokenizer, model, threads, applied


def _model_dims(model) -> dict:
    cfg = model.config
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "intermediate": cfg.intermediate_size, "classes": cfg.num_labels,
            "parameters": int(sum(int(p.numel()) for p in model.parameters()))}


def _measure(marks: list, shapes: list, warmup: int, steps: int) -> dict:
    """Figures of the measured steps: marks[i] = end of step i+1, shapes[i] = (batch, seq, real) of step i+1."""
    measured = shapes[warmup: warmup + steps]
    seconds = marks[warmup + steps - 1] - marks[warmup - 1] if warmup > 0 else None
    return {"seconds": seconds, "steps": steps, "shapes": measured,
            "real_tokens": sum(s[2] for s in measured), "computed_tokens": sum(s[0] * s[1] for s in measured)}


def child_ours(args) -> dict:
    config, splits, tokenizer, model, threads, applied = _child_prelude(args)
    import paddle
    import pipeline.loader as loader_module
    import pipeline.trainer as trainer_module
    from pipeline import dist

    marks, shapes, peak = [], [], {}
    last = args.warmup + args.steps
    pad_id = tokenizer.pad_token_id
    build_optimizer, token_logits = trainer_module.build_optimizer, trainer_module.token_logits
    build_features, data = loader_module.build_training_features, {}

    def counting_build_features(examples, aligner, labels):
        features, stats = build_features(examples, aligner, labels)
        data.update(sentences=len(examples), sequences=len(features), tokens=sum(len(f[0]) for f in features))
        return features, stats

    def timed_build_optimizer(cfg, mdl, total_steps):
        optimizer, schedule = build_optimizer(cfg, mdl, total_steps)
        step = schedule.step

        def timed_step(*a, **k):
            step(*a, **k)
            marks.append(time.perf_counter())  # fit() calls this right after optimizer.step() and clear_grad()
            if len(marks) >= last:
                peak["rss_mib"] = common.peak_rss_mib()
                raise _StopAfterMeasurement

        schedule.step = timed_step
        return optimizer, schedule

    def recording_token_logits(mdl, input_ids, *a, **k):
        if mdl.training:
            shapes.append((int(input_ids.shape[0]), int(input_ids.shape[1]), int((input_ids != pad_id).sum())))
        return token_logits(mdl, input_ids, *a, **k)

    trainer_module.build_optimizer = timed_build_optimizer
    trainer_module.token_logits = recording_token_logits
    loader_module.build_training_features = counting_build_features
    trainer = trainer_module.Trainer(config, model, tokenizer, splits)
    try:
        trainer.fit()
        raise RuntimeError(f"fit() ended after {len(marks)} steps, before the {last} the benchmark needs "
                           f"(too few training sentences for warmup + steps?)")
    except _StopAfterMeasurement:
        pass
    result = {"side": "ours", "rank": dist.get_rank(), "world_size": dist.get_world_size(), "threads": threads,
              "peak_rss_mib": peak["rss_mib"], "model": _model_dims(model), "data": data,
              **_measure(marks, shapes, args.warmup, args.steps)}
    if dist.get_world_size() > 1 and args.allreduce_reps > 0:
        import paddle.distributed as pdist

        grads = paddle.ones([result["model"]["parameters"]], dtype="float32")
        times = []
        for _ in range(args.allreduce_reps + 1):
            dist.barrier()
            start = time.perf_counter()
            pdist.all_reduce(grads)
            float(grads[0])
            times.append(time.perf_counter() - start)
        result["allreduce_seconds"] = times[1:]  # the first one sets up buffers
    dist.shutdown()
    return result


def child_paddlenlp(args) -> dict:
    config, splits, tokenizer, model, threads, applied = _child_prelude(args)
    import paddle  # noqa: F401
    from paddlenlp.data import DataCollatorForTokenClassification
    from paddlenlp.datasets import MapDataset
    from paddlenlp.trainer import Trainer, TrainerCallback, TrainingArguments

    label2id = {label: i for i, label in enumerate(splits.labels)}
    ignore = -100
    piece_counts: dict[str, int] = {}

    def features(example):
        # As PaddleNLP's token-classification examples do: the characters are the "words".
        encoded = tokenizer(example.tokens, is_split_into_words=True, max_length=config.max_seq_len,
                            truncation=True, return_length=False)
        labels = [ignore]
        for char, label in zip(example.tokens, example.labels):
            count = piece_counts.get(char)
            if count is None:
                count = piece_counts[char] = len(tokenizer.tokenize(char))
            if count:
                labels += [label2id[label]] + [ignore] * (count - 1)
        size = len(encoded["input_ids"])
        labels = labels[: size - 1] + [ignore]  # [SEP]; characters past max_seq_len are cut, as the example does
        labels += [ignore] * (size - len(labels))
        return {"input_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"], "labels": labels}

    dataset = MapDataset([features(example) for example in splits.train])
    data = {"sentences": len(splits.train), "sequences": len(dataset),
            "tokens": sum(len(f["input_ids"]) for f in dataset)}
    marks, shapes, peak = [], [], {}
    last = args.warmup + args.steps
    pad_id = tokenizer.pad_token_id

    class StepClock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            marks.append(time.perf_counter())
            if len(marks) == last:
                peak["rss_mib"] = common.peak_rss_mib()

    class RecordingTrainer(Trainer):
        def training_step(self, model_, inputs):
            ids = inputs["input_ids"]
            shapes.append((int(ids.shape[0]), int(ids.shape[1]), int((ids != pad_id).sum())))
            return super().training_step(model_, inputs)

    training_args = TrainingArguments(
        output_dir=str(Path(args.child_dir) / "paddlenlp_out"), device="cpu", do_train=True, do_eval=False,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear", optim="adamw", max_steps=last, seed=config.seed,
        evaluation_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, gradient_accumulation_steps=1)
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=dataset, tokenizer=tokenizer,
                               data_collator=DataCollatorForTokenClassification(tokenizer, label_pad_token_id=ignore),
                               callbacks=[StepClock()])
    trainer.train()
    if len(marks) < last:
        raise RuntimeError(f"PaddleNLP's Trainer ran {len(marks)} steps, fewer than {last}")
    return {"side": "paddlenlp", "rank": 0, "world_size": 1, "threads": threads, "peak_rss_mib": peak["rss_mib"],
            "model": _model_dims(model), "data": data, **_measure(marks, shapes, args.warmup, args.steps)}


def _linear_layouts(rows: int, k: int, n: int):
    """Matmul shapes of a Linear [rows, k] -> [rows, n]: forward, input gradient, weight gradient."""
    return [("fwd", (rows, k), (k, n)), ("dx", (rows, n), (n, k)), ("dw", (k, rows), (rows, n))]


def matmul_kinds(dims: dict, batch: int, seq: int) -> dict:
    """Per kind: (count per step, list of (layout, a shape, b shape)); each matmul is 2*m*k*n FLOPs."""
    h, i, heads, layers, classes = (dims[k] for k in ("hidden", "intermediate", "heads", "layers", "classes"))
    rows, groups, head_dim = batch * seq, batch * heads, h // heads
    return {
        "qkv_out_proj": (4 * layers, _linear_layouts(rows, h, h)),
        "ffn_in": (layers, _linear_layouts(rows, h, i)),
        "ffn_out": (layers, _linear_layouts(rows, i, h)),
        "classifier": (1, _linear_layouts(rows, h, classes)),
        # scores Q@K^T and, in backward, dP = dC@V^T: [s, d] @ [d, s]
        "attn_sd_ds": (2 * layers, [("bmm", (groups, seq, head_dim), (groups, head_dim, seq))]),
        # context P@V, and dQ = dS@K, dK = dS^T@Q, dV = P^T@dC: [s, s] @ [s, d]
        "attn_ss_sd": (4 * layers, [("bmm", (groups, seq, seq), (groups, seq, head_dim))]),
    }


def _matmul_flops(a, b) -> float:
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def step_flops(dims: dict, batch: int, seq: int) -> dict:
    """Matmul FLOPs of one training step per kind (forward + both backward matmuls)."""
    return {kind: count * sum(_matmul_flops(a, b) for _, a, b in layouts)
            for kind, (count, layouts) in matmul_kinds(dims, batch, seq).items()}


def child_matmul(args) -> dict:
    from pipeline.cpu_env import apply_cpu_settings

    apply_cpu_settings()
    import paddle

    paddle.set_device("cpu")
    dims = json.loads(args.dims)
    rates = {}
    for kind, (_, layouts) in matmul_kinds(dims, args.mm_batch, args.mm_seq).items():
        flops = seconds = 0.0
        for _, a_shape, b_shape in layouts:
            a, b = paddle.randn(list(a_shape), dtype="float32"), paddle.randn(list(b_shape), dtype="float32")
            for _ in range(2):
                paddle.matmul(a, b).numpy()  # warm-up; .numpy() makes sure the kernel really ran
            times = []
            for _ in range(args.matmul_reps):
                # Dygraph CPU kernels run synchronously: no copy-out inside the timed region.
                start = time.perf_counter()
                paddle.matmul(a, b)
                times.append(time.perf_counter() - start)
            flops += _matmul_flops(a_shape, b_shape)
            # The fastest repetition: a busy moment on a shared machine can only slow one down, so the
            # minimum is the stable (and the lowest, most demanding) floor.
            seconds += min(times)
        rates[kind] = flops / seconds
    threads = common.thread_settings()
    return {"batch": args.mm_batch, "seq": args.mm_seq, "rates_flops_per_s": rates, "threads": threads,
            "peak_rss_mib": common.peak_rss_mib()}


def run_child(args) -> int:
    Path(args.child_dir).mkdir(parents=True, exist_ok=True)
    result = {"ours": child_ours, "paddlenlp": child_paddlenlp, "matmul": child_matmul}[args.child](args)
    rank = result.get("rank", 0)
    out = Path(args.child_out.replace("{rank}", str(rank)))
    out.write_text(json.dumps(result), encoding="utf-8")
    return 0


# ====================================================================== parent


def child_command(args, child: str, out: str, child_dir: str, extra=()) -> list[str]:
    cmd = [str(Path(__file__).resolve()), "--child", child, "--child-out", out, "--child-dir", child_dir,
           "--config", args.config, "--examples", str(args.examples), "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--matmul-reps", str(args.matmul_reps),
           "--allreduce-reps", str(args.allreduce_reps), *extra]
    return cmd


def launch(args, name: str, cmd: list[str], workers: int = 0) -> tuple[float, str]:
    """Run one child (under the distributed launcher when workers > 0); return (wall seconds, log path)."""
    log = Path(args.workdir) / f"{name}.log"
    # The launcher runs a child by its file name, so the child finds `bench` and `pipeline` through PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if workers:
        env.pop("CUDA_VISIBLE_DEVICES", None)  # CPU workers: the launcher must not look for GPUs
        full = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(workers),
                "--log_dir", str(Path(args.workdir) / f"{name}_logs"), *cmd]
    else:
        full = [sys.executable, *cmd]
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.run(full, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        worker_logs = sorted((Path(args.workdir) / f"{name}_logs").glob("workerlog.*")) if workers else []
        for worker_log in worker_logs:
            tail += [f"--- {worker_log}"] + worker_log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    return wall, str(log)


def combine_ranks(results: list[dict]) -> dict:
    """One job's figures from its ranks: tokens summed, time = slowest rank, RSS per rank."""
    real = sum(r["real_tokens"] for r in results)
    computed = sum(r["computed_tokens"] for r in results)
    seconds = max(r["seconds"] for r in results)
    steps = results[0]["steps"]
    combined = {"world_size": len(results), "real_tokens": real, "computed_tokens": computed, "seconds": seconds,
                "steps": steps, "tokens_per_second": real / seconds, "padding": 1 - real / computed,
                "seconds_per_step": seconds / steps, "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in results], "threads": results[0]["threads"],
                "model": results[0]["model"], "data": results[0]["data"], "shapes": [r["shapes"] for r in results]}
    allreduce = [t for r in results for t in r.get("allreduce_seconds", [])]
    if allreduce:
        combined["allreduce_seconds"] = statistics.median(allreduce)
    return combined


def run_side(args, side: str, repeat: int, workers: int = 0) -> dict:
    name = f"r{repeat}_{side}" + (f"_x{workers}" if workers else "")
    out = str(Path(args.workdir) / f"{name}.rank{{rank}}.json")
    child_dir = str(Path(args.workdir) / name)
    wall, log = launch(args, name, child_command(args, side, out, child_dir), workers)
    results = [json.loads(Path(out.replace("{rank}", str(rank))).read_text()) for rank in range(max(workers, 1))]
    combined = combine_ranks(results)
    combined.update({"process_wall_seconds": wall, "log": log})
    print(f"  {name}: {combined['tokens_per_second']:.0f} real tok/s, {combined['seconds_per_step']:.2f} s/step, "
          f"padding {100 * combined['padding']:.1f}%, peak RSS {combined['peak_rss_mib']:.0f} MiB "
          f"(process {wall:.0f} s)", flush=True)
    return combined


def side_summary(runs: list[dict]) -> dict:
    return {"tokens_per_second": common.summary([r["tokens_per_second"] for r in runs]),
            "seconds_per_step": common.summary([r["seconds_per_step"] for r in runs]),
            "padding": common.summary([r["padding"] for r in runs]),
            "peak_rss_mib": common.summary([r["peak_rss_mib"] for r in runs]),
            "allreduce_seconds": common.summary([r.get("allreduce_seconds") for r in runs])}


def floor_figures(args, ours_runs: list[dict]) -> dict:
    """FLOPs of our measured steps, matmul rates at their median shape, floor vs measured s/step."""
    dims = ours_runs[0]["model"]
    shapes = [tuple(s) for run in ours_runs for rank_shapes in run["shapes"] for s in rank_shapes]
    batch = int(statistics.median(s[0] for s in shapes))
    seq = int(statistics.median(s[1] for s in shapes))
    out = str(Path(args.workdir) / "matmul.rank{rank}.json")
    extra = ["--dims", json.dumps(dims), "--mm-batch", str(batch), "--mm-seq", str(seq)]
    launch(args, "matmul", child_command(args, "matmul", out, str(Path(args.workdir) / "matmul"), extra))
    measured = json.loads(Path(out.replace("{rank}", "0")).read_text())
    rates = measured["rates_flops_per_s"]
    per_run = []
    for run in ours_runs:
        run_shapes = [tuple(s) for s in run["shapes"][0]]  # one worker: rank 0's steps
        flops = [step_flops(dims, b, s) for b, s, _ in run_shapes]
        floor = [sum(f[kind] / rates[kind] for kind in f) for f in flops]
        per_run.append({"flops_per_step": statistics.mean(sum(f.values()) for f in flops),
                        "floor_seconds_per_step": statistics.mean(floor),
                        "measured_seconds_per_step": run["seconds_per_step"]})
    flops_step = statistics.median(p["flops_per_step"] for p in per_run)
    floor_step = statistics.median(p["floor_seconds_per_step"] for p in per_run)
    measured_step = statistics.median(p["measured_seconds_per_step"] for p in per_run)
    mix = step_flops(dims, batch, seq)
    return {"median_batch": batch, "median_seq": seq, "rates_gflops": {k: v / 1e9 for k, v in rates.items()},
            "mix_gflops_per_step_at_median_shape": {k: v / 1e9 for k, v in mix.items()},
            "flops_per_step": flops_step, "floor_seconds_per_step": floor_step,
            "measured_seconds_per_step": measured_step, "ratio": measured_step / floor_step,
            "achieved_gflops": flops_step / measured_step / 1e9, "matmul_threads": measured["threads"]}


def report(args, info: dict, results: dict) -> str:
    lines = []
    add = lines.append
    add("=" * 100)
    add("Training throughput benchmark: ours (pipeline.Trainer) vs paddlenlp.trainer.Trainer, m3e-small, MSRA-NER")
    add(f"date     {results['date']}")
    add(f"machine  {common.machine_line(info)}")
    add(f"load     {' '.join(f'{x:.2f}' for x in info['load_average'])} (1/5/15 min at start)"
        if info.get("load_average") else "load     n/a")
    add(f"command  {results['command']}")
    add(f"settings config {args.config}; first {args.examples} training sentences; batch {args.batch_size} per "
        f"worker; {args.warmup} warm-up + {args.steps} measured steps; {args.repeats} repeats")
    ab = results["ab"]
    thr = ab["ours"]["runs"][0]["threads"]
    add(f"threads  {thr} (pipeline.cpu_env, applied in every child before Paddle is imported)")
    data = [f"{side}: {ab[side]['runs'][0]['data']['sequences']} sequences, {ab[side]['runs'][0]['data']['tokens']} "
            f"tokens incl. [CLS]/[SEP]" for side in ("ours", "paddlenlp") if side in ab]
    add(f"data     {args.examples} sentences -> " + "; ".join(data))
    if "paddlenlp" in ab:
        add("")
        add("1. A/B, one process each, median (min..max) over repeats")
        o, p = ab["ours"]["summary"], ab["paddlenlp"]["summary"]
        rows = [
            ["real tokens/s", common.fmt_mmm(o["tokens_per_second"], "{:.0f}"),
             common.fmt_mmm(p["tokens_per_second"], "{:.0f}"), _fmt_ratio(ab["ratio_tokens_per_second"])],
            ["seconds/step", common.fmt_mmm(o["seconds_per_step"], "{:.3f}"),
             common.fmt_mmm(p["seconds_per_step"], "{:.3f}"), _fmt_ratio(ab["ratio_seconds_per_step"])],
            ["padding share of computed tokens", common.fmt_mmm(o["padding"], "{:.1f}%", 100),
             common.fmt_mmm(p["padding"], "{:.1f}%", 100), ""],
            ["peak RSS MiB", common.fmt_mmm(o["peak_rss_mib"], "{:.0f}"), common.fmt_mmm(p["peak_rss_mib"], "{:.0f}"),
             _fmt_ratio(ab["ratio_peak_rss"])],
        ]
        add(common.table(rows, ["", "ours", "paddlenlp Trainer", "ours/paddlenlp"]))
    sc = results.get("scaling")
    if sc:
        add("")
        add("2. Scaling, ours, same per-worker batch (job real tokens/s; 1 worker = the A/B runs above)")
        one, two = sc["one"], sc["two"]
        t1, t2 = (side["threads"]["OMP_NUM_THREADS"] for side in (ab["ours"]["runs"][0], sc["runs_two"][0]))
        rows = [[f"1 worker x {t1} threads", common.fmt_mmm(one["tokens_per_second"], "{:.0f}"),
                 common.fmt_mmm(one["seconds_per_step"], "{:.3f}"), common.fmt_mmm(one["padding"], "{:.1f}%", 100),
                 common.fmt_mmm(one["peak_rss_mib"], "{:.0f}"), "-"],
                [f"2 workers x {t2} thread(s)", common.fmt_mmm(two["tokens_per_second"], "{:.0f}"),
                 common.fmt_mmm(two["seconds_per_step"], "{:.3f}"), common.fmt_mmm(two["padding"], "{:.1f}%", 100),
                 common.fmt_mmm(two["peak_rss_mib"], "{:.0f}") + " per rank",
                 common.fmt_mmm(two["allreduce_seconds"], "{:.3f}")]]
        add(common.table(rows, ["", "real tokens/s", "s/step", "padding", "peak RSS MiB", "all-reduce s"]))
        add(f"speed-up 2 vs 1 worker (median tokens/s): {_fmt_ratio(sc['speedup'])}")
        add(sc["explanation"])
    fl = results.get("floor")
    if fl:
        add("")
        add(f"3. Matmul floor (ours, one process; rates at the median batch {fl['median_batch']} x "
            f"{fl['median_seq']} tokens, threads {fl['matmul_threads']})")
        rows = [[kind, f"{fl['mix_gflops_per_step_at_median_shape'][kind]:.2f}", f"{rate:.1f}"]
                for kind, rate in fl["rates_gflops"].items()]
        add(common.table(rows, ["matmul kind", "GFLOP/step (fwd+bwd)", "paddle.matmul GFLOP/s"]))
        add(f"FLOPs per step (mean of measured steps)  {fl['flops_per_step'] / 1e9:.2f} GFLOP")
        add(f"floor seconds/step                       {fl['floor_seconds_per_step']:.3f}")
        add(f"measured seconds/step (ours, median)     {fl['measured_seconds_per_step']:.3f}")
        add(f"measured / floor                         {fl['ratio']:.2f}x (target: within 2x) -> "
            f"{'within' if fl['ratio'] <= 2 else 'NOT within'} 2x; achieved {fl['achieved_gflops']:.1f} GFLOP/s")
    add("")
    add(f"raw logs and per-run JSON: {args.workdir}")
    if args.quick:
        add("NOTE: --quick values are for checking the script, not for measuring.")
    add("=" * 100)
    return "\n".join(lines)


def _fmt_ratio(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def scaling_explanation(one: dict, two: dict) -> str:
    s1, s2 = one["seconds_per_step"]["median"], two["seconds_per_step"]["median"]
    ar = two["allreduce_seconds"]["median"] if two.get("allreduce_seconds") else None
    cores = common.usable_cores()
    text = (f"why: the {cores} cores are shared. 1 worker runs {cores} threads; 2 workers run {max(1, cores // 2)} "
            f"each, so each worker computes its batch with half the threads (1 worker: {s1:.2f} s/step for one "
            f"batch; 2 workers: {s2:.2f} s/step for one batch each). The compute can only gain where {cores} threads "
            f"scale badly (Python, small ops, optimiser update).")
    if ar is not None:
        params = one["model_params"]
        text += (f" Every 2-worker step also all-reduces all gradients over gloo ({params / 1e6:.1f}M float32 = "
                 f"{params * 4 / 2**20:.0f} MiB): one all-reduce of that size took {ar:.3f} s, {100 * ar / s2:.0f}% "
                 f"of the 2-worker step, leaving ~{s2 - ar:.2f} s of compute (an estimate: DataParallel sends the "
                 f"gradients in buckets during backward).")
    text += (" If other processes compete for the cores, 2 workers take a larger share of them than 1 does, "
             "which inflates the speed-up: measure on a quiet machine.")
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config of ours (default {DEFAULT_CONFIG})")
    parser.add_argument("--examples", type=int, default=2000, help="first N MSRA-NER training sentences (2000)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per worker per step (16)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps per run, not measured (5)")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run (30)")
    parser.add_argument("--repeats", type=int, default=3, help="A/B (and 2-worker) runs per side (3)")
    parser.add_argument("--matmul-reps", type=int, default=10, help="timed repetitions per matmul shape (10)")
    parser.add_argument("--allreduce-reps", type=int, default=5, help="timed gradient-sized all-reduces (5)")
    parser.add_argument("--no-paddlenlp", action="store_true", help="skip the PaddleNLP Trainer side")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 2-worker runs")
    parser.add_argument("--no-floor", action="store_true", help="skip the matmul floor")
    parser.add_argument("--quick", action="store_true",
                        help="tiny values to check the script: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--workdir", help="where child logs and JSON go (default: a new temporary directory)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per child process (3600)")
    # Internal: how the parent starts a child.
    parser.add_argument("--child", choices=("ours", "paddlenlp", "matmul"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dims", help=argparse.SUPPRESS)
    parser.add_argument("--mm-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mm-seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1 (timing starts at the end of a warm-up step)")
    needed = (args.warmup + args.steps) * args.batch_size * (1 if args.no_scaling else 2)
    if not args.child and args.examples < needed:
        parser.error(f"--examples {args.examples} is too few for {args.warmup}+{args.steps} steps of batch "
                     f"{args.batch_size}{'' if args.no_scaling else ' x 2 workers'}: need >= {needed}, or an "
                     f"epoch ends inside the measurement (ours then evaluates on dev there)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="train_throughput-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    results = {"date": common.now_utc(), "command": common.command_line(), "machine": info,
               "settings": {k: getattr(args, k) for k in ("config", "examples", "batch_size", "warmup", "steps",
                                                          "repeats", "matmul_reps", "allreduce_reps", "quick")}}
    print(f"machine: {common.machine_line(info)}\nlogs: {args.workdir}", flush=True)
    runs = {"ours": [], "paddlenlp": [], "ours_x2": []}
    for repeat in range(1, args.repeats + 1):
        order = ["ours", "paddlenlp"] if repeat % 2 else ["paddlenlp", "ours"]
        for side in order:
            if side == "paddlenlp" and args.no_paddlenlp:
                continue
            runs[side].append(run_side(args, side, repeat))
        if not args.no_scaling:
            runs["ours_x2"].append(run_side(args, "ours", repeat, workers=2))

    ours = side_summary(runs["ours"])
    ab = {"ours": {"runs": runs["ours"], "summary": ours}}
    if runs["paddlenlp"]:
        pnlp = side_summary(runs["paddlenlp"])
        ab["paddlenlp"] = {"runs": runs["paddlenlp"], "summary": pnlp}
        ab["ratio_tokens_per_second"] = common.ratio(ours["tokens_per_second"]["median"],
                                                     pnlp["tokens_per_second"]["median"])
        ab["ratio_seconds_per_step"] = common.ratio(ours["seconds_per_step"]["median"],
                                                    pnlp["seconds_per_step"]["median"])
        ab["ratio_peak_rss"] = common.ratio(ours["peak_rss_mib"]["median"], pnlp["peak_rss_mib"]["median"])
    results["ab"] = ab
    if runs["ours_x2"]:
        two = side_summary(runs["ours_x2"])
        one = dict(ours, model_params=runs["ours"][0]["model"]["parameters"])
        results["scaling"] = {"one": one, "two": two, "runs_two": runs["ours_x2"],
                              "speedup": common.ratio(two["tokens_per_second"]["median"],
                                                      ours["tokens_per_second"]["median"]),
                              "explanation": scaling_explanation(one, two)}
    if not args.no_floor:
        results["floor"] = floor_figures(args, runs["ours"])
    text = report(args, info, results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
