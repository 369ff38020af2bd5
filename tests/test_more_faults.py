"""More faults and bad inputs a user of the trainer and the batch predictor meets (issue 17), each
with the outcome RELIABILITY.md states: a full disk while a state is written, a failed rename of
best_model/, Ctrl-C, a checkpoint_dir that is a file, label lists that are not strict BIO, YAML
syntax errors, empty tokens, a dev set with types train never shows, one file as two splits,
max_seq_len beyond the model's positions, a wrong checkpoint path, a read-only checkpoint, and a
dev file that does not exist."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, clean_env, overrides, write_synthetic_splits
from pipeline import files
from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.readers import DataError, read_examples, write_tsv
from pipeline.splits import load_splits
from test_faults import complete_states, read_output, start, wait_for

TIMEOUT = 300


def train(settings: list[str], script: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(script or ["train_dist.py"]), *settings], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- a full disk while a state is written

# train_dist.py as it is, except that writing the step-4 state's optimizer file meets a full disk
# halfway (the bytes that fit are written, then ENOSPC), as a real write(2) does.
WITH_A_FULL_DISK = """
import builtins, errno, os, runpy, sys

real_open = builtins.open

class FullDisk:
    def __init__(self, handle):
        self.handle = handle
    def write(self, data):
        self.handle.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()

def open_on_a_full_disk(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
    if ".step-00000004.tmp-" in name and name.endswith("optimizer.pdopt") and "w" in mode:
        return FullDisk(handle)
    return handle

builtins.open = open_on_a_full_disk
sys.argv = ["train_dist.py", *sys.argv[1:]]
runpy.run_path("train_dist.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_while_a_state_is_written_stops_with_exit_2_and_keeps_the_previous_state(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    out_dir = tmp_path / "run"
    settings = overrides(tiny_model_dir, tiny_dataset_dir, out_dir, max_steps=6, save_interval=2, eval_interval=2,
                         do_test=False, use_vdl=False)
    full = train(settings, ["-c", WITH_A_FULL_DISK])
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    (line,) = error_lines(full.stderr)
    assert f"could not write {out_dir / 'checkpoints' / 'step-00000004'}" in line and "No space left" in line
    assert complete_states(out_dir) == ["step-00000002"]
    assert not list((out_dir / "checkpoints").glob(".*")), "the half-written state was left behind"
    assert not (out_dir / "run.lock").exists()
    # The state before it is intact: the same command (with space again) resumes from it and finishes.
    rerun = train(settings)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "step-00000002 at step 2" in rerun.stdout + rerun.stderr
    assert complete_states(out_dir) == ["step-00000004", "step-00000006"]


# ---------------------------------------------------------------- a failed rename of best_model/

def failing_rename(into: str, times: int = 1):
    """os.replace failing with EIO for the first ``times`` renames whose destination is named ``into``."""
    real_replace, failures = os.replace, []

    def replace(source, destination):
        if Path(destination).name == into and len(failures) < times:
            failures.append(destination)
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(destination))
        real_replace(source, destination)

    return replace


def test_a_failed_rename_into_place_puts_the_old_best_model_back(tmp_path, monkeypatch):
    """The old copy is moved aside, then the new one fails to take its name: the old copy used to be
    deleted with the temporary one, leaving no best_model/ at all."""
    target = tmp_path / "best_model"
    target.mkdir()
    (target / "weights").write_bytes(b"old")
    monkeypatch.setattr(files.os, "replace", failing_rename("best_model"))
    with pytest.raises(OSError, match="Input/output error"):
        with files.atomic_directory(target) as temporary:
            (temporary / "weights").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]
    assert (target / "weights").read_bytes() == b"old"


def test_when_putting_it_back_fails_too_the_old_best_model_stays_aside_and_is_restored(tmp_path, monkeypatch):
    target = tmp_path / "best_model"
    target.mkdir()
    (target / "weights").write_bytes(b"old")
    monkeypatch.setattr(files.os, "replace", failing_rename("best_model", times=2))
    with pytest.raises(OSError):
        with files.atomic_directory(target) as temporary:
            (temporary / "weights").write_bytes(b"new")
    (aside,) = tmp_path.glob(".best_model.old-*")
    assert (aside / "weights").read_bytes() == b"old"  # kept, not deleted with the temporary copy
    assert files.interrupted_replacement(target) == aside  # what predict.py names, with the mv to repair it
    monkeypatch.undo()
    assert files.restore_interrupted_replacements(tmp_path) == [target]  # what the next training run does
    assert (target / "weights").read_bytes() == b"old"


