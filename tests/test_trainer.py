"""The training loop in one process: it learns, accumulates, stops early, and runs under bf16 AMP."""
from __future__ import annotations

import json
import math

import numpy as np
import paddle
import pytest

from helpers import assert_test_metrics_match_seqeval, make_trainer
from pipeline.amp import APPLIED
from pipeline.config import TrainConfig
from pipeline.trainer import Trainer


@pytest.mark.slow
def test_training_learns_the_synthetic_task(tiny_model_dir, tiny_dataset_dir, tmp_path):
    result = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", epochs=12, log_interval=50).fit()
    assert result.best_dev["f1"] > 0.9, result.history
    assert result.test["f1"] > 0.8
    # What was saved is what was measured: best_model/metrics.json holds the selected dev record.
    saved = json.loads((tmp_path / "out" / "best_model" / "metrics.json").read_text())
    assert saved["dev"]["f1"] == result.best_dev["f1"] and saved["test"] == result.test
    # A model that finds entities: the reported test P/R/F1 equal seqeval's on the saved predictions.
    assert 0 < result.test["precision"] < 1 or 0 < result.test["recall"] < 1 or result.test["f1"] == 1
    assert_test_metrics_match_seqeval(tmp_path / "out", tiny_dataset_dir / "test.tsv")


def test_gradient_accumulation_counts_optimizer_steps(tiny_model_dir, tiny_dataset_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", epochs=1, grad_accum_steps=5,
                           group_by_length=False)
    result = trainer.fit()
    batches = math.ceil(96 / 8)
    assert result.global_step == math.ceil(batches / 5) == 3


def test_clipping_bounds_every_update_to_the_clipped_gradient(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                              monkeypatch):
    """A tiny max_grad_norm clips every step: the optimiser must receive gradients of exactly that norm."""
    from pipeline import optim

    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=4, max_grad_norm=1e-3,
                           do_test=False, eval_interval=0)
    seen = []

    def observing_step(self, optimizer, grad_norm, loss):
        seen.append(float(optim.global_grad_norm(trainer.model.parameters())))
        optimizer.step()
        return APPLIED

    monkeypatch.setattr("pipeline.amp.AmpPolicy.step", observing_step)
    trainer.fit()
    assert len(seen) == 4 and all(n == pytest.approx(1e-3, rel=1e-4) for n in seen)
    logged = [json.loads(line)["grad_norm"] for line in (tmp_path / "out" / "train_metrics.jsonl").open()]
    assert len(logged) == 4 and all(n > 1e-2 for n in logged)  # norms before clipping


def test_early_stopping_after_patience_evaluations(tiny_model_dir, tiny_dataset_dir, tmp_path):
    # A learning rate too small to change any prediction: the first evaluation stays the best.
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", epochs=3, learning_rate=1e-12,
                           eval_interval=1, early_stopping_patience=2)
    result = trainer.fit()
    assert result.stopped_early and result.global_step == 3
    assert [record["step"] for record in result.history] == [1, 2, 3]


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_bf16_amp_runs_on_cpu_and_saves_float32_weights(tiny_model_dir, tiny_dataset_dir, tmp_path, level):
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=3, amp="bf16",
                           amp_level=level, do_test=False)
    result = trainer.fit()
    assert result.global_step == 3 and result.best_dev is not None
    state = paddle.load(str(tmp_path / "out" / "best_model" / "model.pdparams"))
    assert all(tensor.dtype == paddle.float32 for tensor in state.values())
    assert all(np.isfinite(tensor.numpy()).all() for tensor in state.values())


