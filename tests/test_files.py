"""pipeline.files: the atomic directory replace, its recovery after a kill, JSON writing and reading."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import files
from pipeline.files import (atomic_directory, read_json_object, remove_leftovers, restore_interrupted_replacements,
                            sha256_of, write_json)

ROOT = Path(__file__).resolve().parents[1]


def make_directory(path: Path, content: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "weights").write_bytes(content)
    return path


def test_atomic_directory_replaces_the_target_and_leaves_no_sibling(tmp_path):
    target = make_directory(tmp_path / "best_model", b"old")
    (target / "only_in_old").write_text("x")
    with atomic_directory(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name == f".best_model.tmp-{os.getpid()}"
        assert (target / "weights").read_bytes() == b"old"  # untouched while the new copy is built
        (temporary / "weights").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]
    assert sorted(p.name for p in target.iterdir()) == ["weights"] and (target / "weights").read_bytes() == b"new"


def test_atomic_directory_creates_a_new_target_with_the_usual_mode(tmp_path):
    target = tmp_path / "a" / "b" / "export"
    with atomic_directory(target) as temporary:
        (temporary / "f").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "f").read_text() == "x" and target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_failure_inside_leaves_the_old_target_and_no_temporary(tmp_path):
    target = make_directory(tmp_path / "best_model", b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as temporary:
            (temporary / "weights").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]
    assert (target / "weights").read_bytes() == b"old"


KILLED_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from pipeline import files

target = Path(sys.argv[1])
real_replace = os.replace

def replace_then_die(source, destination):
    real_replace(source, destination)
    if Path(destination).name.startswith(f".{target.name}.old-"):
        os.kill(os.getpid(), 9)  # the old copy is aside, the new one not yet in place

files.os.replace = replace_then_die
with files.atomic_directory(target) as temporary:
    (temporary / "weights").write_bytes(b"new")
"""


def test_a_kill_between_the_two_renames_is_recovered_to_the_old_directory(tmp_path):
    target = make_directory(tmp_path / "best_model", b"old")
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(target)], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    # What the kill left: no target, the old copy aside, the finished new copy under its temporary name.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not target.exists() and len(left) == 2, left
    assert left[0].startswith(".best_model.old-") and left[1].startswith(".best_model.tmp-")
    assert restore_interrupted_replacements(tmp_path) == [target]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]
    assert (target / "weights").read_bytes() == b"old"


def test_recovery_keeps_a_complete_target_and_drops_the_leftovers(tmp_path):
    make_directory(tmp_path / "best_model", b"new")
    make_directory(tmp_path / ".best_model.old-7", b"old")
    (tmp_path / ".metrics.json.tmp-7").write_text("{")  # a half-written write_json
    (tmp_path / ".hidden").write_text("not ours")
    assert restore_interrupted_replacements(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "best_model"]
    assert (tmp_path / "best_model" / "weights").read_bytes() == b"new"
    assert restore_interrupted_replacements(tmp_path / "missing") == []


def test_remove_leftovers_touches_only_the_target_s_siblings(tmp_path):
    target = make_directory(tmp_path / "msra_ner", b"x")
    for name in (".msra_ner.tmp-dead", ".msra_ner.old-12", ".m3e-small.tmp-3", ".msra_ner_v2.tmp-4"):
        (tmp_path / name).mkdir()
    remove_leftovers(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m3e-small.tmp-3", ".msra_ner_v2.tmp-4", "msra_ner"]
    remove_leftovers(tmp_path / "nowhere" / "x")  # no parent: nothing to do


def test_write_json_is_complete_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"f1": 0.5, "label": "地名"})
    write_json(path, {"f1": 0.75})
    assert json.loads(path.read_text(encoding="utf-8")) == {"f1": 0.75}
    assert path.read_text(encoding="utf-8").endswith("\n") and sorted(tmp_path.iterdir()) == [path]


class DamagedError(RuntimeError):
    pass


def test_read_json_object_raises_the_callers_error(tmp_path):
    path = tmp_path / "pipeline.json"
    path.write_text('{"labels": ["O"]}')
    assert read_json_object(path, DamagedError, "the checkpoint is damaged") == {"labels": ["O"]}
    path.write_text('{"labels": ')
    with pytest.raises(DamagedError, match=r"pipeline.json is not valid JSON \(.*\); the checkpoint is damaged$"):
        read_json_object(path, DamagedError, "the checkpoint is damaged")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DamagedError, match="is not valid JSON"):
        read_json_object(path, DamagedError, "the checkpoint is damaged")
    path.write_text("[1, 2]")
    with pytest.raises(DamagedError, match=r"pipeline.json should hold a JSON object; the checkpoint is damaged$"):
        read_json_object(path, DamagedError, "the checkpoint is damaged")
    with pytest.raises(ValueError, match="should hold a JSON object"):
        read_json_object(path)
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "absent.json", DamagedError)