def test_save_model_checkpoint_reports_a_failed_write_as_one_checkpoint_error(tiny_model_dir, tmp_path, monkeypatch):
    from pipeline.checkpoint import CheckpointWriteError, save_model_checkpoint
    from pipeline.labels import MSRA_LABELS
    from pipeline.models import build_token_classifier, build_tokenizer, resolve_model
    from pipeline.predictor import Predictor

    spec = resolve_model(str(tiny_model_dir))
    model, tokenizer = build_token_classifier(spec, MSRA_LABELS), build_tokenizer(spec)
    config = TrainConfig(model=str(tiny_model_dir), max_seq_len=32)
    best = tmp_path / "best_model"
    save_model_checkpoint(best, model, tokenizer, config, MSRA_LABELS, metrics={"v": 1})
    monkeypatch.setattr(files.os, "replace", failing_rename("best_model"))
    with pytest.raises(CheckpointWriteError, match=f"could not write {best}: .*Input/output error.*not replaced"):
        save_model_checkpoint(best, model, tokenizer, config, MSRA_LABELS, metrics={"v": 2})
    monkeypatch.undo()
    assert (best / "metrics.json").read_text().strip().endswith("}") and '"v": 1' in (best / "metrics.json").read_text()
    Predictor.from_checkpoint(best).predict(["李四去上海"])


# ---------------------------------------------------------------- Ctrl-C

@pytest.mark.slow
def test_ctrl_c_during_training_stops_after_the_step_with_its_state_and_exit_75(tiny_model_dir, tiny_dataset_dir,
                                                                                tmp_path):
    # Ctrl-C in the training loop is a graceful stop (pipeline/stop_signals.py): the step finishes, its state is
    # written, one line says how to continue. Outside the loop (reading data, the final test) it stays Python's
    # KeyboardInterrupt, which train_dist.py turns into one line and exit 130.
    out_dir = tmp_path / "run"
    settings = overrides(tiny_model_dir, tiny_dataset_dir, out_dir, max_steps=400, epochs=100, save_interval=2,
                         eval_interval=0, do_test=False, use_vdl=False)
    job = start([sys.executable, "train_dist.py", *settings])
    try:
        wait_for(lambda: "step-00000002" in complete_states(out_dir), 240, "the step-2 state", job)
        job.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    output = read_output(job)
    assert job.returncode == 75, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("stopped after step")]
    stopped_at = int(line.split()[3])
    assert "SIGINT received" in line and "rerun the same command to continue" in line
    assert f"step-{stopped_at:08d}" in complete_states(out_dir)  # the state of the very step it stopped after
    assert not (out_dir / "run.lock").exists()  # released on the way out
    assert not list((out_dir / "checkpoints").glob(".*")), "a half-written state was left behind"
    assert complete_states(out_dir)


# ---------------------------------------------------------------- configuration

def test_a_checkpoint_dir_that_is_a_file_is_one_line_and_exit_2_before_paddle_loads(tiny_model_dir,
                                                                                     tiny_dataset_dir, tmp_path):
    (tmp_path / "outputs").write_text("not a directory\n")
    for given, says in ((tmp_path / "outputs", "is a file"), (tmp_path / "outputs" / "run", "is under")):
        done = train(overrides(tiny_model_dir, tiny_dataset_dir, given))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        (line,) = error_lines(done.stderr)
        assert f"checkpoint_dir {given} {says}" in line and "not a directory" in line
        assert "device:" not in done.stdout + done.stderr  # refused with the config, before Paddle was set up


