"""The Predictor: batch NER from a checkpoint directory alone, and which engine runs it.

``Predictor.from_checkpoint`` chooses the engine (``ENGINES``): the dynamic
graph over the checkpoint's weights, a static export of those same weights
found beside the checkpoint (``find_export``) and run by Paddle Inference, or an
ONNX export (float32 or int8) run by ONNX Runtime. All label through the same
``TokenLabeller``, so the float32 engines give the same labels. The directory
may also be an export alone (``python -m pipeline.export`` writes everything a
predictor needs into it): then its own engine runs it.

Paddle and the engines are imported inside ``from_checkpoint``, not at module
level: CLIs import ``ENGINES`` for their ``--engine`` choices before
``pipeline.cpu_env`` has set the thread variables Paddle reads when imported.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .text import character_labels, entities_of, split_text

if TYPE_CHECKING:
    from .labeller import TokenLabeller

ENGINES = ("auto", "dynamic", "static", "onnx")
DEFAULT_PRECISION = "fp32"
# The arithmetic each engine offers per device, default first. The static engine's fp16 is Paddle Inference's
# mixed precision, chosen at run time; the onnx engine's int8 is baked into its export (python -m pipeline.export
# --format onnx --quantize int8), and the onnxruntime installed here is its CPU build. Paddle Inference's own
# CPU int8 needs a program calibrated on sample inputs and oneDNN, which the static engine keeps off.
ENGINE_PRECISIONS = {
    "dynamic": {"cpu": ("fp32",), "gpu": ("fp32",)},
    "static": {"cpu": ("fp32",), "gpu": ("fp32", "fp16")},
    "onnx": {"cpu": ("fp32", "int8")},
}
PRECISIONS = {device: tuple(dict.fromkeys(p for offered in ENGINE_PRECISIONS.values() for p in offered.get(device, ())))
              for device in ("cpu", "gpu")}
ALL_PRECISIONS = tuple(dict.fromkeys(p for choices in PRECISIONS.values() for p in choices))
# The export format each exported-model engine reads (pipeline.static_export.EXPORT_FORMATS).
ENGINE_FORMATS = {"static": "paddle", "onnx": "onnx"}


class EngineUnavailable(RuntimeError):
    """An engine whose optional library is not installed (onnxruntime for the onnx engine)."""


def precision_owner(precision: str, device: str) -> str:
    """The engine ``--engine auto`` runs for ``precision`` on ``device``: the first that offers it (the static
    engine for fp32 when an export is found, else the dynamic graph: see ``Predictor.from_checkpoint``)."""
    return next(engine for engine, offered in ENGINE_PRECISIONS.items() if precision in offered.get(device, ()))


def precision_summary() -> str:
    """``ENGINE_PRECISIONS`` in words, for --help."""
    return "; ".join(f"{engine}: " + ", ".join(f"{device.upper()} {'/'.join(choices)}"
                                               for device, choices in offered.items())
                     for engine, offered in ENGINE_PRECISIONS.items())


def precision_problem(precision: str | None, device: str, engine: str) -> str | None:
    """Why ``precision`` (None: the default) cannot be used on ``device`` ('cpu'/'gpu') with ``engine``, or None."""
    precision = precision or DEFAULT_PRECISION
    if engine != "auto" and not ENGINE_PRECISIONS[engine].get(device):
        return f"the {engine} engine runs on {', '.join(d.upper() for d in ENGINE_PRECISIONS[engine])} only"
    if precision not in PRECISIONS[device]:
        return (f"--precision {precision} is not available on {device.upper()} "
                f"(there: {', '.join(PRECISIONS[device])})")
    if engine != "auto" and precision not in ENGINE_PRECISIONS[engine][device]:
        # auto never runs a reduced precision on another engine than the one that has it: no quiet fallback.
        owner = precision_owner(precision, device)
        return f"--precision {precision} is the {owner} engine's: add --engine {owner} (or leave --engine auto)"
    return None


class StaticModelWarning(UserWarning):
    """engine='auto' found no usable static model (none, incomplete or stale) and runs the dynamic graph."""


def export_candidates(directory, inference_dir=None, export_format: str = "paddle",
                            precision: str = DEFAULT_PRECISION) -> list[Path]:
    """Where a checkpoint's export of this format and precision is looked for, in order."""
    from .static_export import export_dir_name

    if inference_dir is not None:
        return [Path(inference_dir)]
    directory, name = Path(directory), export_dir_name(export_format, precision)
    return [directory / name, directory.parent / name]


