"""The real entry points: plain `python train_dist.py`, then two CPU workers under
`paddle.distributed.launch`, then `predict.py` on the checkpoint they saved."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, assert_test_metrics_match_seqeval, clean_env, overrides
from pipeline.readers import read_examples
from pipeline.labels import bio_spans

TIMEOUT = 600


def gold_entity_count(path: Path) -> int:
    examples, _ = read_examples(path)
    return sum(len(bio_spans(e.labels)) for e in examples)


def run(command, log_hint: Path | None = None):
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        logs = ""
        if log_hint is not None and log_hint.is_dir():
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_hint.glob("workerlog.*")))
        pytest.fail(f"{command} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                    f"stderr:\n{result.stderr[-3000:]}\n{logs}")
    return result


def assert_complete_run(out_dir: Path, data_dir: Path, evaluations: int):
    best = out_dir / "best_model"
    for name in ("model.pdparams", "config.json", "vocab.txt", "pipeline.json", "train_config.yaml", "metrics.json"):
        assert (best / name).is_file(), f"best_model/{name} missing"
    metrics = json.loads((best / "metrics.json").read_text())
    # Every dev and test entity is counted exactly once, however many ranks shared the work.
    assert metrics["dev"]["num_gold"] == gold_entity_count(data_dir / "dev.tsv")
    assert metrics["test"]["num_gold"] == gold_entity_count(data_dir / "test.tsv")
    assert json.loads((out_dir / "test_metrics.json").read_text())["test"] == metrics["test"]
    history = [json.loads(line) for line in (out_dir / "dev_metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == [2 * (i + 1) for i in range(evaluations)]
    assert list((out_dir / "vdl").iterdir()), "no VisualDL log written"
    import paddle

    state = paddle.load(str(best / "model.pdparams"))
    assert any(name.endswith("classifier.weight") for name in state)
    return metrics


@pytest.mark.slow
def test_single_process_training(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out_dir = tmp_path / "single"
    result = run([sys.executable, "train_dist.py", *overrides(tiny_model_dir, tiny_dataset_dir, out_dir)])
    assert_complete_run(out_dir, tiny_dataset_dir, evaluations=2)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 4


@pytest.mark.slow
def test_two_worker_launch_then_predict(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out_dir, log_dir = tmp_path / "dist", tmp_path / "logs"
    run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
         "train_dist.py", *overrides(tiny_model_dir, tiny_dataset_dir, out_dir)], log_hint=log_dir)
    assert_complete_run(out_dir, tiny_dataset_dir, evaluations=2)
    assert_test_metrics_match_seqeval(out_dir, tiny_dataset_dir / "test.tsv")
    worker_logs = {p.name: p.read_text() for p in log_dir.glob("workerlog.*")}
    assert set(worker_logs) == {"workerlog.0", "workerlog.1"}
    assert "[rank 0]" in worker_logs["workerlog.0"] and "test (best model)" in worker_logs["workerlog.0"]
    # Only rank 0 wrote: rank 1's log holds no 'saved to' line.
    assert "saved to" not in worker_logs["workerlog.1"]

    texts = ["张三在北京工作。", "", "李四去上海 2022年", "x" * 200]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    run([sys.executable, "predict.py", "--checkpoint", str(out_dir / "best_model"), "--input",
         str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl"), "--batch_size", "2"])
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in results] == texts
    assert all(len(r["labels"]) == len(r["text"]) for r in results)


@pytest.mark.slow
def test_two_worker_relaunch_resumes_from_the_newest_state(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out_dir = tmp_path / "resume"
    first_logs, second_logs = tmp_path / "logs1", tmp_path / "logs2"
    launch = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir"]
    run([*launch, str(first_logs), "train_dist.py",
         *overrides(tiny_model_dir, tiny_dataset_dir, out_dir, save_interval=2, do_test=False)], log_hint=first_logs)
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    # The same command with a larger budget continues from step 4 on both ranks.
    run([*launch, str(second_logs), "train_dist.py",
         *overrides(tiny_model_dir, tiny_dataset_dir, out_dir, save_interval=2, do_test=False, max_steps=6)],
        log_hint=second_logs)
    for rank in (0, 1):
        log = (second_logs / f"workerlog.{rank}").read_text()
        assert "step-00000004 at step 4" in log, f"rank {rank} did not resume from step 4"
    rank0 = (second_logs / "workerlog.0").read_text().splitlines()
    summary = json.loads([line for line in rank0 if line.startswith('{"global_step"')][-1])
    assert summary["global_step"] == 6
    digests = {line.split()[-1] for rank in (0, 1)
               for line in (second_logs / f"workerlog.{rank}").read_text().splitlines() if "final weights sha256" in line}
    assert len(digests) == 1


def test_bad_data_stops_train_dist_before_any_model_is_built(tiny_model_dir, tiny_dataset_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    lines = (data / "dev.tsv").read_text(encoding="utf-8").splitlines()
    lines[5] = lines[5].split("\t")[0] + "\tO"  # one label for a sentence of several characters
    (data / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "train_dist.py", *overrides(tiny_model_dir, data, tmp_path / "out")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert f"{data / 'dev.tsv'}:6:" in done.stderr and "labels" in done.stderr
    assert "BertForTokenClassification" not in done.stdout + done.stderr  # no model was built
    assert not (tmp_path / "out" / "run.lock").exists()  # and the lock was given back


@pytest.mark.slow
def test_two_worker_launch_with_the_crf_head(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out_dir, log_dir = tmp_path / "crf", tmp_path / "logs"
    run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
         "train_dist.py", *overrides(tiny_model_dir, tiny_dataset_dir, out_dir, head="crf")], log_hint=log_dir)
    assert_complete_run(out_dir, tiny_dataset_dir, evaluations=2)
    assert json.loads((out_dir / "best_model" / "config.json").read_text())["ner_head"] == "crf"
    import paddle

    assert "crf.transitions" in paddle.load(str(out_dir / "best_model" / "model.pdparams"))
    digests = {line.split()[-1] for rank in (0, 1)
               for line in (log_dir / f"workerlog.{rank}").read_text().splitlines() if "final weights sha256" in line}
    assert len(digests) == 1  # the transitions were all-reduced like every other gradient


def test_the_row_sync_takes_the_word_embedding_table_out_of_dataparallel(tiny_model_dir, monkeypatch):
    import paddle

    from pipeline import dist
    from pipeline.labels import MSRA_LABELS
    from pipeline.models import build_token_classifier, resolve_model

    broadcast = []
    monkeypatch.setattr(dist.dist, "broadcast", lambda tensor, src: broadcast.append(tensor.name))
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), MSRA_LABELS)
    sync = dist.EmbeddingRowSync.for_model(model)
    table = model.bert.embeddings.word_embeddings.weight
    assert sync.weight is table and sync.vocab_size == table.shape[0]
    assert getattr(table, "no_sync", False)  # DataParallel leaves it to the sync, which broadcast it itself
    assert broadcast == [table.name]
    assert not any(getattr(p, "no_sync", False) for p in model.parameters() if p is not table)
    assert dist.EmbeddingRowSync.for_model(paddle.nn.Linear(2, 2)) is None


def test_the_row_sync_averages_the_used_rows_and_joins_the_collective_without_a_gradient(monkeypatch):
    # One process standing in for rank 0 of 2 whose peer sent zeros: the all-reduce is the identity.
    import numpy as np
    import paddle

    from pipeline import dist

    sent = []
    monkeypatch.setattr(dist.dist, "broadcast", lambda tensor, src: None)
    monkeypatch.setattr(dist.dist, "all_reduce", lambda tensor: sent.append(tensor.shape))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    table = paddle.nn.Embedding(6, 3)
    sync = dist.EmbeddingRowSync(table.weight)
    sync.note_ids(paddle.to_tensor([[1, 4], [4, 1]]))
    sync.all_reduce()  # no backward yet: still one all-reduce of the used rows, of zeros
    assert sent == [[2, 3]]
    sync.note_ids(paddle.to_tensor([[1, 4]]))
    table(paddle.to_tensor([[1, 4]])).sum().backward()
    dense = table.weight.grad.numpy().copy()
    sync.all_reduce()
    assert sent[-1] == [2, 3]
    np.testing.assert_array_equal(table.weight.grad.numpy(), dense / 2)  # averaged; unused rows stay 0
    sync.all_reduce()  # nothing noted since: the mask starts empty again, no rows to send
    assert len(sent) == 2


def two_workers_with(model_dir, data_dir, run_dir: Path, **setting) -> tuple[str, str]:
    """Rank 0's log and the final weights' sha256 of a two-worker run of the tiny model with gradient
    accumulation (two micro-batches per rank per step) and ``setting``; both ranks must end equal."""
    (key, value), = setting.items()
    out_dir, log_dir = run_dir / f"{key}-{value}", run_dir / f"logs-{key}-{value}"
    run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
         "train_dist.py", *overrides(model_dir, data_dir, out_dir, batch_size=4, grad_accum_steps=2, do_test=False,
                                     **setting)], log_hint=log_dir)
    digests = {line.split()[-1] for rank in (0, 1) for line in
               (log_dir / f"workerlog.{rank}").read_text().splitlines() if "final weights sha256" in line}
    assert len(digests) == 1, f"{key}={value}: the ranks' weights differ"
    return (log_dir / "workerlog.0").read_text(), digests.pop()


@pytest.mark.slow
def test_two_workers_train_the_same_weights_when_only_the_used_embedding_rows_are_all_reduced(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    # The dense all-reduce of the whole table against pipeline.dist.EmbeddingRowSync, with gradient
    # accumulation, so that the used rows of two micro-batches per rank must be merged.
    (dense_log, dense), (rows_log, rows) = (two_workers_with(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                             embedding_grad_rows=value) for value in (False, True))
    assert "all-reduced by the rows the batches used" in rows_log
    assert "all-reduced by the rows" not in dense_log
    assert rows == dense


@pytest.mark.slow
def test_two_workers_train_the_same_weights_adding_gradients_in_shared_memory_as_over_gloo(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    # pipeline.shared_memory_sync against DataParallel's gloo all-reduce, with gradient accumulation
    # and the row-wise embedding sync beside it (the table is the one parameter it leaves out).
    (gloo_log, gloo), (shared_log, shared) = (two_workers_with(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                               shared_memory_all_reduce=value)
                                              for value in (False, True))
    assert "gradient values in shared memory" in shared_log and "shared memory" not in gloo_log
    assert shared == gloo
    # The file was removed once both workers had mapped it: nothing of this run is left in /dev/shm.
    files = re.findall(r"(/\S+/nerpipe-gradients-[\w-]+)", shared_log)
    assert files and not any(Path(name).exists() for name in files)


@pytest.mark.slow
def test_resume_with_another_worker_count_continues_after_the_windows_already_done(tiny_model_dir,
                                                                                    tiny_dataset_dir, tmp_path):
    """96 training windows: 2 workers x 8 make 6 batches an epoch, one process 12. Two workers stop at
    step 4 (64 windows done); one process resuming must continue at its batch 8, not 4, so the epoch
    ends at step 8 (skipping only 4 batches would run 8 more, to step 12)."""
    out_dir, logs = tmp_path / "out", tmp_path / "logs"
    run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(logs),
         "train_dist.py", *overrides(tiny_model_dir, tiny_dataset_dir, out_dir, save_interval=2, do_test=False)],
        log_hint=logs)
    state = json.loads((out_dir / "checkpoints" / "step-00000004" / "training_state.json").read_text())
    assert (state["batches_done"], state["windows_per_batch"]) == (4, 16)
    result = run([sys.executable, "train_dist.py",
                  *overrides(tiny_model_dir, tiny_dataset_dir, out_dir, save_interval=2, do_test=False, max_steps=0,
                             epochs=1)])
    output = result.stdout + result.stderr
    assert "epoch 0 continues after 64 of its windows, at batch 8 of 12" in output, output[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["global_step"] == 8


def rng_digests(state_dir: Path) -> list[str]:
    """sha256 of each rank's saved Paddle generator state, in rank order (the states themselves
    compare only by their pickled form)."""
    import hashlib
    import pickle

    import paddle

    from pipeline.checkpoint import RNG_FILE, _own_rng_states_of

    per_rank = _own_rng_states_of(paddle.load(str(state_dir / RNG_FILE)))
    return [hashlib.sha256(pickle.dumps(states)).hexdigest() for states in per_rank]


@pytest.mark.slow
def test_a_two_worker_resume_restores_each_ranks_own_rng_state(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Each rank draws its own dropout masks (seed + rank). A two-worker run resumed from its step-4
    state must continue each rank's generator where that rank left it: at step 8 every rank's
    generator state equals the uninterrupted run's, and so do the weights those masks trained.
    The resumed directory holds the step-4 state alone, copied from the uninterrupted run: what a
    run stopped right after writing it leaves to resume from (real kills: tests/test_faults.py)."""
    import shutil

    import numpy as np
    import paddle

    launch = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    settings = dict(max_steps=8, save_interval=4, eval_interval=4, do_test=False, use_vdl=False)
    run([*launch, str(tmp_path / "logs-whole"), "train_dist.py",
         *overrides(tiny_model_dir, tiny_dataset_dir, whole, **settings)], log_hint=tmp_path / "logs-whole")
    shutil.copytree(whole / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    logs = tmp_path / "logs-resumed"
    run([*launch, str(logs), "train_dist.py", *overrides(tiny_model_dir, tiny_dataset_dir, resumed, **settings)],
        log_hint=logs)
    for rank in (0, 1):
        assert "step-00000004 at step 4" in (logs / f"workerlog.{rank}").read_text(), f"rank {rank} did not resume"

    at_4 = rng_digests(whole / "checkpoints" / "step-00000004")
    whole_8, resumed_8 = (rng_digests(d / "checkpoints" / "step-00000008") for d in (whole, resumed))
    # The test can tell the ranks apart (their generators differ) and sees draws between steps 4 and 8.
    assert whole_8[0] != whole_8[1] and at_4[0] != whole_8[0] and at_4[1] != whole_8[1]
    # Rank by rank: had rank 1 been given rank 0's state, or none, its generator would be elsewhere now.
    assert resumed_8 == whole_8
    weights = [paddle.load(str(d / "checkpoints" / "step-00000008" / "model.pdparams")) for d in (whole, resumed)]
    final = {k: v.numpy() for k, v in weights[1].items()}
    for name, value in weights[0].items():
        np.testing.assert_allclose(final[name], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
