"""Pure text processing for the ingest stage: cleaning, Gutenberg stripping, dedupe, splits, stats (no I/O).

Near-duplicates follow the usual web-corpus recipe (Broder 1997 "On the resemblance and containment of
documents"; used for GPT-3's Common Crawl filtering): a document is its set of 5-word shingles, MinHash
signatures with 128 permutations estimate Jaccard similarity, LSH bands find candidate pairs, and each
candidate is confirmed with the exact Jaccard of the two shingle sets.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import string
import unicodedata
from collections import defaultdict
from typing import Literal

import numpy as np

from model.errors import InstructflowError

# --- cleaning --------------------------------------------------------------------------------------

_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")  # C0/C1 controls (but \t, \n) and BOMs
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 3+ blank lines


def clean_text(text: str) -> str:
    """NFC, \\n newlines, no control characters but \\n and \\t, no trailing spaces, at most 2 blank lines in a row.

    Blank lines at the start and the end are removed too.
    """
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n")


# Project Gutenberg's markers, modern ("*** START OF THE PROJECT GUTENBERG EBOOK X ***") and older
# ("*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*", "End of Project Gutenberg's X").
_GUTENBERG_START = re.compile(
    r"^[ \t]*(\*{3}[ \t]*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)[^\n]*\n?",
    re.MULTILINE | re.IGNORECASE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(\*{3}[ \t]*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG'?S? )",
    re.MULTILINE | re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between its start and end markers.

    The body starts after the last start marker before the end marker (some texts carry both a start line
    and the older small print); text without markers is returned unchanged.
    """
    first = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, first.end() if first else 0)
    stop = end.start() if end else len(text)
    starts = list(_GUTENBERG_START.finditer(text, 0, stop))
    start = starts[-1].end() if starts else 0
    return text if (start, stop) == (0, len(text)) else text[start:stop]


_TEXT_BYTES = bytes({7, 8, 9, 10, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F})


def looks_binary(raw: bytes, sample: int = 65536) -> bool:
    """True for data that is no text file: NUL bytes, or over 30% control bytes in the first `sample` bytes.

    Bytes >= 0x80 count as text (UTF-8, latin-1); UTF-16 text has NUL bytes and counts as binary.
    """
    head = raw[:sample]
    if not head:
        return False
    return b"\x00" in head or len(head.translate(None, _TEXT_BYTES)) > 0.3 * len(head)


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut a long text at blank lines into pieces of at most about `max_chars` (a longer paragraph stays whole)."""
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


# --- exact and near duplicates ---------------------------------------------------------------------


def content_hash(text: str) -> str:
    """Hash of the text with case and whitespace normalised: equal for copies that differ only in those."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode(), digest_size=16).hexdigest()


def exact_duplicates(docs: list[str]) -> set[int]:
    """Indices of documents whose normalised content appeared earlier (the first copy is kept)."""
    seen: set[str] = set()
    dropped = set()
    for i, text in enumerate(docs):
        key = content_hash(text)
        if key in seen:
            dropped.add(i)
        seen.add(key)
    return dropped


SHINGLE_WORDS = 5
NUM_PERM = 128
# Punctuation (ASCII and common typographic) becomes a space, so "lord," and "lord" are one word.
_TYPOGRAPHIC = "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00ab\u00bb"  # curly quotes, dashes, ellipsis, guillemets
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + _TYPOGRAPHIC})
_U64 = np.uint64
_rng = np.random.default_rng(20240501)  # fixed: signatures are the same in every process
_PERM_A = (_rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64) | 1).astype(np.uint32)  # odd: a bijection
_PERM_B = _rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)


def words_of(text: str) -> list[str]:
    """Lower-cased words, punctuation removed: what shingles are made of."""
    return text.lower().translate(_PUNCTUATION).split()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads a 64-bit hash's bits (uint64 arithmetic wraps)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def shingle_sets(docs: list[str], words: int = SHINGLE_WORDS) -> list[np.ndarray]:
    """Each document's set of `words`-word shingles as sorted unique uint64 hashes.

    A document shorter than `words` words is one shingle; one without words has none.
    """
    vocab: defaultdict[str, int] = defaultdict(itertools.count().__next__)  # word -> id, in order of appearance
    ids = []
    for doc in docs:
        tokens = words_of(doc)
        ids.append(np.fromiter(map(vocab.__getitem__, tokens), np.int64, len(tokens)))
    word_hashes = np.array([_word_hash(w) for w in vocab], dtype=np.uint64)  # (V,) independent of doc order
    shingles = []
    for doc in ids:
        k = min(words, len(doc))
        n = len(doc) - k + 1 if k else 0
        h = np.zeros(n, np.uint64)
        for j in range(k):  # polynomial hash of the k words of each shingle
            h = h * _U64(0x100000001B3) + word_hashes[doc[j : j + n]]
        shingles.append(np.unique(_mix64(h)))
    return shingles


