"""Self-describing checkpoints, written atomically.

A model checkpoint directory holds everything the predictor needs:
``model.pdparams`` (weights), ``config.json`` (PaddleNLP model config with
``id2label``), the tokenizer files, ``pipeline.json`` (label list, text unit,
max_seq_len, tokenizer class), ``char_mapping.json`` (the characters fed to the
model as others, ``pipeline.char_mapping``), ``train_config.yaml`` and ``metrics.json``.
It is built in a temporary sibling directory and renamed into place, so a
crash mid-write never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import paddle

from .char_mapping import check_char_mapping
from .config import TrainConfig, save_config
from .files import atomic_directory, interrupted_replacement, read_json_object, write_json
from .metrics import upgrade_summary

WEIGHTS_FILE = "model.pdparams"
META_FILE = "pipeline.json"
METRICS_FILE = "metrics.json"
TRAIN_CONFIG_FILE = "train_config.yaml"
MODEL_CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pdopt"
TRAINING_STATE_FILE = "training_state.json"
RNG_FILE = "rng.pdstate"
SCALER_FILE = "loss_scaler.pdstate"
# Optional: checkpoints written before the character mapping existed have none, and map nothing.
CHAR_MAPPING_FILE = "char_mapping.json"
# Test hook: seconds to pause in the middle of writing a checkpoint, so a test can kill the writer there.
SAVE_DELAY_VARIABLE = "NERPIPE_TEST_SAVE_DELAY"
FORMAT_VERSION = 1
REQUIRED_FILES = (WEIGHTS_FILE, META_FILE, MODEL_CONFIG_FILE)
# What every training state holds (the loss scaler's state only with fp16).
TRAINING_STATE_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE, RNG_FILE)
# The end of every error about a checkpoint file that cannot be read as JSON.
_DAMAGED = "the checkpoint is damaged"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete or does not fit what is asked of it."""


class TrainingStatesDifferError(CheckpointError):
    """Ranks that see different training states to resume from. Every rank raises it at the same point,
    right after the collective that compared them, so the ranks can leave together (``dist.shutdown``)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk, a read-only or vanished directory)."""


@contextlib.contextmanager
def _writing(target: Path):
    """Turn an OSError while ``target`` is written into one CheckpointWriteError saying what survived."""
    try:
        yield
    except OSError as error:
        # atomic_directory has already dropped the half-written copy and left the previous one in place.
        raise CheckpointWriteError(
            f"could not write {target}: {error}; it was not replaced, so the previous training states and "
            f"best_model/ are as they were. Free space (or make {target.parent} writable), then rerun the same "
            f"command to resume from the newest training state") from error


def float32_state_dict(model: paddle.nn.Layer) -> dict:
    """The model's weights in float32 (AMP O2 keeps half-precision parameters): every saved
    ``model.pdparams`` is float32, whatever the training precision."""
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.dtype in (paddle.float16, paddle.bfloat16):
            tensor = tensor.astype("float32")
        state[name] = tensor
    return state


def _test_pause() -> None:
    delay = float(os.environ.get(SAVE_DELAY_VARIABLE, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def save_model_checkpoint(directory, model, tokenizer, config: TrainConfig, labels: list[str],
                          metrics: dict | None = None, extra_files: dict | None = None,
                          char_mapping: dict[str, str] | None = None) -> Path:
    """Write a complete, self-describing model directory atomically; rank 0 only (``char_mapping``:
    the aligner's, written when given)."""
    target = Path(directory)
    with _writing(target), atomic_directory(target) as temporary:
        paddle.save(float32_state_dict(model), str(temporary / WEIGHTS_FILE))
        _test_pause()
        model.config.save_pretrained(str(temporary))
        tokenizer.save_pretrained(str(temporary))
        write_json(temporary / META_FILE, {
            "format_version": FORMAT_VERSION,
            "labels": list(labels),
            "text_unit": config.text_unit,
            "max_seq_len": config.max_seq_len,
            "tokenizer_class": type(tokenizer).__name__,
            "model_class": type(model).__name__,
            "base_model": config.model,
            "decoding": config.decoding,
        })
        save_config(config, temporary / TRAIN_CONFIG_FILE)
        write_json(temporary / METRICS_FILE, metrics or {})
        if char_mapping is not None:
            write_json(temporary / CHAR_MAPPING_FILE, char_mapping)
        for name, writer in (extra_files or {}).items():
            writer(temporary / name)
    return target


@dataclass
class InferenceBundle:
    """What a checkpoint directory describes: a model ready to run, and how to feed it."""

    model: paddle.nn.Layer
    tokenizer: object
    labels: list[str]
    text_unit: str
    max_seq_len: int
    meta: dict


def read_meta(directory) -> dict:
    """``pipeline.json`` of a checkpoint, after checking the required files are there."""
    directory = Path(directory)
    if not directory.is_dir():
        old_copy = interrupted_replacement(directory)
        if old_copy is not None:
            # Not repaired here: prediction may run on read-only storage, or beside a training run.
            raise CheckpointError(f"checkpoint directory {directory} does not exist, but {old_copy.name} beside it "
                                  f"is its previous copy, left by a save killed between its two renames; the next "
                                  f"training run in that checkpoint_dir puts it back, or do it now: "
                                  f"mv '{old_copy}' '{directory}'")
        if directory.exists():
            raise CheckpointError(f"checkpoint {directory} is a file, not a directory; give the best_model/ directory "
                                  f"that train_dist.py wrote (it holds {', '.join(REQUIRED_FILES)})")
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {missing}; is it a best_model/ directory "
                              f"written by train_dist.py?")
    meta = read_json_object(directory / META_FILE, CheckpointError, _DAMAGED)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory} has format version {meta.get('format_version')!r}; "
                              f"this code reads version {FORMAT_VERSION}")
    return meta


