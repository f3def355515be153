"""Pure text processing: cleaning, Gutenberg stripping, binary sniffing, exact and near duplicates, splits."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from model.errors import InstructflowError
from model.text import (
    chunk_text,
    clean_text,
    content_hash,
    document_stats,
    exact_duplicates,
    jaccard,
    looks_binary,
    lsh_bands,
    minhash_signatures,
    near_duplicates,
    shingle_sets,
    split_of,
    strip_gutenberg,
)

# Moby-Dick, chapter 1 (public domain): two different paragraphs of the same book.
ISHMAEL = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and "
    "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part "
    "of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find "
    "myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I find "
    "myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I meet; and "
    "especially whenever my hypos get such an upper hand of me, that it requires a strong moral principle to "
    "prevent me from deliberately stepping into the street, and methodically knocking people's hats off, then, I "
    "account it high time to get to sea as soon as I can. This is my substitute for pistol and ball. With a "
    "philosophical flourish Cato throws himself upon his sword; I quietly take to the ship. There is nothing "
    "surprising in this. If they but knew it, almost all men in their degree, some time or other, cherish very "
    "nearly the same feelings towards the ocean with me."
)
MANHATTOES = (
    "There now is your insular city of the Manhattoes, belted round by wharves as Indian isles by coral reefs; "
    "commerce surrounds it with her surf. Right and left, the streets take you waterward. Its extreme downtown is "
    "the battery, where that noble mole is washed by waves, and cooled by breezes, which a few hours previous "
    "were out of sight of land. Look at the crowds of water-gazers there. Circumambulate the city of a dreamy "
    "Sabbath afternoon. Go from Corlears Hook to Coenties Slip, and from thence, by Whitehall, northward. What "
    "do you see? Posted like silent sentinels all around the town, stand thousands upon thousands of mortal men "
    "fixed in ocean reveries."
)


def test_clean_text_normalises_unicode_newlines_controls_and_spacing():
    raw = "\ufeffCafe\u0301 menu  \r\nline two\t\r\rthree\x00\x07\x1b[0m ok\x0c\n\n\n\n\n\nend\u2028last \n\n"
    assert clean_text(raw) == "Caf\u00e9 menu\nline two\n\nthree[0m ok\n\n\nend\nlast"
    assert clean_text("a\tb\n\tindented") == "a\tb\n\tindented"  # tabs inside and leading tabs stay
    assert clean_text("one\n\n\ntwo") == "one\n\n\ntwo"  # two blank lines are allowed
    assert clean_text(clean_text(raw)) == clean_text(raw)  # idempotent


MODERN = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***




Produced by Dianne Bean

HAMLET, PRINCE OF DENMARK

Ber. Who's there?

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt *****
Updated editions will replace the previous one.
"""

OLD = """**The Project Gutenberg Etext of Macbeth**
Please take a look at the important information in this header.
*****SMALL PRINT!*****
LIMITED WARRANTY; DISCLAIMER OF DAMAGES
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

MACBETH

Witch. When shall we three meet again?

End of Project Gutenberg's Macbeth, by William Shakespeare
This file should be named 2264.txt
"""


def test_strip_gutenberg_keeps_the_body_only():
    body = "Produced by Dianne Bean\n\nHAMLET, PRINCE OF DENMARK\n\nBer. Who's there?"
    assert clean_text(strip_gutenberg(MODERN)) == body
    assert clean_text(strip_gutenberg(OLD)) == "MACBETH\n\nWitch. When shall we three meet again?"
    crlf = MODERN.replace("\n", "\r\n")
    assert clean_text(strip_gutenberg(crlf)) == clean_text(strip_gutenberg(MODERN))


def test_text_without_gutenberg_markers_is_unchanged():
    plain = "HAMLET\n\nThe end of the play, not of Project Gutenberg.\n*** a line of stars ***\n"
    assert strip_gutenberg(plain) == plain
    assert strip_gutenberg("") == ""


def test_looks_binary():
    assert looks_binary(b"PK\x03\x04\x00\x00 zip header")
    assert looks_binary(bytes(random.Random(0).randrange(1, 32) for _ in range(1000)))
    assert looks_binary("utf-16 text".encode("utf-16"))  # NUL bytes: not a text file we can read
    assert not looks_binary("Caf\u00e9 \u2014 \u65e5\u672c\n\tok\r\n".encode())
    assert not looks_binary("caf\u00e9 na\u00efve".encode("latin-1"))
    assert not looks_binary(b"")