def minhash_signatures(shingles: list[np.ndarray]) -> np.ndarray:
    """(N, NUM_PERM) uint32 MinHash signatures; rows of documents without shingles are all 0xFFFFFFFF.

    Permutation k maps a shingle's top 32 hash bits x to a_k * x + b_k mod 2^32 (a_k odd).
    """
    sizes = np.array([len(s) for s in shingles], dtype=np.int64)
    sig = np.full((len(shingles), NUM_PERM), 0xFFFFFFFF, np.uint32)
    nonempty = np.flatnonzero(sizes)
    if not len(nonempty):
        return sig
    x = np.concatenate([shingles[i] >> _U64(32) for i in nonempty]).astype(np.uint32)  # (S,) all shingles
    offsets = np.concatenate([[0], np.cumsum(sizes[nonempty])[:-1]])  # where each document's shingles start
    permuted = np.empty_like(x)
    for k in range(NUM_PERM):  # one permutation at a time: memory stays at two (S,) arrays
        np.multiply(x, _PERM_A[k], out=permuted)
        np.add(permuted, _PERM_B[k], out=permuted)
        sig[nonempty, k] = np.minimum.reduceat(permuted, offsets)
    return sig


def lsh_bands(threshold: float, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) for LSH over NUM_PERM minhashes (bands * rows <= NUM_PERM).

    The most rows (fewest false candidates) with which a pair of Jaccard similarity `threshold` still
    shares a band with probability 1 - (1 - s^rows)^bands >= `recall`: for 0.8, 21 bands of 6 rows
    (a pair at 0.8 is found with probability 0.998, one at 0.3 becomes a candidate with 0.015).
    """
    for rows in range(NUM_PERM, 0, -1):
        bands = NUM_PERM // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return NUM_PERM, 1


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 0.0


def near_duplicates(docs: list[str], threshold: float = 0.8) -> set[int]:
    """Indices of documents whose 5-word-shingle Jaccard similarity to an earlier kept document is >= threshold.

    Documents are visited in order; one is dropped when a kept earlier document is similar enough, so every
    dropped document has a kept near-copy. Deterministic (fixed hash seeds).
    """
    if not 0 < threshold <= 1:
        raise InstructflowError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    shingles = shingle_sets(docs)
    sig = minhash_signatures(shingles)
    bands, rows = lsh_bands(threshold)
    kept_in_bucket: dict[tuple[int, bytes], list[int]] = {}
    dropped = set()
    for j, shingle_set in enumerate(shingles):
        if not len(shingle_set):
            continue  # no words: nothing to compare (exact dedupe handles empty documents)
        keys = [(band, sig[j, band * rows : (band + 1) * rows].tobytes()) for band in range(bands)]
        checked: set[int] = set()
        for key in keys:
            for i in kept_in_bucket.get(key, ()):
                if i not in checked:
                    checked.add(i)
                    if jaccard(shingles[i], shingle_set) >= threshold:
                        dropped.add(j)
                        break
            if j in dropped:
                break
        if j not in dropped:
            for key in keys:
                kept_in_bucket.setdefault(key, []).append(j)
    return dropped


# --- splits and statistics -------------------------------------------------------------------------


def split_of(doc_id: str, val_fraction: float, seed: int) -> Literal["train", "val"]:
    """"val" for a `val_fraction` share of documents, chosen by a hash of (seed, doc_id).

    Each document's split depends on its own id only, so adding documents never moves existing ones.
    """
    if not 0 <= val_fraction < 1:
        raise InstructflowError(f"val_fraction must be in [0, 1), got {val_fraction}")
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def document_stats(text: str) -> dict[str, float]:
    """chars, words, lines, mean word length and share of non-ASCII characters of one document."""
    words = text.split()
    chars = len(text)
    return {
        "chars": chars,
        "words": len(words),
        "lines": text.count("\n") + 1 if text else 0,
        "mean_word_length": sum(map(len, words)) / len(words) if words else 0.0,
        "non_ascii_fraction": (chars - len(text.encode("ascii", "ignore"))) / chars if chars else 0.0,
    }
