"""Training throughput on CPU: our loop vs PaddleNLP's Trainer (its defaults and its strongest setup),
1 vs 2 workers, and the matmul floor at the fastest float32 GEMM this machine offers.

    python -m bench.train_throughput                      # full benchmark (defaults below)
    python -m bench.train_throughput --quick              # tiny values, to check that everything runs
    python -m bench.train_throughput --repeats 5 --json results.json

What is compared (same model m3e-small, same first N MSRA-NER training
sentences, same per-worker batch, same optimiser settings, same thread
settings from pipeline.cpu_env applied before Paddle is imported):

  ours                pipeline.Trainer.fit() of the config (length-grouped
                      batches) with the linear head, the head PaddleNLP's side
                      trains (--head crf times the CRF's instead: not like for
                      like against PaddleNLP). The real fit() loop runs; the benchmark wraps
                      the learning-rate schedule's step() to time-stamp the end
                      of each optimiser step, wraps token_logits to record batch
                      shapes, and stops the run after the last timed step.
  paddlenlp           paddlenlp.trainer.Trainer as PaddleNLP's ERNIE 3.0 token-
                      classification example uses it: the same *ForTokenClassification
                      model, characters tokenised with is_split_into_words=True,
                      labels aligned to the pieces (-100 on [CLS]/[SEP]),
                      DataCollatorForTokenClassification, its default random
                      sampler, to_static off; TrainingArguments with the same batch
                      size, learning rate, weight decay, warmup ratio,
                      max_grad_norm, AdamW and max_steps, no evaluation, saving
                      or logging. A callback time-stamps on_step_end.
  paddlenlp_grouped   the same Trainer given our batches: a subclass whose
                      _get_train_sampler returns our sampler (same grouping, same
                      seed), as an informed user removes the padding.
  paddlenlp_static    the same, plus TrainingArguments(to_static=True). With 2
                      workers TrainingArguments refuses to_static (it asserts
                      world_size == 1), so the model is wrapped with
                      paddle.jit.to_static by hand, as Trainer.__init__ does for
                      one process; the report says so.

The batches timed: W warm-up batches, then one whole pass over the subset
(bench.timed_pass). Ours and both PaddleNLP setups with our batches run exactly
the same sentences in the same batches (the parent checks that every step's
shape and real token count agree); PaddleNLP's default draws its own random
batches for as many steps. So ours vs paddlenlp_grouped/_static is the engine
alone, and paddlenlp vs paddlenlp_grouped is the padding alone.

Each run is a fresh subprocess (peak RSS per run); time = wall time from the
end of the last warm-up step to the end of the last step of the pass (data
loading included). Real tokens = non-padding tokens ([CLS]/[SEP] included) of
the timed batches, computed tokens = batch x padded length; padding share =
padding / computed tokens. The order of the sides rotates between repeats.

The matmul floor counts the matmul FLOPs of each timed step of ours (encoder
projections, attention scores and context, FFN, classifier; embeddings excluded;
forward + input-gradient + weight-gradient matmuls = 3x forward), times them at
the median step's shapes with every float32 GEMM library we could train with
(bench.gemm_floor: Paddle's MKL with and without MKL_DEBUG_CPU_TYPE, oneDNN
through Paddle Inference, NumPy's OpenBLAS; each in a fresh process with the
same threads), takes the fastest per kind, and divides.
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

from bench import common, gemm_floor  # no Paddle import: thread variables come first

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_CONFIG = "configs/msra_m3e_small_quick.yaml"
QUICK = {"examples": 64, "warmup": 1, "repeats": 1, "matmul_reps": 2, "allreduce_reps": 2}
FLOOR_TARGET = 1.4  # issue 18: a training step within 1.4x the machine's matmul floor

# What each side is, in the order of the report. PaddleNLP's setups are named by what they add.
SIDES = {
    "ours": "ours (pipeline.Trainer, length-grouped batches, SOT to_static)",
    "paddlenlp": "PaddleNLP Trainer, defaults (random batches, eager)",
    "paddlenlp_grouped": "PaddleNLP Trainer + our batches (eager)",
    "paddlenlp_static": "PaddleNLP Trainer + our batches + to_static=True",
}
PADDLENLP_SETUPS = {"default": "paddlenlp", "grouped": "paddlenlp_grouped", "static": "paddlenlp_static"}
OUR_BATCHES = ("ours", "paddlenlp_grouped", "paddlenlp_static")


# ====================================================================== children
# Each child runs in its own process and writes one JSON file; nothing here runs in the parent.


class _StopAfterMeasurement(Exception):
    """Raised inside fit() once the last timed step has ended."""


def _load_config(args):
    from pipeline.config import load_config

    # One epoch of warm-up + pass batches (bench.timed_pass); no evaluation, saving or test.
    overrides = [f"max_train_examples={args.examples}", f"batch_size={args.batch_size}", "epochs=1",
                 "max_steps=0", "grad_accum_steps=1", "do_test=false", "max_dev_examples=1", "use_vdl=false",
                 "eval_interval=0", "resume='off'", "save_interval=0", f"checkpoint_dir={args.child_dir}",
                 f"head={args.head}", *args.set]
    config = load_config(str(ROOT / args.config) if not os.path.isabs(args.config) else args.config, overrides)
    if not config.group_by_length:
        raise SystemExit(f"{args.config}: group_by_length is false; the benchmark times our length-grouped batches")
    return config


def _child_prelude(args):
    """Thread settings before Paddle, then config, data, tokenizer and model, as train_dist.py builds them."""
    from pipeline.cpu_env import apply_cpu_settings

    apply_cpu_settings()
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
    return config, splits, tokenizer, model, common.thread_settings()


def _model_dims(model) -> dict:
    cfg = model.config
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "intermediate": cfg.intermediate_size, "classes": cfg.num_labels,
            "parameters": int(sum(int(p.numel()) for p in model.parameters()))}


def measure(marks: list, shapes: list, warmup: int) -> dict:
    """Figures of the timed steps: marks[i] = end of step i+1, shapes[i] = (batch, seq, real) of step i+1."""
    timed = shapes[warmup:]
    # Per step too: a step that took far longer than its neighbours is a compilation (to_static, a new shape).
    step_seconds = [round(b - a, 4) for a, b in zip(marks[warmup - 1:], marks[warmup:])]
    return {"seconds": marks[-1] - marks[warmup - 1], "steps": len(marks) - warmup, "shapes": timed,
            "step_seconds": step_seconds,
            "real_tokens": sum(s[2] for s in timed), "computed_tokens": sum(s[0] * s[1] for s in timed)}


def _timed_pass_sampler(warmup: int, made: list):
    """A stand-in for LengthGroupedBatchSampler that adds the warm-up batches and keeps each instance made."""
    from bench.timed_pass import WarmupThenPassSampler

    def build(dataset, lengths, batch_size, seed, *a, **k):
        sampler = WarmupThenPassSampler(dataset, lengths, batch_size, seed, warmup, *a, **k)
        made.append(sampler)
        return sampler

    return build


def child_ours(args) -> dict:
    config, splits, tokenizer, model, threads = _child_prelude(args)
    import paddle
    import pipeline.loader as loader_module
    import pipeline.trainer as trainer_module
    from pipeline import dist

    marks, shapes, peak, samplers = [], [], {}, []
    pad_id = tokenizer.pad_token_id
    build_optimizer, token_logits = trainer_module.build_optimizer, trainer_module.token_logits
    build_features, data = loader_module.build_training_features, {}

    def counting_build_features(examples, aligner, labels):
        features, stats = build_features(examples, aligner, labels)
        data.update(sentences=len(examples), sequences=len(features), tokens=sum(len(f[0]) for f in features))
        return features, stats

    def timed_build_optimizer(cfg, mdl, total_steps):
        optimizer, schedule = build_optimizer(cfg, mdl, total_steps)
        step, last = schedule.step, len(samplers[-1])  # the loader (and its sampler) is built just before

        def timed_step(*a, **k):
            step(*a, **k)
            marks.append(time.perf_counter())  # fit() calls this right after optimizer.step() and clear_grad()
            if len(marks) >= last:  # before the epoch's end, where fit() would evaluate
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
    loader_module.LengthGroupedBatchSampler = _timed_pass_sampler(args.warmup, samplers)
    trainer = trainer_module.Trainer(config, model, tokenizer, splits)
    try:
        trainer.fit()
        raise RuntimeError(f"fit() ended after {len(marks)} steps, before the warm-up + pass the benchmark needs")
    except _StopAfterMeasurement:
        pass
    result = {"side": "ours", "rank": dist.get_rank(), "world_size": dist.get_world_size(), "threads": threads,
              "peak_rss_mib": peak["rss_mib"], "model": _model_dims(model), "data": data,
              **measure(marks, shapes, args.warmup)}
    if dist.get_world_size() > 1 and args.allreduce_reps > 0:
        import paddle.distributed as pdist

        def timed(call) -> list[float]:
            """Seconds of ``call`` after a barrier, each of --allreduce-reps times; the first call, which sets
            up buffers, is left out."""
            times = []
            for _ in range(args.allreduce_reps + 1):
                dist.barrier()
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            return times[1:]

        def gloo_all_reduce(values: int):
            grads = paddle.ones([values], dtype="float32")
            return lambda: (pdist.all_reduce(grads), float(grads[0]))

        result["allreduce_seconds"] = timed(gloo_all_reduce(result["model"]["parameters"]))
        sync = trainer.gradient_sync  # pipeline.shared_memory_sync, where the run used it
        if sync is not None:
            result["dense_gradient_values"] = sync.values
            result["dense_allreduce_seconds"] = {"gloo": timed(gloo_all_reduce(sync.values)),
                                                 "shared_memory": timed(sync.all_reduce)}
    dist.shutdown()
    return result


def paddlenlp_features(example, tokenizer, label2id: dict, max_seq_len: int, piece_counts: dict) -> dict:
    """One sentence as PaddleNLP's token-classification examples feed it: characters as "words"."""
    ignore = -100
    encoded = tokenizer(example.tokens, is_split_into_words=True, max_length=max_seq_len, truncation=True,
                        return_length=False)
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


