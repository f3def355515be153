"""The ingest stage's units: read sources into documents, clean and dedupe them, write the split dataset.

A source is one string:
- a local `.txt`, `.jsonl` or `.parquet` file, a folder (read recursively, hidden entries skipped) or a glob;
  JSON lines and parquet give the field/column `text`, or the one named after `#` (`chats.jsonl#content`);
- an `http(s)://` URL of a `.txt` or `.jsonl` file, downloaded once into the cache (keyed by the URL);
- `hf:NAME[:SPLIT]`, a Hugging Face dataset (needs the `datasets` package and a reachable hub);
- `carrier:NAME`, an offline corpus carried by a registry package (see CARRIERS and tasks/carriers.py).

A dataset is a folder with `documents.parquet` (doc_id, source, path, text, split, per-document stats) and
`manifest.json` (sources with file hashes, counts per split, cleaning counts, config), written all at once.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urldefrag, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import InstructflowError
from model.files import atomic_directory
from model.text import (
    chunk_text,
    clean_text,
    document_stats,
    exact_duplicates,
    looks_binary,
    near_duplicates,
    split_of,
    strip_gutenberg,
)
from tasks.carriers import movie_reviews_file, owt_file, shakespeare_play_files, tiny_shakespeare_file
from tasks.settings import cache_dir

log = logging.getLogger("instructflow.ingest")

COLUMNS = ["doc_id", "source", "path", "text"]
SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
URL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: where it is on disk, its stable name within the source, how to read it."""

    path: Path
    name: str  # relative path, URL or carrier member name: part of each document's id, so never machine-specific
    kind: str  # "txt" | "jsonl" | "parquet"
    field: str = "text"  # JSON field / parquet column holding the text
    latin1: bool = False  # a known latin-1 carrier: decode as latin-1 where it is not UTF-8
    # > 0: a long .txt becomes documents of about this many characters (cut at blank lines), so that one
    # big file (a book, a dump) still spreads over the train and val splits
    chunk_chars: int = 10_000


@dataclass(frozen=True)
class CarrierCorpus:
    """How to fetch and read one named offline corpus."""

    files: Callable[[], list[Path]]
    kind: str
    field: str = "text"
    latin1: bool = False
    chunk_chars: int = 0


CARRIERS: dict[str, CarrierCorpus] = {
    # One 1.1 MB file of play excerpts, cut into ~10 kB passages so that both splits get documents.
    "tiny-shakespeare": CarrierCorpus(lambda: [tiny_shakespeare_file()], "txt", chunk_chars=10_000),
    # 42 plays and poems, one document each (Gutenberg texts; latin-1 in the original releases).
    "shakespeare-plays": CarrierCorpus(shakespeare_play_files, "txt", latin1=True),
    # 1,000 OpenWebText documents; field "0" is each document's original text (the others are shuffles).
    "owt": CarrierCorpus(lambda: [owt_file()], "jsonl", field="0"),
    # Pang & Lee's 1,500 full movie reviews (5.9 MB), one document each: the demo's pretraining text, in the
    # domain of its fine-tuning task and its feedback round.
    "movie-reviews": CarrierCorpus(lambda: [movie_reviews_file()], "jsonl"),
}


class _Skip(Exception):
    """A file that cannot be used (binary, not UTF-8, unreadable); the reason is counted, not fatal."""


# --- reading ---------------------------------------------------------------------------------------


def read_documents(sources: list[str]) -> tuple[pd.DataFrame, list[dict]]:
    """One row per document (doc_id, source, path, text), and one manifest record per source.

    A record lists the files read (path, name, sha256, bytes, documents), the files skipped with their
    reason, and the documents skipped per reason. Unusable files are skipped and logged while other
    documents exist; no usable document at all is an error.
    """
    if not sources:
        raise InstructflowError("no sources given: name a file, folder, glob, URL, hf:NAME or carrier:NAME")
    if len(set(sources)) != len(sources):
        raise InstructflowError(f"a source is given twice in {sources}; give each once")
    rows: list[dict] = []
    records = []
    for spec in sources:
        record: dict = {"source": spec, "files": [], "documents": 0, "skipped_files": [], "skipped_documents": {}}
        if spec.startswith("hf:"):
            documents = _read_hf(spec, record)
            rows += [_row(spec, spec, i, text) for i, text in documents]
            record["documents"] = len(documents)
        else:
            for file in _resolve(spec, record):
                rows += _read_file(spec, file, record)
        log.info("%s: %d documents from %d files", spec, record["documents"], len(record["files"]))
        records.append(record)
    if not rows:
        raise InstructflowError(_nothing_usable(records))
    return pd.DataFrame(rows, columns=COLUMNS), records


