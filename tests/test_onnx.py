"""ONNX export and the onnx engine: float32 labels equal the Paddle engines', int8 is quantised and its
differences are few on a trained model, an export directory serves alone, bad flags are one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from helpers import ENGINE_TEXTS as TEXTS, ROOT, labels_of, make_trainer
from pipeline.checkpoint import CheckpointError
from pipeline.config import TrainConfig
from pipeline.export import main as export_main
from pipeline.labels import MSRA_LABELS, to_bio
from pipeline.predictor import EngineUnavailable, Predictor, StaticModelWarning
from pipeline.static_export import EXPORT_META_FILE, ONNX_MODEL_FILE, export_inference_model


def onnxruntime_installed() -> bool:
    """Whether the optional onnxruntime can be imported (a test may hide it to see the error users get)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


needs_onnxruntime = pytest.mark.skipif(
    not onnxruntime_installed(),
    reason="onnxruntime is not installed (optional: NERPIPE_ONNX=1 bash scripts/setup.sh; .ci/run installs it)")


def onnx_export(checkpoint_dir, *extra) -> int:
    return export_main(["--checkpoint", str(checkpoint_dir), "--format", "onnx", *extra])


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, tiny_model_dir):
    """A random tiny BERT whose large head makes its labels varied, with Paddle, ONNX and ONNX int8 exports."""
    from paddlenlp.transformers import BertTokenizer

    from pipeline.checkpoint import save_model_checkpoint
    from pipeline.models import build_token_classifier, resolve_model

    tokenizer = BertTokenizer.from_pretrained(str(tiny_model_dir))
    paddle.seed(2)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), MSRA_LABELS)
    model.classifier.weight.set_value(paddle.randn(model.classifier.weight.shape) * 3)
    directory = tmp_path_factory.mktemp("onnx") / "best_model"
    save_model_checkpoint(directory, model, tokenizer, TrainConfig(model=str(tiny_model_dir), max_seq_len=32),
                          MSRA_LABELS, metrics={}, char_mapping={"“": '"'})
    export_inference_model(directory, directory / "inference")
    if onnxruntime_installed():
        assert onnx_export(directory) == 0 and onnx_export(directory, "--quantize", "int8") == 0
    return directory


@needs_onnxruntime
def test_onnx_fp32_gives_the_dynamic_and_static_engines_labels(checkpoint_dir):
    onnx = Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="onnx")
    assert onnx.engine_name == "onnx" and onnx.labeller.engine.options["precision"] == "fp32"
    expected = labels_of(Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="dynamic"))
    assert labels_of(Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="static")) == expected
    assert labels_of(onnx) == expected
    assert len(set(label for labels in expected for label in labels)) > 2, "labels too uniform to compare"
    assert all(to_bio(labels, "bio")[1].opened_span_repaired == 0 for labels in expected)  # constrained decoding
    for batch_size in (1, 8):
        onnx.labeller.batch_size = batch_size
        assert labels_of(onnx) == expected, batch_size
    argmax = labels_of(Predictor.from_checkpoint(checkpoint_dir, engine="dynamic", decoding="argmax"))
    assert labels_of(Predictor.from_checkpoint(checkpoint_dir, engine="onnx", decoding="argmax")) == argmax
    meta = json.loads((checkpoint_dir / "onnx" / EXPORT_META_FILE).read_text())
    assert (meta["format"], meta["precision"], meta["outputs"][0]["name"]) == ("onnx", "fp32", "logits")
    assert meta["check"]["max_abs_logit_difference"] < 1e-4


