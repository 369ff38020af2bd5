"""The training loop: data-parallel fine-tuning with AMP, evaluation, best-model selection.

``Trainer.fit`` reads as its steps: prepare, then per batch a forward/backward, per accumulation
group one optimiser step that says whether its gradients were finite, then what follows a step
(log, evaluate, save), and at the end a test of the best model. Rank 0 owns every side effect
(files, VisualDL, progress bars); collectives (evaluation's count reduction, the log figures,
barriers, RNG gathering) run on every rank in the same order.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle
from tqdm import tqdm

from . import dist
from .alignment import Aligner
from .amp import APPLIED, LOSS_SCALE_OVERFLOW, AmpPolicy
from .char_mapping import build_char_mapping
from .checkpoint import (WEIGHTS_FILE, TrainingProgress, TrainingStatesDifferError, add_metrics,
                         latest_training_state, load_char_mapping, load_training_state, load_weights, own_rng_state,
                         prune_training_states, resume_source, save_model_checkpoint, save_training_state,
                         training_state_dir, training_state_step)
from .config import TrainConfig, save_config
from .cpu_env import release_freed_memory
from .engines import DynamicEngine
from .evaluation import evaluate, write_predictions
from .files import write_json
from .heads import token_loss
from .labeller import TokenLabeller
from .dropout_masks import install_dropout_masks_from_integers, uninstall_from_attention
from .linear_grad import install_matmul_bias_grad
from .native_layer_norm import install_native_layer_norm
from .shared_memory_sync import shared_memory_gradient_sync
from .loader import build_train_loader
from .metrics import SCORE_KEYS
from .models import token_logits
from .optim import build_optimizer, clip_grads_, global_grad_norm
from .run_log import RunLog, StepStats
from .runtime import current_device, on_gpu
from .splits import DataSplits
from .stop_signals import RELAUNCH_EXIT_CODE, catch_stop_signals

logger = logging.getLogger(__name__)

BEST_MODEL_DIR = "best_model"
TEST_METRICS_FILE = "test_metrics.json"
TEST_PREDICTIONS_FILE = "test_predictions.jsonl"


class NumericalError(RuntimeError):
    """Too many optimiser steps in a row whose loss or gradients were NaN/Inf."""


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived: every rank stopped after the same step, whose training state is written."""


class SaveTimer:
    """Whether ``save_minutes`` have passed on this rank's clock since the last training state."""

    def __init__(self, minutes: float, clock=time.monotonic):
        self.seconds = minutes * 60
        self.clock = clock  # seconds; tests replace it
        self.restart()

    def restart(self):
        """A training state was just written (or training starts)."""
        self.since = self.clock()

    def due(self) -> bool:
        """True when time-based saving is on and its minutes have passed."""
        return self.seconds > 0 and self.clock() - self.since >= self.seconds


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
    loss_scale_overflows: int = 0  # fp16 steps the loss scaler skipped (and lowered its scale): not bad steps