def test_a_run_killed_after_a_checkpoint_resumes_at_the_exact_step(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                                    monkeypatch):
    settings = dict(max_steps=6, save_interval=3, eval_interval=2, do_test=False)
    reference = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "whole", **settings)
    whole = reference.fit()

    out = tmp_path / "killed"
    original_log = Trainer._log_training

    def crash_at_step_5(self, step):
        original_log(self, step)
        if step == 5:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Trainer, "_log_training", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tiny_model_dir, tiny_dataset_dir, out, **settings).fit()
    monkeypatch.setattr(Trainer, "_log_training", original_log)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]

    steps_run = []
    resumed_trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, **settings)
    monkeypatch.setattr(Trainer, "_log_training",
                        lambda self, step: (steps_run.append(step), original_log(self, step)))
    resumed = resumed_trainer.fit()
    assert steps_run == [4, 5, 6], "the resumed run must run exactly the remaining steps"
    assert resumed.global_step == 6
    assert [r["step"] for r in resumed.history] == [r["step"] for r in whole.history] == [2, 4, 6]
    # The crashed run had logged step 4's evaluation and steps 4-5 after its last state: rewritten, not doubled.
    logged_evals = [json.loads(line)["step"] for line in (out / "dev_metrics.jsonl").read_text().splitlines()]
    logged_steps = [json.loads(line)["step"] for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert logged_evals == [2, 4, 6] and logged_steps == [1, 2, 3, 4, 5, 6]
    # Same batches, same learning rates, same dropout masks: the same weights, up to float rounding.
    final = {k: v.numpy() for k, v in resumed_trainer.model.state_dict().items()}
    for name, value in reference.model.state_dict().items():
        np.testing.assert_allclose(final[name], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_only_the_newest_training_states_are_kept(tiny_model_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "out"
    make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=5, save_interval=1, keep_checkpoints=2,
                 do_test=False).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


@pytest.mark.parametrize("damage", ["weights cut short", "state json cut short", "rng missing"])
def test_a_damaged_newest_state_is_skipped_for_the_newest_intact_one(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                                    caplog, damage):
    import logging

    out = tmp_path / "out"
    settings = dict(save_interval=2, keep_checkpoints=2, do_test=False, eval_interval=2)
    make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=4, **settings).fit()
    newest = out / "checkpoints" / "step-00000004"
    if damage == "weights cut short":
        weights = newest / "model.pdparams"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "state json cut short":
        state = newest / "training_state.json"
        state.write_text(state.read_text()[:40])
    else:
        (newest / "rng.pdstate").unlink()
    steps_run = []
    original_log = Trainer._log_training
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=6, **settings)
    trainer._log_training = lambda step: (steps_run.append(step), original_log(trainer, step))
    with caplog.at_level(logging.WARNING):
        result = trainer.fit()
    assert "skipping damaged training state" in caplog.text and "step-00000004" in caplog.text
    assert "resumed from" in caplog.text and "step-00000002" in caplog.text
    assert steps_run == [3, 4, 5, 6] and result.global_step == 6


def test_resume_off_starts_fresh_and_bad_resume_paths_are_rejected(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from pipeline.config import ConfigError

    out = tmp_path / "out"
    make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=2, save_interval=2, do_test=False).fit()
    fresh = make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=2, save_interval=2, do_test=False,
                         resume="off").fit()
    assert fresh.global_step == 2 and [r["step"] for r in fresh.history] == [2]
    with pytest.raises(ConfigError, match="resume must be"):
        TrainConfig(resume=str(tmp_path / "nowhere"))


def poison_training_forward(monkeypatch, bad_calls: set):
    """Make the training forward pass return NaN logits on the given (1-based) calls; evaluation is untouched."""
    import pipeline.trainer as trainer_module

    original, calls = trainer_module.token_logits, [0]

    def poisoned(model, input_ids):
        calls[0] += 1
        logits = original(model, input_ids)
        return logits * float("nan") if calls[0] in bad_calls else logits

    monkeypatch.setattr(trainer_module, "token_logits", poisoned)


