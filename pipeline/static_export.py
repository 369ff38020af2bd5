"""Static inference models for Paddle Inference: export a checkpoint's token classifier, and tell
whether an export is current.

An export directory holds ``inference.json`` (or ``inference.pdmodel`` with the
legacy IR) and ``inference.pdiparams``, written by ``paddle.jit.save``: one
input, ``input_ids`` int64 ``[batch, seq]`` (any batch size and length up to the
encoder's position table), one output, the logits ``[batch, seq, classes]``.
Padding is read from ``input_ids`` by the encoder itself, as in the dynamic graph.

Beside them ``export.json`` records the sha256 of the checkpoint's
``model.pdparams`` (and ``pipeline.checkpoint.weights_digest``), so that a
predictor can tell an export made from other weights (a stale one) and refuse it.
"""
from __future__ import annotations

from pathlib import Path

from .files import atomic_directory, read_json_object, sha256_of, write_json

EXPORT_META_FILE = "export.json"
MODEL_PREFIX = "inference"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME = "input_ids"


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


def export_status(inference_dir, checkpoint_dir, weights_sha256: str | None = None) -> tuple[bool, str]:
    """``(usable, reason)``: whether ``inference_dir`` holds a complete export of this checkpoint's weights."""
    directory = Path(inference_dir)
    if not directory.is_dir():
        return False, f"no static model: {directory} does not exist"
    if model_files(directory) is None:
        return False, f"no static model in {directory} (expected {MODEL_PREFIX}.json or .pdmodel and .pdiparams)"
    meta = read_export_meta(directory)
    if meta is None or "weights_sha256" not in meta:
        return False, (f"{directory / EXPORT_META_FILE} is missing or unreadable; "
                       f"re-export with python -m pipeline.export")
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        return False, (f"{directory} has export format {meta.get('format_version')!r}, "
                       f"this code reads {EXPORT_FORMAT_VERSION}; re-export it")
    from .checkpoint import read_meta

    if meta.get("labels") != read_meta(checkpoint_dir)["labels"]:
        return False, f"static model in {directory} was exported for other labels than {checkpoint_dir}'s; re-export it"
    current = weights_sha256 or checkpoint_weights_sha256(checkpoint_dir)
    if meta["weights_sha256"] != current:
        return False, (f"static model in {directory} is stale: exported from weights sha256 "
                       f"{meta['weights_sha256'][:12]}..., but {Path(checkpoint_dir)}/model.pdparams is "
                       f"{current[:12]}...; re-export with python -m pipeline.export --checkpoint {checkpoint_dir} "
                       f"--output {directory}")
    return True, f"static model in {directory} matches the checkpoint's weights"


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


def export_inference_model(checkpoint_dir, output_dir) -> Path:
    """Write the static model and ``export.json`` for ``checkpoint_dir`` into ``output_dir``; return it.

    The files are written into a temporary sibling directory and renamed into
    place, so a crash never leaves a half export that looks complete.
    """
    import paddle
    from paddle.static import InputSpec

    from .checkpoint import WEIGHTS_FILE, CheckpointError, load_inference_bundle, read_meta, weights_digest

    checkpoint_dir = Path(checkpoint_dir)
    output_dir = Path(output_dir)
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
    model = bundle.model
    model.eval()
    wrapper = _logits_layer(model)
    wrapper.eval()
    static = paddle.jit.to_static(wrapper, input_spec=[InputSpec(shape=[None, None], dtype="int64", name=INPUT_NAME)],
                                  full_graph=True)
    # An older export is replaced only once the new one is complete.
    with atomic_directory(output_dir) as temporary:
        paddle.jit.save(static, str(temporary / MODEL_PREFIX))
        files = model_files(temporary)
        if files is None:
            raise RuntimeError(f"paddle.jit.save wrote no {MODEL_PREFIX}.json/.pdmodel + .pdiparams in {temporary}")
        write_json(temporary / EXPORT_META_FILE, {
            "format_version": EXPORT_FORMAT_VERSION,
            "source_checkpoint": str(checkpoint_dir.resolve()),
            "weights_sha256": weights_sha256,
            "weights_digest": weights_digest(model),
            "weights_file": WEIGHTS_FILE,
            "labels": bundle.labels,
            "max_seq_len": bundle.max_seq_len,
            "model_class": type(model).__name__,
            "program_file": files[0].name,
            "params_file": files[1].name,
            "inputs": [{"name": INPUT_NAME, "dtype": "int64", "shape": [None, None]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, None, len(bundle.labels)]}],
            "paddle_version": paddle.__version__,
        })
    return output_dir