def child_paddlenlp(args) -> dict:
    config, splits, tokenizer, model, threads = _child_prelude(args)
    import paddle
    from paddlenlp.data import DataCollatorForTokenClassification
    from paddlenlp.datasets import MapDataset
    from paddlenlp.trainer import Trainer, TrainerCallback, TrainingArguments

    from bench.timed_pass import WarmupThenPassSampler
    from pipeline import dist

    setup = args.child
    label2id = {label: i for i, label in enumerate(splits.labels)}
    piece_counts: dict[str, int] = {}
    dataset = MapDataset([paddlenlp_features(example, tokenizer, label2id, config.max_seq_len, piece_counts)
                          for example in splits.train])
    lengths = [len(f["input_ids"]) for f in dataset]
    data = {"sentences": len(splits.train), "sequences": len(dataset), "tokens": sum(lengths)}
    world = dist.get_world_size()
    # Built before the Trainer, with the paddle.distributed environment ours uses, so it shards the same way.
    sampler = (WarmupThenPassSampler(dataset, lengths, config.batch_size, config.seed, args.warmup)
               if setup != "paddlenlp" else None)
    # Default: as many steps as ours, over PaddleNLP's own random batches (its epoch is the same pass length).
    last = len(sampler) if sampler else args.warmup + -(-len(dataset) // (config.batch_size * world))
    marks, shapes, peak, notes = [], [], {}, []
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

        def _get_train_sampler(self):
            # What an informed user overrides to remove the padding: our batches, our seed.
            return sampler if sampler is not None else super()._get_train_sampler()

    options = dict(
        output_dir=str(Path(args.child_dir) / "paddlenlp_out"), device="cpu", do_train=True, do_eval=False,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear", optim="adamw", max_steps=last, seed=config.seed,
        evaluation_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, gradient_accumulation_steps=1, to_static=setup == "paddlenlp_static")
    try:
        training_args = TrainingArguments(**options)
    except AssertionError as refusal:
        if not options["to_static"]:
            raise
        # TrainingArguments refuses to_static with more than one worker (outside auto-parallel); apply
        # what Trainer.__init__ would (paddle.jit.to_static on the whole model) by hand, before DataParallel.
        reason = " ".join(str(refusal).split()).split(" : ")[0]  # "It's not supported for training in static mode..."
        notes.append(f"TrainingArguments(to_static=True) refused {world} workers (an assertion: {reason!r}, "
                     f"world_size must be 1 outside auto-parallel); the model was wrapped with paddle.jit.to_static "
                     f"by hand, as Trainer.__init__ does for one process")
        training_args = TrainingArguments(**{**options, "to_static": False})
        model = paddle.jit.to_static(model)
    dims = _model_dims(model)
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=dataset, tokenizer=tokenizer,
                               data_collator=DataCollatorForTokenClassification(tokenizer, label_pad_token_id=-100),
                               callbacks=[StepClock()])
    trainer.train()
    if len(marks) < last:
        raise RuntimeError(f"PaddleNLP's Trainer ran {len(marks)} steps, fewer than {last}")
    result = {"side": setup, "rank": dist.get_rank(), "world_size": world, "threads": threads,
              "peak_rss_mib": peak["rss_mib"], "model": dims, "data": data, "notes": notes,
              **measure(marks[:last], shapes[:last], args.warmup)}
    dist.shutdown()
    return result