@needs_onnxruntime
def test_auto_takes_the_onnx_export_on_cpu_when_it_is_current_else_the_static_one(checkpoint_dir, tmp_path,
                                                                                 monkeypatch):
    """ONNX Runtime's float32 is the faster CPU engine (BENCHMARKS.md) with the same labels: --engine auto
    runs it when its export is current, and the static export when it is absent, stale or not installed."""
    auto = Predictor.from_checkpoint(checkpoint_dir, batch_size=3)
    assert auto.engine_name == "onnx" and auto.labeller.engine.options["precision"] == "fp32"
    assert labels_of(auto) == labels_of(Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="static"))
    # An --inference_dir naming the static export keeps it.
    assert Predictor.from_checkpoint(checkpoint_dir, inference_dir=checkpoint_dir / "inference").engine_name == "static"
    without_onnx = tmp_path / "without_onnx"
    shutil.copytree(checkpoint_dir, without_onnx, ignore=shutil.ignore_patterns("onnx*"))
    assert Predictor.from_checkpoint(without_onnx).engine_name == "static"
    stale = tmp_path / "stale"
    shutil.copytree(checkpoint_dir, stale)
    meta = json.loads((stale / "onnx" / EXPORT_META_FILE).read_text())
    meta["weights_sha256"] = "0" * 64
    (stale / "onnx" / EXPORT_META_FILE).write_text(json.dumps(meta))
    with pytest.warns(StaticModelWarning, match="stale"):
        assert Predictor.from_checkpoint(stale).engine_name == "static"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert Predictor.from_checkpoint(checkpoint_dir).engine_name == "static"


@needs_onnxruntime
def test_int8_export_quantises_the_matmuls_and_runs(checkpoint_dir):
    import onnx

    meta = json.loads((checkpoint_dir / "onnx_int8" / EXPORT_META_FILE).read_text())
    # 2 layers x (Q, K, V, output, FFN in, FFN out) + the classifier; the attention products stay float.
    assert meta["precision"] == "int8" and meta["quantization"]["quantized_matmuls"] == 13
    assert meta["quantization"]["per_channel"] is True  # the default: one scale per output column
    operators = [node.op_type for node in onnx.load(str(checkpoint_dir / "onnx_int8" / ONNX_MODEL_FILE)).graph.node]
    assert operators.count("MatMulInteger") == 13
    int8 = Predictor.from_checkpoint(checkpoint_dir, precision="int8")  # --engine auto: the engine that has int8
    assert int8.engine_name == "onnx" and int8.labeller.engine.options["precision"] == "int8"
    labels = labels_of(int8)
    assert [len(l) for l in labels] == [len(t) for t in TEXTS]
    assert all(to_bio(l, "bio")[1].opened_span_repaired == 0 for l in labels)
    # The quantised logits are close to, not equal to, the float ones.
    ids = np.array([[2, 10, 11, 12, 13, 3], [2, 14, 3, 0, 0, 0]], dtype=np.int64)
    fp32_logits = Predictor.from_checkpoint(checkpoint_dir, engine="onnx").labeller.engine.logits(ids)
    difference = np.abs(int8.labeller.engine.logits(ids) - fp32_logits).max()
    assert 0 < difference < 0.1 * np.abs(fp32_logits).max()


@needs_onnxruntime
def test_per_tensor_int8_export_is_recorded_and_quantises_the_same_matmuls(checkpoint_dir, tmp_path):
    assert onnx_export(checkpoint_dir, "--quantize", "int8", "--per_tensor", "--output", str(tmp_path / "pt")) == 0
    meta = json.loads((tmp_path / "pt" / EXPORT_META_FILE).read_text())
    assert meta["quantization"]["per_channel"] is False and meta["quantization"]["quantized_matmuls"] == 13
    per_channel = json.loads((checkpoint_dir / "onnx_int8" / EXPORT_META_FILE).read_text())
    # One scale per weight against one per output column: the quantised logits differ.
    assert meta["check"]["max_abs_logit_difference"] != per_channel["check"]["max_abs_logit_difference"]


