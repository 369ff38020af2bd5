"""Export directories: a checkpoint's token classifier as a static model for Paddle Inference (this
module) or as ONNX (``pipeline.onnx_export``), and whether an export is current.

A Paddle export holds ``inference.json`` (or ``inference.pdmodel`` with the
legacy IR) and ``inference.pdiparams``, written by ``paddle.jit.save``; an ONNX
export holds ``model.onnx``. Either has one input, ``input_ids`` int64
``[batch, seq]`` (any batch size and length up to the encoder's position table),
and one output, the logits ``[batch, seq, classes]``. Padding is read from
``input_ids`` by the encoder itself, as in the dynamic graph.

Beside the model, ``export.json`` records the sha256 of the checkpoint's
``model.pdparams`` (and ``pipeline.checkpoint.weights_digest``), so that a
predictor can tell an export made from other weights (a stale one) and refuse it,
and everything else a predictor needs (labels, window length, text unit,
tokenizer class, decoding, a CRF's transitions), with the tokenizer's files and
``char_mapping.json``: the directory alone can serve (``read_standalone_export``).
"""
from __future__ import annotations

from pathlib import Path

from .files import atomic_directory, read_json_object, sha256_of, write_json

EXPORT_META_FILE = "export.json"
MODEL_PREFIX = "inference"
ONNX_MODEL_FILE = "model.onnx"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
# python -m pipeline.export --format; the default first. Exports written before "format" was recorded are paddle.
EXPORT_FORMATS = ("paddle", "onnx")
# Keys an export needs to serve without its checkpoint (exports written before them need it beside).
SERVING_KEYS = ("labels", "max_seq_len", "text_unit", "tokenizer_class", "decoding")


def export_dir_name(export_format: str = "paddle", precision: str = "fp32") -> str:
    """Where an export of this format and precision goes beside its checkpoint, and is looked for."""
    if export_format == "paddle":
        return "inference"
    return "onnx" if precision == "fp32" else f"onnx_{precision}"


def checkpoint_weights_sha256(checkpoint_dir) -> str:
    """sha256 of ``model.pdparams``: what an export's meta file must record to be current."""
    from .checkpoint import WEIGHTS_FILE, CheckpointError

    path = Path(checkpoint_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint_dir} has no {WEIGHTS_FILE}")
    return sha256_of(path)


def model_files(inference_dir) -> tuple[Path, Path] | None:
    """``(program file, parameters file)`` of an export, or None when there is none.

    Paddle 3 writes the program as ``.json`` (PIR); older versions, or
    ``FLAGS_enable_pir_api=0``, as ``.pdmodel``.
    """
    directory = Path(inference_dir)
    params = directory / f"{MODEL_PREFIX}.pdiparams"
    for suffix in (".json", ".pdmodel"):
        program = directory / f"{MODEL_PREFIX}{suffix}"
        if program.is_file() and params.is_file():
            return program, params
    return None


def read_export_meta(inference_dir) -> dict | None:
    """``export.json`` of an export directory, or None when missing or unreadable."""
    try:
        return read_json_object(Path(inference_dir) / EXPORT_META_FILE)
    except (OSError, ValueError):
        return None


def export_format_of(meta: dict) -> str:
    """``paddle`` or ``onnx``: what an ``export.json`` describes."""
    return meta.get("format", "paddle")


def export_precision_of(meta: dict) -> str:
    """The arithmetic baked into an export: ``int8`` for a quantised ONNX model, else ``fp32``."""
    return meta.get("precision", "fp32")


def has_model(directory, export_format: str = "paddle") -> bool:
    """Whether ``directory`` holds the model files of an export of ``export_format``."""
    if export_format == "onnx":
        return (Path(directory) / ONNX_MODEL_FILE).is_file()
    return model_files(directory) is not None


def model_description(export_format: str, precision: str) -> str:
    """How messages name an export of this format and precision."""
    return "static model" if export_format == "paddle" else f"ONNX {precision} model"


def _expected_files(export_format: str) -> str:
    return ONNX_MODEL_FILE if export_format == "onnx" else f"{MODEL_PREFIX}.json or .pdmodel and .pdiparams"