def test_sha256_of_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = os.urandom((1 << 20) + 17)  # more than one read block
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def _record_fsyncs_and_renames(monkeypatch):
    """Log ('fsync', path) and ('replace', source, target) in the order the code makes them."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", os.path.realpath(source), os.path.realpath(target)))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return events


def test_atomic_directory_fsyncs_every_file_before_publishing_and_the_parent_after(tmp_path, monkeypatch):
    target = tmp_path / "best_model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    events = _record_fsyncs_and_renames(monkeypatch)
    with files.atomic_directory(target) as temporary:
        (temporary / "weights.bin").write_bytes(b"w" * 1000)
        (temporary / "sub").mkdir()
        (temporary / "sub" / "vocab.txt").write_text("v")
        built = os.path.realpath(temporary)
    renames = [i for i, event in enumerate(events) if event[0] == "replace"]
    publish = next(i for i in renames if events[i][1] == built)
    synced_before = {event[1] for event in events[:publish] if event[0] == "fsync"}
    for name in ("weights.bin", "sub/vocab.txt", "sub", ""):
        assert os.path.realpath(os.path.join(built, name)) in synced_before, (name, events)
    assert ("fsync", os.path.realpath(tmp_path)) in events[publish + 1:], events  # the renames reach the disk


def test_write_json_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = _record_fsyncs_and_renames(monkeypatch)
    files.write_json(tmp_path / "metrics.json", {"f1": 0.5})
    kinds = [event[0] for event in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[1][2] == os.path.realpath(tmp_path / "metrics.json")
    assert events[0][1] == events[1][1] and events[2][1] == os.path.realpath(tmp_path)


# --- ResumableLineFile: the output predict.py continues after a kill ---


def test_a_resumable_line_file_continues_after_its_last_commit_and_cuts_a_torn_line(tmp_path):
    target = tmp_path / "out.jsonl"
    first = files.ResumableLineFile(target, {"input": {"size": 3}})
    assert first.unfinished() is None
    assert first.open({"offset": 0}) == {"offset": 0}
    first.commit(["a\n", "b\n"], {"offset": 4})
    first.close()  # as a killed run leaves it: no final file, the partial and its record
    assert not target.exists() and first.partial.read_bytes() == b"a\nb\n"
    with open(first.partial, "ab") as handle:
        handle.write(b"c\nd")  # a complete line whose commit never came, then a torn one
    again = files.ResumableLineFile(target, {"input": {"size": 3}})
    assert again.unfinished() == 2
    assert again.open({"offset": 0}) == {"offset": 4} and again.lines == 2
    again.commit(["c\n", "d\n"], {"offset": 8})
    again.finish()
    assert target.read_bytes() == b"a\nb\nc\nd\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no partial, no record, no temporary
    # A finished file is not continued: the next run starts anew and replaces it only when it finishes.
    third = files.ResumableLineFile(target, {"input": {"size": 3}})
    assert third.unfinished() is None and third.open({"offset": 0}) == {"offset": 0}
    third.commit(["x\n"], {"offset": 2})
    assert target.read_bytes() == b"a\nb\nc\nd\n"
    third.finish()
    assert target.read_bytes() == b"x\n"


def test_a_resumable_line_file_refuses_another_identity_or_a_shortened_partial(tmp_path):
    target = tmp_path / "out.jsonl"
    first = files.ResumableLineFile(target, {"input": {"size": 3, "mtime_ns": 1}, "settings": {"n": 1}})
    first.open({})
    first.commit(["a\n", "b\n"], {"k": 1})
    first.close()
    other = files.ResumableLineFile(target, {"input": {"size": 4, "mtime_ns": 1}, "settings": {"n": 1}})
    with pytest.raises(files.ResumeRefused, match=r"\(2 lines done\) was made with other input than "
                                                  r"this run's: size 3 -> 4$"):
        other.unfinished()
    with pytest.raises(files.ResumeRefused):
        other.open({})
    assert first.partial.read_bytes() == b"a\nb\n"  # refusing changed nothing
    assert other.unfinished(overwrite=True) is None
    assert other.open({"k": 0}, overwrite=True) == {"k": 0} and first.partial.read_bytes() == b""
    other.close()
    # The record says 2 lines of 4 bytes; a partial file cut shorter is not continued.
    same = files.ResumableLineFile(target, other.identity)
    same.open({})
    same.commit(["a\n", "b\n"], {})
    same.close()
    first.partial.write_bytes(b"a\n")
    with pytest.raises(files.ResumeRefused, match="holds 2 bytes, fewer than the 4"):
        files.ResumableLineFile(target, other.identity).unfinished()