def document_id(source: str, name: str, index: int) -> str:
    """Stable id of the `index`-th document of file `name` of `source` (its split follows from it)."""
    return hashlib.sha256(f"{source}\n{name}\n{index}".encode()).hexdigest()[:16]


def _row(source: str, name: str, index: int, text: str) -> dict:
    return {"doc_id": document_id(source, name, index), "source": source, "path": name, "text": text}


def _resolve(spec: str, record: dict) -> list[SourceFile]:
    """The files a source names (downloading or fetching them first); skipped files go into `record`."""
    if spec.startswith("carrier:"):
        return _carrier_files(spec)
    if re.match(r"https?://", spec):
        return [_url_file(spec)]
    return _local_files(spec, record)


def _carrier_files(spec: str) -> list[SourceFile]:
    corpus = CARRIERS.get(spec.removeprefix("carrier:"))
    if corpus is None:
        known = ", ".join(f"carrier:{name}" for name in CARRIERS)
        raise InstructflowError(f"unknown carrier in source {spec!r}; known carriers: {known}")
    return [SourceFile(p, p.name, corpus.kind, corpus.field, corpus.latin1, corpus.chunk_chars) for p in corpus.files()]


def _split_field(spec: str) -> tuple[str, str]:
    """`path#field` -> (path, field); a path that exists with its `#` is taken as it is."""
    if "#" not in spec or Path(spec).exists():
        return spec, "text"
    base, field = spec.rsplit("#", 1)
    if not base or not field:
        raise InstructflowError(f"source {spec!r}: write PATH#FIELD with both parts, e.g. data.jsonl#content")
    return base, field


def _local_files(spec: str, record: dict) -> list[SourceFile]:
    base, field = _split_field(spec)
    path = Path(base).expanduser()
    if path.is_file():
        return [SourceFile(path, path.name, SUFFIXES.get(path.suffix.lower(), "txt"), field)]
    if path.is_dir():
        return _folder_files(spec, path, field, record)
    if re.search(r"[*?[]", base):
        matches = sorted(Path(p) for p in glob.glob(base, recursive=True) if Path(p).is_file())
        if not matches:
            raise InstructflowError(f"source {spec!r}: the pattern matches no file; check the pattern")
        root = Path(*[part for part in _until_magic(Path(base).parts)])
        return [SourceFile(p, p.relative_to(root).as_posix(), SUFFIXES.get(p.suffix.lower(), "txt"), field)
                for p in matches]  # fmt: skip
    raise InstructflowError(
        f"source {spec!r}: {path} does not exist; give an existing file, folder or glob, an http(s):// URL, "
        f"hf:NAME[:SPLIT] or one of {', '.join('carrier:' + name for name in CARRIERS)}"
    )


def _until_magic(parts: tuple[str, ...]) -> list[str]:
    """The leading path parts of a glob without wildcards (its root folder)."""
    out = []
    for part in parts:
        if re.search(r"[*?[]", part):
            break
        out.append(part)
    return out or ["."]


def _folder_files(spec: str, folder: Path, field: str, record: dict) -> list[SourceFile]:
    """Every .txt/.jsonl/.parquet file under `folder`; other files are recorded as skipped."""
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in SUFFIXES:
            files.append(SourceFile(p, rel.as_posix(), SUFFIXES[p.suffix.lower()], field))
        else:
            _skip_file(spec, rel.as_posix(), "not a .txt, .jsonl or .parquet file", record)
    if not files:
        raise InstructflowError(f"source {spec!r}: the folder {folder} holds no .txt, .jsonl or .parquet file")
    return files


def _url_file(spec: str) -> SourceFile:
    """A URL's file, downloaded once into `cache_dir()/downloads/` (the fragment names the JSON field)."""
    url, field = urldefrag(spec)
    suffix = PurePosixPath(urlparse(url).path).suffix.lower()
    suffix = suffix if suffix in SUFFIXES else ".txt"
    cached = cache_dir() / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}{suffix}"
    if not cached.is_file():
        _download(url, cached)
    return SourceFile(cached, url, SUFFIXES[suffix], field or "text")