def load_char_mapping(directory) -> dict[str, str]:
    """The character mapping a checkpoint or training state was trained with; {} if it has none."""
    path = Path(directory) / CHAR_MAPPING_FILE
    if not path.is_file():
        return {}
    try:
        return check_char_mapping(read_json_object(path, CheckpointError, _DAMAGED), path)
    except ValueError as error:
        raise CheckpointError(f"{error}; {_DAMAGED}") from None


def saved_decoding(directory, meta: dict) -> str:
    """The decoding a checkpoint was selected with; ``constrained`` for checkpoints written before
    ``decoding`` existed (their argmax labels could be invalid BIO; the constrained ones never are)."""
    from .decoding import DECODINGS

    decoding = meta.get("decoding", "constrained")
    if decoding not in DECODINGS:
        raise CheckpointError(f"{Path(directory) / META_FILE}: decoding must be one of {list(DECODINGS)}, "
                              f"got {decoding!r}")
    return decoding


def load_weights(model: paddle.nn.Layer, path) -> None:
    """Load a state dict, failing on any missing, unexpected or mis-shaped weight; each tensor is cast to
    its parameter's dtype (float32 files into an O2 model's float16/bfloat16 parameters)."""
    try:
        state = paddle.load(str(path))
    except Exception as error:  # Paddle raises assorted types for truncated or foreign files
        raise CheckpointError(f"{path} cannot be read as Paddle weights ({type(error).__name__}: {error}); "
                              f"the file is damaged or not a .pdparams file") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    mismatched = [f"{k}: {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
                  if list(state[k].shape) != list(own[k].shape)]
    if mismatched:
        raise CheckpointError(f"{path} does not fit the model (label set or architecture differs): {mismatched[:5]}")
    # Saved weights are float32, but AMP O2 leaves a model's parameters float16/bfloat16 (decorate casts
    # them in place), and set_state_dict refuses any other dtype ("Variable dtype not match").
    model.set_state_dict({name: _as_dtype(tensor, own[name].dtype) for name, tensor in state.items()})


def _as_dtype(tensor, dtype):
    if not isinstance(tensor, paddle.Tensor):
        tensor = paddle.to_tensor(tensor)
    return tensor if tensor.dtype == dtype else tensor.astype(dtype)


def load_tokenizer_and_meta(directory) -> tuple[dict, object]:
    """``pipeline.json`` (checked against ``config.json``'s id2label) and the tokenizer of a
    checkpoint, without building its model."""
    directory = Path(directory)
    meta = read_meta(directory)
    saved_labels = read_json_object(directory / MODEL_CONFIG_FILE, CheckpointError, _DAMAGED).get("id2label")
    if saved_labels is not None and [saved_labels[str(i)] for i in range(len(saved_labels))] != meta["labels"]:
        raise CheckpointError(f"{directory}: the label list in {META_FILE} and id2label in {MODEL_CONFIG_FILE} differ")
    return meta, load_tokenizer(directory, meta["tokenizer_class"])