@pytest.mark.parametrize("labels, message", [
    ("[O, B-PER, I-PER, B-PER]", "each label once; repeated: ['B-PER']"),
    ("[O, B-PER]", "both B- and I- of every type; missing ['I-PER']"),
    ("[O, PER]", "strict BIO ('O', 'B-TYPE', 'I-TYPE'), got ['PER']"),
    ("[O, B-LOC, I-LOC, S-LOC, E-LOC]", "got ['S-LOC', 'E-LOC']"),
    ("[O, B-, I-]", "got ['B-', 'I-']"),
])
def test_a_label_list_with_duplicates_or_not_strict_bio_is_refused_naming_the_file(tmp_path, labels, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"labels: {labels}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(path) in str(caught.value) and message in str(caught.value)
    assert load_config(None, ["labels=[B-PER, I-PER, B-LOC, I-LOC, O]"]).labels[-1] == "O"  # a good one passes


@pytest.mark.parametrize("text, where, problem", [
    ("epochs: 2\nlabels: [O, B-PER,\nseed: 1\n", ":4:1:", "(while parsing a flow sequence begun at line 2, column 9)"),
    ("epochs: 2\n  batch_size: 8\n", ":2:13:", "mapping values are not allowed here"),
    ("model: \"m3e-small\n", ":2:1:", "found unexpected end of stream"),
    ("epochs: 2\n\tseed: 1\n", ":2:1:", "found character '\\t' that cannot start any token"),
])
def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, text, where, problem):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}{where} not valid YAML: ") and problem in message


@pytest.mark.slow
def test_max_seq_len_beyond_the_models_position_embeddings_stops_before_the_model_is_built(
        tiny_model_dir, tiny_dataset_dir, tmp_path):
    """The tiny BERT has 128 positions; with max_seq_len 200 the first window longer than 128 would
    fail inside the embedding lookup, mid-training."""
    done = train(overrides(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_seq_len=200))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert "max_seq_len 200 is more than model" in line and "cover 128 tokens" in line
    assert "BertForTokenClassification" not in done.stdout + done.stderr  # no model was built
    assert not (tmp_path / "out" / "run.lock").exists()


# ---------------------------------------------------------------- data

@pytest.mark.parametrize("name, content, line, reason", [
    ("a.tsv", "张\x02\x02三\tB-PER\x02O\x02O\n", 1, "token 2 of 3 is empty"),
    ("b.tsv", "text_a\tlabel\n张\tO\n\x02\tO\x02O\n", 3, "token 1 of 2 is empty"),
    ("c.jsonl", '{"tokens": ["a"], "labels": ["O"]}\n{"tokens": [], "labels": []}\n', 2, "sentence has no tokens"),
    ("d.jsonl", '{"tokens": ["New", "", "York"], "labels": ["B-LOC", "I-LOC", "I-LOC"]}\n', 1, "token 2 of 3 is empty"),
    ("e.jsonl", '{"tokens": [""], "labels": ["O"]}\n', 1, "sentence has no tokens"),
])
def test_a_sentence_of_zero_characters_or_an_empty_token_is_refused_with_its_line(tmp_path, name, content, line,
                                                                                  reason):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_examples(path)
    assert str(caught.value).startswith(f"{path}:{line}: ") and reason in str(caught.value)


def test_a_dev_type_that_train_never_shows_is_warned_about_and_still_scored(tmp_path, caplog):
    write_synthetic_splits(tmp_path, {"train": 40, "test": 4})  # train shows PER, LOC and ORG
    write_tsv(tmp_path / "dev.tsv", [(list("张三在北京"), ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]),
                                     (list("去年访问了故宫"), ["O"] * 5 + ["B-SITE", "I-SITE"])])
    with caplog.at_level(logging.WARNING, logger="pipeline.splits"):
        splits = load_splits(TrainConfig(model="unused", dataset=str(tmp_path)))
    assert "dev (" in caplog.text and "entity type(s) that train never shows: SITE (first at" in caplog.text
    assert f"{tmp_path / 'dev.tsv'}:3)" in caplog.text  # line 1 is the header and "count as missed" in caplog.text
    # In the label list, so its gold entities stay in the dev scores (as misses) instead of stopping the run.
    assert {"B-SITE", "I-SITE"} <= set(splits.labels) and splits.labels[-1] == "O"
    caplog.clear()
    shutil.copy(tmp_path / "train.tsv", tmp_path / "dev-like-train.tsv")
    with caplog.at_level(logging.WARNING, logger="pipeline.splits"):
        load_splits(TrainConfig(model="unused", dataset=str(tmp_path), dev_file=str(tmp_path / "dev-like-train.tsv")))
    assert "never shows" not in caplog.text
    # A label list given in the config is a promise: a label outside it is still an error with its line.
    with pytest.raises(DataError, match=r"dev.tsv:3: label 'B-SITE' is not in the label list"):
        load_splits(TrainConfig(model="unused", dataset=str(tmp_path), labels=["B-PER", "I-PER", "B-LOC", "I-LOC",
                                                                               "B-ORG", "I-ORG", "O"]))


