"""The training loop: data-parallel fine-tuning with AMP, evaluation, best-model selection.

Rank 0 owns every side effect (files, VisualDL, progress bars); collectives
(evaluation's count reduction, barriers) run on every rank in the same order.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle
from paddle.io import DataLoader, Dataset, DistributedBatchSampler
from tqdm import tqdm

from . import dist
from .checkpoint import (METRICS_FILE, TRAINING_STATE_FILE, WEIGHTS_FILE, latest_training_state, load_training_state,
                         load_weights, prune_training_states, resume_source, save_model_checkpoint, save_training_state)
from .config import TrainConfig, save_config
from .cpu_env import release_freed_memory
from .data import Aligner, DataSplits, TrainingCollator, build_training_features
from .evaluation import evaluate, write_predictions
from .files import write_json
from .heads import token_loss
from .inference import TokenLabeller
from .linear_grad import install_matmul_bias_grad
from .models import token_logits
from .optim import build_optimizer, clip_grads_, global_grad_norm
from .sampling import LengthGroupedBatchSampler

logger = logging.getLogger(__name__)

BEST_MODEL_DIR = "best_model"
TEST_METRICS_FILE = "test_metrics.json"
DEV_HISTORY_FILE = "dev_metrics.jsonl"
TRAIN_HISTORY_FILE = "train_metrics.jsonl"
TEST_PREDICTIONS_FILE = "test_predictions.jsonl"


class NumericalError(RuntimeError):
    """Too many optimiser steps in a row whose loss or gradients were NaN/Inf."""


class FeatureDataset(Dataset):
    """Training windows held in memory: tokenised once, before the first step."""

    def __init__(self, features):
        self.features = features

    def __getitem__(self, index):
        return self.features[index]

    def __len__(self):
        return len(self.features)


@dataclass
class TrainingResult:
    """What ``fit`` ends with."""

    global_step: int
    best_metric: float | None
    best_dev: dict | None
    test: dict | None
    stopped_early: bool = False
    history: list = field(default_factory=list)
    bad_steps: int = 0  # steps skipped because their loss or gradients were not finite


class AmpPolicy:
    """Autocast context, optional O2 decoration and the fp16 loss scaler, from the config."""

    def __init__(self, config: TrainConfig):
        self.enabled = config.amp != "off"
        self.dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(config.amp, "float32")
        self.level = config.amp_level
        # Only fp16 needs loss scaling: bf16 has float32's exponent range.
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=config.init_loss_scaling) if config.amp == "fp16" else None

    def decorate(self, model, optimizer):
        """Cast parameters for O2 (keeping float32 master weights in the optimizer)."""
        if self.enabled and self.level == "O2":
            return paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", dtype=self.dtype)
        return model, optimizer

    def autocast(self):
        """Context for forward passes, in training and evaluation alike."""
        if not self.enabled:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, dtype=self.dtype)

    def backward(self, loss):
        """Backward of the (scaled, for fp16) loss."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer):
        """Undo the fp16 loss scale on the gradients before they are measured or clipped."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        """Optimiser step; with fp16 the scaler skips on Inf/NaN (found when unscaling) and adapts the scale."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


class LossOfBatch(paddle.nn.Layer):
    """The training forward: logits under the AMP policy, then the head's loss (float32).

    One forward for both, so that DataParallel sees every parameter used inside its
    forward pass, the CRF's transitions included.
    """

    def __init__(self, model, amp: AmpPolicy):
        super().__init__()
        self.model = model
        self.amp = amp

    def forward(self, input_ids, label_ids):
        with self.amp.autocast():
            logits = token_logits(self.model, input_ids)
        return token_loss(self.model, logits, label_ids)