def load_tokenizer(directory, class_name: str):
    """The PaddleNLP tokenizer ``class_name`` saved in ``directory`` (a checkpoint or an export)."""
    import paddlenlp.transformers as transformers

    directory = Path(directory)
    tokenizer_class = getattr(transformers, class_name, None)
    if tokenizer_class is None:
        raise CheckpointError(f"{directory}: unknown tokenizer class {class_name!r}")
    # Checked here: PaddleNLP would otherwise fail with "missing 'vocab_file'", naming no file.
    missing = sorted(name for name in getattr(tokenizer_class, "resource_files_names", {}).values()
                     if not (directory / name).is_file())
    if missing:
        raise CheckpointError(f"{directory} is missing the tokenizer file(s) {missing} that "
                              f"{class_name} needs; copy them from the model it was trained from")
    return tokenizer_class.from_pretrained(str(directory))


def load_inference_bundle(directory) -> InferenceBundle:
    """Rebuild model and tokenizer from a checkpoint directory alone."""
    from .models import token_classifier_from_config_dir

    directory = Path(directory)
    meta, tokenizer = load_tokenizer_and_meta(directory)
    model = token_classifier_from_config_dir(directory)
    load_weights(model, directory / WEIGHTS_FILE)
    model.eval()
    return InferenceBundle(model, tokenizer, meta["labels"], meta["text_unit"], int(meta["max_seq_len"]), meta)


def load_crf_transitions(directory):
    """A checkpoint's CRF transition scores as float32 numpy (None for the linear head), without
    building its model."""
    directory = Path(directory)
    if read_json_object(directory / MODEL_CONFIG_FILE, CheckpointError, _DAMAGED).get("ner_head") != "crf":
        return None
    state = paddle.load(str(directory / WEIGHTS_FILE))
    if "crf.transitions" not in state:
        raise CheckpointError(f"{directory}: config.json says ner_head crf but {WEIGHTS_FILE} has no crf.transitions")
    return state["crf.transitions"].numpy().astype("float32")


def training_state_dir(output_dir, step: int) -> Path:
    """``checkpoint_dir/checkpoints/step-00000100``: zero-padded so names sort by step."""
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def _rename_optimizer_keys(state: dict, mapping: dict[str, str]) -> dict:
    """Rename optimiser-state keys whose prefix is a parameter name in ``mapping``."""
    prefixes = sorted(mapping, key=len, reverse=True)  # longest first: linear_11.w_0 before linear_1.w_0

    def rename(key: str) -> str:
        for prefix in prefixes:
            if key == prefix or key.startswith(prefix + "_"):
                return mapping[prefix] + key[len(prefix):]
        return key

    return {rename(k): (_rename_optimizer_keys(v, mapping) if isinstance(v, dict) else v) for k, v in state.items()}


def portable_optimizer_state(model, optimizer) -> dict:
    """Optimiser state keyed by structured parameter names (``bert.encoder...``), not by Paddle's
    generated ones (``linear_12.w_0``), which depend on how many layers the process built before."""
    return _rename_optimizer_keys(optimizer.state_dict(), {p.name: f"@{n}" for n, p in model.named_parameters()})


def load_portable_optimizer_state(model, optimizer, state: dict) -> None:
    """Inverse of ``portable_optimizer_state`` for this process's parameter names."""
    optimizer.set_state_dict(_rename_optimizer_keys(state, {f"@{n}": p.name for n, p in model.named_parameters()}))