def test_nan_steps_are_skipped_and_counted(tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    poison_training_forward(monkeypatch, {2, 3})
    digests = {}
    original_log = Trainer._log_training

    def record(self, step):
        from pipeline.checkpoint import weights_digest

        digests[step] = weights_digest(self.model)
        original_log(self, step)

    monkeypatch.setattr(Trainer, "_log_training", record)
    result = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=5, max_bad_steps=3,
                          do_test=False).fit()
    assert result.global_step == 5 and result.bad_steps == 2
    # Steps 2 and 3 changed nothing; the steps around them did.
    assert digests[1] == digests[2] == digests[3] != digests[4] != digests[5]
    # The logged gradient norm is that of the steps taken: finite, none for the skipped ones.
    norms = {r["step"]: r["grad_norm"] for r in map(json.loads, (tmp_path / "out" / "train_metrics.jsonl").open())}
    assert norms[2] is None and norms[3] is None
    assert all(math.isfinite(norms[s]) and norms[s] > 0 for s in (1, 4, 5))
    state = paddle.load(str(tmp_path / "out" / "best_model" / "model.pdparams"))
    assert all(np.isfinite(tensor.numpy()).all() for tensor in state.values())


def test_too_many_nan_steps_in_a_row_stop_the_run(tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    from pipeline.trainer import NumericalError

    poison_training_forward(monkeypatch, set(range(3, 100)))
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=20, max_bad_steps=3,
                           save_interval=2, eval_interval=2, do_test=False)
    with pytest.raises(NumericalError) as caught:
        trainer.fit()
    message = str(caught.value)
    # Steps 3, 4 and 5 were bad: it stops at 5 and points at the newest state (step 4: skipped steps
    # leave the weights untouched, so it holds step 2's finite weights).
    assert "stopping at step 5" in message and "from step 3" in message
    assert "step-00000004" in message and "best_model" in message
    state = paddle.load(str(tmp_path / "out" / "checkpoints" / "step-00000004" / "model.pdparams"))
    assert all(np.isfinite(tensor.numpy()).all() for tensor in state.values())


def _strict_only(record: dict) -> dict:
    """A dev summary as versions before the conlleval-style scores wrote it: strict figures, plain keys."""
    def old(values: dict) -> dict:
        return {k.removeprefix("strict_"): v for k, v in values.items() if k.startswith("strict_") or k == "step"}

    return {**old(record), "per_type": {t: old(v) for t, v in record["per_type"].items()}}


@pytest.mark.parametrize("compare_metrics, new_best", [("f1", True), ("strict_f1", False)])
def test_a_state_written_before_both_scorings_resumes_comparing_like_with_like(
        tiny_model_dir, tiny_dataset_dir, tmp_path, compare_metrics, new_best):
    out = tmp_path / "out"
    settings = dict(save_interval=2, eval_interval=2, do_test=False, compare_metrics=compare_metrics)
    make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=2, **settings).fit()
    path = out / "checkpoints" / "step-00000002" / "training_state.json"
    state = json.loads(path.read_text())
    # An old state whose best dev F1 (strict, under the plain key) nothing can beat.
    state["history"] = [{**_strict_only(r), "f1": 1.0} for r in state["history"]]
    state["best_dev"], state["best_metric"] = {**_strict_only(state["best_dev"]), "f1": 1.0}, 1.0
    path.write_text(json.dumps(state))
    result = make_trainer(tiny_model_dir, tiny_dataset_dir, out, max_steps=4, **settings).fit()
    # Its figures were strict: read as strict_f1, they are 1.0; its conlleval-style F1 was never measured.
    assert result.history[0]["strict_f1"] == 1.0 and "f1" not in result.history[0]
    assert json.loads((out / "dev_metrics.jsonl").read_text().splitlines()[0]) == result.history[0]
    saved_step = json.loads((out / "best_model" / "metrics.json").read_text())["step"]
    # compare_metrics=f1 has no old value to beat, so step 4 is the best; strict_f1 = 1.0 is never beaten.
    assert (saved_step == 4) is new_best and (result.best_metric == 1.0) is not new_best