def _download(url: str, target: Path) -> None:
    """Stream `url` into a temp file next to `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response, open(tmp, "xb") as out:
            shutil.copyfileobj(response, out)
        os.replace(tmp, target)
    except urllib.error.HTTPError as e:
        raise InstructflowError(f"could not download {url}: HTTP {e.code} {e.reason}; check the URL") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise InstructflowError(
            f"could not download {url}: {reason}; check the URL and the network, "
            "or download the file yourself and give its path"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_hf(spec: str, record: dict) -> list[tuple[int, str]]:
    """Documents of `hf:NAME[:SPLIT][#FIELD]` through the optional `datasets` package."""
    name_split, field = _split_field(spec.removeprefix("hf:"))
    name, _, split = name_split.partition(":")
    try:
        import datasets  # optional: not a dependency of instructflow
    except ImportError:
        raise InstructflowError(
            f"source {spec!r} needs the `datasets` package and a reachable Hugging Face hub; "
            "pip install datasets, or export the data to .jsonl/.parquet and give that path"
        ) from None
    try:
        data = datasets.load_dataset(name, split=split or "train", cache_dir=str(cache_dir() / "hf-datasets"))
    except Exception as e:  # the hub, the name or the split: all reported the same way
        raise InstructflowError(
            f"could not load the dataset {spec!r} ({type(e).__name__}: {e}); check the name and split "
            "and that the Hugging Face hub is reachable"
        ) from None
    if field not in data.column_names:
        raise InstructflowError(f"{spec!r} has no column {field!r} (columns: {data.column_names}); use {spec}#COLUMN")
    record["files"].append({"path": spec, "fingerprint": getattr(data, "_fingerprint", None), "rows": len(data)})
    documents, skipped = _strings(enumerate(data[field]), field)
    _count_skipped(spec, spec, skipped, record)
    return documents


def _read_file(spec: str, file: SourceFile, record: dict) -> list[dict]:
    """Rows of one file; an unusable file is recorded as skipped and gives none."""
    raw = file.path.read_bytes()
    try:
        documents, skipped = _documents_of(spec, file, raw)
    except _Skip as e:
        _skip_file(spec, file.name, str(e), record)
        return []
    record["files"].append({"path": str(file.path), "name": file.name, "sha256": hashlib.sha256(raw).hexdigest(),
                            "bytes": len(raw), "documents": len(documents)})  # fmt: skip
    record["documents"] += len(documents)
    _count_skipped(spec, file.name, skipped, record)
    return [_row(spec, file.name, i, text) for i, text in documents]


def _documents_of(spec: str, file: SourceFile, raw: bytes) -> tuple[list[tuple[int, str]], Counter]:
    """(index, text) of each document of a file, and the count of documents skipped per reason."""
    if file.kind == "parquet":
        return _parquet_documents(spec, file, raw)
    if looks_binary(raw):
        raise _Skip("binary data, not text")
    text = _decode(raw, file)
    if file.kind == "jsonl":
        return _jsonl_documents(spec, file, text)
    pieces = chunk_text(text, file.chunk_chars) if file.chunk_chars else [text]
    return list(enumerate(pieces)), Counter()


def _decode(raw: bytes, file: SourceFile) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if file.latin1:
            return raw.decode("latin-1")
        raise _Skip(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it to UTF-8") from None


def _jsonl_documents(spec: str, file: SourceFile, text: str) -> tuple[list[tuple[int, str]], Counter]:
    """Documents of JSON lines, indexed by line number; bad lines are counted per reason."""
    records, skipped = [], Counter()
    fields: set[str] = set()
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            skipped["not valid JSON"] += 1
            continue
        if not isinstance(value, dict):
            skipped["not a JSON object"] += 1
            continue
        fields.update(value)
        if file.field not in value:
            skipped[f"no field {file.field!r}"] += 1
            continue
        records.append((number, value[file.field]))
    if not records and not fields:
        raise _Skip("not JSON lines (no line is a JSON object)")
    if not records:
        raise InstructflowError(
            f"source {spec!r}: no record of {file.name} has the field {file.field!r} "
            f"(fields: {sorted(fields)[:10]}); name the field as {file.name}#FIELD"
        )
    documents, bad = _strings(records, file.field)
    return documents, skipped + bad


def _parquet_documents(spec: str, file: SourceFile, raw: bytes) -> tuple[list[tuple[int, str]], Counter]:
    try:
        parquet = pq.ParquetFile(pa.BufferReader(raw))
        columns = parquet.schema_arrow.names
        values = parquet.read(columns=[file.field]).column(0).to_pylist() if file.field in columns else None
    except (pa.ArrowException, OSError) as e:
        raise _Skip(f"not a readable parquet file ({e})") from None
    if values is None:
        raise InstructflowError(
            f"source {spec!r}: {file.name} has no column {file.field!r} (columns: {columns[:10]}); "
            f"name the column as {file.name}#COLUMN"
        )
    return _strings(enumerate(values), file.field)


def _strings(values, field: str) -> tuple[list[tuple[int, str]], Counter]:
    """Keep the (index, value) pairs whose value is a string; count the others."""
    documents, skipped = [], Counter()
    for index, value in values:
        if isinstance(value, str):
            documents.append((index, value))
        else:
            skipped[f"field {field!r} is {'empty' if value is None else 'not a string'}"] += 1
    return documents, skipped


def _skip_file(spec: str, name: str, reason: str, record: dict) -> None:
    log.warning("%s: skipped %s: %s", spec, name, reason)
    record["skipped_files"].append({"path": name, "reason": reason})


def _count_skipped(spec: str, name: str, skipped: Counter, record: dict) -> None:
    for reason, count in sorted(skipped.items()):
        log.warning("%s: skipped %d documents of %s: %s", spec, count, name, reason)
        record["skipped_documents"][reason] = record["skipped_documents"].get(reason, 0) + count


def _nothing_usable(records: list[dict]) -> str:
    reasons = [f"{r['source']}: {s['path']}: {s['reason']}" for r in records for s in r["skipped_files"]]
    reasons += [f"{r['source']}: {n} documents: {why}" for r in records for why, n in r["skipped_documents"].items()]
    shown = "; ".join(reasons[:10]) + (f"; and {len(reasons) - 10} more" if len(reasons) > 10 else "")
    return (
        f"no usable document in {[r['source'] for r in records]}"
        + (f" (skipped: {shown})" if reasons else " (the sources hold no documents)")
        + "; give UTF-8 text, JSON lines or parquet with a text field"
    )


# --- cleaning --------------------------------------------------------------------------------------


def clean_documents(
    df: pd.DataFrame, min_chars: int = 100, near_threshold: float = 0.8
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean every text (Gutenberg header/footer, `clean_text`), then drop short, exact- and near-duplicate ones.

    Steps run in this order, each on what the previous kept; the first document of a duplicate group is kept.
    Returns the kept rows and the counts of each step.
    """
    stripped = [strip_gutenberg(text) for text in df["text"]]
    texts = [clean_text(text) for text in stripped]
    stats = {
        "documents_in": len(df),
        "chars_in": int(sum(map(len, df["text"]))),
        "gutenberg_stripped": sum(len(s) != len(t) for s, t in zip(stripped, df["text"])),
    }
    keep = [i for i, text in enumerate(texts) if len(text) >= min_chars]
    stats["too_short"] = len(texts) - len(keep)
    exact = exact_duplicates([texts[i] for i in keep])
    keep = [i for k, i in enumerate(keep) if k not in exact]
    near = near_duplicates([texts[i] for i in keep], near_threshold)
    keep = [i for k, i in enumerate(keep) if k not in near]
    out = df.iloc[keep].assign(text=[texts[i] for i in keep]).reset_index(drop=True)
    stats |= {
        "exact_duplicates": len(exact),
        "near_duplicates": len(near),
        "documents_out": len(out),
        "chars_out": int(sum(map(len, out["text"]))),
    }
    log.info("cleaning: %s", stats)
    if out.empty:
        raise InstructflowError(
            f"no document is left after cleaning ({stats['too_short']} of {len(df)} are shorter than "
            f"min_chars={min_chars}); lower min_chars or give more text"
        )
    return out, stats