class AutocastLabeller(TokenLabeller):
    """A TokenLabeller whose forward passes run under the training AMP policy (needed for O2)."""

    def __init__(self, *args, amp: AmpPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.amp = amp

    def _predict_windows(self, windows):
        with self.amp.autocast():
            return super()._predict_windows(windows)


class Trainer:
    """Fits a token classifier on ``splits.train``, selects on dev, tests the best model."""

    def __init__(self, config: TrainConfig, model, tokenizer, splits: DataSplits):
        self.config = config
        self.model = model  # the bare model: evaluation and saving never go through DataParallel
        self.tokenizer = tokenizer
        self.splits = splits
        self.labels = splits.labels
        self.output_dir = Path(config.checkpoint_dir)
        self.best_dir = self.output_dir / BEST_MODEL_DIR
        self.aligner = Aligner(tokenizer, config.max_seq_len)
        self.amp = AmpPolicy(config)
        self.is_main = dist.is_main_process()
        self.writer = None

    # ------------------------------------------------------------ setup

    def _build_loader(self):
        features, stats = build_training_features(self.splits.train, self.aligner, self.labels)
        if self.is_main:
            logger.info("train features: %d windows from %d sentences (%d split because longer than "
                        "max_seq_len=%d), %d word pieces, %d [UNK], %d tokens without any piece %s",
                        stats.windows, stats.examples, stats.split_examples, self.config.max_seq_len,
                        stats.pieces, stats.unknown_pieces, stats.tokens_without_pieces,
                        dict(stats.no_piece_characters.most_common(5)))
        dataset = FeatureDataset(features)
        if self.config.group_by_length:
            sampler = LengthGroupedBatchSampler(dataset, [len(f[0]) for f in features], self.config.batch_size,
                                                self.config.seed)
        else:
            # Shuffles with the epoch as seed (set_epoch), identically on every rank, then shards.
            sampler = DistributedBatchSampler(dataset, batch_size=self.config.batch_size, shuffle=True,
                                              drop_last=False)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=TrainingCollator(self.aligner.pad_id),
                            num_workers=self.config.num_workers, return_list=True)
        return sampler, loader

    def _open_writer(self):
        if self.is_main and self.config.use_vdl:
            from visualdl import LogWriter

            self.writer = LogWriter(logdir=str(self.output_dir / "vdl"))

    def _log_scalars(self, values: dict, step: int):
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(tag=key, value=float(value), step=step)

    def labeller(self) -> TokenLabeller:
        """The evaluation engine over the bare model, under the training AMP policy."""
        return AutocastLabeller(self.model, self.aligner, self.labels, self.config.eval_batch_size, amp=self.amp)

    # ------------------------------------------------------------ evaluation and saving

    def evaluate_split(self, examples, name: str) -> dict:
        """Exact P/R/F1 summary on a split (collective: every rank calls it)."""
        counts = evaluate(self.labeller(), examples, description=name)
        return counts.summary()

    def _save_best(self, summary: dict, step: int):
        """Rank 0 writes best_model/ atomically; every rank then waits, so nobody reads half of it."""
        if self.is_main:
            save_model_checkpoint(self.best_dir, self.model, self.tokenizer, self.config, self.labels,
                                  metrics={"step": step, "dev": summary})
            logger.info("step %d: new best dev %s=%.4f, saved to %s", step, self.config.compare_metrics,
                        summary[self.config.compare_metrics], self.best_dir)
        dist.barrier()

    def _load_best(self):
        """Rank 0 reads best_model/ and broadcasts it: other nodes may not share its disk."""
        if self.is_main:
            load_weights(self.model, self.best_dir / WEIGHTS_FILE)
        dist.broadcast_parameters(self.model, src=0)

    def _resume_source(self) -> Path | None:
        """The training state to continue from, the same on every rank (or an error saying why not)."""
        source = resume_source(self.config)
        # All ranks must resume from the same step: without shared storage they may see different files.
        step = -1
        if source is not None:
            state_file = source / TRAINING_STATE_FILE
            if not state_file.is_file():
                raise RuntimeError(f"resume: {source} holds no {TRAINING_STATE_FILE}; it is not a training state")
            step = int(json.loads(state_file.read_text(encoding="utf-8"))["step"])
        seen = dist.all_reduce_max(np.array([step, -step], dtype=np.int64))
        if seen[0] != -seen[1]:
            raise RuntimeError(f"ranks see different training states under {self.output_dir} (this rank: {source}); "
                               f"checkpoint_dir must be on storage every node shares to resume")
        return source

    # ------------------------------------------------------------ the loop

    def fit(self) -> TrainingResult:
        """Train, evaluating on dev every ``eval_interval`` steps and at each epoch end."""
        config = self.config
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "train_config.yaml")
        sampler, loader = self._build_loader()
        batches_per_epoch = len(loader)
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
        total_steps = config.max_steps or steps_per_epoch * config.epochs
        epochs = math.ceil(total_steps / steps_per_epoch)
        optimizer, schedule = build_optimizer(config, self.model, total_steps)
        step, best_metric, best_dev, evals_without_gain = 0, None, None, 0
        history, stopped_early, bad_steps, bad_in_a_row = [], False, 0, 0
        start_epoch, skip_batches, resumed_evaluated_at = 0, 0, None
        source = self._resume_source()
        if source is not None:
            # Before AMP decoration and DataParallel, so both start from the restored weights.
            progress = load_training_state(source, self.model, optimizer, schedule, dist.get_rank(),
                                           dist.get_world_size(), self.amp.scaler)
            step, start_epoch, skip_batches = progress["step"], progress["epoch"], progress["batches_done"]
            best_metric, best_dev = progress["best_metric"], progress["best_dev"]
            evals_without_gain, history = progress["evals_without_gain"], progress["history"]
            resumed_evaluated_at, bad_steps = progress["evaluated_at"], progress.get("bad_steps", 0)
            logger.warning("resumed from %s at step %d (epoch %d, %d batches into it)", source, step, start_epoch,
                           skip_batches)
            if self.is_main:
                self._truncate_histories(history, step)
        if config.matmul_bias_grad and not config.use_gpu and not self.amp.enabled:
            # Before to_static traces the forward, so the traced program has the matmul form.
            install_matmul_bias_grad(self.model)
        self.model, optimizer = self.amp.decorate(self.model, optimizer)
        loss_of_batch = LossOfBatch(self.model, self.amp)
        if config.to_static:
            # Not full_graph: SOT keeps what it cannot translate (e.g. the CRF loss) in eager mode.
            loss_of_batch = paddle.jit.to_static(loss_of_batch, full_graph=False)
        wrapped = dist.wrap_for_training(loss_of_batch)
        self._open_writer()
        if self.is_main:
            logger.info("training: %d workers x batch %d x accumulation %d; %d steps (%d epochs of %d steps)",
                        dist.get_world_size(), config.batch_size, config.grad_accum_steps, total_steps,
                        epochs, steps_per_epoch)

        window = _Window()
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not self.is_main,
                   mininterval=2)

        def run_evaluation() -> bool:
            """Evaluate on dev, maybe save the best model; True when early stopping says stop."""
            nonlocal best_metric, best_dev, evals_without_gain
            summary = self.evaluate_split(self.splits.dev, "dev")
            metric = summary[config.compare_metrics]
            record = {"step": step, **{k: v for k, v in summary.items() if k != "per_type"},
                      "per_type": summary["per_type"]}
            history.append(record)
            if self.is_main:
                logger.info("step %d dev: precision %.4f recall %.4f f1 %.4f", step, summary["precision"],
                            summary["recall"], summary["f1"])
                self._log_scalars({f"eval/{k}": summary[k] for k in ("precision", "recall", "f1")}, step)
                with open(self.output_dir / DEV_HISTORY_FILE, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            # Every rank holds the same reduced metric, so they all take the same branch.
            if best_metric is None or metric > best_metric:
                best_metric, best_dev, evals_without_gain = metric, summary, 0
                self._save_best(summary, step)
            else:
                evals_without_gain += 1
            release_freed_memory()  # evaluation's (and saving's) peak goes back to the kernel, not kept for good
            return bool(config.early_stopping_patience) and evals_without_gain >= config.early_stopping_patience

        wrapped.train()
        done = False
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            evaluated_at = resumed_evaluated_at if epoch == start_epoch else None
            for batch_index, (input_ids, label_ids) in enumerate(loader):
                if epoch == start_epoch and batch_index < skip_batches:
                    # Consumed before the interruption; the order depends only on (seed, epoch), so the
                    # batches that follow are exactly the ones the interrupted run would have seen.
                    continue
                boundary = (batch_index + 1) % config.grad_accum_steps == 0 or batch_index + 1 == batches_per_epoch
                # Gradients are all-reduced only on the micro-batch that ends an accumulation group.
                sync = contextlib.nullcontext() if boundary else dist.no_gradient_sync(wrapped)
                with sync:
                    loss = wrapped(input_ids, label_ids)
                    self.amp.backward(loss / config.grad_accum_steps)
                window.add(loss.detach(), (input_ids != self.aligner.pad_id).astype("int64").sum(),
                           input_ids.size)
                if not boundary:
                    continue
                # One norm for the NaN/Inf check and for clipping (pipeline/optim.py). The gradients are
                # all-reduced already, so every rank sees the same norm and takes the same branch.
                self.amp.unscale(optimizer)
                grad_norm = global_grad_norm(self.model.parameters())
                if math.isfinite(grad_norm):
                    clip_grads_(self.model.parameters(), config.max_grad_norm, grad_norm)
                    window.add_grad_norm(grad_norm)
                    self.amp.step(optimizer)
                    bad_in_a_row = 0
                else:
                    bad_steps, bad_in_a_row = bad_steps + 1, bad_in_a_row + 1
                    if self.amp.scaler:
                        self.amp.step(optimizer)  # the fp16 scaler skips the update itself and lowers the scale
                    if self.is_main:
                        logger.warning("step %d: loss or gradients are NaN/Inf; update skipped (%d in a row, %d in "
                                       "all)", step + 1, bad_in_a_row, bad_steps)
                    if bad_in_a_row >= config.max_bad_steps:
                        last_state = latest_training_state(self.output_dir)
                        raise NumericalError(
                            f"stopping at step {step + 1}: {bad_in_a_row} steps in a row (from step "
                            f"{step + 2 - bad_in_a_row}) had NaN/Inf loss or gradients (max_bad_steps="
                            f"{config.max_bad_steps}). Last good training state: {last_state or 'none written'}; "
                            f"best model so far: {self.best_dir if self.best_dir.is_dir() else 'none saved'}. "
                            f"Lower learning_rate, check the data, or turn amp off.")
                optimizer.clear_grad()
                # A skipped step still counts, as with the fp16 scaler: steps and batches stay in lockstep.
                schedule.step()
                step += 1
                bar.update(1)
                if step % config.log_interval == 0:
                    self._log_training(window, step, schedule.get_lr(), bar)
                if config.eval_interval and step % config.eval_interval == 0:
                    evaluated_at = step
                    eval_started = time.perf_counter()
                    if run_evaluation():
                        stopped_early = done = True
                    window.exclude(time.perf_counter() - eval_started)  # throughput counts training time only
                # After the evaluation, so that the state carries this step's best metric.
                if config.save_interval and step % config.save_interval == 0:
                    rng_states = dist.all_gather_objects(paddle.get_rng_state())  # collective: every rank
                    if self.is_main:
                        save_training_state(self.output_dir, self.model, optimizer, schedule, config, {
                            "step": step, "epoch": epoch, "batches_done": batch_index + 1,
                            "best_metric": best_metric, "best_dev": best_dev,
                            "evals_without_gain": evals_without_gain, "history": history,
                            "evaluated_at": evaluated_at, "bad_steps": bad_steps},
                            rng_states, self.amp.scaler.state_dict() if self.amp.scaler else None)
                        # Only after the new state is complete, so a crash here never leaves fewer than before.
                        prune_training_states(self.output_dir, config.keep_checkpoints)
                        release_freed_memory()
                if step >= total_steps:
                    done = True
                if done:
                    break
            if evaluated_at != step and not stopped_early:
                if run_evaluation():
                    stopped_early = done = True
            if done:
                break
        bar.close()
        if stopped_early and self.is_main:
            logger.info("early stopping at step %d: %d evaluations without improvement", step, evals_without_gain)

        test_summary = None
        if self.splits.test is not None:
            self._load_best()
            counts, predictions = evaluate(self.labeller(), self.splits.test, description="test",
                                           keep_predictions=True)
            test_summary = counts.summary()
            if self.is_main:
                # What the test metrics were computed from, so anyone can recompute them (e.g. with seqeval).
                write_predictions(self.output_dir / TEST_PREDICTIONS_FILE, self.splits.test, predictions)
                logger.info("test (best model): precision %.4f recall %.4f f1 %.4f", test_summary["precision"],
                            test_summary["recall"], test_summary["f1"])
                write_json(self.output_dir / TEST_METRICS_FILE, {"step": best_step(history, best_metric,
                                                                                    config.compare_metrics),
                                                                 "test": test_summary})
                metrics_path = self.best_dir / METRICS_FILE
                metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
                write_json(metrics_path, {**metrics, "test": test_summary})
                self._log_scalars({f"test/{k}": test_summary[k] for k in ("precision", "recall", "f1")}, step)
            dist.barrier()
        if self.writer is not None:
            self.writer.close()
        if bad_steps and self.is_main:
            logger.warning("%d step(s) were skipped because their loss or gradients were NaN/Inf", bad_steps)
        return TrainingResult(step, best_metric, best_dev, test_summary, stopped_early, history, bad_steps)

    def _truncate_histories(self, history: list, step: int):
        """After a resume, drop what the interrupted run logged past the state it resumes from."""
        lines = [json.dumps(record) + "\n" for record in history]
        (self.output_dir / DEV_HISTORY_FILE).write_text("".join(lines), encoding="utf-8")
        train_log = self.output_dir / TRAIN_HISTORY_FILE
        if train_log.is_file():
            kept = [line for line in train_log.read_text(encoding="utf-8").splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= step]
            train_log.write_text("".join(kept), encoding="utf-8")

    def _log_training(self, window: "_Window", step: int, learning_rate: float, bar):
        # Summed over ranks so the figures describe the whole job; every rank reaches this at the same step.
        # The gradient norm needs no reduction: it is measured on all-reduced gradients, alike on every rank.
        loss_sum, batches, real_tokens, computed_tokens, seconds, grad_norm = window.drain()
        totals = dist.all_reduce_sum(np.array([loss_sum, batches, real_tokens, computed_tokens], dtype=np.float64))
        seconds = float(dist.all_reduce_max(np.array([seconds], dtype=np.float64))[0])
        loss = totals[0] / max(totals[1], 1)
        tokens_per_second = totals[2] / max(seconds, 1e-9)
        padding = 1 - totals[2] / max(totals[3], 1)
        if self.is_main:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens_per_second:.0f}")
            norm_text = f", grad norm {grad_norm:.3f}" if grad_norm is not None else ""
            logger.info("step %d: loss %.4f, lr %.3e, %.0f real tokens/s, padding %.1f%%%s", step, loss,
                        learning_rate, tokens_per_second, 100 * padding, norm_text)
            scalars = {"train/loss": loss, "train/lr": learning_rate, "train/tokens_per_second": tokens_per_second,
                       "train/padding": padding}
            if grad_norm is not None:
                scalars["train/grad_norm"] = grad_norm
            self._log_scalars(scalars, step)
            # The same figures as a plain file, for plots and reports without VisualDL.
            record = {"step": step, "loss": loss, "lr": learning_rate, "tokens_per_second": tokens_per_second,
                      "padding": padding, "grad_norm": grad_norm}
            with open(self.output_dir / TRAIN_HISTORY_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def best_step(history: list, best_metric, key: str):
    """Step of the first evaluation that reached the best metric."""
    return next((record["step"] for record in history if record[key] == best_metric), None)


class _Window:
    """Loss and token counts since the last log line, kept on the device until read."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.loss, self.real_tokens, self.batches, self.computed, self.grad_norms = None, None, 0, 0, []
        self.started, self.excluded = time.perf_counter(), 0.0

    def exclude(self, seconds: float):
        """Leave time spent outside training steps (evaluation) out of the next throughput figure."""
        self.excluded += seconds

    def add_grad_norm(self, norm: float):
        """Norm before clipping of a step that was taken (skipped NaN/Inf steps are logged apart)."""
        self.grad_norms.append(norm)

    def add(self, loss, real_tokens, computed_tokens: int):
        self.loss = loss if self.loss is None else self.loss + loss
        self.real_tokens = real_tokens if self.real_tokens is None else self.real_tokens + real_tokens
        self.batches += 1
        self.computed += int(computed_tokens)

    def drain(self):
        """Read and reset: one host-device sync per log line, not per step."""
        values = (float(self.loss) if self.loss is not None else 0.0, self.batches,
                  int(self.real_tokens) if self.real_tokens is not None else 0, self.computed,
                  time.perf_counter() - self.started - self.excluded,
                  sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else None)
        self._reset()
        return values