def _tiny_classifier(model_dir, head: str):
    from pipeline.labels import MSRA_LABELS
    from pipeline.models import build_token_classifier, resolve_model

    paddle.seed(3)
    return build_token_classifier(resolve_model(str(model_dir)), MSRA_LABELS, head=head)


def _batch(batch: int, length: int, seed: int):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(5, 60, size=(batch, length))
    label_ids = rng.integers(0, 7, size=(batch, length))
    label_ids[:, 0] = label_ids[:, -1] = -100  # [CLS] and [SEP] carry no label
    label_ids[0, 1:3] = -100  # a continuation piece: not scored
    return paddle.to_tensor(input_ids, dtype="int64"), paddle.to_tensor(label_ids, dtype="int64")


SHAPES = [(4, 9), (4, 17), (3, 5), (4, 23), (2, 12), (4, 30), (3, 7)]


@pytest.mark.parametrize("head", ["linear", "crf"])
def test_to_static_losses_and_gradients_equal_eager_ones_for_every_batch_shape(tiny_model_dir, head):
    """The traced logits and the eager loss give the eager forward's loss and gradients, shape after shape."""
    from pipeline.amp import AmpPolicy
    from pipeline.trainer import LossOfBatch

    models = {mode: _tiny_classifier(tiny_model_dir, head) for mode in ("eager", "static")}
    losses = {mode: LossOfBatch(model, AmpPolicy(TrainConfig()), to_static=mode == "static")
              for mode, model in models.items()}
    # No dropout, in training mode (in eval mode a to_static program computes no gradients): the two
    # forwards would draw different masks.
    for model in models.values():
        for layer in model.sublayers():
            if isinstance(layer, paddle.nn.Dropout):
                layer.p = 0.0
            elif isinstance(layer, paddle.nn.MultiHeadAttention):
                layer.dropout = 0.0
    for index, shape in enumerate(SHAPES):
        input_ids, label_ids = _batch(*shape, seed=index)
        values = {}
        for mode, loss_of_batch in losses.items():
            loss = loss_of_batch(input_ids, label_ids)
            loss.backward()
            values[mode] = float(loss)
        assert values["static"] == pytest.approx(values["eager"], rel=1e-5), shape
        for (name, eager), static in zip(models["eager"].named_parameters(), models["static"].parameters()):
            if eager.grad is None:  # the pooler: not on the path to the loss in either mode
                assert static.grad is None, name
                continue
            assert static.grad is not None, (name, shape)
            np.testing.assert_allclose(static.grad.numpy(), eager.grad.numpy(), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} at batch shape {shape}")
        for model in models.values():
            model.clear_gradients()


@pytest.mark.parametrize("head", ["linear", "crf"])
def test_new_batch_shapes_stop_being_translated_after_the_first_few(tiny_model_dir, head):
    """SOT makes a frame's dimensions symbolic once it has seen them change (the token ids are marked so
    from the start); after that a new batch shape is not translated again. The CRF's likelihood, when
    it was traced, kept being translated batch after batch (a second or more each on m3e-small)."""
    from paddle.jit.sot.opcode_translator.executor.executor_cache import OpcodeExecutorCache

    from pipeline.amp import AmpPolicy
    from pipeline.trainer import LossOfBatch

    loss_of_batch = LossOfBatch(_tiny_classifier(tiny_model_dir, head), AmpPolicy(TrainConfig()), to_static=True)
    cache = OpcodeExecutorCache()
    cache.clear()  # translations are cached per code object, across instances: start from none
    counts = []
    for index, shape in enumerate(SHAPES):
        loss_of_batch(*_batch(*shape, seed=index)).backward()
        counts.append(cache.translate_count)
    assert counts[0] > 0, "the logits were not translated at all"
    settled = 3  # the first shape, then two changes of each dimension's size
    assert counts[settled:] == [counts[settled - 1]] * (len(SHAPES) - settled), counts
