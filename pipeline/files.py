"""How the pipeline writes and reads files, one helper per mechanism.

Every writer that must never leave a half-written result behind goes through
here: ``write_json`` for one file, ``atomic_directory`` for a directory. Both
build under a temporary sibling name and rename into place. A directory that
already exists is first moved aside (``os.replace`` cannot overwrite a non-empty
directory), so a process killed between the two renames leaves only the old copy
under its aside name; ``restore_interrupted_replacements`` puts it back. The
sibling names are made and parsed only in this module.

``ResumableLineFile`` is the third mechanism, for a large file of lines written over a long
time (``predict.py``'s output): appended and committed a chunk at a time under ``TARGET.partial``,
continued after a kill, renamed to ``TARGET`` when complete.

Atomic also means durable: the new files are fsynced before the rename that
publishes them, and the parent directory after it, so a power loss leaves the
old version or the complete new one, never a name pointing at unwritten data.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# A sibling being built is ".NAME.tmp-PID", a replaced directory moved aside ".NAME.old-PID".
_TEMPORARY = "tmp"
_ASIDE = "old"


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _parse_sibling(name: str) -> tuple[str, str] | None:
    """``(target name, kind)`` of a sibling name made by ``_sibling``, or None for any other name."""
    # The last marker counts, as a target's own name may hold one (".a.tmp-1.old-2" is a's aside copy).
    found = max((name.rfind(f".{kind}-"), kind) for kind in (_TEMPORARY, _ASIDE))
    if not name.startswith(".") or found[0] < 2:
        return None
    return name[1:found[0]], found[1]


def fsync_path(path) -> None:
    """Flush one file or directory (its entries: renames into it) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def write_json(path, value) -> None:
    """Write JSON via a temporary file, fsync and a rename, so readers never see half a file."""
    path = Path(path)
    temporary = _sibling(path, _TEMPORARY)
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        handle.flush()
        # On the disk before the rename: a crash must not leave the new name holding an empty file.
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)  # the rename itself


def read_json_object(path, error: type[Exception] = ValueError, what: str = "the file is damaged") -> dict:
    """A JSON object from ``path``; invalid JSON or another type raises ``error`` ending with ``what``."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}); {what}") from None
    if not isinstance(value, dict):
        raise error(f"{path} should hold a JSON object; {what}")
    return value


def not_a_file(path) -> str | None:
    """Why ``path`` cannot be read as a file ("does not exist", "is a directory, not a file"), or None."""
    path = Path(path)
    if path.is_file():
        return None
    return "is a directory, not a file" if path.is_dir() else "does not exist"


def sha256_of(path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(target) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to fill; on success it replaces ``target``.

    On an exception the temporary directory is removed and ``target`` is left as it was, also when
    the exception is the second rename failing: the old copy is renamed back, or, should that fail
    too, kept under its aside name for ``restore_interrupted_replacements``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(target, _TEMPORARY)
    aside = _sibling(target, _ASIDE)
    shutil.rmtree(temporary, ignore_errors=True)  # left by a killed process that had this pid
    # mkdir, not mkdtemp: the final directory gets the usual umask-based mode, not mkdtemp's 0700.
    temporary.mkdir()
    try:
        yield temporary
        _fsync_tree(temporary)  # every file on the disk before the new copy gets the real name
        if target.exists():
            os.replace(target, aside)
        try:
            os.replace(temporary, target)
        except BaseException:
            if aside.exists() and not target.exists():
                os.replace(aside, target)
            raise
        fsync_path(target.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        # The old copy goes only once a copy holds the name: never the last one there is.
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(target) -> None:
    """Delete the temporary and moved-aside siblings of ``target`` that killed writers left.

    Only for callers that know no other process is writing ``target`` now (they hold a lock).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for sibling in list(target.parent.iterdir()):
        parsed = _parse_sibling(sibling.name)
        if parsed is not None and parsed[0] == target.name:
            _remove(sibling)


def interrupted_replacement(target) -> Path | None:
    """The old copy of a missing ``target`` that a replacement killed between its two renames left
    under its aside name (the newest if several), or None."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    asides = [sibling for sibling in target.parent.iterdir()
              if _parse_sibling(sibling.name) == (target.name, _ASIDE) and sibling.is_dir()]
    return max(asides, key=lambda path: path.stat().st_mtime, default=None)


def restore_interrupted_replacements(directory) -> list[Path]:
    """Put back every directory in ``directory`` whose replacement was killed between its two renames.

    ``atomic_directory`` moves ``X`` to its aside name and then the new copy to ``X``; a kill
    between the two leaves only the old copy, which is renamed back here. Half-written
    temporary siblings are deleted. Only for callers that hold a lock on ``directory``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    restored, temporaries = [], []
    for sibling in sorted(directory.iterdir()):
        parsed = _parse_sibling(sibling.name)
        if parsed is None:
            continue
        name, kind = parsed
        if kind == _TEMPORARY:
            temporaries.append(sibling)
            continue
        target = directory / name
        if target.exists():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            os.replace(sibling, target)
            restored.append(target)
    for temporary in temporaries:
        _remove(temporary)
    return restored


class ResumeRefused(ValueError):
    """An unfinished ``ResumableLineFile`` that cannot be continued (other identity, or damaged); says why."""