@needs_onnxruntime
def test_an_export_directory_alone_serves_with_the_checkpoint_labels(checkpoint_dir, tmp_path, monkeypatch):
    import predict

    expected = labels_of(Predictor.from_checkpoint(checkpoint_dir, engine="dynamic"))
    served = {}
    for name in ("inference", "onnx", "onnx_int8"):
        alone = tmp_path / "elsewhere" / name  # no checkpoint beside it
        shutil.copytree(checkpoint_dir / name, alone)
        predictor = Predictor.from_checkpoint(alone)
        served[name] = labels_of(predictor)
        assert predictor.engine_name == ("static" if name == "inference" else "onnx")
        assert predictor.labeller.aligner.char_mapping == {"“": '"'}  # the checkpoint's, carried by the export
    assert served["inference"] == expected and served["onnx"] == expected
    beside = labels_of(Predictor.from_checkpoint(checkpoint_dir, engine="onnx", precision="int8"))
    assert served["onnx_int8"] == beside
    # predict.py consumes it as it consumes a checkpoint: the same output lines.
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS[:5]) + "\n", encoding="utf-8")
    outputs = {}
    for name, argv in (("checkpoint", ["--checkpoint", str(checkpoint_dir), "--engine", "dynamic"]),
                       ("onnx alone", ["--checkpoint", str(tmp_path / "elsewhere" / "onnx")])):
        out = tmp_path / f"{name}.jsonl"
        assert predict.main([*argv, "--input", str(source), "--output", str(out)]) == 0
        outputs[name] = out.read_text(encoding="utf-8")
    assert outputs["onnx alone"] == outputs["checkpoint"]


@needs_onnxruntime
def test_crf_checkpoint_exports_its_transitions_and_decodes_alike(tiny_model_dir, tmp_path):
    from paddlenlp.transformers import BertTokenizer

    from pipeline.checkpoint import save_model_checkpoint
    from pipeline.models import build_token_classifier, resolve_model

    paddle.seed(3)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), MSRA_LABELS, head="crf")
    model.classifier.weight.set_value(paddle.randn(model.classifier.weight.shape) * 3)
    model.crf.transitions.set_value(paddle.randn([len(MSRA_LABELS)] * 2) * 2)
    directory = tmp_path / "best_model"
    save_model_checkpoint(directory, model, BertTokenizer.from_pretrained(str(tiny_model_dir)),
                          TrainConfig(model=str(tiny_model_dir), max_seq_len=32, head="crf"), MSRA_LABELS)
    assert onnx_export(directory) == 0
    saved = json.loads((directory / "onnx" / EXPORT_META_FILE).read_text())["crf_transitions"]
    assert np.array_equal(np.asarray(saved, dtype=np.float32), model.crf.transitions.numpy())
    expected = labels_of(Predictor.from_checkpoint(directory, engine="dynamic"))
    assert labels_of(Predictor.from_checkpoint(directory, engine="onnx")) == expected
    shutil.copytree(directory / "onnx", tmp_path / "alone")
    assert labels_of(Predictor.from_checkpoint(tmp_path / "alone")) == expected


@needs_onnxruntime
def test_stale_or_mismatched_onnx_exports_are_refused(checkpoint_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoint_dir, run / "best_model")
    state = paddle.load(str(run / "best_model" / "model.pdparams"))
    name = next(k for k in state if "classifier" in k)
    state[name] = state[name] + 1.0
    paddle.save(state, str(run / "best_model" / "model.pdparams"))
    for options in ({"engine": "onnx"}, {"precision": "int8"}, {"engine": "onnx", "precision": "int8"}):
        with pytest.raises(CheckpointError, match="stale.*--format onnx"):
            Predictor.from_checkpoint(run / "best_model", **options)
    # An int8 export given where float32 is asked (and the reverse) is no match.
    with pytest.raises(CheckpointError, match="onnx int8 export, not the onnx fp32"):
        Predictor.from_checkpoint(checkpoint_dir, engine="onnx", inference_dir=checkpoint_dir / "onnx_int8")
    with pytest.raises(CheckpointError, match="holds an ONNX int8 model, not fp32"):
        Predictor.from_checkpoint(checkpoint_dir / "onnx_int8", precision="fp32")
    with pytest.raises(CheckpointError, match="export for the onnx engine"):
        Predictor.from_checkpoint(checkpoint_dir / "onnx", engine="static")
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint_dir, bare, ignore=shutil.ignore_patterns("onnx*"))
    with pytest.raises(CheckpointError, match="no ONNX int8 model.*--format onnx --quantize int8"):
        Predictor.from_checkpoint(bare, precision="int8")  # never a quiet fallback to float32