# --- writing ---------------------------------------------------------------------------------------


def write_dataset(
    df: pd.DataFrame,
    out_dir: Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    sources: list[dict] | None = None,
    cleaning: dict | None = None,
    config: dict | None = None,
) -> Path:
    """Write `documents.parquet` (+ split and per-document stats) and `manifest.json` to `out_dir` at once.

    Everything is written into a staging folder next to `out_dir` and renamed into place
    (`atomic_directory`), so an interrupted run never leaves a half-written dataset. `sources` (from `read_documents`), `cleaning` (counts from
    `clean_documents`) and `config` (extra settings to record) go into the manifest. Returns its path.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    split = [split_of(doc_id, val_fraction, seed) for doc_id in df["doc_id"]]
    stats = pd.DataFrame([document_stats(text) for text in df["text"]], index=df.index)
    table = pd.concat([df[COLUMNS].assign(split=split), stats], axis=1)
    if val_fraction > 0 and "val" not in split:
        log.warning("no document fell into the val split (%d documents, val_fraction=%s)", len(df), val_fraction)
    with atomic_directory(out_dir) as staging:
        table.to_parquet(staging / "documents.parquet", index=False)
        manifest = {
            "documents_file": "documents.parquet",
            "documents_sha256": hashlib.sha256((staging / "documents.parquet").read_bytes()).hexdigest(),
            "documents": {s: int((table["split"] == s).sum()) for s in ("train", "val")},
            "chars": {s: int(table.loc[table["split"] == s, "chars"].sum()) for s in ("train", "val")},
            "words": {s: int(table.loc[table["split"] == s, "words"].sum()) for s in ("train", "val")},
            "cleaning": cleaning or {},
            "sources": sources or [],
            "config": {"val_fraction": val_fraction, "seed": seed, **(config or {})},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir / "manifest.json"


def _check_replaceable(out_dir: Path) -> None:
    """Only a new folder, an empty one or an earlier dataset may be replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InstructflowError(f"{out_dir} is a file; give a folder for the dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise InstructflowError(
            f"{out_dir} holds files but no manifest.json (not a dataset); give a new or empty folder"
        )