def _meta_problem(directory: Path, export_format: str, precision: str) -> tuple[dict | None, str | None]:
    """``(export.json, None)``, or ``(None, why the directory is no usable export of this format and precision)``."""
    what = model_description(export_format, precision)
    if not directory.is_dir():
        return None, f"no {what}: {directory} does not exist"
    if not has_model(directory, export_format):
        return None, f"no {what} in {directory} (expected {_expected_files(export_format)})"
    meta = read_export_meta(directory)
    if meta is None or "weights_sha256" not in meta:
        return None, (f"{directory / EXPORT_META_FILE} is missing or unreadable; "
                      f"re-export with python -m pipeline.export")
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        return None, (f"{directory} has export format {meta.get('format_version')!r}, "
                      f"this code reads {EXPORT_FORMAT_VERSION}; re-export it")
    if (export_format_of(meta), export_precision_of(meta)) != (export_format, precision):
        return None, (f"{directory} holds a {export_format_of(meta)} {export_precision_of(meta)} export, not the "
                      f"{export_format} {precision} one asked for")
    return meta, None


def is_export_dir(directory) -> bool:
    """Whether ``directory`` is an export directory (its ``export.json``, no checkpoint's ``pipeline.json``)."""
    from .checkpoint import META_FILE

    directory = Path(directory)
    return (directory / EXPORT_META_FILE).is_file() and not (directory / META_FILE).is_file()


def read_standalone_export(directory) -> dict:
    """``export.json`` of an export directory used without its checkpoint, after checking it can serve
    alone; raises CheckpointError saying why not."""
    from .checkpoint import CheckpointError

    directory = Path(directory)
    meta = read_export_meta(directory)
    if meta is None:
        raise CheckpointError(f"{directory / EXPORT_META_FILE} is unreadable; re-export with python -m pipeline.export")
    export_format, precision = export_format_of(meta), export_precision_of(meta)
    meta, problem = _meta_problem(directory, export_format, precision)
    if problem:
        raise CheckpointError(problem)
    missing = [key for key in SERVING_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{directory} was exported before exports carried {missing}: pass its checkpoint "
                              f"(--checkpoint .../best_model --inference_dir {directory}), or re-export it")
    return meta


def export_status(inference_dir, checkpoint_dir, weights_sha256: str | None = None, export_format: str = "paddle",
                  precision: str = "fp32") -> tuple[bool, str]:
    """``(usable, reason)``: whether ``inference_dir`` holds a complete export of this checkpoint's weights
    in ``export_format`` and ``precision``."""
    directory = Path(inference_dir)
    meta, problem = _meta_problem(directory, export_format, precision)
    if problem:
        return False, problem
    from .checkpoint import read_meta

    what = model_description(export_format, precision)
    if meta.get("labels") != read_meta(checkpoint_dir)["labels"]:
        return False, f"{what} in {directory} was exported for other labels than {checkpoint_dir}'s; re-export it"
    current = weights_sha256 or checkpoint_weights_sha256(checkpoint_dir)
    if meta["weights_sha256"] != current:
        return False, (f"{what} in {directory} is stale: exported from weights sha256 "
                       f"{meta['weights_sha256'][:12]}..., but {Path(checkpoint_dir)}/model.pdparams is "
                       f"{current[:12]}...; re-export with python -m pipeline.export --checkpoint {checkpoint_dir} "
                       f"--output {directory}{export_flags(export_format, precision)}")
    return True, f"{what} in {directory} matches the checkpoint's weights"


def export_flags(export_format: str, precision: str) -> str:
    """The ``python -m pipeline.export`` flags that write an export of this format and precision."""
    flags = "" if export_format == "paddle" else " --format onnx"
    return flags + ("" if precision == "fp32" else f" --quantize {precision}")