class ResumableLineFile:
    """A file of lines built as ``TARGET.partial`` a chunk at a time, which becomes ``TARGET`` only when finished.

    Every ``commit`` appends its lines, fsyncs them, then records in ``TARGET.progress.json`` (written
    atomically) how many lines and bytes are committed, with the caller's ``state`` at that point
    (e.g. how far the input was read) and the ``identity`` of what the lines are made from. A process
    killed at any moment (SIGKILL included) leaves the partial file and a record of its last commit;
    ``open`` on the rerun truncates whatever came after that commit (a torn last line, or complete lines
    whose commit never happened) and continues, so no line is lost or written twice. ``finish`` renames
    the partial file to ``TARGET``: a file under the final name is always complete.
    """

    def __init__(self, target, identity: dict):
        self.target = Path(target)
        self.partial = self.target.with_name(self.target.name + ".partial")
        self.progress = self.target.with_name(self.target.name + ".progress.json")
        self.identity = identity  # JSON-able: compared with the unfinished file's on open
        self.lines = 0
        self._bytes = 0
        self._handle = None

    def unfinished(self, overwrite: bool = False) -> int | None:
        """Lines an earlier, unfinished run committed, to be continued by ``open``; None: ``open`` starts anew.

        Writes nothing. Raises ResumeRefused when the unfinished file was made from something else (its
        identity differs) or is shorter than its last commit; ``overwrite`` means it is discarded.
        """
        record = self._record_to_continue(overwrite)
        return None if record is None else int(record["lines"])

    def _record_to_continue(self, overwrite: bool) -> dict | None:
        if overwrite or not (self.partial.exists() and self.progress.exists()):
            return None  # a partial file without a record has no commit; a record without one, nothing to continue
        record = read_json_object(self.progress, ResumeRefused, "it is damaged")
        self._check(record)
        return record

    def open(self, initial_state: dict, overwrite: bool = False) -> dict:
        """Continue the unfinished file (see ``unfinished``) or start an empty one; the state to continue from."""
        # A killed write_json leaves its temporary sibling; only the one process writing TARGET gets here.
        remove_leftovers(self.progress)
        record = self._record_to_continue(overwrite)
        if record is None:
            self.progress.unlink(missing_ok=True)
            self._handle = open(self.partial, "wb")
            self.lines, self._bytes = 0, 0
            self._record(initial_state)
            return initial_state
        self._handle = open(self.partial, "r+b")
        self.lines, self._bytes = int(record["lines"]), int(record["bytes"])
        self._handle.truncate(self._bytes)  # what came after the last commit is redone
        self._handle.seek(self._bytes)
        return record["state"]

    def _check(self, record: dict) -> None:
        done = f"{self.partial} ({record.get('lines', '?')} lines done)"
        stored = record.get("identity")
        if not isinstance(stored, dict) or not {"lines", "bytes", "state"} <= record.keys():
            raise ResumeRefused(f"{self.progress} does not describe {done}")
        differing = [key for key in sorted(set(stored) | set(self.identity)) if stored.get(key) != self.identity.get(key)]
        if differing:
            raise ResumeRefused(f"{done} was made with other {', '.join(differing)} than this run's: "
                                f"{'; '.join(_difference(stored.get(k), self.identity.get(k)) for k in differing)}")
        size = self.partial.stat().st_size
        if size < int(record["bytes"]):
            raise ResumeRefused(f"{done} holds {size} bytes, fewer than the {record['bytes']} its last commit "
                                f"recorded in {self.progress}")

    def commit(self, lines: list[str], state: dict) -> None:
        """Append ``lines`` (each ending with a newline) and record them, with ``state``, as done."""
        self._handle.write("".join(lines).encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())  # the lines on the disk before the record that says they are there
        lines_done, bytes_done = self.lines + len(lines), self._handle.tell()
        self._record(state, lines_done, bytes_done)
        self.lines, self._bytes = lines_done, bytes_done  # only once recorded: a signal mid-record changes nothing

    def _record(self, state: dict, lines_done: int | None = None, bytes_done: int | None = None) -> None:
        write_json(self.progress, {"identity": self.identity,
                                   "lines": self.lines if lines_done is None else lines_done,
                                   "bytes": self._bytes if bytes_done is None else bytes_done, "state": state})

    def recorded_lines(self) -> int:
        """The lines the record on disk says are done: what a rerun continues after, whatever this process was
        doing when it was interrupted (the record is replaced atomically, so it is the old one or the new one)."""
        try:
            return int(read_json_object(self.progress, ValueError, "unreadable progress record")["lines"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.lines

    def finish(self) -> None:
        """Put the complete file under its final name (replacing any older one), then drop the record."""
        self._handle.close()
        os.replace(self.partial, self.target)
        fsync_path(self.target.parent)
        # A kill here leaves a record without its partial file: open treats that as nothing to continue.
        self.progress.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop without finishing: the partial file and its last commit stay, to be continued."""
        if self._handle is not None and not self._handle.closed:
            self._handle.close()


def _difference(before, now) -> str:
    """What changed between two identity values, for the refusal message."""
    if isinstance(before, dict) and isinstance(now, dict):
        changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
                   if before.get(key) != now.get(key)]
        return ", ".join(changed)
    return f"{before!r} -> {now!r}"
