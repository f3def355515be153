"""Byte-level BPE tokenizers: OpenAI's exact GPT-2 encoding, or one trained on a corpus.

Both are Hugging Face `tokenizers` BPE models over GPT-2's byte-to-unicode alphabet, so any text
(any bytes, really) encodes without unknown tokens and decodes back exactly. GPT-2's encoding is
rebuilt from OpenAI's ranks file (`gpt2.tiktoken`, the file tiktoken uses); the tests check it
against tiktoken id for id. One class serves both, saved as one `tokenizer.json` file.

Special tokens are never produced from user text unless asked (`allow_special=True`): a document
that happens to contain "<|endoftext|>" must not be able to end itself early.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from model.errors import InstructflowError
from model.files import atomic_write

# sha256 of OpenAI's GPT-2 ranks file; tiktoken expects the same hash for r50k_base.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
# Reserved in every trained tokenizer: end of text, GPT-1's fine-tuning markers, chat turns.
SPECIALS = (EOT, "<|start|>", "<|delim|>", "<|extract|>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # fmt: skip


class Tokenizer:
    """A byte-level BPE tokenizer with named special tokens (always including `<|endoftext|>`)."""

    def __init__(self, hf: HFTokenizer) -> None:
        self._hf = hf
        # The default path: special-token strings in text are plain text, like tiktoken's encode_ordinary.
        self._hf.encode_special_tokens = True
        added = hf.get_added_tokens_decoder()
        self.specials: dict[str, int] = {t.content: i for i, t in added.items() if t.special}
        if EOT not in self.specials or not isinstance(hf.decoder, decoders.ByteLevel):
            raise InstructflowError(
                f"not a byte-level BPE tokenizer with {EOT}; use one made by Tokenizer.train or .gpt2"
            )

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def gpt2(cls, ranks_path: str | Path) -> Tokenizer:
        """OpenAI's GPT-2 encoding (50,257 ids, `<|endoftext|>` = 50256) from its tiktoken ranks file.

        The conversion takes about a second, so its result is cached as a tokenizer.json next to
        the ranks file, named by the ranks file's sha256.
        """
        path = Path(ranks_path)
        data = _read_bytes(path, "GPT-2 ranks file")
        digest = hashlib.sha256(data).hexdigest()
        if digest != GPT2_RANKS_SHA256:
            _parse_ranks(data, path)  # raises if it is not even a ranks file (say, truncated mid-line)
            raise InstructflowError(
                f"{path} is not OpenAI's GPT-2 ranks file (sha256 {digest}, expected "
                f"{GPT2_RANKS_SHA256}); it is corrupt or a different file: delete it so it is fetched again"
            )
        cached = path.with_name(f"{path.name}.{digest[:16]}.tokenizer.json")
        if cached.is_file():
            try:
                return cls.load(cached)
            except InstructflowError:
                pass  # a damaged cache is rebuilt below and overwritten
        tok = cls(_gpt2_hf(_parse_ranks(data, path)))
        try:
            tok.save(cached)
        except OSError:
            pass  # e.g. a read-only directory: everything works, only the next start is slower
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Byte-level BPE learned from `texts`, with all of SPECIALS reserved (ids 0..7).

        `vocab_size` counts the specials and the 256 byte tokens; a small corpus may stop short of it.
        """
        if isinstance(texts, str):  # iterating a str would train on single characters
            raise InstructflowError("Tokenizer.train takes an iterable of texts: pass [text], not text")
        if vocab_size < 256 + len(SPECIALS):
            raise InstructflowError(
                f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least "
                f"{256 + len(SPECIALS)} (256 bytes + {len(SPECIALS)} special tokens); raise vocab_size"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer saved by `save` (Hugging Face tokenizer.json format)."""
        path = Path(path)
        text = _read_bytes(path, "tokenizer file").decode("utf-8", errors="replace")
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise InstructflowError(
                f"{path} is not a valid tokenizer file ({e}); delete it and train or fetch it again"
            ) from None
        return cls(hf)

    def save(self, path: str | Path) -> None:
        """Write one tokenizer.json file, atomically (a crash leaves the old file or none)."""
        atomic_write(Path(path), self._hf.to_str().encode("utf-8"))

    # --- vocabulary --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self.specials[EOT]

    def special_id(self, name: str) -> int:
        """Id of a special token such as "<|delim|>"."""
        if name not in self.specials:
            hint = "; tokenizers made by Tokenizer.train have it" if name in SPECIALS else ""
            raise InstructflowError(
                f"this tokenizer has no special token {name!r}; it has {', '.join(self.specials)}{hint}"
            )
        return self.specials[name]

    # --- encoding ----------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids only if `allow_special`."""
        hf = self._with_specials if allow_special else self._hf
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` of many texts at once (in parallel, in Rust)."""
        hf = self._with_specials if allow_special else self._hf
        return [e.ids for e in hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes behind `ids`, even when they end inside a UTF-8 character."""
        ids, table = list(ids), self._bytes
        if ids and not (0 <= min(ids) and max(ids) < len(table)):
            raise InstructflowError(
                f"token id out of range: ids run from 0 to {len(table) - 1}, got "
                f"{min(ids) if min(ids) < 0 else max(ids)}; was the text encoded with another tokenizer?"
            )
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @cached_property
    def _bytes(self) -> list[bytes]:
        """The bytes of every id (built on first decode: it takes a tenth of a second for GPT-2)."""
        return _byte_table(self._hf, set(self.specials.values()))

    @cached_property
    def _with_specials(self) -> HFTokenizer:
        """A second copy that splits special tokens out of the text (built on first use)."""
        return HFTokenizer.from_str(self._hf.to_str())  # encode_special_tokens is False again

    def __getstate__(self) -> str:
        # Pickled for worker processes as its JSON; __init__ then restores the safe encoding default,
        # which is runtime state that the HF object's own pickling would drop.
        return self._hf.to_str()

    def __setstate__(self, state: str) -> None:
        self.__init__(HFTokenizer.from_str(state))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, specials={len(self.specials)})"


# --- GPT-2's byte alphabet ---------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (so BPE vocabularies are valid strings).

    Printable Latin-1 bytes map to themselves; the other 68 are shifted to code points 256 and up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _byte_table(hf: HFTokenizer, special_ids: set[int]) -> list[bytes]:
    """The bytes of every id; specials are their literal UTF-8 text."""
    table = []
    for i in range(hf.get_vocab_size(with_added_tokens=True)):
        token = hf.id_to_token(i)
        try:
            table.append(token.encode() if i in special_ids else bytes(CHAR_TO_BYTE[c] for c in token))
        except (AttributeError, KeyError):  # a gap in the ids, or a token outside the byte alphabet
            raise InstructflowError(
                f"not a byte-level BPE tokenizer (id {i} is {token!r}); use one made by Tokenizer"
            ) from None
    return table


# --- GPT-2 from tiktoken ranks -----------------------------------------------------------------


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """tiktoken's format: one `base64(token) rank` per line, ranks 0, 1, 2, ..."""
    ranks: dict[bytes, int] = {}
    try:
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:  # includes base64 errors and lines that are not two fields
        ranks = {}
    if len(ranks) < 256 or sorted(ranks.values()) != list(range(len(ranks))):
        raise InstructflowError(
            f"{path} is corrupt (not lines of `base64-token rank`); delete it so it is fetched again"
        )
    return ranks


def _gpt2_hf(ranks: dict[bytes, int]) -> HFTokenizer:
    """The standard tiktoken → HF conversion: same vocabulary, merges recovered from the ranks.

    Token of rank r was made by merging the two parts that BPE with only ranks < r leaves of it,
    so its merge is (those two parts) and its merge priority is r.
    """
    to_str = lambda token: "".join(BYTE_TO_CHAR[b] for b in token)  # noqa: E731
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe(ranks, token, max_rank=rank)
            merges.append((to_str(left), to_str(right)))
    vocab[EOT] = GPT2_EOT_ID
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    # The default ByteLevel regex is GPT-2's: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|...
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return hf


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merge `token` with ranks below `max_rank`, lowest rank first (tiktoken's rule)."""
    parts = [bytes([b]) for b in token]
    while True:
        found = [(r, i) for i, pair in enumerate(zip(parts, parts[1:]))
                 if (r := ranks.get(pair[0] + pair[1], max_rank)) < max_rank]  # fmt: skip
        if not found:
            return parts
        _, i = min(found)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


# --- files -------------------------------------------------------------------------------------


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InstructflowError(f"{what} {path} does not exist; check the path") from None
    except OSError as e:
        raise InstructflowError(f"cannot read {what} {path}: {e.strerror}") from None
