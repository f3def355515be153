"""The tokenizer stage: train a byte-level BPE on the ingested corpus (or take GPT-2's) and write token shards.

Output, one directory written atomically: `tokenizer.json`, `train.bin` and `val.bin` (flat uint16 token
arrays, each document followed by <|endoftext|>, memory-mapped by training) and `tokens.json` (counts).
Large corpora are encoded in parallel Ray tasks, one per chunk of documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from model.errors import InstructflowError
from model.files import atomic_directory
from model.tokenizer import Tokenizer
from tasks.corpus import write_tokens
from tasks.params import TokenizerParams


def load_documents(dataset_dir: Path) -> pd.DataFrame:
    path = Path(dataset_dir) / "documents.parquet"
    if not path.is_file():
        raise InstructflowError(f"{path} does not exist: run the ingest stage first (or point at its output)")
    return pd.read_parquet(path, columns=["text", "split"])


def build_tokenizer(documents: pd.DataFrame, params: TokenizerParams) -> Tokenizer:
    if params.kind == "gpt2":
        from tasks.carriers import gpt2_ranks_file

        return Tokenizer.gpt2(gpt2_ranks_file())
    train_texts = documents.loc[documents["split"] == "train", "text"]
    return Tokenizer.train(iter(train_texts), vocab_size=params.vocab_size)


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """All documents' tokens, each followed by <|endoftext|> (GPT-2's document separator)."""
    ids: list[int] = []
    for tokens in tokenizer.encode_batch(texts):
        ids.extend(tokens)
        ids.append(tokenizer.eot_id)
    return ids


def encode_in_parallel(tokenizer: Tokenizer, texts: list[str], chunks: int) -> list[int]:
    """`encode_documents` split over `chunks` Ray tasks; the result is identical, in document order."""
    import ray

    from tasks.ray_train import ensure_ray

    ensure_ray()
    remote = ray.remote(encode_documents)
    tokenizer_ref = ray.put(tokenizer)
    size = -(-len(texts) // chunks)  # ceiling division
    futures = [remote.remote(tokenizer_ref, texts[start:start + size]) for start in range(0, len(texts), size)]
    return [t for part in ray.get(futures) for t in part]


PARALLEL_ABOVE_CHARS = 20_000_000  # below this, one process (Rust threads) beats shipping text to Ray tasks


def _auto_chunks(texts: list[str]) -> int:
    if sum(map(len, texts)) < PARALLEL_ABOVE_CHARS:
        return 1
    import ray

    from tasks.ray_train import ensure_ray

    ensure_ray()
    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def tokenize_dataset(dataset_dir: Path, params: TokenizerParams, out_dir: Path) -> Path:
    """Write tokenizer + token shards for an ingested dataset into out_dir; returns the tokens.json path."""
    documents = load_documents(dataset_dir)
    tokenizer = build_tokenizer(documents, params)
    counts = {}
    with atomic_directory(out_dir) as staging:
        tokenizer.save(staging / "tokenizer.json")
        for split in ("train", "val"):
            texts = documents.loc[documents["split"] == split, "text"].tolist()
            if not texts:
                raise InstructflowError(f"the ingested dataset has no {split} documents; add text or change val_fraction")
            chunks = params.parallel_chunks or _auto_chunks(texts)
            ids = encode_in_parallel(tokenizer, texts, chunks) if chunks > 1 else encode_documents(tokenizer, texts)
            write_tokens(ids, staging / f"{split}.bin", tokenizer.vocab_size)
            counts[split] = {"documents": len(texts), "tokens": len(ids), "file": f"{split}.bin"}
        summary = {"tokenizer": "tokenizer.json", "kind": params.kind, "vocab_size": tokenizer.vocab_size, **counts}
        (staging / "tokens.json").write_text(json.dumps(summary, indent=2))
    return out_dir / "tokens.json"


def read_token_summary(tokens_uri: Path) -> dict:
    path = Path(tokens_uri)
    if not path.is_file():
        raise InstructflowError(f"{path} does not exist: run the tokenizer stage first")
    return json.loads(path.read_text())