def find_export(directory, inference_dir=None, export_format: str = "paddle",
                precision: str = DEFAULT_PRECISION) -> tuple[Path | None, str, bool]:
    """``(export directory, reason, found)``: the first candidate holding a current export of the
    checkpoint's weights, or ``(None, why none is usable, whether an unusable export was found)``."""
    from .checkpoint import read_meta
    from .static_export import checkpoint_weights_sha256, export_flags, export_status, has_model, model_description

    read_meta(directory)  # a missing or broken checkpoint is reported as such, not as a missing export
    absent = []
    for candidate in export_candidates(directory, inference_dir, export_format, precision):
        if inference_dir is None and not has_model(candidate, export_format):
            absent.append(f"no {model_description(export_format, precision)} in {candidate}")
            continue
        usable, reason = export_status(candidate, directory, checkpoint_weights_sha256(directory), export_format,
                                       precision)
        # A stale or broken export is reported even if a later candidate is also absent.
        return (candidate if usable else None), reason, True
    return None, ("; ".join(absent) + f" (export one with python -m pipeline.export"
                  f"{export_flags(export_format, precision)})"), False


class Predictor:
    """Batch NER prediction from a saved checkpoint directory alone."""

    def __init__(self, labeller: TokenLabeller, text_unit: str):
        self.labeller = labeller
        self.text_unit = text_unit

    @classmethod
    def from_checkpoint(cls, directory, batch_size: int = 32, max_seq_len: int | None = None,
                        use_gpu: bool = False, engine: str = "auto", inference_dir=None,
                        static_options: dict | None = None, precision: str | None = None,
                        decoding: str | None = None) -> "Predictor":
        """Load tokenizer, label map and a model from ``directory`` (e.g. ``.../best_model``).

        ``engine``: ``"dynamic"`` runs the checkpoint's weights in the dynamic graph;
        ``"static"`` runs the static model exported by ``python -m pipeline.export``
        through Paddle Inference and fails (CheckpointError) if there is none or it
        was exported from other weights; ``"onnx"`` does the same with the ONNX export
        (``--format onnx``, int8 with ``--quantize int8``) through ONNX Runtime; ``"auto"``
        uses, on CPU in float32, a current ONNX export when ONNX Runtime is installed (the faster
        engine), else the static model when one is found and current, else warns and runs the
        dynamic graph, and with a reduced ``precision`` runs the one engine that has it
        (int8 on CPU: onnx; fp16 on a GPU: static), failing if it has no export. An export
        is looked for in ``inference_dir`` if given, else in ``directory/NAME`` and then
        ``directory/../NAME`` (NAME: ``inference``, ``onnx`` or ``onnx_int8``). ``directory`` may
        also be an export directory alone: its engine and precision are then the export's.
        ``static_options`` (``onednn``, ``ir_optim``, ``threads``...) go to ``StaticEngine``
        (``threads`` also to ``OnnxEngine``). ``precision``: one of ``ENGINE_PRECISIONS`` for the
        engine and device (``use_gpu``); None: the export's, else fp32.
        ``decoding`` (``constrained`` or ``argmax``) overrides the one the checkpoint records.
        """
        import numpy as np
        import paddle

        from .checkpoint import (CheckpointError, load_char_mapping, load_crf_transitions, load_inference_bundle,
                                 load_tokenizer, load_tokenizer_and_meta, read_meta, saved_decoding)
        from .decoding import DECODINGS
        from .alignment import Aligner
        from .engines import DynamicEngine, StaticEngine
        from .labeller import TokenLabeller
        from .static_export import export_format_of, export_precision_of, is_export_dir, read_standalone_export

        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        device = "gpu" if use_gpu else "cpu"
        problem = precision_problem(precision, device, engine)
        if problem:
            raise ValueError(problem)
        if decoding is not None and decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        standalone = is_export_dir(directory)
        if standalone:  # an export without its checkpoint: it says which engine and precision it is for
            meta = read_standalone_export(directory)
            own_engine = {"paddle": "static", "onnx": "onnx"}[export_format_of(meta)]
            exported = export_precision_of(meta)
            if engine not in ("auto", own_engine):
                raise CheckpointError(f"{directory} is an export for the {own_engine} engine; --engine {engine} "
                                      f"needs a checkpoint directory (best_model/)")
            engine = own_engine
            # Paddle Inference applies fp16 at run time; an ONNX export holds its precision.
            precision = precision or exported
            if own_engine == "onnx" and precision != exported:
                raise CheckpointError(f"{directory} holds an ONNX {exported} model, not {precision}")
            problem = precision_problem(precision, device, engine)
            if problem:  # e.g. an ONNX export on a GPU picked by --device auto
                raise CheckpointError(f"{directory} holds a {export_format_of(meta)} {exported} export: {problem}")
        else:
            precision = precision or DEFAULT_PRECISION
            meta = read_meta(directory)  # before any model is built: a bad recorded decoding fails at once
            if max_seq_len is not None:
                _check_window_fits(directory, max_seq_len)
            if engine == "auto" and precision != DEFAULT_PRECISION:
                engine = precision_owner(precision, device)
        decoding = decoding or saved_decoding(directory, meta)
        paddle.set_device(device)
        export_dir = Path(directory) if standalone else None
        if not standalone and engine == "auto" and device == "cpu" and precision == DEFAULT_PRECISION \
                and _onnxruntime_installed():
            # ONNX Runtime's float32 is faster than Paddle Inference on CPU, in less memory, with the same labels
            # (BENCHMARKS.md: 1.37x on AVX-512, 1.20x on AVX2): take its export when there is a current one.
            onnx_dir, reason, found = find_export(directory, inference_dir, ENGINE_FORMATS["onnx"], DEFAULT_PRECISION)
            if onnx_dir is not None:
                engine, export_dir = "onnx", onnx_dir
            elif found and inference_dir is None:  # an ONNX export that is stale or broken: say why it is passed over
                warnings.warn(f"{reason}; not using it", StaticModelWarning, stacklevel=2)
        if not standalone and engine != "dynamic" and export_dir is None:
            export_engine = "static" if engine == "auto" else engine
            export_dir, reason, found = find_export(directory, inference_dir, ENGINE_FORMATS[export_engine],
                                                    precision if export_engine == "onnx" else DEFAULT_PRECISION)
            if export_dir is None:
                if engine != "auto":
                    raise CheckpointError(f"engine={engine!r}: {reason}")
                if found:  # no export at all is the normal case: no warning
                    warnings.warn(f"{reason}; using the dynamic graph", StaticModelWarning, stacklevel=2)
            engine = export_engine if export_dir is not None else "dynamic"
        if export_dir is None:
            bundle = load_inference_bundle(directory)
            runner, tokenizer = DynamicEngine(bundle.model), bundle.tokenizer
            labels, text_unit, trained_len = bundle.labels, bundle.text_unit, bundle.max_seq_len
        else:
            if standalone:
                tokenizer = load_tokenizer(directory, meta["tokenizer_class"])
                saved = meta["crf_transitions"]
                transitions = None if saved is None else np.asarray(saved, dtype=np.float32)
            else:
                meta, tokenizer = load_tokenizer_and_meta(directory)
                transitions = load_crf_transitions(directory)
            if engine == "onnx":
                from .onnx_engine import OnnxEngine

                runner = OnnxEngine(export_dir, threads=(static_options or {}).get("threads"),
                                    transitions=transitions)
            else:
                runner = StaticEngine(export_dir, use_gpu=use_gpu, transitions=transitions, precision=precision,
                                      **(static_options or {}))
            labels, text_unit, trained_len = meta["labels"], meta["text_unit"], int(meta["max_seq_len"])
        # The mapping saved at training time, not one derived anew: the model must see what it was trained on
        # (an export carries its checkpoint's copy).
        aligner = Aligner(tokenizer, max_seq_len or trained_len, load_char_mapping(directory))
        return cls(TokenLabeller(runner, aligner, labels, batch_size, decoding=decoding), text_unit)

    @property
    def engine_name(self) -> str:
        """``"dynamic"``, ``"static"`` or ``"onnx"``: what runs the model."""
        return getattr(self.labeller.engine, "name", type(self.labeller.engine).__name__)

    def predict(self, texts: list[str]) -> list[dict]:
        """One result per text, in order: ``{"text", "labels", "entities"}``."""
        units = [split_text(text, self.text_unit) for text in texts]
        token_labels = self.labeller.label([u.tokens for u in units])
        results = []
        for text, unit, labels in zip(texts, units, token_labels):
            per_character = character_labels(text, unit, labels)
            results.append({"text": text, "labels": per_character, "entities": entities_of(text, per_character)})
        return results


def _onnxruntime_installed() -> bool:
    """Whether the optional ONNX Runtime (requirements-onnx.txt) can be imported, without importing it."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _check_window_fits(directory, max_seq_len: int) -> None:
    """A window longer than the checkpoint's position embeddings fails inside the model, on the first
    long text: refused here instead (CheckpointError naming the limit)."""
    from .checkpoint import MODEL_CONFIG_FILE, CheckpointError
    from .files import read_json_object
    from .models import input_token_limit

    path = Path(directory) / MODEL_CONFIG_FILE
    limit = input_token_limit(read_json_object(path, CheckpointError, "the checkpoint is damaged"))
    if limit is not None and max_seq_len > limit:
        raise CheckpointError(f"max_seq_len {max_seq_len} is more than the model in {directory} can read: its "
                              f"position embeddings cover {limit} tokens ({path}); use {limit} or less")