def _logits_layer(model):
    """A Layer whose forward is ``token_logits(model, input_ids)``, whatever form the model's output takes."""
    import paddle

    from .models import token_logits

    class TokenLogits(paddle.nn.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return token_logits(self.inner, input_ids)

    return TokenLogits(model)


def load_for_export(checkpoint_dir):
    """``(InferenceBundle, sha256 of model.pdparams)`` of a checkpoint, the weights unchanged while loaded;
    CheckpointError naming the directory if it cannot be exported."""
    from .checkpoint import WEIGHTS_FILE, CheckpointError, load_inference_bundle, read_meta

    checkpoint_dir = Path(checkpoint_dir)
    read_meta(checkpoint_dir)  # CheckpointError naming the directory if it is not a checkpoint
    weights_sha256 = checkpoint_weights_sha256(checkpoint_dir)
    try:
        bundle = load_inference_bundle(checkpoint_dir)
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt weights file, an unreadable config...
        raise CheckpointError(f"cannot load checkpoint {checkpoint_dir}: {type(error).__name__}: {error}") from error
    if checkpoint_weights_sha256(checkpoint_dir) != weights_sha256:
        raise CheckpointError(f"{checkpoint_dir}/{WEIGHTS_FILE} changed while it was being exported (a training run "
                              f"saving a new best model?); export again")
    bundle.model.eval()
    return bundle, weights_sha256


def save_static_program(model, directory) -> tuple[Path, Path]:
    """``paddle.jit.save`` the model's logits as ``directory/inference.*``; return (program, parameters)."""
    import paddle
    from paddle.static import InputSpec

    wrapper = _logits_layer(model)
    wrapper.eval()
    static = paddle.jit.to_static(wrapper, input_spec=[InputSpec(shape=[None, None], dtype="int64", name=INPUT_NAME)],
                                  full_graph=True)
    paddle.jit.save(static, str(Path(directory) / MODEL_PREFIX))
    files = model_files(directory)
    if files is None:
        raise RuntimeError(f"paddle.jit.save wrote no {MODEL_PREFIX}.json/.pdmodel + .pdiparams in {directory}")
    return files


def write_export(directory, checkpoint_dir, bundle, weights_sha256: str, **format_fields) -> None:
    """``export.json`` (``format_fields`` say which model file and how it was made), the tokenizer's files and
    the checkpoint's ``char_mapping.json``: what makes ``directory`` serve without its checkpoint."""
    import paddle

    from .checkpoint import (CHAR_MAPPING_FILE, WEIGHTS_FILE, load_char_mapping, load_crf_transitions,
                             saved_decoding, weights_digest)

    checkpoint_dir, directory = Path(checkpoint_dir), Path(directory)
    bundle.tokenizer.save_pretrained(str(directory))
    char_mapping = load_char_mapping(checkpoint_dir)
    if (checkpoint_dir / CHAR_MAPPING_FILE).is_file():
        write_json(directory / CHAR_MAPPING_FILE, char_mapping)
    transitions = load_crf_transitions(checkpoint_dir)
    write_json(directory / EXPORT_META_FILE, {
        "format_version": EXPORT_FORMAT_VERSION,
        "source_checkpoint": str(checkpoint_dir.resolve()),
        "weights_sha256": weights_sha256,
        "weights_digest": weights_digest(bundle.model),
        "weights_file": WEIGHTS_FILE,
        "labels": bundle.labels,
        "max_seq_len": bundle.max_seq_len,
        "text_unit": bundle.text_unit,
        "tokenizer_class": type(bundle.tokenizer).__name__,
        "decoding": saved_decoding(checkpoint_dir, bundle.meta),
        # float32 values written as JSON doubles read back exactly.
        "crf_transitions": None if transitions is None else transitions.tolist(),
        "model_class": type(bundle.model).__name__,
        **format_fields,
        "inputs": [{"name": INPUT_NAME, "dtype": "int64", "shape": [None, None]}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, None, len(bundle.labels)]}],
        "paddle_version": paddle.__version__,
    })


def export_inference_model(checkpoint_dir, output_dir) -> Path:
    """Write the static model, ``export.json`` and the serving files for ``checkpoint_dir`` into
    ``output_dir``; return it.

    The files are written into a temporary sibling directory and renamed into
    place, so a crash never leaves a half export that looks complete.
    """
    bundle, weights_sha256 = load_for_export(checkpoint_dir)
    output_dir = Path(output_dir)
    # An older export is replaced only once the new one is complete.
    with atomic_directory(output_dir) as temporary:
        program, params = save_static_program(bundle.model, temporary)
        write_export(temporary, checkpoint_dir, bundle, weights_sha256, format="paddle", precision="fp32",
                     program_file=program.name, params_file=params.name)
    return output_dir