def test_an_export_written_before_exports_carried_their_tokenizer_needs_its_checkpoint(checkpoint_dir, tmp_path):
    old = tmp_path / "old_export"
    shutil.copytree(checkpoint_dir / "inference", old)
    meta = json.loads((old / EXPORT_META_FILE).read_text())
    for key in ("text_unit", "tokenizer_class", "decoding", "crf_transitions", "format", "precision"):
        meta.pop(key)
    (old / EXPORT_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="pass its checkpoint"):
        Predictor.from_checkpoint(old)
    # Beside its checkpoint it is still current (format paddle when unrecorded).
    assert Predictor.from_checkpoint(checkpoint_dir, engine="static", inference_dir=old).engine_name == "static"


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["--quantize", "int8"], "--quantize int8 needs --format onnx"),
    (["--format", "onnx", "--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
    (["--format", "onnx", "--per_channel"], "--per_channel is an option of --quantize int8"),
    (["--format", "onnx", "--per_tensor"], "--per_tensor is an option of --quantize int8"),
    (["--format", "onnx", "--quantize", "int8", "--per_tensor", "--per_channel"],
     "--per_channel and --per_tensor exclude each other"),
])
def test_export_cli_bad_flags_are_one_line_errors(argv, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint", str(tmp_path), *argv],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_without_onnxruntime_the_onnx_export_says_how_to_install_it(checkpoint_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert onnx_export(checkpoint_dir, "--output", str(tmp_path / "x")) == 2
    error = capsys.readouterr().err
    assert "requirements-onnx.txt" in error and error.count("\n") == 1 and not (tmp_path / "x").exists()


@needs_onnxruntime
def test_without_onnxruntime_the_onnx_engine_says_how_to_install_it(checkpoint_dir, tmp_path, monkeypatch, capsys):
    import predict

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EngineUnavailable, match="NERPIPE_ONNX=1"):
        Predictor.from_checkpoint(checkpoint_dir / "onnx")
    source = tmp_path / "in.txt"
    source.write_text("王\n", encoding="utf-8")
    assert predict.main(["--checkpoint", str(checkpoint_dir), "--input", str(source), "--precision", "int8"]) == 2
    error = capsys.readouterr().err
    assert "requirements-onnx.txt" in error and "Traceback" not in error


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--engine", "static", "--precision", "int8"], "is the onnx engine's: add --engine onnx"),
    (["--device", "cpu", "--engine", "dynamic", "--precision", "int8"], "is the onnx engine's"),
    (["--device", "gpu", "--engine", "onnx"], "the onnx engine runs on CPU only"),
    (["--device", "gpu", "--precision", "int8"], "not available on GPU (there: fp32, fp16)"),
])
def test_predict_cli_precision_and_engine_are_checked_together(argv, message, capsys):
    import predict

    with pytest.raises(SystemExit) as stopped:
        predict.parse_args(["--checkpoint", "c", "--input", "i", *argv])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@needs_onnxruntime
