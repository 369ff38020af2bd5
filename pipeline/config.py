"""The one typed training config: defaults, then a YAML file, then ``key=value`` overrides.

Unknown keys, wrong types and impossible values are rejected with the key's
name before any work starts. The resolved config is saved next to the outputs
and inside every checkpoint. Names follow PaddleHub's fine-tune API where it
has one (``epochs``, ``batch_size``, ``checkpoint_dir``, ``compare_metrics``...).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .decoding import DECODINGS
from .labels import SCHEMES
from .metrics import SCORE_KEYS

AMP_MODES = ("off", "fp16", "bf16")
AMP_LEVELS = ("O1", "O2")
# Any corpus score of a summary: f1/precision/recall are conlleval-style, strict_* strict IOB2 (pipeline/metrics.py).
COMPARE_METRICS = SCORE_KEYS
DATA_FORMATS = ("auto", "tsv", "conll", "jsonl")
TAG_SCHEMES = ("auto", *SCHEMES)
TEXT_UNITS = ("char", "word")
HEADS = ("linear", "crf")
USE_GPU_CHOICES = ("auto", "true", "false")  # decided by pipeline.device before Paddle loads
CHAR_MAPPINGS = ("auto", "off")


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type, or has an impossible value."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2): 1.1 also reads off/on/yes/no as booleans,
    which turned choices such as `resume=off` or `amp: off` into False."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _read_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


def _doc(text: str, default):
    return field(default=default, metadata={"doc": text})


@dataclass
class TrainConfig:
    """Everything a training run needs; saved with every checkpoint."""

    # --- model and data ---
    model: str = _doc("PaddleHub name, PaddleNLP name or local model directory.", "m3e-small")
    dataset: str = _doc(
        "'msra_ner' (fetched by `python -m pipeline.assets fetch`) or a directory holding "
        "train/dev/test files (.tsv, .conll/.txt or .jsonl).",
        "msra_ner",
    )
    train_file: typing.Optional[str] = _doc("Training file; overrides the one found in `dataset`.", None)
    dev_file: typing.Optional[str] = _doc("Dev file used for model selection; overrides `dataset`'s.", None)
    test_file: typing.Optional[str] = _doc("Test file evaluated once with the best model; overrides `dataset`'s.", None)
    data_format: str = _doc("File layout: auto (by extension), tsv, conll or jsonl.", "auto")
    tag_scheme: str = _doc("Tag scheme of the files: auto, bio, bioes or bmes (converted to BIO).", "auto")
    labels: typing.Optional[typing.List[str]] = _doc(
        "BIO label list; default: read from the training data (PaddleHub's order for msra_ner).", None
    )
    head: str = _doc("Token-classification head: 'linear' (softmax per token) or 'crf' (a linear-chain CRF "
                     "over the tokens on top of the linear layer; Viterbi decoding).", "linear")
    decoding: str = _doc(
        "How per-token scores become labels in evaluation and prediction: 'constrained' (Viterbi over the "
        "log-probabilities, or the CRF's scores, with the moves strict BIO forbids removed: predictions are always "
        "valid BIO) or 'argmax' (per token, or the CRF's Viterbi alone). Recorded in the checkpoint.", "constrained")
    text_unit: str = _doc("'char': one label per character (Chinese); 'word': per whitespace word.", "char")
    lower_case: typing.Optional[bool] = _doc("Lower-case text before tokenising; default: the tokenizer's own.", None)
    char_mapping: str = _doc(
        "'auto': a character the tokenizer's vocabulary lacks ([UNK]) is fed to the model as an equivalent it has "
        "(curly quotes as straight ones, the em dash as a hyphen, NFKC forms; pipeline/char_mapping.py), one "
        "character for one, in training, evaluation and prediction (saved with the checkpoint); outputs keep the "
        "original characters. 'off': characters are tokenised as they are.", "auto")
    max_seq_len: int = _doc("Longest token sequence fed to the model; longer texts are split into windows.", 128)
    max_train_examples: int = _doc("Use only the first N training sentences (0: all).", 0)
    max_dev_examples: int = _doc("Use only the first N dev sentences (0: all).", 0)
    max_test_examples: int = _doc("Use only the first N test sentences (0: all).", 0)

    # --- optimisation ---
    epochs: int = _doc("Passes over the training data.", 3)
    max_steps: int = _doc("Stop after this many optimiser steps (0: run all epochs).", 0)
    batch_size: int = _doc("Sentences (windows) per worker per forward pass.", 32)
    eval_batch_size: int = _doc("Sentences per worker per evaluation batch.", 64)
    group_by_length: bool = _doc(
        "Batch sentences of similar length (shuffled anew every epoch) so that little of each batch is padding.", True
    )
    grad_accum_steps: int = _doc("Forward passes whose gradients are summed before one optimiser step.", 1)
    learning_rate: float = _doc("Peak learning rate of AdamW.", 5e-5)
    weight_decay: float = _doc("AdamW weight decay; never applied to biases and norm weights.", 0.01)
    layer_lr_decay: float = _doc(
        "Layer-wise learning-rate decay: encoder layer i of N trains at learning_rate * this ** (N - i), the "
        "embeddings at ** (N + 1), the head at learning_rate (1: one rate for all).", 1.0
    )
    warmup_ratio: float = _doc("Share of all steps spent warming the learning rate up linearly.", 0.1)
    max_grad_norm: float = _doc("Clip gradients to this global norm (0: no clipping).", 1.0)
    seed: int = _doc("Seed for weights of the head, shuffling and dropout (same on every rank).", 42)
    amp: str = _doc("Automatic mixed precision: off, fp16 (GPU, dynamic loss scaling) or bf16.", "off")
    amp_level: str = _doc("AMP level: O1 (casts per op) or O2 (parameters cast too).", "O1")
    init_loss_scaling: float = _doc("Initial loss scale for fp16.", 32768.0)
    to_static: bool = _doc(
        "Run the training forward through paddle.jit.to_static (SOT: Python bytecode translated into static "
        "subgraphs, falling back to eager where it cannot). Same results, fewer per-operator Python dispatches "
        "per step.",
        True)
    matmul_bias_grad: bool = _doc(
        "On CPU in float32, compute Linear layers' bias gradients as a matmul instead of Paddle's row reduction, "
        "which is slower than the layer's own matmuls (pipeline/linear_grad.py); same outputs.", True)
    dropout_masks_from_integers: bool = _doc(
        "On CPU in float32, draw dropout masks as 24-bit random integers from Paddle's generator instead of "
        "Paddle's CPU dropout kernel, which draws a float per element on one thread (pipeline/dropout_masks.py). "
        "Same drop probability (to 2**-24) and scaling; other draws, so other masks than with it off.", True)
    native_layer_norm: bool = _doc(
        "On CPU in float32, train with our C++ layer norm (compiled once per machine with g++; Paddle's is used "
        "where it cannot be built) instead of Paddle's CPU kernels, which are about ten times slower "
        "(pipeline/native_layer_norm.py). Same formula; sums in another order. Evaluation uses Paddle's.", True)
    embedding_grad_rows: bool = _doc(
        "On CPU with several workers, all-reduce only the rows of the word-embedding gradient that some "
        "worker's batch used (the other rows are zero on every worker) instead of the whole table, which is "
        "almost half of m3e-small's gradients; same gradients, less gloo traffic (pipeline/dist.py).", True)
    shared_memory_all_reduce: bool = _doc(
        "On CPU in float32 with several workers on one machine, add the gradients in a shared file in /dev/shm "
        "instead of DataParallel's gloo all-reduce over TCP (pipeline/shared_memory_sync.py); the same sums "
        "with two workers. Workers on several machines, or without room in /dev/shm, keep gloo.", True)
    max_bad_steps: int = _doc(
        "A step whose loss or gradients are NaN/Inf is skipped (no update) and counted; this many such steps "
        "in a row stop the run with an error naming the step and the last good checkpoint.", 10)

    # --- evaluation, saving, logging ---
    eval_interval: int = _doc("Evaluate on dev every N optimiser steps (0: only at the end of each epoch).", 0)
    compare_metrics: str = _doc(
        "Dev metric that picks the best model: f1, precision or recall, conlleval-style (an I-X after O or "
        "another type starts an entity, as the published figures count); strict_f1, strict_precision or "
        "strict_recall for strict IOB2. `f1` meant strict IOB2 F1 before both scorings existed.", "f1")
    early_stopping_patience: int = _doc("Stop after N evaluations without improvement (0: never).", 0)
    log_interval: int = _doc("Log loss, learning rate and throughput every N optimiser steps.", 10)
    save_interval: int = _doc("Write a training-state checkpoint every N optimiser steps (0: never).", 0)
    save_minutes: float = _doc(
        "Also write a training state after a step when this many minutes have passed since the last one "
        "(or since training started) on any rank (0: never). A stop signal (SIGTERM, SIGINT, SIGUSR1) always "
        "writes one for the step it stops after.", 0.0)
    keep_checkpoints: int = _doc("Training states kept under checkpoint_dir/checkpoints (older ones deleted).", 2)
    resume: str = _doc(
        "'auto': continue from the newest training state under checkpoint_dir/checkpoints (written every "
        "save_interval steps) if there is one; 'off': start fresh; or the path of a step-NNNNNNNN directory.",
        "auto",
    )
    checkpoint_dir: str = _doc("Where best_model/, checkpoints, metrics and VisualDL logs go.", "outputs/msra_ner")
    overwrite: bool = _doc(
        "Starting fresh (nothing to resume) in a checkpoint_dir that holds a previous run's results is refused "
        "unless this is true; then those results are deleted first.", False)
    do_test: bool = _doc("After training, evaluate the best model on the test file.", True)
    use_gpu: str = _doc(
        "auto: on the GPU when Paddle has CUDA and a GPU is visible (under the launcher, the card it gives each "
        "worker: pick them with --gpus), else on CPU; true: GPU or stop with an error; false: CPU.", "auto")
    deterministic: bool = _doc(
        "Set Paddle's deterministic-kernel flags (FLAGS_cudnn_deterministic, FLAGS_embedding_deterministic) so that "
        "a GPU run repeats exactly with the same seed and cards; slower. CPU runs need nothing.", False)
    use_vdl: bool = _doc("Write VisualDL scalars under checkpoint_dir/vdl.", True)
    num_workers: int = _doc("DataLoader worker processes per rank (0: load in the main process).", 0)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Reject impossible values, naming the key."""
        positive = ("max_seq_len", "epochs", "batch_size", "eval_batch_size", "grad_accum_steps", "log_interval",
                    "keep_checkpoints", "max_bad_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        non_negative = (
            "max_train_examples", "max_dev_examples", "max_test_examples", "max_steps", "eval_interval",
            "early_stopping_patience", "save_interval", "save_minutes", "num_workers", "weight_decay", "max_grad_norm",
        )
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        choices = {
            "amp": AMP_MODES, "amp_level": AMP_LEVELS, "compare_metrics": COMPARE_METRICS,
            "data_format": DATA_FORMATS, "tag_scheme": TAG_SCHEMES, "text_unit": TEXT_UNITS, "head": HEADS,
            "use_gpu": USE_GPU_CHOICES,
            "char_mapping": CHAR_MAPPINGS,
            "decoding": DECODINGS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 < self.layer_lr_decay <= 1:
            raise ConfigError(f"layer_lr_decay must be in (0, 1], got {self.layer_lr_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_seq_len < 8:
            raise ConfigError(f"max_seq_len must be >= 8 (room for special tokens and text), got {self.max_seq_len}")
        if self.amp == "fp16" and self.use_gpu == "false":
            # With use_gpu=auto the device is known only later: pipeline.runtime.check_amp_on_device.
            raise ConfigError("amp: fp16 needs a GPU (use_gpu: auto or true); on CPU use amp: bf16 or off")
        if self.init_loss_scaling <= 0:
            raise ConfigError(f"init_loss_scaling must be > 0, got {self.init_loss_scaling!r}")
        if not self.model:
            raise ConfigError("model must name a model or a directory")
        if self.resume not in ("auto", "off") and not Path(self.resume).is_dir():
            raise ConfigError(f"resume must be auto, off or an existing checkpoint directory, got {self.resume!r}")
        if self.labels is not None:
            _check_label_list(self.labels)
        _check_checkpoint_dir(self.checkpoint_dir)

    def to_dict(self) -> dict:
        """Plain dict of every field, for YAML and checkpoints."""
        return dataclasses.asdict(self)


def _check_label_list(labels: list[str]) -> None:
    """A label list is strict BIO: 'O', and for every type both B- and I-, each label once."""
    from .labels import bio_labels_for_types

    if "O" not in labels:
        raise ConfigError(f"labels must contain 'O', got {labels!r}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        # Two ids for one label: the model would split its training signal between them.
        raise ConfigError(f"labels must name each label once; repeated: {repeated}")
    types = sorted({label[2:] for label in labels if label[:2] in ("B-", "I-") and len(label) > 2})
    foreign = [label for label in labels if label not in bio_labels_for_types(types)]
    if foreign:
        raise ConfigError(f"labels must be strict BIO ('O', 'B-TYPE', 'I-TYPE'), got {foreign} "
                          f"(files in another scheme are converted to BIO when read; list their BIO labels)")
    unpaired = [f"{prefix}-{kind}" for kind in types for prefix in "BI" if f"{prefix}-{kind}" not in labels]
    if unpaired:
        raise ConfigError(f"labels must hold both B- and I- of every type; missing {unpaired}")


def _check_checkpoint_dir(checkpoint_dir: str) -> None:
    """checkpoint_dir is, or can become, a directory: neither it nor a parent is a file."""
    path = Path(checkpoint_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == path else f"is under {candidate}, which is"
                raise ConfigError(f"checkpoint_dir {checkpoint_dir} {where} a file, not a directory")
            return


def field_docs() -> dict[str, str]:
    """One line of documentation per config key."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value, annotation):
    """Check ``value`` against the field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(key, value, inner)
    if origin in (list, typing.List):
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; it is still a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            # YAML reads `model: 123` as an int; a name is still meant.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annotation!r} for {key}")  # a bug in this module


def parse_overrides(overrides: list[str]) -> dict:
    """``["epochs=2", "labels=[B-X, I-X, O]"]`` -> dict; values are read as YAML."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            parsed[key.strip()] = _read_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from None
    return parsed


def _check_keys_and_types(values: dict, source: str) -> dict:
    """Reject unknown keys and wrong types, naming ``source``; return coerced values."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(hints)}")
    if isinstance(values.get("use_gpu"), bool):
        # YAML's true/false (configs and checkpoints written when use_gpu was a boolean, `use_gpu=true`).
        values = {**values, "use_gpu": str(values["use_gpu"]).lower()}
    try:
        return {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def build_config(values: dict, source: str = "config") -> TrainConfig:
    """A validated TrainConfig from a dict; unknown keys are an error naming ``source``."""
    coerced = _check_keys_and_types(values, source)
    try:
        return TrainConfig(**coerced)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides; validated."""
    values: dict = {}
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = _read_yaml(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(_yaml_error_line(path, error)) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(loaded).__name__}")
        # Key and type mistakes are reported against the file or the override that made them.
        values.update(_check_keys_and_types(loaded, str(path)))
    values.update(_check_keys_and_types(parse_overrides(list(overrides)), "command-line override"))
    return build_config(values, source=f"{path} + overrides" if path else "config")


def _yaml_error_line(path, error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one ``file:line:column: problem`` line (1-based, as editors count)."""
    mark, context_mark = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    mark = mark or context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    if context:
        # e.g. "while parsing a flow sequence", which began where the mistake is (an unclosed bracket).
        if context_mark is not None and context_mark is not mark:
            context += f" begun at line {context_mark.line + 1}, column {context_mark.column + 1}"
        problem = f"{problem} ({context})"
    return f"{where}: not valid YAML: {problem}"


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (readable back by ``load_config``)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