def test_one_file_given_as_two_splits_is_warned_about(tmp_path, caplog):
    write_synthetic_splits(tmp_path, {"train": 8, "dev": 4, "test": 4})
    (tmp_path / "link.tsv").symlink_to(tmp_path / "dev.tsv")
    cases = [({"dev_file": str(tmp_path / "train.tsv")}, "train and dev are the same file", "trained on it"),
             ({"test_file": str(tmp_path / "link.tsv")}, "dev and test are the same file", "selected on it")]
    for given, warning, why in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.splits"):
            load_splits(TrainConfig(model="unused", dataset=str(tmp_path), **given))
        assert warning in caplog.text and why in caplog.text and "overstate" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.splits"):
        load_splits(TrainConfig(model="unused", dataset=str(tmp_path)))
    assert "same file" not in caplog.text


def test_a_dev_file_that_does_not_exist_is_named_before_train_is_read(tmp_path, caplog):
    write_synthetic_splits(tmp_path, {"train": 8, "dev": 4})
    missing = tmp_path / "dev-2024.tsv"
    with caplog.at_level(logging.INFO, logger="pipeline.splits"):
        with pytest.raises(DataError) as caught:
            load_splits(TrainConfig(model="unused", dataset=str(tmp_path), dev_file=str(missing), do_test=False))
    assert str(caught.value) == f"{missing}: dev_file does not exist"
    assert "train:" not in caplog.text  # nothing was read first
    with pytest.raises(DataError, match="test_file is not a file"):
        load_splits(TrainConfig(model="unused", dataset=str(tmp_path), test_file=str(tmp_path)))


# ---------------------------------------------------------------- prediction

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A run directory holding a best_model/ of the tiny BERT (random head), as train_dist.py leaves it."""
    import paddle

    from pipeline.checkpoint import save_model_checkpoint
    from pipeline.labels import MSRA_LABELS
    from pipeline.models import build_token_classifier, build_tokenizer, resolve_model

    spec = resolve_model(str(tiny_model_dir))
    paddle.seed(3)
    run_dir = tmp_path_factory.mktemp("run")
    save_model_checkpoint(run_dir / "best_model", build_token_classifier(spec, MSRA_LABELS), build_tokenizer(spec),
                          TrainConfig(model=str(tiny_model_dir), max_seq_len=32), MSRA_LABELS, metrics={})
    return run_dir


def predict(checkpoint, tmp_path: Path, *extra: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "in.txt").write_text("张三在北京工作。\n\n李四去上海\n", encoding="utf-8")
    command = [*(prefix or []), sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--input",
               str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl"), *extra]
    return subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)


def test_predict_with_a_wrong_checkpoint_path_is_one_line_naming_it(saved_run, tmp_path):
    typo, weights_file = saved_run / "best_modle", saved_run / "best_model" / "model.pdparams"
    for given, says in ((typo, f"checkpoint directory {typo} does not exist"),
                        (weights_file, f"checkpoint {weights_file} is a file, not a directory"),
                        (saved_run, f"checkpoint {saved_run} is missing ['model.pdparams', 'pipeline.json'")):
        done = predict(given, tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        (line,) = error_lines(done.stderr)
        assert says in line
        assert not (tmp_path / "out.jsonl").exists()


def test_predict_max_seq_len_beyond_the_checkpoints_positions_is_refused(saved_run, tmp_path):
    done = predict(saved_run / "best_model", tmp_path, "--max_seq_len", "512")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = error_lines(done.stderr)
    assert "max_seq_len 512 is more than the model" in line and "cover 128 tokens" in line


def tree_snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_predict_from_a_read_only_checkpoint_works_and_writes_nothing_there(saved_run, tmp_path):
    """The run directory mounted read-only (a bind mount in a private mount namespace, so the
    file system itself refuses writes, even to root); prediction must not need to write there."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespaces here: {probe.stderr.strip()}")
    before = tree_snapshot(saved_run)
    read_only = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(saved_run)]
    refused = subprocess.run([*read_only, "touch", str(saved_run / "best_model" / "probe")], capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr  # the mount does refuse writes
    done = predict(saved_run / "best_model", tmp_path, prefix=read_only)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    assert tree_snapshot(saved_run) == before