@dataclass
class StepPlan:
    """How many batches, steps and epochs the run takes."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int

    @classmethod
    def of(cls, config: TrainConfig, batches_per_epoch: int) -> "StepPlan":
        """``max_steps`` when set, else ``epochs`` whole epochs; an optimiser step is ``grad_accum_steps`` batches."""
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum_steps)
        total_steps = config.max_steps or steps_per_epoch * config.epochs
        return cls(batches_per_epoch, steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch))


class LossOfBatch(paddle.nn.Layer):
    """The training forward: logits under the AMP policy, then the head's loss (float32).

    One forward for both, so that DataParallel sees every parameter used inside its
    forward pass, the CRF's transitions included.

    With ``to_static``, only the logits go through SOT; the loss runs eagerly. SOT traced the
    CRF's likelihood (a loop over positions, a host read of the longest row, index buffers sized
    by the batch) anew for batch after batch, a second or more each, and graph breaks inside it
    do not make the code after them eager. The token ids are marked dynamic in both dimensions, so
    the first program already serves every batch shape; the frames SOT starts after graph breaks
    inside PaddleNLP's encoder become dynamic once they have seen their sizes change (two more shapes).
    """

    def __init__(self, model, amp: AmpPolicy, to_static: bool = False):
        super().__init__()
        self.model = model
        self.amp = amp
        # Not full_graph: SOT keeps in eager mode what it cannot translate.
        self.logits_of = paddle.jit.to_static(self._logits, full_graph=False) if to_static else self._logits

    def _logits(self, input_ids):
        with self.amp.autocast():
            return token_logits(self.model, input_ids)

    def forward(self, input_ids, label_ids):
        # Batch and length vary from batch to batch. Only SOT reads the mark; eagerly it is an unused attribute.
        paddle.jit.marker.dynamic_dims(input_ids, [0, 1])
        return token_loss(self.model, self.logits_of(input_ids), label_ids)


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
        char_mapping = build_char_mapping(tokenizer) if config.char_mapping == "auto" else {}
        self.aligner = Aligner(tokenizer, config.max_seq_len, char_mapping)
        self.amp = AmpPolicy(config)
        self.is_main = dist.is_main_process()
        self.progress = TrainingProgress()
        self.stopped_early = False
        self.bad_in_a_row = 0  # NaN/Inf steps in a row that the loss scaler does not explain
        self.step_loss = None
        self.gradient_sync = None  # set in _prepare: the shared-memory all-reduce, where it applies
        self.save_timer = SaveTimer(config.save_minutes)

    # ------------------------------------------------------------ the loop

    def fit(self) -> TrainingResult:
        """Train, evaluating on dev every ``eval_interval`` steps and at each epoch end; test the best model."""
        self._prepare()
        stop = False
        # Until the last step, a stop signal means: finish this step, write its state, raise TrainingInterrupted.
        with catch_stop_signals() as self.stop_request:
            self.save_timer.restart()
            for epoch in range(self.progress.epoch, self.plan.epochs):
                for batch_index, (input_ids, label_ids) in self._batches_of(epoch):
                    if not self._forward_backward(input_ids, label_ids, batch_index):
                        continue  # inside an accumulation group: no optimiser step yet
                    self._optimizer_step()
                    stop = self._after_step(epoch, batch_index)
                    if stop:
                        break
                # Every epoch (and the run) ends with an evaluation, unless one ran at this very step.
                if self.progress.evaluated_at != self.progress.step and not self.stopped_early:
                    stop = self._evaluate_dev() or stop
                if stop or self.progress.step >= self.plan.total_steps:
                    break
        self.bar.close()
        if self.gradient_sync is not None:
            self.gradient_sync.close()
        if self.stopped_early and self.is_main:
            logger.info("early stopping at step %d: %d evaluations without improvement", self.progress.step,
                        self.progress.evals_without_gain)
        test = self._test_best_model() if self.splits.test is not None else None
        self.run_log.close()
        if self.progress.bad_steps and self.is_main:
            logger.warning("%d step(s) were skipped because their loss or gradients were NaN/Inf",
                           self.progress.bad_steps)
        if self.progress.loss_scale_overflows and self.is_main:
            logger.info("%d step(s) were skipped by the fp16 loss scaler (gradients overflowed its scale, which it "
                        "lowered; usual early in a run, not counted as bad steps)", self.progress.loss_scale_overflows)
        progress = self.progress
        return TrainingResult(progress.step, progress.best_metric, progress.best_dev, test, self.stopped_early,
                              progress.history, progress.bad_steps, progress.loss_scale_overflows)

    # ------------------------------------------------------------ the steps

    def _prepare(self):
        """Loader, optimiser and schedule, the resumed state if any, AMP, to_static, DataParallel, logs."""
        config = self.config
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "train_config.yaml")
        source = self._resume_source()
        if source is not None:
            self._keep_char_mapping_of(source)  # before the training features are built with it
        self.sampler, self.loader = build_train_loader(self.splits.train, self.aligner, self.labels, config,
                                                       log=self.is_main)
        self.plan = StepPlan.of(config, len(self.loader))
        self.optimizer, self.schedule = build_optimizer(config, self.model, self.plan.total_steps)
        if source is not None:
            # Before AMP decoration and DataParallel, so both start from the restored weights.
            self.progress = load_training_state(source, self.model, self.optimizer, self.schedule, dist.get_rank(),
                                                dist.get_world_size(), self.amp.scaler, current_device())
            logger.warning("resumed from %s at step %d (epoch %d, %d batches into it)", source, self.progress.step,
                           self.progress.epoch, self.progress.batches_done)
        self.resumed_at = (self.progress.epoch, self._batches_to_skip())
        self.progress.windows_per_batch = config.batch_size * dist.get_world_size()
        # On CPU a host read of a tensor waits for nothing; on a GPU it waits for the queued work (clipping).
        self.host_reads_are_free = not on_gpu()
        # The CPU measures below: float32 training on the device in use (not the use_gpu flag), each
        # installed before to_static traces the forward, so the traced program has them.
        cpu_float32 = not on_gpu() and not self.amp.enabled
        if config.matmul_bias_grad and cpu_float32:
            install_matmul_bias_grad(self.model)
        if config.dropout_masks_from_integers and cpu_float32:
            install_dropout_masks_from_integers(self.model)
        else:
            uninstall_from_attention()  # an earlier trainer of this process may have installed it
        if config.native_layer_norm and cpu_float32:
            layer_norms = install_native_layer_norm(self.model)  # 0 without a build
            if self.is_main and layer_norms:
                logger.info("layer norm: our C++ operator in %d layers while training (pipeline/native_layer_norm.py)",
                            layer_norms)
        self.model, self.optimizer = self.amp.decorate(self.model, self.optimizer)
        # Before DataParallel is built: it takes the table out of DataParallel's all-reduce.
        self.embedding_sync = dist.embedding_row_sync(self.model, config.embedding_grad_rows, on_gpu())
        # After the row sync has marked its table no_sync; in place of DataParallel's all-reduce when it applies.
        self.gradient_sync = shared_memory_gradient_sync(self.model, config.shared_memory_all_reduce, cpu_float32)
        self.wrapped = dist.wrap_for_training(LossOfBatch(self.model, self.amp, config.to_static),
                                              data_parallel=self.gradient_sync is None)
        self.wrapped.train()
        self.run_log = RunLog(self.output_dir, self.is_main, config.use_vdl)
        if source is not None:
            self.run_log.truncate(self.progress.history, self.progress.step)
        self.stats = StepStats()
        self.bar = tqdm(total=self.plan.total_steps, initial=self.progress.step, desc="train", unit="step",
                        disable=not self.is_main, mininterval=2)
        if self.is_main and self.embedding_sync is not None:
            logger.info("gradients: the word-embedding table (%d rows) is all-reduced by the rows the batches used",
                        self.embedding_sync.vocab_size)
        if self.is_main:
            logger.info("training: %d workers x batch %d x accumulation %d; %d steps (%d epochs of %d steps)",
                        dist.get_world_size(), config.batch_size, config.grad_accum_steps, self.plan.total_steps,
                        self.plan.epochs, self.plan.steps_per_epoch)

    def _batches_to_skip(self) -> int:
        """Batches of the resumed epoch already done, counted in this run's batches.

        With another worker count a batch holds another number of windows: the epoch continues after
        as many windows as the interrupted run consumed (rounded to whole accumulation groups). The
        global batches are cut differently, so the rest of this epoch is not exactly the windows the
        interrupted run had left; from the next epoch on, every epoch is the one a run of this size sees.
        """
        done, before = self.progress.batches_done, self.progress.windows_per_batch
        now = self.config.batch_size * dist.get_world_size()
        if not done or before in (None, now):
            return done
        groups = round(done * before / now / self.config.grad_accum_steps)
        skip = min(groups * self.config.grad_accum_steps, self.plan.batches_per_epoch)
        if self.is_main:
            logger.warning("resumed with %d windows per batch instead of %d (another worker count or batch_size): "
                           "epoch %d continues after %d of its windows, at batch %d of %d; the rest of this epoch "
                           "may repeat or leave out a few windows the interrupted run had not seen, later epochs "
                           "are exact", now, before, self.progress.epoch, done * before, skip,
                           self.plan.batches_per_epoch)
        return skip

    def _batches_of(self, epoch: int):
        """``(batch_index, batch)`` of one epoch, without the batches a resumed run consumed already."""
        if self.progress.step >= self.plan.total_steps:
            return  # resumed from a state written at the last step (a stop there): no step is left to run
        self.sampler.set_epoch(epoch)
        resumed_epoch, skip = self.resumed_at
        if epoch != resumed_epoch:
            self.progress.evaluated_at = None
            skip = 0
        for batch_index, batch in enumerate(self.loader):
            # The order depends only on (seed, epoch), so the batches after the skipped ones are exactly
            # the ones the interrupted run would have seen.
            if batch_index >= skip:
                yield batch_index, batch

    def _forward_backward(self, input_ids, label_ids, batch_index: int) -> bool:
        """Loss and gradients of one micro-batch; True when it ends an accumulation group."""
        config = self.config
        boundary = ((batch_index + 1) % config.grad_accum_steps == 0
                    or batch_index + 1 == self.plan.batches_per_epoch)
        # Gradients are all-reduced only on the micro-batch that ends an accumulation group.
        sync = contextlib.nullcontext() if boundary else dist.no_gradient_sync(self.wrapped)
        with sync:
            loss = self.wrapped(input_ids, label_ids)
            self.amp.backward(loss / config.grad_accum_steps)
        if self.embedding_sync is not None:
            self.embedding_sync.note_ids(input_ids)
            if boundary:
                self.embedding_sync.all_reduce()
        if boundary and self.gradient_sync is not None:
            self.gradient_sync.all_reduce()
        # The accumulation group's loss, on the device: read only when the loss scaler skips the step.
        self.step_loss = loss.detach() if self.step_loss is None else self.step_loss + loss.detach()
        self.stats.add(loss.detach(), (input_ids != self.aligner.pad_id).astype("int64").sum(), input_ids.size)
        return boundary

    def _optimizer_step(self) -> bool:
        """Clip and apply the accumulated gradients, or skip them if not finite; True when applied.

        fp16 overflows that the loss scaler explains (``AmpPolicy.step``) are counted apart, as
        ``loss_scale_overflows``; only the other non-finite steps count toward ``max_bad_steps``.

        One norm serves the NaN/Inf check and clipping; it stays on the device (on a GPU the only host
        read of a step is whether to skip it: ``AmpPolicy.step``), and is read on log steps. The
        gradients are all-reduced already, so every rank sees the same norm and takes the same branch.
        A skipped step still counts, as with the fp16 scaler: steps and batches stay in lockstep.
        """
        progress = self.progress
        self.amp.unscale(self.optimizer)
        parameters = self.model.parameters()
        grad_norm = global_grad_norm(parameters)
        # Non-finite gradients stay non-finite when clipped, and are skipped after.
        clip_grads_(parameters, self.config.max_grad_norm, grad_norm, skip_unclipped=self.host_reads_are_free)
        outcome = self.amp.step(self.optimizer, grad_norm, self.step_loss)
        self.step_loss = None
        if outcome == APPLIED:
            self.stats.add_grad_norm(grad_norm)
            self.bad_in_a_row = 0
        elif outcome == LOSS_SCALE_OVERFLOW:
            # Neither a bad step nor a good one: bad_in_a_row goes on from where it was.
            progress.loss_scale_overflows += 1
            self.stats.add_loss_scale_overflow()
        else:
            self._skip_bad_step()
        self.optimizer.clear_grad()
        self.schedule.step()
        progress.step += 1
        self.bar.update(1)
        return outcome == APPLIED

    def _skip_bad_step(self):
        """Count a NaN/Inf step; stop the run when ``max_bad_steps`` come in a row."""
        progress, config = self.progress, self.config
        progress.bad_steps += 1
        self.bad_in_a_row += 1
        if self.is_main:
            logger.warning("step %d: loss or gradients are NaN/Inf; update skipped (%d in a row, %d in all)",
                           progress.step + 1, self.bad_in_a_row, progress.bad_steps)
        if self.bad_in_a_row >= config.max_bad_steps:
            last_state = latest_training_state(self.output_dir)
            raise NumericalError(
                f"stopping at step {progress.step + 1}: {self.bad_in_a_row} steps in a row (from step "
                f"{progress.step + 2 - self.bad_in_a_row}) had NaN/Inf loss or gradients (max_bad_steps="
                f"{config.max_bad_steps}). Last good training state: {last_state or 'none written'}; "
                f"best model so far: {self.best_dir if self.best_dir.is_dir() else 'none saved'}. "
                f"Lower learning_rate, check the data, or turn amp off.")

    def _after_step(self, epoch: int, batch_index: int) -> bool:
        """Log, evaluate, save as the intervals, the clock or a stop signal say; True when the run should
        stop; raises TrainingInterrupted after the state of a signalled stop is written."""
        config, step = self.config, self.progress.step
        if step % config.log_interval == 0:
            self._log_training(step)
        if config.eval_interval and step % config.eval_interval == 0:
            self.progress.evaluated_at = step
            started = time.perf_counter()
            self._evaluate_dev()
            self.stats.exclude(time.perf_counter() - started)  # throughput counts training time only
        stop_now, time_due = self._agree_on_stop_and_clock()
        if stop_now and self.is_main:
            logger.warning("step %d: stop requested by a signal; writing its training state, then exiting", step)
        # After the evaluation, so that the state carries this step's best metric.
        if (config.save_interval and step % config.save_interval == 0) or time_due or stop_now:
            self.progress.epoch, self.progress.batches_done = epoch, batch_index + 1
            self._save_training_state()
        if stop_now:
            self._stop_after(step)
        return self.stopped_early or step >= self.plan.total_steps

    def _agree_on_stop_and_clock(self) -> tuple[bool, bool]:
        """(a stop signal arrived, save_minutes passed) on any rank (collective with several workers).

        Ranks get a signal at different moments (the launcher signals one worker after another) and
        their clocks differ: the maximum over ranks makes all of them stop, or save, after the same step.
        """
        local = np.array([self.stop_request.requested, self.save_timer.due()], dtype=np.int64)
        agreed = dist.all_reduce_max(local) if dist.get_world_size() > 1 else local
        return bool(agreed[0]), bool(agreed[1])

    def _stop_after(self, step: int):
        """Every rank waits for rank 0's state of ``step``, then the run ends with TrainingInterrupted."""
        dist.barrier()  # nobody exits (and gets the launcher to stop the others) before the state is complete
        self.bar.close()
        self.run_log.close()
        request = self.stop_request
        if request.requested:  # repeats are counted: they show that the launcher's burst did not kill this rank
            repeats = f", {request.count} signals in all" if request.count > 1 else ""
            cause = f"{request.signal_name} received{repeats}"
        else:
            cause = "another rank received a stop signal"
        raise TrainingInterrupted(f"stopped after step {step} of {self.plan.total_steps} ({cause}); its training "
                                  f"state is {training_state_dir(self.output_dir, step)}; rerun the same command "
                                  f"to continue from it (exit code {RELAUNCH_EXIT_CODE}: relaunch me)")

    def _log_training(self, step: int):
        """The training figures since the last log line (collective: summed over ranks)."""
        figures = self.stats.reduce()
        learning_rate = self.schedule.get_lr()
        if self.is_main:
            self.bar.set_postfix(loss=f"{figures['loss']:.4f}", lr=f"{learning_rate:.2e}",
                                 tok_s=f"{figures['tokens_per_second']:.0f}")
        self.run_log.training(step, learning_rate, figures)

    def _evaluate_dev(self) -> bool:
        """Evaluate on dev, save the best model if it improved; True when early stopping says stop."""
        progress, config = self.progress, self.config
        summary = self.evaluate_split(self.splits.dev, "dev")
        record = {"step": progress.step, **{k: v for k, v in summary.items() if k != "per_type"},
                  "per_type": summary["per_type"]}
        progress.history.append(record)
        self.run_log.evaluation(record)
        # Every rank holds the same reduced metric, so they all take the same branch.
        metric = summary[config.compare_metrics]
        # Against the best summary's own value of this metric: a state saved before the metric existed (its
        # dev figures were strict IOB2 only) has none, and this evaluation then becomes the best.
        best = (progress.best_dev or {}).get(config.compare_metrics)
        if best is None or metric > best:
            progress.best_metric, progress.best_dev, progress.evals_without_gain = metric, summary, 0
            self._save_best(summary)
        else:
            progress.evals_without_gain += 1
        release_freed_memory()  # evaluation's (and saving's) peak goes back to the kernel, not kept for good
        patience = config.early_stopping_patience
        self.stopped_early = self.stopped_early or bool(patience) and progress.evals_without_gain >= patience
        return self.stopped_early

    def _save_training_state(self):
        """Rank 0 writes the full training state; every rank's own RNG state goes with it."""
        rng_states = dist.all_gather_objects(own_rng_state(current_device()))  # collective: every rank
        if self.is_main:
            save_training_state(self.output_dir, self.model, self.optimizer, self.schedule, self.config,
                                self.progress, rng_states, self.amp.scaler_state(), self.aligner.char_mapping)
            # Only after the new state is complete, so a crash here never leaves fewer than before.
            prune_training_states(self.output_dir, self.config.keep_checkpoints)
            release_freed_memory()
        self.save_timer.restart()

    def _test_best_model(self) -> dict:
        """Reload the best weights on every rank, evaluate once on test, record the result."""
        self._load_best()
        with self.amp.float32_weights(self.model):
            counts, predictions = evaluate(self.labeller(), self.splits.test, description="test",
                                           keep_predictions=True)
        summary = counts.summary()
        if self.is_main:
            # What the test metrics were computed from, so anyone can recompute them (e.g. with seqeval).
            write_predictions(self.output_dir / TEST_PREDICTIONS_FILE, self.splits.test, predictions)
            logger.info("test (best model): precision %.4f recall %.4f f1 %.4f", summary["precision"],
                        summary["recall"], summary["f1"])
            progress = self.progress
            write_json(self.output_dir / TEST_METRICS_FILE,
                       {"step": best_step(progress.history, progress.best_metric, self.config.compare_metrics),
                        "test": summary})
            add_metrics(self.best_dir, test=summary)
            self.run_log.scalars({f"test/{k}": summary[k] for k in SCORE_KEYS}, progress.step)
        dist.barrier()
        return summary

    # ------------------------------------------------------------ evaluation, saving, resuming

    def labeller(self) -> TokenLabeller:
        """The evaluation engine over the bare model, as predict.py runs it; use it under
        ``self.amp.float32_weights`` (float32, no autocast) so that its labels are predict.py's."""
        return TokenLabeller(DynamicEngine(self.model), self.aligner, self.labels, self.config.eval_batch_size,
                             decoding=self.config.decoding)

    def evaluate_split(self, examples, name: str) -> dict:
        """Exact P/R/F1 summary on a split, in float32 as predict.py computes it (collective: every rank calls it)."""
        with self.amp.float32_weights(self.model):
            counts = evaluate(self.labeller(), examples, description=name)
        return counts.summary()

    def _save_best(self, summary: dict):
        """Rank 0 writes best_model/ atomically; every rank then waits, so nobody reads half of it."""
        step = self.progress.step
        if self.is_main:
            save_model_checkpoint(self.best_dir, self.model, self.tokenizer, self.config, self.labels,
                                  metrics={"step": step, "dev": summary}, char_mapping=self.aligner.char_mapping)
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
        step = training_state_step(source) if source is not None else -1
        seen = dist.all_reduce_max(np.array([step, -step], dtype=np.int64))
        if seen[0] != -seen[1]:
            # Not worth a relaunch (train_dist.py exits 2): every rank would see the same files again.
            raise TrainingStatesDifferError(
                f"ranks see different training states under {self.output_dir} (newest step on any rank: "
                f"{seen[0]}, this rank: {source or 'none'}); checkpoint_dir must be on storage every node shares "
                f"to resume, or start afresh with resume=off overwrite=true")
        return source

    def _keep_char_mapping_of(self, source: Path):
        """Continue with the character mapping the resumed state was trained with (none for states
        written before the mapping existed), so the resumed run sees the very same inputs."""
        saved = load_char_mapping(source)
        if saved != self.aligner.char_mapping:
            logger.warning("%s was trained with a character mapping of %d characters, this run derived %d: "
                           "continuing with the saved one", source, len(saved), len(self.aligner.char_mapping))
            self.aligner = Aligner(self.tokenizer, self.config.max_seq_len, saved)


def best_step(history: list, best_metric, key: str):
    """Step of the first evaluation that reached the best metric."""
    return next((record["step"] for record in history if record.get(key) == best_metric), None)
