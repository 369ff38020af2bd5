"""The benchmarks' own arithmetic (memory-trend verdict, prediction ceiling), memory_trend's process
sampling; op_costs and step_profile run as `python -m bench.X`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bench import memory_trend, predict_throughput
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


def test_op_costs_times_every_kernel_including_both_linears():
    import re

    out = subprocess.run([sys.executable, "-m", "bench.op_costs", "--batch", "2", "--seq", "3", "--hidden", "8",
                          "--intermediate", "16", "--heads", "2", "--reps", "1"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    timed = dict((name, float(ms)) for ms, name in re.findall(r"^\s*([\d.]+) ms  (.+)$", out, re.MULTILINE))
    assert len(timed) == 12 and all(ms >= 0 for ms in timed.values()), out
    assert "Linear (FFN in), forward + backward, Paddle's" in timed
    assert any("bias gradient as a matmul" in name for name in timed)


def test_step_profile_prints_the_operators_of_a_training_step(tiny_model_dir, tmp_path):
    # Run outside the checkout (whatever the profiler leaves in the cwd), finding bench through PYTHONPATH.
    out = subprocess.run([sys.executable, "-m", "bench.step_profile", "--model", str(tiny_model_dir), "--batch", "2",
                          "--seq", "5", "--steps", "1"], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "matmul bias gradients in 14 Linear layers" in out  # 2 layers x 6, the pooler, the classifier
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
