"""Character mapping: characters the vocabulary lacks, replaced by an equivalent it has.

m3e-small's vocabulary has no curly quotes, em dash or ellipsis, so on MSRA-NER about 1% of
the training characters became ``[UNK]``, and quotes mark names and titles (“旅行者”号). The
mapping is derived from the tokenizer alone: a character is mapped only if it tokenizes to
``[UNK]`` as it is, and only to a candidate that tokenizes to exactly one known piece, so every
original character still has exactly one position and its label stays on it. Candidates are
``EQUIVALENTS`` (tried first, in order), then the character's NFKC form (full-width and other
compatibility forms). The ``Aligner`` applies the mapping before tokenising; texts, tokens and
outputs keep the user's characters. The trainer saves the mapping with every checkpoint
(``char_mapping.json``) and the predictor applies that saved copy, never a fresh derivation.
"""
from __future__ import annotations

import functools
import sys
import unicodedata

# Hand-picked equivalents for characters NFKC leaves alone, each with its candidates in order of
# preference; the first that is one piece of the vocabulary wins.
EQUIVALENTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys("“”„‟〝〞", ('"', "＂")),  # double quotes, curly and low
    **dict.fromkeys("‘’‚‛", ("'", "＇")),  # single quotes and apostrophes
    **dict.fromkeys("—―–‒‐‑⸺⸻", ("-", "－", "─")),  # em, en, figure dashes and hyphens
    "…": ("⋯", "."),  # the ellipsis: the midline one first, as Chinese typesets it
    **dict.fromkeys("・‧•∙⋅", ("·",)),  # middle dots, as in foreign names (芭芭拉·弗兰克林)
}


def _candidates(character: str) -> list[str]:
    """What ``character`` may be replaced with, in order of preference."""
    candidates = list(EQUIVALENTS.get(character, ()))
    normal = unicodedata.normalize("NFKC", character)
    if normal != character:
        candidates.append(normal)
    return candidates


@functools.lru_cache(maxsize=1)
def _characters_to_try() -> tuple[str, ...]:
    """Every character that has a candidate: ``EQUIVALENTS``' keys and those NFKC changes."""
    everything = (chr(code) for code in range(sys.maxunicode + 1) if not 0xD800 <= code <= 0xDFFF)
    return tuple(sorted(set(EQUIVALENTS) | {c for c in everything if unicodedata.normalize("NFKC", c) != c}))


def build_char_mapping(tokenizer) -> dict[str, str]:
    """``{character: replacement}`` for every character that is ``[UNK]`` to ``tokenizer`` and has a
    candidate that is exactly one known piece (about a second: every Unicode character is looked at)."""
    unknown = tokenizer.unk_token

    def is_one_known_piece(text: str) -> bool:
        pieces = tokenizer.tokenize(text)
        return len(pieces) == 1 and pieces[0] != unknown

    mapping = {}
    for character in _characters_to_try():
        if unknown not in tokenizer.tokenize(character):
            continue  # known as it is (or no piece at all, like a space): never changed
        replacement = next((c for c in _candidates(character) if is_one_known_piece(c)), None)
        if replacement is not None:
            mapping[character] = replacement
    return mapping


def check_char_mapping(mapping, source) -> dict[str, str]:
    """``mapping`` if it is ``{single character: non-empty string}``, else ValueError naming ``source``."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{source}: expected an object of character: replacement, got {type(mapping).__name__}")
    for key, value in mapping.items():
        if len(key) != 1 or not isinstance(value, str) or not value:
            raise ValueError(f"{source}: entry {key!r}: {value!r} does not map one character to a non-empty string")
    return mapping
