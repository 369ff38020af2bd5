"""The benchmarks' own arithmetic (memory-trend verdict, prediction ceiling, training's gain split and
matmul floor), memory_trend's process sampling, the timed pass's batches (and both training benchmark
children on the tiny model), the GEMM libraries' child processes; op_costs and step_profile run as
`python -m bench.X`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import memory_trend, predict_launch, predict_throughput
from helpers import ROOT


def samples(rss_of_step, steps=800, every=10, workers=1):
    return [{"worker": w, "step": s, "rss_mib": rss_of_step(s)} for s in range(every, steps + 1, every)
            for w in range(workers)]


def test_a_flat_run_after_warm_up_is_flat_and_a_leak_is_not():
    # Warm-up growth in the first half (allocator pools, first evaluation) does not count.
    flat = memory_trend.summarise(samples(lambda s: 1500 + min(s, 200) + (s % 30) * 0.5, workers=2), 800, 0.03)
    assert [s["flat"] for s in flat] == [True, True]
    assert abs(flat[0]["second_half_slope_mib_per_100_steps"]) < 1
    # 10 MiB per 100 steps: 80 MiB over 800 steps, 5% of ~1,600 MiB.
    leak = memory_trend.summarise(samples(lambda s: 1500 + 0.1 * s), 800, 0.03)
    assert leak[0]["flat"] is False
    assert leak[0]["second_half_slope_mib_per_100_steps"] == pytest.approx(10.0)
    # RSS "at step 800" is the median of the samples within 40 steps of it (steps 760-800 here).
    assert leak[0]["rss_by_step"]["step_800"] == pytest.approx(1500 + 0.1 * 780)


def test_slope_needs_several_steps():
    assert memory_trend.slope_per_100_steps([(5, 1.0), (5, 2.0), (5, 3.0)]) is None
    assert memory_trend.slope_per_100_steps([(0, 1.0), (100, 3.0), (200, 5.0)]) == pytest.approx(2.0)


def test_forward_flops_count_every_matmul_of_a_bert_layer():
    dims = {"layers": 1, "hidden": 4, "heads": 2, "intermediate": 8, "classes": 3}
    n = 5
    projections = 4 * 2 * n * 4 * 4          # Q, K, V and output: [n, 4] @ [4, 4]
    ffn = 2 * n * 4 * 8 + 2 * n * 8 * 4       # [n, 4] @ [4, 8] and back
    attention = 2 * (2 * 2 * n * 2 * n)        # scores and context, 2 heads of size 2
    classifier = 2 * n * 4 * 3
    assert predict_throughput.forward_flops(dims, n) == projections + ffn + attention + classifier


def test_workers_are_found_under_the_launcher_and_their_rss_read():
    # A stand-in launcher, its command line naming both (as `python -m paddle.distributed.launch ...
    # train_dist.py` does), with one worker whose command line names train_dist.py.
    worker = [sys.executable, "-c", "import time; time.sleep(60)", "train_dist.py"]
    launcher = subprocess.Popen([sys.executable, "-c", f"import subprocess; subprocess.run({worker!r})",
                                 "paddle.distributed.launch", "train_dist.py"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not memory_trend.training_workers(launcher.pid):
            assert time.monotonic() < deadline, "the child never showed up"
            time.sleep(0.05)
        workers = memory_trend.training_workers(launcher.pid)
        assert len(workers) == 1 and workers[0] != launcher.pid
        assert memory_trend.rss_mib(workers[0]) > 1
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    assert memory_trend.training_workers(launcher.pid) == []
    assert memory_trend.rss_mib(launcher.pid) is None  # gone (and reaped)


def test_a_workers_forked_child_is_not_counted_as_another_worker():
    # The worker forks a child that keeps the worker's command line (what a subprocess looks like
    # between fork and exec): that child is not a second worker.
    import psutil

    from bench.common import script_processes

    code = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nelse:\n    time.sleep(60)"
    worker = subprocess.Popen([sys.executable, "-c", code, "predict.py"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(worker.pid).children():
            assert time.monotonic() < deadline, "the forked child never showed up"
            time.sleep(0.05)
        assert script_processes(worker.pid, "predict.py") == [worker.pid]
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_op_costs_times_every_kernel_including_both_linears_and_both_layer_norms():
    import re

    out = subprocess.run([sys.executable, "-m", "bench.op_costs", "--batch", "2", "--seq", "3", "--hidden", "8",
                          "--intermediate", "16", "--heads", "2", "--reps", "1"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    timed = dict((name, float(ms)) for ms, name in re.findall(r"^\s*([\d.]+) ms  (.+)$", out, re.MULTILINE))
    assert len(timed) == 14 and all(ms >= 0 for ms in timed.values()), out
    assert "Linear (FFN in), forward + backward, Paddle's" in timed
    assert any("bias gradient as a matmul" in name for name in timed)
    assert "layer norm, forward + backward, Paddle's" in timed
    assert any("our C++ operator" in name for name in timed)


def test_step_profile_prints_the_operators_of_a_training_step(tiny_model_dir, tmp_path):
    # Run outside the checkout (whatever the profiler leaves in the cwd), finding bench through PYTHONPATH.
    out = subprocess.run([sys.executable, "-m", "bench.step_profile", "--model", str(tiny_model_dir), "--batch", "2",
                          "--seq", "5", "--steps", "1"], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "matmul bias gradients in 14 Linear layers" in out  # 2 layers x 6, the pooler, the classifier
    assert "dropout masks in 8 Dropout layers and the attention; our C++ layer norm in 5 LayerNorm layers" in out
    summary = out[out.index("Operator Summary"):]
    assert "Global_MatmulGradNode" in summary or "matmul_grad" in summary, summary[:2000]



def test_prediction_bench_scores_and_counts_label_differences(tmp_path):
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    from helpers import write_synthetic_splits

    test_file = write_synthetic_splits(tmp_path, {"test": 20}, seed=3) / "test.tsv"
    texts, gold = predict_throughput.read_test_texts(test_file), predict_throughput.read_test_labels(test_file)
    assert len(texts) == len(gold) == 20 and all(len(t) == len(g) for t, g in zip(texts, gold))
    with_entities = [i for i, labels in enumerate(gold) if any(label != "O" for label in labels)]
    predicted = [list(labels) for labels in gold]
    predicted[with_entities[0]] = ["O"] * len(gold[with_entities[0]])  # every entity of one sentence lost
    scores = predict_throughput.f1_scores(gold, predicted)
    assert scores["f1"] == pytest.approx(f1_score(gold, predicted)) and scores["f1"] < 1
    assert scores["strict_f1"] == pytest.approx(f1_score(gold, predicted, mode="strict", scheme=IOB2))
    changed = sum(label != "O" for label in gold[with_entities[0]])
    assert predict_throughput.differing_labels(gold, predicted) == {
        "sentences": 1, "characters": changed, "of_characters": sum(map(len, gold))}


@pytest.mark.slow
def test_prediction_launch_bench_runs_one_process_and_two_ranks_and_compares_their_outputs(
        tiny_checkpoint_dir, tmp_path):
    from helpers import write_synthetic_splits

    test_file = write_synthetic_splits(tmp_path, {"test": 30}, seed=4) / "test.tsv"
    figures = tmp_path / "launch.json"
    done = subprocess.run([sys.executable, "-m", "bench.predict_launch", "--checkpoint", str(tiny_checkpoint_dir),
                           "--test_file", str(test_file), "--lines", "40,80", "--repeats", "2",
                           "--modes", "single,launch2", "--json", str(figures)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "launch2 / single:" in done.stdout and "outputs differing from one process's: 0" in done.stdout
    report = json.loads(figures.read_text(encoding="utf-8"))
    for size in ("40", "80"):
        # Two repeats: the second launch of each size reads its own rank-0 log, not one appended to the first's.
        runs = report["results"][size]["single"] + report["results"][size]["launch2"]
        assert [r["mode"] for r in runs] == ["single", "single", "launch2", "launch2"]
        assert all(r["sentences"] == int(size) for r in runs)  # 40 lines cycle the 30 sentences
        assert [len(r["peak_rss_mib_per_process"]) for r in runs] == [1, 1, 2, 2]
        assert min(rss for r in runs for rss in r["peak_rss_mib_per_process"]) > 50
        assert len({r["output_sha256"] for r in runs}) == 1
    assert report["differing_outputs"] == 0


def test_prediction_launch_bench_counts_an_output_that_differs(monkeypatch, tmp_path):
    from helpers import write_synthetic_splits

    test_file = write_synthetic_splits(tmp_path, {"test": 5}, seed=4) / "test.tsv"

    def fake_run(mode, checkpoint, source, work):
        output = work / f"{mode}.jsonl"
        output.write_bytes(b"same\n" if mode != "launch2" else b"other\n")
        return {"mode": mode, "wall_seconds": 1.0, "sentences": 5, "predict_seconds": 0.5,
                "sentences_per_second": 10.0, "peak_rss_mib_per_process": [100.0], "output": str(output)}

    monkeypatch.setattr(predict_launch, "run", fake_run)
    args = predict_launch.parse_args(["--test_file", str(test_file), "--repeats", "2"])
    results, differing = predict_launch.measure(args, [5])
    assert differing == 2  # both launch2 runs, neither single nor launch1
    assert "outputs differing from one process's: 2" in predict_launch.report(results, differing)


# ---------------------------------------------------------------- train_throughput: batches, comparison, floor


def test_the_timed_pass_is_the_training_epoch_after_warm_up_batches_from_the_next_one():
    from bench.timed_pass import WarmupThenPassSampler
    from pipeline.sampling import LengthGroupedBatchSampler

    lengths = [3 + (7 * i) % 29 for i in range(50)]
    dataset = list(range(50))
    timed = WarmupThenPassSampler(dataset, lengths, batch_size=4, seed=5, warmup_batches=3, bucket_batches=2)
    plain = LengthGroupedBatchSampler(dataset, lengths, batch_size=4, seed=5, bucket_batches=2)
    batches = list(timed)
    assert len(batches) == len(timed) == 3 + 13 and timed.pass_batches() == len(plain) == 13
    assert batches[3:] == list(plain)  # the pass: training's own epoch 0, same grouping and seed
    plain.set_epoch(1)
    assert batches[:3] == list(plain)[:3]  # warm-up: the next epoch's first batches, not the timed pass's
    covered = sorted(i for batch in batches[3:] for i in batch)
    assert set(covered) == set(range(50)) and len(covered) == 52  # every sentence once, 2 repeated to fill


def _child_result(shapes, seconds=2.0, rss=100.0, notes=()):
    return {"real_tokens": sum(s[2] for s in shapes), "computed_tokens": sum(s[0] * s[1] for s in shapes),
            "seconds": seconds, "steps": len(shapes), "peak_rss_mib": rss, "threads": {"OMP_NUM_THREADS": "2"},
            "model": {"parameters": 10}, "data": {"sequences": 8, "tokens": 60}, "shapes": shapes,
            "notes": list(notes)}


def test_runs_on_other_batches_are_told_apart():
    from bench import train_throughput as tt

    ours = tt.combine_ranks([_child_result([[4, 10, 38], [4, 6, 22]])])
    assert tt.batches_differ(ours, tt.combine_ranks([_child_result([[4, 10, 38], [4, 6, 22]], seconds=5)])) is None
    reason = tt.batches_differ(ours, tt.combine_ranks([_child_result([[4, 10, 38], [4, 7, 22]])]))
    assert reason and "timed step 2" in reason
    assert "ranks" in tt.batches_differ(ours, tt.combine_ranks([_child_result([[4, 10, 38]])] * 2))


def test_the_gain_splits_into_padding_to_static_and_engine_and_names_the_strongest_setup(tmp_path):
    from bench import train_throughput as tt

    grouped = [[4, 10, 40], [4, 5, 20]]  # 60 real of 60 computed tokens
    random_batches = [[4, 10, 30], [4, 10, 30]]  # 60 real of 80 computed
    runs = {"ours": _child_result(grouped, seconds=1.0), "paddlenlp": _child_result(random_batches, seconds=6.0),
            "paddlenlp_grouped": _child_result(grouped, seconds=3.0),
            "paddlenlp_static": _child_result(grouped, seconds=2.0, notes=["wrapped by hand"])}
    block = {name: {"runs": [tt.combine_ranks([r])], "summary": tt.side_summary([tt.combine_ranks([r])])}
             for name, r in runs.items()}
    comparison = tt.compare(block)
    assert comparison["strongest"] == "paddlenlp_static"
    assert comparison["ours_over_strongest"] == pytest.approx(2.0)
    split = comparison["gain_split"]
    assert (split["padding"], split["to_static"], split["engine"]) == pytest.approx((2.0, 1.5, 2.0))
    assert split["padding"] * split["to_static"] * split["engine"] == pytest.approx(split["total"]) == 6.0
    assert comparison["ours_over_computed"]["paddlenlp"] == pytest.approx((60 / 1.0) / (80 / 6.0))
    # to_static slower than eager: the eager setup is the strongest, and the factors still multiply to the total.
    slow_static = dict(block, paddlenlp_static={"summary": tt.side_summary([tt.combine_ranks(
        [_child_result(grouped, seconds=4.0)])])})
    other = tt.compare(slow_static)
    assert other["strongest"] == "paddlenlp_grouped" and other["ours_over_strongest"] == pytest.approx(3.0)
    factors = other["gain_split"]
    assert factors["padding"] * factors["to_static"] * factors["engine"] == pytest.approx(6.0)
    # The report prints both token rates, the ratios and the split.
    args = tt.parse_args(["--no-scaling", "--no-floor", "--repeats", "1", "--workdir", str(tmp_path)])
    results = {"date": "d", "command": "c", "one_process": block, "comparison": {"1": comparison}, "failed": {}}
    text = tt.report(args, {"cpu": "cpu", "cores": 2, "python": "3", "paddle": "p", "paddlenlp": "n"}, results)
    assert "ours / strongest, real tokens/s: 2.00x" in text and "note: wrapped by hand" in text
    assert "padding 2.00x (paddlenlp_grouped / paddlenlp) x to_static 1.50x" in text
    assert "engine 2.00x (ours / paddlenlp_static) = 6.00x" in text
    assert "computed tok/s" in text and "13" in text  # PaddleNLP default: 80 computed tokens in 6 s


def test_paddlenlp_setups_are_checked_before_any_run():
    from bench import train_throughput as tt

    assert tt.parse_args([]).paddlenlp_setups == ["paddlenlp", "paddlenlp_grouped", "paddlenlp_static"]
    assert tt.parse_args(["--paddlenlp", "static,default"]).paddlenlp_setups == ["paddlenlp", "paddlenlp_static"]
    assert tt.parse_args(["--no-paddlenlp"]).paddlenlp_x2_setups == []
    for bad in (["--paddlenlp", "fast"], ["--paddlenlp-x2", "default"]):
        with pytest.raises(SystemExit):
            tt.parse_args(bad)


def test_ours_trains_paddlenlps_linear_head_unless_told_otherwise(tmp_path):
    # The quick preset trains the CRF; PaddleNLP's side trains *ForTokenClassification's linear head.
    from bench import train_throughput as tt

    for argv, head in (([], "linear"), (["--head", "crf"], "crf")):
        args = tt.parse_args(["--child-dir", str(tmp_path)] + argv)
        assert tt._load_config(args).head == head
        command = tt.child_command(args, "ours", "out.json", str(tmp_path))
        assert command[command.index("--head") + 1] == head


def test_config_overrides_reach_our_child(tmp_path):
    from bench import train_throughput as tt

    args = tt.parse_args(["--child-dir", str(tmp_path), "--set", "embedding_grad_rows=false", "--set=seed=7"])
    config = tt._load_config(args)
    assert config.embedding_grad_rows is False and config.seed == 7
    child = tt.parse_args(tt.child_command(args, "ours", "out.json", str(tmp_path))[1:])
    assert child.set == ["embedding_grad_rows=false", "seed=7"]


@pytest.mark.slow
def test_config_ab_times_both_sides_on_the_same_batches(tiny_model_dir, tiny_dataset_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndataset: {tiny_dataset_dir}\nmax_seq_len: 32\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "bench.config_ab", "--config", str(config), "--examples", "40",
                           "--warmup", "1", "--repeats", "1", "--b", "matmul_bias_grad=false",
                           "--json", str(tmp_path / "ab.json")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "ab.json").read_text())
    assert result["b"] == ["matmul_bias_grad=false"] and result["a"] == []
    assert [len(result["runs"][side]) for side in "AB"] == [1, 1]
    assert result["runs"]["A"][0]["real_tokens"] == result["runs"]["B"][0]["real_tokens"] > 0
    assert "B / A:" in done.stdout


def test_gemm_libraries_follow_the_instruction_set_detected():
    from bench import gemm_floor

    amd_avx2 = gemm_floor.variants({"MKL_DEBUG_CPU_TYPE": "5"}, isa="avx2")
    assert set(amd_avx2) == {"paddle_mkl", "paddle_mkl_own_path", "paddle_onednn", "numpy_openblas"}
    amd_avx512 = gemm_floor.variants({"MKL_DEBUG_CPU_TYPE": "7"}, isa="avx512")
    assert {"paddle_mkl_avx2", "paddle_mkl_xeon_phi", "numpy_openblas_avx512"} <= set(amd_avx512)
    assert "paddle_mkl_avx512" not in amd_avx512  # training's own path, timed as "paddle_mkl"
    assert gemm_floor.variant_environment("paddle_mkl_xeon_phi", {"MKL_DEBUG_CPU_TYPE": "7"}) == {
        "MKL_DEBUG_CPU_TYPE": "6"}
    intel = gemm_floor.variants({}, isa="avx512")  # MKL's own choice already: no "unset" variant to add
    assert "paddle_mkl_own_path" not in intel and "paddle_mkl_avx2" in intel
    env = gemm_floor.variant_environment("numpy_openblas", {"OMP_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell",
                                                            "OPENBLAS_L2_SIZE": "1"})
    assert "OPENBLAS_CORETYPE" not in env and "OPENBLAS_L2_SIZE" not in env and env["OPENBLAS_NUM_THREADS"] == "2"
    assert "MKL_DEBUG_CPU_TYPE" not in gemm_floor.variant_environment("paddle_mkl_own_path",
                                                                      {"MKL_DEBUG_CPU_TYPE": "5"})


def test_the_floor_takes_the_fastest_library_for_each_kind_and_skips_one_that_failed():
    from bench import gemm_floor

    results = {"a": {"ok": True, "rates_flops_per_s": {"ffn_in": 2e9, "attn_ss_sd": 1e9}},
               "b": {"ok": True, "rates_flops_per_s": {"ffn_in": 1e9, "attn_ss_sd": 4e9}},
               "c": {"ok": False, "error": "exit -4: Illegal instruction"}}
    best = gemm_floor.fastest_rates(results)
    assert best == {"ffn_in": {"flops_per_s": 2e9, "variant": "a"}, "attn_ss_sd": {"flops_per_s": 4e9, "variant": "b"}}
    assert gemm_floor.floor_seconds({"ffn_in": 4e9, "attn_ss_sd": 4e9}, {"ffn_in": 2e9, "attn_ss_sd": 4e9}) == 3.0
    with pytest.raises(RuntimeError, match="Illegal instruction"):
        gemm_floor.fastest_rates({"c": results["c"]})


def test_step_flops_are_three_times_the_forward_matmuls():
    from bench import gemm_floor

    dims = {"layers": 1, "hidden": 4, "heads": 2, "intermediate": 8, "classes": 3}
    flops = gemm_floor.step_flops(dims, batch=1, seq=5)
    assert flops["ffn_in"] == 3 * 2 * 5 * 4 * 8 and flops["classifier"] == 3 * 2 * 5 * 4 * 3
    assert flops["attn_sd_ds"] + flops["attn_ss_sd"] == 3 * predict_throughput.forward_flops(dims, 5) - 3 * (
        4 * 2 * 5 * 4 * 4 + 2 * 2 * 5 * 4 * 8 + 2 * 5 * 4 * 3)


def test_openblas_is_timed_in_its_own_process_without_the_site_core_type(tmp_path):
    from bench import gemm_floor

    dims = {"layers": 1, "hidden": 8, "heads": 2, "intermediate": 16, "classes": 3}
    os.environ["OPENBLAS_CORETYPE"] = "Prescott"  # a slow kernel set a site profile might force
    try:
        results = gemm_floor.measure_all(dims, batch=2, seq=4, reps=1, workdir=tmp_path, names=["numpy_openblas"])
    finally:
        del os.environ["OPENBLAS_CORETYPE"]
    result = results["numpy_openblas"]
    assert result["ok"], result
    assert result["library_variables"]["OPENBLAS_CORETYPE"] is None
    assert result["library_variables"]["OPENBLAS_NUM_THREADS"] == result["threads"]["OMP_NUM_THREADS"]
    assert set(result["rates_flops_per_s"]) == set(gemm_floor.step_flops(dims, 2, 4))
    assert all(rate > 0 for rate in result["rates_flops_per_s"].values())


def test_mkls_own_path_is_timed_without_any_mkl_path_variable(tmp_path, monkeypatch):
    """The child applies cpu_env's settings, which on AMD name MKL's AVX2 path whenever none is set: the 'own
    path' child must still run with the variable unset (it once timed the AVX2 path a second time). The child's
    side runs here, in this process, on a processor made to read as AMD."""
    from bench import gemm_floor
    from pipeline import cpu_env

    dims = {"layers": 1, "hidden": 8, "heads": 2, "intermediate": 16, "classes": 3}
    monkeypatch.setattr(cpu_env, "_cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu_env, "cpu_flags", lambda: frozenset(cpu_env.AVX2_FLAGS))
    saved = dict(os.environ)
    try:
        for name in ("paddle_mkl", "paddle_mkl_own_path"):
            # As the parent hands each child its environment (variant_environment drops the variable for own_path).
            os.environ.clear()
            os.environ.update(gemm_floor.variant_environment(name, {**saved, "MKL_DEBUG_CPU_TYPE": "5"}))
            out = tmp_path / f"{name}.json"
            assert gemm_floor.main(["--variant", name, "--dims", json.dumps(dims), "--batch", "2", "--seq", "4",
                                    "--reps", "1", "--out", str(out), "--workdir", str(tmp_path / name)]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    timed_with = {name: json.loads((tmp_path / f"{name}.json").read_text())["library_variables"]["MKL_DEBUG_CPU_TYPE"]
                  for name in ("paddle_mkl", "paddle_mkl_own_path")}
    assert timed_with == {"paddle_mkl": "5", "paddle_mkl_own_path": None}


@pytest.mark.slow
def test_ours_and_paddlenlp_with_our_batches_time_the_same_sentences_in_the_same_batches(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    # The real children of bench.train_throughput on the tiny model: a warm-up batch, then one whole pass.
    import json

    from bench import train_throughput as tt

    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndataset: {tiny_dataset_dir}\nmax_seq_len: 32\n", encoding="utf-8")
    runs = {}
    for side in ("ours", "paddlenlp_static"):
        out = tmp_path / f"{side}.rank{{rank}}.json"
        subprocess.run([sys.executable, "-m", "bench.train_throughput", "--child", side, "--child-out", str(out),
                        "--child-dir", str(tmp_path / side), "--config", str(config), "--examples", "40",
                        "--batch-size", "8", "--warmup", "1"], cwd=ROOT, check=True, capture_output=True)
        runs[side] = tt.combine_ranks([json.loads((tmp_path / f"{side}.rank0.json").read_text())])
    ours, static = runs["ours"], runs["paddlenlp_static"]
    assert ours["steps"] == 5 and ours["data"]["sequences"] == 40  # 40 sentences / 8 a batch: the whole pass
    assert tt.batches_differ(ours, static) is None
    assert ours["real_tokens"] == static["real_tokens"] == ours["data"]["tokens"] == static["data"]["tokens"]
    assert static["notes"] == []  # one process: TrainingArguments(to_static=True) itself, no hand-made wrap


def test_every_gemm_variant_chosen_is_one_the_child_knows():
    from bench import gemm_floor

    for isa in ("avx512", "avx2", "older"):
        for environ in ({}, {"MKL_DEBUG_CPU_TYPE": "5"}, {"MKL_DEBUG_CPU_TYPE": "6"},
                        {"MKL_DEBUG_CPU_TYPE": "7"}):
            assert set(gemm_floor.variants(environ, isa=isa)) <= set(gemm_floor.VARIANT_NAMES)