@dataclass
class TrainingProgress:
    """Where the training loop is: everything besides tensors that a resumed run must continue from.

    Its saved form (``training_state.json``, beside the schedule's state) belongs to this module:
    ``to_state`` and ``from_state`` are the only code that reads or writes it.
    """

    step: int = 0  # optimiser steps taken (skipped NaN/Inf steps included)
    epoch: int = 0  # the epoch being run
    batches_done: int = 0  # batches of ``epoch`` consumed when the state was written
    # Windows per batch over all ranks (batch_size x workers) when it was written: a resume with another
    # worker count converts batches_done with it (None in states written before it was recorded).
    windows_per_batch: int | None = None
    best_metric: float | None = None  # best dev value of config.compare_metrics so far
    best_dev: dict | None = None  # the dev summary that reached it
    evals_without_gain: int = 0  # for early stopping
    history: list = field(default_factory=list)  # every dev evaluation's record, in order
    evaluated_at: int | None = None  # step of this epoch's last dev evaluation, so the epoch end skips a repeat
    bad_steps: int = 0  # steps whose loss or gradients were NaN/Inf (their update skipped)
    loss_scale_overflows: int = 0  # fp16 steps the loss scaler skipped (not bad steps)

    def to_state(self) -> dict:
        """The JSON form written into ``training_state.json``."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "TrainingProgress":
        """Read the JSON form; keys this version does not know are ignored, missing ones take defaults
        (states written before ``bad_steps`` existed have none). Dev summaries written before the
        conlleval-style scores existed are read with their strict figures under the ``strict_`` keys."""
        known = {f.name for f in fields(cls)}
        progress = cls(**{k: v for k, v in state.items() if k in known})
        progress.history = [upgrade_summary(record) for record in progress.history]
        progress.best_dev = progress.best_dev and upgrade_summary(progress.best_dev)
        return progress


def training_state_step(directory) -> int:
    """The step a training state directory was written at (raises CheckpointError if it is not one)."""
    path = Path(directory) / TRAINING_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"resume: {directory} holds no {TRAINING_STATE_FILE}; it is not a training state")
    return int(read_json_object(path, CheckpointError, _DAMAGED)["step"])


def add_metrics(directory, **metrics) -> None:
    """Add entries (e.g. ``test=...``) to a model checkpoint's ``metrics.json``, keeping the others."""
    path = Path(directory) / METRICS_FILE
    write_json(path, {**read_json_object(path, CheckpointError, _DAMAGED), **metrics})


def save_training_state(output_dir, model, optimizer, schedule, config: TrainConfig, progress: TrainingProgress,
                        rng_states: list, scaler_state: dict | None = None,
                        char_mapping: dict[str, str] | None = None) -> Path:
    """Weights, optimiser, schedule, RNG, loss scaler and loop progress, written atomically; rank 0 only.

    ``rng_states`` is every rank's ``own_rng_state`` in rank order (ranks draw different dropout masks).
    """
    target = training_state_dir(output_dir, progress.step)
    with _writing(target), atomic_directory(target) as temporary:
        paddle.save(float32_state_dict(model), str(temporary / WEIGHTS_FILE))
        _test_pause()
        paddle.save(portable_optimizer_state(model, optimizer), str(temporary / OPTIMIZER_FILE))
        # Dropout draws from Paddle's generator: restoring it makes a resumed run repeat the same masks.
        paddle.save({"own_per_rank": list(rng_states)}, str(temporary / RNG_FILE))
        if scaler_state is not None:
            paddle.save(scaler_state, str(temporary / SCALER_FILE))
        write_json(temporary / TRAINING_STATE_FILE, {**progress.to_state(), "schedule": schedule.state_dict()})
        save_config(config, temporary / TRAIN_CONFIG_FILE)
        if char_mapping is not None:
            write_json(temporary / CHAR_MAPPING_FILE, char_mapping)
    return target


def complete_training_states(output_dir) -> list[Path]:
    """``checkpoints/step-*`` directories that are complete, oldest first (temporary ones never are)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / TRAINING_STATE_FILE).is_file())


def prune_training_states(output_dir, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete training states; return what was deleted."""
    complete = complete_training_states(output_dir)
    doomed = complete[:-keep] if keep > 0 else []
    for directory in doomed:
        shutil.rmtree(directory, ignore_errors=True)
    return doomed


def latest_training_state(output_dir) -> Path | None:
    """Newest complete ``checkpoints/step-*`` directory, or None."""
    complete = complete_training_states(output_dir)
    return complete[-1] if complete else None


def training_state_problem(directory) -> str | None:
    """Why a complete-looking training state cannot be resumed from (a file missing, unreadable or
    cut short), or None. Reads every file the way ``load_training_state`` will."""
    directory = Path(directory)
    missing = [n for n in TRAINING_STATE_FILES if not (directory / n).is_file()]
    if missing:
        return f"missing {missing}"
    try:
        state = read_json_object(directory / TRAINING_STATE_FILE, CheckpointError, _DAMAGED)
    except CheckpointError as error:
        return str(error)
    if not isinstance(state.get("step"), int) or "schedule" not in state:
        return f"{TRAINING_STATE_FILE} has no step or schedule"
    try:
        load_char_mapping(directory)
    except CheckpointError as error:
        return str(error)
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE):
        try:
            paddle.load(str(directory / name))
        except Exception as error:  # Paddle raises assorted types for truncated or foreign files
            return f"{name} cannot be read ({type(error).__name__}: {error})"
    return None