def test_chunk_text_cuts_at_blank_lines():
    paragraphs = [f"paragraph {i} " + "word " * (i % 7) for i in range(200)]
    text = "\n\n".join(paragraphs)
    pieces = chunk_text(text, 300)
    assert "\n\n".join(pieces) == text
    assert all(len(p) <= 300 for p in pieces) and len(pieces) > 10
    assert chunk_text("x" * 1000 + "\n\nshort", 100) == ["x" * 1000, "short"]  # a long paragraph stays whole


def test_exact_duplicates_ignore_case_and_whitespace_and_keep_the_first():
    docs = ["Call me Ishmael.", "call  me\nISHMAEL.", "Call me Ahab.", "Call me Ishmael.", ""]
    assert exact_duplicates(docs) == {1, 3}
    assert content_hash("a  b") == content_hash("A\nb") != content_hash("a b c")


def _edit(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new, 1)
    return text


def test_near_duplicates_find_an_edited_copy_but_not_a_different_paragraph():
    edited = _edit(ISHMAEL, {"watery": "wet", "drizzly": "rainy", "Cato": "Brutus"})  # three words changed
    reformatted = ISHMAEL.upper().replace(", ", " ,  ").replace(". ", ".\n")  # case, spacing, line breaks
    rewritten = " ".join(w if i % 3 else "sea" for i, w in enumerate(ISHMAEL.split()))  # a third changed
    docs = [ISHMAEL, MANHATTOES, edited, reformatted, rewritten, ""]
    sets = shingle_sets(docs)
    assert jaccard(sets[0], sets[2]) > 0.8 and jaccard(sets[0], sets[4]) < 0.2
    assert near_duplicates(docs) == {2, 3}
    assert near_duplicates([edited, ISHMAEL, MANHATTOES]) == {1}  # the first of a cluster is kept
    assert near_duplicates(docs, threshold=0.95) == {3}
    assert near_duplicates([]) == set()
    with pytest.raises(InstructflowError, match="threshold"):
        near_duplicates(docs, threshold=0)


def test_near_duplicates_among_many_documents():
    rng = random.Random(0)
    vocab = ISHMAEL.split() + MANHATTOES.split()
    docs = [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(300)]
    copies = {}
    for original in rng.sample(range(300), 20):  # each copy: a few words replaced
        words = docs[original].split()
        for k in rng.sample(range(len(words)), 2):
            words[k] = "whale"
        docs.append(" ".join(words))
        copies[len(docs) - 1] = original
    assert near_duplicates(docs) == set(copies)
    assert near_duplicates(docs) == near_duplicates(list(docs))  # deterministic


def test_minhash_estimates_jaccard_and_lsh_bands_fit_the_threshold():
    sets = shingle_sets([ISHMAEL, _edit(ISHMAEL, {"watery": "wet", "Cato": "Brutus"}), MANHATTOES, "", "two words"])
    sig = minhash_signatures(sets)
    assert sig.shape == (5, 128) and (sig[3] == 0xFFFFFFFF).all() and len(sets[3]) == 0 and len(sets[4]) == 1
    assert abs((sig[0] == sig[1]).mean() - jaccard(sets[0], sets[1])) < 0.15
    assert (sig[0] == sig[2]).mean() < 0.1
    assert lsh_bands(0.8) == (21, 6) and lsh_bands(0.5) == (42, 3) and lsh_bands(1.0) == (1, 128)


def test_signatures_do_not_depend_on_the_process():
    code = (
        "import hashlib, sys; from model.text import shingle_sets, minhash_signatures;"
        "print(hashlib.sha256(minhash_signatures(shingle_sets(sys.argv[1:])).tobytes()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[1]
    digests = {
        subprocess.run([sys.executable, "-c", code, ISHMAEL, MANHATTOES], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout  # fmt: skip
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_split_of_is_deterministic_stable_and_near_the_fraction():
    ids = [f"doc-{i}" for i in range(20_000)]
    splits = [split_of(i, 0.1, seed=0) for i in ids]
    assert 0.09 < splits.count("val") / len(ids) < 0.11
    assert splits == [split_of(i, 0.1, seed=0) for i in ids]
    assert splits[:100] == [split_of(i, 0.1, seed=0) for i in ids[:100]]  # independent of the other documents
    assert splits != [split_of(i, 0.1, seed=1) for i in ids]
    assert {split_of(i, 0.0, seed=0) for i in ids[:1000]} == {"train"}
    with pytest.raises(InstructflowError, match="val_fraction"):
        split_of("doc", 1.0, seed=0)


def test_document_stats():
    assert document_stats("Caf\u00e9 au lait\nok") == {
        "chars": 15, "words": 4, "lines": 2, "mean_word_length": 3.0, "non_ascii_fraction": 1 / 15,
    }  # fmt: skip
    assert document_stats("")["words"] == 0