def run_child(args) -> int:
    Path(args.child_dir).mkdir(parents=True, exist_ok=True)
    result = (child_ours if args.child == "ours" else child_paddlenlp)(args)
    out = Path(args.child_out.replace("{rank}", str(result.get("rank", 0))))
    out.write_text(json.dumps(result), encoding="utf-8")
    return 0


# ====================================================================== parent


def child_command(args, child: str, out: str, child_dir: str) -> list[str]:
    return [str(Path(__file__).resolve()), "--child", child, "--child-out", out, "--child-dir", child_dir,
            "--config", args.config, "--examples", str(args.examples), "--batch-size", str(args.batch_size),
            "--warmup", str(args.warmup), "--allreduce-reps", str(args.allreduce_reps), "--head", args.head,
            *[f"--set={override}" for override in args.set]]


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
        raise ChildFailed(f"{name} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    return wall, str(log)


class ChildFailed(RuntimeError):
    """A benchmark child exited with an error; the message ends with its log's tail."""


def combine_ranks(results: list[dict]) -> dict:
    """One job's figures from its ranks: tokens summed, time = slowest rank, RSS per rank."""
    real = sum(r["real_tokens"] for r in results)
    computed = sum(r["computed_tokens"] for r in results)
    seconds = max(r["seconds"] for r in results)
    steps = results[0]["steps"]
    combined = {"world_size": len(results), "real_tokens": real, "computed_tokens": computed, "seconds": seconds,
                "steps": steps, "tokens_per_second": real / seconds, "computed_tokens_per_second": computed / seconds,
                "padding": 1 - real / computed, "seconds_per_step": seconds / steps,
                "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in results], "threads": results[0]["threads"],
                "model": results[0]["model"], "data": results[0]["data"], "shapes": [r["shapes"] for r in results],
                "notes": sorted({note for r in results for note in r.get("notes", [])})}
    allreduce = [t for r in results for t in r.get("allreduce_seconds", [])]
    if allreduce:
        combined["allreduce_seconds"] = statistics.median(allreduce)
    for way in ("gloo", "shared_memory"):
        dense = [t for r in results for t in r.get("dense_allreduce_seconds", {}).get(way, [])]
        if dense:
            combined[f"dense_{way}_seconds"] = statistics.median(dense)
            combined["dense_gradient_values"] = results[0]["dense_gradient_values"]
    return combined


def run_side(args, side: str, repeat: int, workers: int = 0, label: str | None = None) -> dict:
    """One run of ``side``'s child; ``label`` (default: the side) names its logs and JSON."""
    name = f"r{repeat}_{label or side}" + (f"_x{workers}" if workers else "")
    out = str(Path(args.workdir) / f"{name}.rank{{rank}}.json")
    child_dir = str(Path(args.workdir) / name)
    wall, log = launch(args, name, child_command(args, side, out, child_dir), workers)
    results = [json.loads(Path(out.replace("{rank}", str(rank))).read_text()) for rank in range(max(workers, 1))]
    combined = combine_ranks(results)
    combined.update({"process_wall_seconds": wall, "log": log})
    print(f"  {name}: {combined['tokens_per_second']:.0f} real tok/s ({combined['computed_tokens_per_second']:.0f} "
          f"computed), {combined['steps']} steps of {combined['seconds_per_step']:.2f} s, padding "
          f"{100 * combined['padding']:.1f}%, peak RSS {combined['peak_rss_mib']:.0f} MiB (process {wall:.0f} s)",
          flush=True)
    if "dense_shared_memory_seconds" in combined:
        print(f"    all-reduce of its {combined['dense_gradient_values'] / 1e6:.1f}M dense gradients: gloo "
              f"{combined['dense_gloo_seconds']:.3f} s, shared memory {combined['dense_shared_memory_seconds']:.3f} s",
              flush=True)
    return combined


def batches_differ(reference: dict, other: dict) -> str | None:
    """Why two runs did not time the same batches (per rank: batch size, padded length, real tokens), or None."""
    a, b = reference["shapes"], other["shapes"]
    if len(a) != len(b):
        return f"{len(a)} ranks against {len(b)}"
    for rank, (steps_a, steps_b) in enumerate(zip(a, b)):
        if len(steps_a) != len(steps_b):
            return f"rank {rank}: {len(steps_a)} timed steps against {len(steps_b)}"
        for step, (x, y) in enumerate(zip(steps_a, steps_b), 1):
            if list(x) != list(y):
                return f"rank {rank}, timed step {step}: (batch, padded length, real tokens) {list(x)} against {list(y)}"
    return None


def side_summary(runs: list[dict]) -> dict:
    return {key: common.summary([r.get(key) for r in runs])
            for key in ("tokens_per_second", "computed_tokens_per_second", "seconds_per_step", "padding",
                        "peak_rss_mib", "allreduce_seconds", "dense_gloo_seconds", "dense_shared_memory_seconds",
                        "steps")}


def _median(summary: dict | None, key: str):
    return summary[key]["median"] if summary and summary.get(key) else None


def compare(sides: dict) -> dict:
    """Ratios of ours to each PaddleNLP setup, the strongest of them, and the gain split into padding and engine.

    ``sides``: name -> {"summary": side_summary}. The gain over PaddleNLP's defaults is a product:
    padding (PaddleNLP with our batches / PaddleNLP default), to_static (PaddleNLP + to_static / without),
    engine (ours / PaddleNLP with our batches and to_static, or without it where to_static failed). Each
    factor uses real tokens/s of runs that differ in that one thing only.
    """
    tps = {name: _median(side["summary"], "tokens_per_second") for name, side in sides.items()}
    ours = tps.get("ours")
    out = {"ours_over": {name: common.ratio(ours, value) for name, value in tps.items() if name != "ours"},
           "ours_over_computed": {
               name: common.ratio(_median(sides["ours"]["summary"], "computed_tokens_per_second"),
                                  _median(side["summary"], "computed_tokens_per_second"))
               for name, side in sides.items() if name != "ours"} if "ours" in sides else {}}
    candidates = {name: value for name, value in tps.items() if name.startswith("paddlenlp") and value}
    if candidates:
        strongest = max(candidates, key=candidates.get)
        out.update(strongest=strongest, ours_over_strongest=common.ratio(ours, candidates[strongest]))
    split = {"padding": common.ratio(tps.get("paddlenlp_grouped"), tps.get("paddlenlp")),
             "to_static": common.ratio(tps.get("paddlenlp_static"), tps.get("paddlenlp_grouped"))}
    # Against the last setup of the chain that ran, so that the factors multiply to the total exactly
    # (the strongest setup, if it is the eager one, is compared above).
    against = next((n for n in ("paddlenlp_static", "paddlenlp_grouped") if tps.get(n)), None)
    split["engine"] = common.ratio(ours, tps.get(against)) if against else None
    split["engine_against"] = against
    split["total"] = common.ratio(ours, tps.get("paddlenlp"))
    out["gain_split"] = split
    return out


def floor_figures(args, ours_runs: list[dict], info: dict) -> dict:
    """FLOPs of our timed steps, the fastest GEMM per kind at the median shape, floor vs measured s/step."""
    dims = ours_runs[0]["model"]
    shapes = [tuple(s) for run in ours_runs for rank_shapes in run["shapes"] for s in rank_shapes]
    batch = int(statistics.median(s[0] for s in shapes))
    seq = int(statistics.median(s[1] for s in shapes))
    print(f"  matmul floor: {len(gemm_floor.variants(_training_environment()))} GEMM libraries at {batch} x {seq} "
          f"tokens, each in its own process", flush=True)
    variants = gemm_floor.measure_all(dims, batch, seq, args.matmul_reps, Path(args.workdir) / "gemm",
                                      timeout=args.timeout)
    best = gemm_floor.fastest_rates(variants)
    rates = {kind: value["flops_per_s"] for kind, value in best.items()}
    per_run = []
    for run in ours_runs:
        flops = [gemm_floor.step_flops(dims, b, s) for b, s, _ in run["shapes"][0]]  # one worker: rank 0's steps
        per_run.append({"flops_per_step": statistics.mean(sum(f.values()) for f in flops),
                        "floor_seconds_per_step": statistics.mean(gemm_floor.floor_seconds(f, rates) for f in flops),
                        "measured_seconds_per_step": run["seconds_per_step"]})
    flops_step = statistics.median(p["flops_per_step"] for p in per_run)
    floor_step = statistics.median(p["floor_seconds_per_step"] for p in per_run)
    measured_step = statistics.median(p["measured_seconds_per_step"] for p in per_run)
    mix = gemm_floor.step_flops(dims, batch, seq)
    return {"median_batch": batch, "median_seq": seq, "processor": gemm_floor.isa_line(info),
            "variants": variants, "fastest": best, "variants_table": gemm_floor.variants_table(variants, mix),
            "mix_gflops_per_step_at_median_shape": {k: v / 1e9 for k, v in mix.items()},
            "flops_per_step": flops_step, "floor_seconds_per_step": floor_step,
            "measured_seconds_per_step": measured_step, "ratio": measured_step / floor_step, "target": FLOOR_TARGET,
            "achieved_gflops": flops_step / measured_step / 1e9}


def _training_environment() -> dict:
    from pipeline.cpu_env import apply_cpu_thread_settings

    env = dict(os.environ)
    apply_cpu_thread_settings(env)
    return env


def report(args, info: dict, results: dict) -> str:
    lines = []
    add = lines.append
    add("=" * 100)
    add("Training throughput benchmark: ours (pipeline.Trainer) vs paddlenlp.trainer.Trainer, m3e-small, MSRA-NER")
    add(f"date      {results['date']}")
    add(f"machine   {common.machine_line(info)}")
    add(f"processor {gemm_floor.isa_line(info)} (detected at run time)")
    add(f"load      {' '.join(f'{x:.2f}' for x in info['load_average'])} (1/5/15 min at start)"
        if info.get("load_average") else "load      n/a")
    add(f"command   {results['command']}")
    one = results["one_process"]
    ours_run = one["ours"]["runs"][0]
    add(f"settings  config {args.config}, head {args.head}; first {args.examples} training sentences; batch {args.batch_size} per "
        f"worker; {args.warmup} warm-up batches, then one whole pass ({ours_run['steps']} steps in one process); "
        f"{args.repeats} repeats")
    add(f"threads   {ours_run['threads']} (pipeline.cpu_env, applied in every child before Paddle is imported)")
    data = [f"{name}: {side['runs'][0]['data']['sequences']} sequences, {side['runs'][0]['data']['tokens']} tokens"
            for name, side in one.items() if name in ("ours", "paddlenlp", "paddlenlp_grouped")]
    add(f"data      {args.examples} sentences -> " + "; ".join(data) + " (incl. [CLS]/[SEP])")
    for title, block in (("1. One process each", one), ("2. Two workers each (paddle.distributed.launch, "
                                                         "1 thread per worker)", results.get("two_workers"))):
        if not block:
            continue
        add("")
        add(f"{title}, median (min..max) over repeats")
        add(_sides_table(block, results["comparison"][title[0]]))
        comparison = results["comparison"][title[0]]
        if comparison.get("strongest"):
            add(f"strongest PaddleNLP setup: {comparison['strongest']}; ours / strongest, real tokens/s: "
                f"{_fmt_ratio(comparison['ours_over_strongest'])} (target 1.5x)")
        add(_gain_split_line(comparison["gain_split"]))
        for note in sorted({n for side in block.values() for run in side["runs"] for n in run.get("notes", [])}):
            add(f"note: {note}")
        for name, reason in results.get("failed", {}).get(title[0], {}).items():
            add(f"FAILED {name}: {reason}")
    sc = results.get("scaling")
    if sc:
        add("")
        add(f"speed-up of ours, 2 workers vs 1 (median job real tokens/s): {_fmt_ratio(sc['speedup'])}")
        add(sc["explanation"])
    fl = results.get("floor")
    if fl:
        add("")
        add(f"3. Matmul floor (ours, one process; rates at the median batch {fl['median_batch']} x "
            f"{fl['median_seq']} tokens, each library in its own process with training's threads)")
        add(fl["variants_table"])
        add(f"FLOPs per step (mean of timed steps)      {fl['flops_per_step'] / 1e9:.2f} GFLOP")
        add(f"floor seconds/step (fastest per kind)    {fl['floor_seconds_per_step']:.3f}")
        add(f"measured seconds/step (ours, median)     {fl['measured_seconds_per_step']:.3f}")
        add(f"measured / floor                         {fl['ratio']:.2f}x (target: within {fl['target']}x) -> "
            f"{'within' if fl['ratio'] <= fl['target'] else 'NOT within'}; achieved {fl['achieved_gflops']:.1f} GFLOP/s")
    add("")
    add(f"raw logs and per-run JSON: {args.workdir}")
    if args.quick:
        add("NOTE: --quick values are for checking the script, not for measuring.")
    add("=" * 100)
    return "\n".join(lines)


def _gain_split_line(split: dict) -> str:
    """The gain as padding x to_static x engine, naming the runs each factor compares; the factors measured."""
    factors = [(f"padding {_fmt_ratio(split['padding'])} (paddlenlp_grouped / paddlenlp)", split["padding"]),
               (f"to_static {_fmt_ratio(split['to_static'])} (paddlenlp_static / paddlenlp_grouped)", split["to_static"]),
               (f"engine {_fmt_ratio(split['engine'])} (ours / {split['engine_against']})", split["engine"])]
    shown = " x ".join(text for text, value in factors if value is not None)
    if split["total"] is not None and all(value is not None for _, value in factors):
        return f"gain over PaddleNLP's defaults, real tokens/s, runs that differ in one thing each: {shown} = " \
               f"{_fmt_ratio(split['total'])}"
    return f"gain, real tokens/s, runs that differ in one thing each: {shown or 'no pair of runs to compare'}"


def _sides_table(block: dict, comparison: dict) -> str:
    rows = []
    for name, side in block.items():
        s = side["summary"]
        rows.append([name, common.fmt_mmm(s["tokens_per_second"], "{:.0f}"),
                     common.fmt_mmm(s["computed_tokens_per_second"], "{:.0f}"),
                     common.fmt_mmm(s["seconds_per_step"], "{:.3f}"), common.fmt_mmm(s["padding"], "{:.1f}%", 100),
                     common.fmt_mmm(s["peak_rss_mib"], "{:.0f}"),
                     "-" if name == "ours" else _fmt_ratio(comparison["ours_over"].get(name)),
                     "-" if name == "ours" else _fmt_ratio(comparison["ours_over_computed"].get(name))])
    table = common.table(rows, ["", "real tok/s", "computed tok/s", "s/step", "padding", "peak RSS MiB",
                                "ours/this real", "ours/this computed"])
    return table + "\n" + "\n".join(f"  {name}: {SIDES[name]}" for name in block)


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
    shared = two["dense_shared_memory_seconds"]["median"] if two.get("dense_shared_memory_seconds") else None
    if shared is not None:
        text += (f" Ours all-reduces only the used rows of the word-embedding table, and adds the other gradients in "
                 f"shared memory: {shared:.3f} s a step, where gloo took {two['dense_gloo_seconds']['median']:.3f} s "
                 f"for as many values.")
    text += (" If other processes compete for the cores, 2 workers take a larger share of them than 1 does, "
             "which inflates the speed-up: measure on a quiet machine.")
    return text


def parse_setups(text: str, option: str, parser) -> list[str]:
    """``default,grouped,static`` (or ``none``) -> side names, in SIDES' order."""
    names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PADDLENLP_SETUPS]
    if unknown:
        parser.error(f"{option}: unknown setup(s) {unknown}; choose from {', '.join(PADDLENLP_SETUPS)} or none")
    return [side for side in SIDES if side in {PADDLENLP_SETUPS[n] for n in names}]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config of ours (default {DEFAULT_CONFIG})")
    parser.add_argument("--head", choices=("linear", "crf"), default="linear",
                        help="our token-classification head (default linear: the head of PaddleNLP's "
                             "*ForTokenClassification, which its side trains; the config's own head is ignored)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for ours, e.g. --set embedding_grad_rows=false (repeatable)")
    parser.add_argument("--examples", type=int, default=2000,
                        help="first N MSRA-NER training sentences; one whole pass over them is timed (2000)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per worker per step (16)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up batches per run before the pass, untimed (5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (3)")
    parser.add_argument("--paddlenlp", default="default,grouped,static",
                        help="PaddleNLP setups, one process: default (its random sampler), grouped (our batches), "
                             "static (our batches + to_static), or none (default: all three)")
    parser.add_argument("--paddlenlp-x2", default="static",
                        help="PaddleNLP setups also run with 2 workers, same choices (default: static)")
    parser.add_argument("--matmul-reps", type=int, default=10, help="timed repetitions per matmul shape (10)")
    parser.add_argument("--allreduce-reps", type=int, default=5, help="timed gradient-sized all-reduces (5)")
    parser.add_argument("--no-paddlenlp", action="store_true", help="skip every PaddleNLP setup (= --paddlenlp none "
                                                                    "--paddlenlp-x2 none)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 2-worker runs")
    parser.add_argument("--no-floor", action="store_true", help="skip the matmul floor")
    parser.add_argument("--quick", action="store_true",
                        help="tiny values to check the script: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--workdir", help="where child logs and JSON go (default: a new temporary directory)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per child process (3600)")
    # Internal: how the parent starts a child.
    parser.add_argument("--child", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1 (timing starts at the end of a warm-up step)")
    if args.examples < 1 or args.batch_size < 1:
        parser.error("--examples and --batch-size must be >= 1")
    args.paddlenlp_setups = [] if args.no_paddlenlp else parse_setups(args.paddlenlp, "--paddlenlp", parser)
    args.paddlenlp_x2_setups = ([] if args.no_paddlenlp or args.no_scaling
                                else parse_setups(args.paddlenlp_x2, "--paddlenlp-x2", parser))
    if "paddlenlp" in args.paddlenlp_x2_setups:
        parser.error("--paddlenlp-x2: the default setup runs in one process only (its own sampler, no batches "
                     "to compare with ours)")
    return args


def run_all(args, repeat_sides: list[tuple[str, int]]) -> tuple[dict, dict]:
    """Every (side, workers) once per repeat, the order rotated each repeat; runs and failures by block."""
    runs = {(side, workers): [] for side, workers in repeat_sides}
    failed: dict[str, dict] = {"1": {}, "2": {}}
    for repeat in range(1, args.repeats + 1):
        shift = (repeat - 1) % len(repeat_sides)
        for side, workers in repeat_sides[shift:] + repeat_sides[:shift]:
            block = "2" if workers else "1"
            if side in failed[block]:
                continue
            try:
                run = run_side(args, side, repeat, workers)
            except ChildFailed as error:
                if side != "paddlenlp_static":
                    raise
                # The fallback the issue asks for: record why, and the eager setup with our batches stays.
                failed[block][side] = str(error).splitlines()[0] + " -- " + _last_error_line(str(error))
                print(f"  {side}: FAILED, left out of later repeats: {failed[block][side]}", flush=True)
                continue
            ours = runs.get(("ours", workers)) or []
            if side in OUR_BATCHES and side != "ours" and ours:
                reason = batches_differ(ours[0], run)
                if reason:
                    raise SystemExit(f"{side} did not time the batches ours did ({reason}): are some sentences "
                                     f"longer than max_seq_len (ours splits them into windows, PaddleNLP truncates)?")
            runs[(side, workers)].append(run)
    return runs, failed


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "Error" in line or "error" in line]
    return lines[-1][:300] if lines else "see the log"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="train_throughput-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    results = {"date": common.now_utc(), "command": common.command_line(), "machine": info,
               "settings": {k: getattr(args, k) for k in ("config", "head", "set", "examples", "batch_size", "warmup", "repeats",
                                                          "paddlenlp_setups", "paddlenlp_x2_setups", "matmul_reps",
                                                          "allreduce_reps", "quick")}}
    print(f"machine: {common.machine_line(info)}\nprocessor: {gemm_floor.isa_line(info)}\nlogs: {args.workdir}",
          flush=True)
    # Ours first in each block: the other sides with our batches are checked against its batches.
    plan = [("ours", 0)] + [(side, 0) for side in args.paddlenlp_setups]
    if not args.no_scaling:
        plan += [("ours", 2)] + [(side, 2) for side in args.paddlenlp_x2_setups]
    runs, failed = run_all(args, plan)
    blocks = {"1": {}, "2": {}}
    for (side, workers), side_runs in runs.items():
        if side_runs:
            blocks["2" if workers else "1"][side] = {"runs": side_runs, "summary": side_summary(side_runs)}
    results["one_process"] = blocks["1"]
    results["comparison"] = {"1": compare(blocks["1"])}
    results["failed"] = failed
    if blocks["2"]:
        results["two_workers"] = blocks["2"]
        results["comparison"]["2"] = compare(blocks["2"])
        ours_one, ours_two = blocks["1"]["ours"]["summary"], blocks["2"]["ours"]["summary"]
        one = dict(ours_one, model_params=blocks["1"]["ours"]["runs"][0]["model"]["parameters"])
        results["scaling"] = {"speedup": common.ratio(_median(ours_two, "tokens_per_second"),
                                                      _median(ours_one, "tokens_per_second")),
                              "explanation": scaling_explanation(one, ours_two)}
    if not args.no_floor:
        results["floor"] = floor_figures(args, blocks["1"]["ours"]["runs"], info)
    text = report(args, info, results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