def latest_intact_training_state(output_dir) -> Path | None:
    """Newest training state that can be resumed from; damaged newer ones are skipped with a warning
    (older states are kept for exactly this: a crash or a full disk while the newest was written)."""
    for directory in reversed(complete_training_states(output_dir)):
        problem = training_state_problem(directory)
        if problem is None:
            return directory
        logging.getLogger(__name__).warning("skipping damaged training state %s (%s); trying the one before it",
                                            directory, problem)
    return None


def resume_source(config: TrainConfig) -> Path | None:
    """The training state ``config.resume`` names: None for 'off', the newest intact one under
    ``checkpoint_dir`` for 'auto' (None when there is none), else the given directory."""
    if config.resume == "off":
        return None
    return latest_intact_training_state(config.checkpoint_dir) if config.resume == "auto" else Path(config.resume)


def load_training_state(directory, model, optimizer, schedule, rank: int = 0, world_size: int = 1,
                        scaler=None, device: str = "cpu") -> TrainingProgress:
    """Restore weights, optimiser, schedule, this rank's RNG (on ``device``, Paddle's 'cpu' or 'gpu:N')
    and the loss scaler from ``directory``; return the loop progress."""
    directory = Path(directory)
    missing = [n for n in TRAINING_STATE_FILES if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"training state {directory} is missing {missing}")
    load_weights(model, directory / WEIGHTS_FILE)
    load_portable_optimizer_state(model, optimizer, paddle.load(str(directory / OPTIMIZER_FILE)))
    state = read_json_object(directory / TRAINING_STATE_FILE, CheckpointError, _DAMAGED)
    schedule.set_state_dict(state.pop("schedule"))
    per_rank = _own_rng_states_of(paddle.load(str(directory / RNG_FILE)))
    if len(per_rank) != world_size:
        logging.getLogger(__name__).warning(
            "%s was written by %d workers and is resumed by %d: dropout masks will differ from an "
            "uninterrupted run (everything else is restored exactly)", directory, len(per_rank), world_size)
    restore_own_rng_state(per_rank[rank % len(per_rank)], device, directory)
    if scaler is not None and (directory / SCALER_FILE).is_file():
        scaler.load_state_dict(paddle.load(str(directory / SCALER_FILE)))
    return TrainingProgress.from_state(state)


def own_rng_state(device: str) -> dict:
    """This process's own generator state on ``device`` ('cpu' or 'gpu:N', ``paddle.get_device()``).

    On a GPU ``paddle.get_rng_state()`` returns one state per visible GPU (``framework/random.py``), and
    under the launcher every worker sees every card: a worker draws its dropout masks from its own card's
    generator only, so that one is kept, and a resume on another number of GPUs can still restore it.
    """
    kind, _, index = device.partition(":")
    states = paddle.get_rng_state()
    return {"device": kind, "state": states[int(index or 0) if kind == "gpu" else 0]}


def _own_rng_states_of(saved: dict) -> list[dict]:
    """Every rank's ``own_rng_state`` from an RNG file, the older layouts included: a ``get_rng_state()``
    list per rank (``paddle_per_rank``), or one list for the whole run (``paddle``). Those were written
    by CPU runs, whose list is the CPU generator alone."""
    if "own_per_rank" in saved:
        return list(saved["own_per_rank"])
    lists = saved["paddle_per_rank"] if "paddle_per_rank" in saved else [saved["paddle"]]
    return [{"device": "cpu" if len(states) == 1 else "gpu", "state": states[0]} for states in lists]


def restore_own_rng_state(saved: dict, device: str, source) -> None:
    """Set this process's generator on ``device`` to ``saved`` (an ``own_rng_state``), leaving the other
    cards' generators as they are, so any GPU count works (``set_rng_state`` wants one state per visible
    GPU). A state written on another kind of device (CPU <-> GPU) cannot be restored: warn and go on."""
    kind, _, index = device.partition(":")
    if saved["device"] != kind:
        logging.getLogger(__name__).warning(
            "%s was written on %s and is resumed on %s: its random generator state cannot be restored there, "
            "so dropout masks will differ from an uninterrupted run (everything else is restored exactly)",
            source, saved["device"].upper(), kind.upper())
        return
    states = list(paddle.get_rng_state())
    states[int(index or 0) if kind == "gpu" else 0] = saved["state"]
    paddle.set_rng_state(states)


def weights_digest(model: paddle.nn.Layer) -> str:
    """sha256 over every float32 weight in name order: equal on replicas holding equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(float32_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