def test_export_never_lets_polygraphy_install_packages(checkpoint_dir, tmp_path):
    """paddle2onnx's default clean-up would set POLYGRAPHY_AUTOINSTALL_DEPS=1 and import polygraphy."""
    code = ("import os, sys; from pipeline.export import main; "
            f"assert main(['--checkpoint', {str(checkpoint_dir)!r}, '--format', 'onnx', '--output', "
            f"{str(tmp_path / 'e')!r}]) == 0; "
            "print('polygraphy' in sys.modules, os.environ['POLYGRAPHY_AUTOINSTALL_DEPS'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False 0"


@needs_onnxruntime
def test_int8_labels_depend_on_the_batch_unless_each_window_runs_alone(checkpoint_dir, tmp_path, capsys):
    """Dynamic quantisation takes one activation scale per batch: a text's int8 labels may change with the texts
    batched beside it (other --workers shards, batch sizes). Alone in its batch (--batch_size 1) a window's
    labels are its own, and --workers gives one process's output."""
    import predict

    texts = TEXTS * 3
    int8 = Predictor.from_checkpoint(checkpoint_dir, precision="int8", batch_size=1)
    alone = labels_of(int8, texts)
    assert labels_of(int8, texts[::-1]) == alone[::-1]
    int8.labeller.batch_size = 16
    batched = labels_of(int8, texts)
    differing = sum(a != b for p, q in zip(alone, batched) for a, b in zip(p, q))
    assert differing <= 0.05 * sum(map(len, texts))  # counted; some may differ, few do
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.jsonl"
        assert predict.main(["--checkpoint", str(checkpoint_dir), "--input", str(source), "--output", str(out),
                             "--precision", "int8", "--batch_size", "1", "--workers", str(workers)]) == 0
        outputs[workers] = out.read_text(encoding="utf-8")
    assert outputs[2] == outputs[1]
    assert [json.loads(line)["labels"] for line in outputs[1].splitlines()] == alone


@needs_onnxruntime
def test_evaluate_cli_scores_the_int8_export(checkpoint_dir, tiny_dataset_dir, capsys):
    from pipeline import evaluate

    common = ["--checkpoint", str(checkpoint_dir), "--file", str(tiny_dataset_dir / "test.tsv")]
    assert evaluate.main([*common, "--engine", "onnx", "--precision", "int8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["sentences"] == 24 and 0 <= scores["f1"] <= 1 and scores["num_gold"] > 0
    assert evaluate.main([*common, "--precision", "int8"]) == 2  # its --engine defaults to dynamic
    error = capsys.readouterr().err
    assert "is the onnx engine's: add --engine onnx" in error and error.count("\n") == 1


@needs_onnxruntime
@pytest.mark.slow
def test_int8_on_a_trained_model_keeps_its_labels_and_f1(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """On a model that has learnt the synthetic task, the int8 export changes almost no label (counted)."""
    from pipeline.evaluation import evaluate
    from pipeline.readers import read_examples

    result = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", epochs=8, log_interval=50).fit()
    assert result.test["f1"] > 0.8
    best = tmp_path / "out" / "best_model"
    assert onnx_export(best) == 0 and onnx_export(best, "--quantize", "int8") == 0
    examples = [e for split in ("test", "dev", "train") for e in read_examples(tiny_dataset_dir / f"{split}.tsv")[0]]
    scores, predicted = {}, {}
    for precision in ("fp32", "int8"):
        labeller = Predictor.from_checkpoint(best, engine="onnx", precision=precision).labeller
        counts, predicted[precision] = evaluate(labeller, examples, keep_predictions=True)
        scores[precision] = counts.summary()
    dynamic = Predictor.from_checkpoint(best, engine="dynamic").labeller
    assert dynamic.label([e.tokens for e in examples]) == predicted["fp32"]
    tokens = sum(len(e.tokens) for e in examples)
    differing = sum(a != b for p, q in zip(predicted["fp32"], predicted["int8"]) for a, b in zip(p, q))
    print(f"int8 vs fp32 on {len(examples)} sentences: {differing} of {tokens} labels differ; "
          f"F1 {scores['int8']['f1']:.4f} vs {scores['fp32']['f1']:.4f}")
    assert differing <= 0.01 * tokens
    for key in ("f1", "strict_f1"):
        assert abs(scores["int8"][key] - scores["fp32"][key]) <= 0.01, key
