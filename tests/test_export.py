"""Static export: the Paddle Inference engine labels exactly like the dynamic graph; 'auto' never runs stale weights."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import paddle
import pytest

from helpers import ENGINE_TEXTS as TEXTS, ROOT, labels_of
from pipeline.checkpoint import CheckpointError
from pipeline.config import TrainConfig
from pipeline.engines import StaticEngine
from pipeline.export import main as export_main
from pipeline.labels import MSRA_LABELS, to_bio
from pipeline.predictor import Predictor, StaticModelWarning
from pipeline.static_export import EXPORT_META_FILE, export_inference_model, model_files


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, tiny_model_dir):
    from paddlenlp.transformers import BertTokenizer

    from pipeline.checkpoint import save_model_checkpoint
    from pipeline.models import build_token_classifier, resolve_model

    tokenizer = BertTokenizer.from_pretrained(str(tiny_model_dir))
    paddle.seed(2)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), MSRA_LABELS)
    # A larger head makes the random labels varied rather than one class everywhere.
    head = model.classifier.weight
    head.set_value(paddle.randn(head.shape) * 3)
    config = TrainConfig(model=str(tiny_model_dir), max_seq_len=32)
    directory = tmp_path_factory.mktemp("export") / "best_model"
    save_model_checkpoint(directory, model, tokenizer, config, MSRA_LABELS, metrics={})
    return directory


@pytest.fixture(scope="module")
def exported(checkpoint_dir):
    return export_inference_model(checkpoint_dir, checkpoint_dir / "inference")


def test_export_writes_model_and_digest(checkpoint_dir, exported):
    assert model_files(exported) is not None
    meta = json.loads((exported / EXPORT_META_FILE).read_text())
    assert meta["labels"] == MSRA_LABELS and len(meta["weights_sha256"]) == 64 and meta["weights_digest"]
    assert not list(exported.parent.glob(".inference.tmp*")), "temporary directory left behind"


def test_static_and_dynamic_give_identical_labels(checkpoint_dir, exported):
    dynamic = Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="dynamic")
    static = Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="static")
    assert (dynamic.engine_name, static.engine_name) == ("dynamic", "static")
    expected = labels_of(dynamic)
    assert labels_of(static) == expected
    assert len(set(label for labels in expected for label in labels)) > 2, "labels too uniform to compare"
    assert expected[1] == [] and all(label == "O" for label in expected[2])
    # Constrained decoding (the default) in both engines: valid strict BIO, while argmax is not, and
    # argmax too gives the same labels in both.
    assert all(to_bio(labels, "bio")[1].opened_span_repaired == 0 for labels in expected)
    argmax = labels_of(Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="dynamic", decoding="argmax"))
    assert labels_of(Predictor.from_checkpoint(checkpoint_dir, batch_size=3, engine="static", decoding="argmax")) == argmax
    assert sum(to_bio(labels, "bio")[1].opened_span_repaired for labels in argmax) > 0
    # Every Paddle Inference option combination, and other batch sizes, label the same.
    for onednn in (False, True):
        for ir_optim in (False, True):
            static.labeller.engine = StaticEngine(exported, onednn=onednn, ir_optim=ir_optim)
            for batch_size in (1, 8):
                static.labeller.batch_size = batch_size
                assert labels_of(static) == expected, (onednn, ir_optim, batch_size)


def test_auto_uses_current_export_and_falls_back_when_stale(checkpoint_dir, exported, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaticModelWarning)
        assert Predictor.from_checkpoint(checkpoint_dir).engine_name == "static"
    # The sibling layout: outputs/run/best_model + outputs/run/inference.
    run = tmp_path / "run"
    shutil.copytree(checkpoint_dir, run / "best_model", ignore=shutil.ignore_patterns("inference"))
    shutil.copytree(exported, run / "inference")
    assert Predictor.from_checkpoint(run / "best_model").engine_name == "static"
    # Weights changed after the export: auto warns and runs the dynamic graph; static refuses.
    state = paddle.load(str(run / "best_model" / "model.pdparams"))
    name = next(k for k in state if "classifier" in k)
    state[name] = state[name] + 1.0
    paddle.save(state, str(run / "best_model" / "model.pdparams"))
    with pytest.warns(StaticModelWarning, match="stale"):
        predictor = Predictor.from_checkpoint(run / "best_model")
    assert predictor.engine_name == "dynamic"
    with pytest.raises(CheckpointError, match="stale"):
        Predictor.from_checkpoint(run / "best_model", engine="static")
    # An explicit inference_dir is used, and checked the same way.
    assert Predictor.from_checkpoint(checkpoint_dir, engine="static", inference_dir=run / "inference").engine_name \
        == "static"
    with pytest.raises(CheckpointError, match="stale"):
        Predictor.from_checkpoint(run / "best_model", engine="static", inference_dir=exported)


def test_static_errors_clearly_without_export(checkpoint_dir, tmp_path):
    bare = tmp_path / "bare" / "best_model"
    shutil.copytree(checkpoint_dir, bare, ignore=shutil.ignore_patterns("inference"))
    with pytest.raises(CheckpointError, match="pipeline.export"):
        Predictor.from_checkpoint(bare, engine="static")
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.from_checkpoint(bare, engine="static", inference_dir=tmp_path / "nowhere")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaticModelWarning)  # no export at all is normal: silent fallback
        assert Predictor.from_checkpoint(bare).engine_name == "dynamic"
    assert Predictor.from_checkpoint(bare, engine="dynamic").engine_name == "dynamic"
    with pytest.raises(ValueError, match="engine"):
        Predictor.from_checkpoint(bare, engine="fast")


def test_export_cli(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "cli_export"
    assert export_main(["--checkpoint", str(checkpoint_dir), "--output", str(out)]) == 0
    assert model_files(out) is not None and (out / EXPORT_META_FILE).is_file()
    assert export_main(["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "does not exist" in err
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint_dir, broken, ignore=shutil.ignore_patterns("inference"))
    (broken / "model.pdparams").write_bytes(b"not a weights file")
    assert export_main(["--checkpoint", str(broken), "--output", str(tmp_path / "y")]) == 2
    assert str(broken) in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_export_module_runs_as_a_command(checkpoint_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint", str(tmp_path / "nope")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_predict_cli_engine_flags(checkpoint_dir, exported, tmp_path, monkeypatch, capsys):
    import predict

    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS[:5]) + "\n", encoding="utf-8")
    outputs = {}
    for engine in ("dynamic", "static"):
        out = tmp_path / f"{engine}.jsonl"
        assert predict.main(["--checkpoint", str(checkpoint_dir), "--input", str(source), "--output", str(out),
                             "--engine", engine, "--inference_dir", str(exported)]) == 0
        outputs[engine] = out.read_text(encoding="utf-8")
    assert outputs["dynamic"] == outputs["static"]
    assert predict.main(["--checkpoint", str(checkpoint_dir), "--input", str(source), "--engine", "static",
                         "--inference_dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_crf_checkpoint_decodes_with_viterbi_in_both_engines(tiny_model_dir, tmp_path):
    """A CRF checkpoint rebuilds its head; its learnt transitions shape the labels, identically in the
    dynamic and static engines; constrained decoding (the default) keeps them valid BIO, which the
    transitions alone (decoding argmax) do not."""
    import numpy as np
    from paddlenlp.transformers import BertTokenizer

    from pipeline.checkpoint import save_model_checkpoint
    from pipeline.models import build_token_classifier, resolve_model

    tokenizer = BertTokenizer.from_pretrained(str(tiny_model_dir))
    paddle.seed(3)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), MSRA_LABELS, head="crf")
    model.classifier.weight.set_value(paddle.randn(model.classifier.weight.shape) * 3)
    model.crf.transitions.set_value(paddle.randn([len(MSRA_LABELS)] * 2) * 2)
    directory = tmp_path / "best_model"
    save_model_checkpoint(directory, model, tokenizer, TrainConfig(model=str(tiny_model_dir), max_seq_len=32,
                                                                   head="crf"), MSRA_LABELS)
    export_inference_model(directory, directory / "inference")
    decoded = {}
    for decoding in ("constrained", "argmax"):
        dynamic = labels_of(Predictor.from_checkpoint(directory, engine="dynamic", decoding=decoding))
        static = Predictor.from_checkpoint(directory, engine="static", decoding=decoding)
        assert static.engine_name == "static" and labels_of(static) == dynamic, decoding
        decoded[decoding] = dynamic
    assert all(to_bio(labels, "bio")[1].opened_span_repaired == 0 for labels in decoded["constrained"])
    assert sum(to_bio(labels, "bio")[1].opened_span_repaired for labels in decoded["argmax"]) > 0
    # Without its transitions the same emissions decode differently: the CRF's are used.
    bare = Predictor.from_checkpoint(directory, engine="dynamic")
    bare.labeller.engine.transitions = lambda: None
    assert labels_of(bare) != decoded["constrained"]
    assert np.isfinite(model.crf.transitions.numpy()).all()
