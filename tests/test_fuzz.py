"""The two parsers that take outside data, fuzzed (hypothesis, bounded in time): Label Studio's JSON export ->
comparisons, and ingest's file readers. Thousands of generated inputs, from arbitrary JSON and bytes to exports and
files one mutation away from valid: none crashes, every rejection is one clear InstructflowError, and what is
accepted adds up (and fits the comparisons store's schema, so an append is never half-written)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.errors import InstructflowError
from tasks.ingest import read_documents
from tasks.ranking import LIST, ROW_SCHEMA, comparisons_from_export, ranking_result

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
OUTCOMES = ("ranked", "tied", "unranked", "skipped", "empty", "malformed")
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)  # the same inputs on every run: a failure here reproduces


@st.composite
def annotation(draw, ids: list[str]) -> dict:
    """An annotation as Label Studio exports it, now and then with one field broken."""
    chosen = draw(st.lists(st.sampled_from(ids + ["unknown-id"]), max_size=len(ids) + 1))
    tiers = [[c] for c in chosen] if draw(st.booleans()) else [chosen]
    result = ranking_result(tiers, levels=draw(st.integers(1, 4)), simulated=draw(st.booleans()))
    item = {"id": draw(st.integers(1, 50)), "completed_by": draw(st.integers(1, 3)), "result": result,
            "was_cancelled": draw(st.booleans()), "lead_time": draw(st.floats(0, 100)),
            "created_at": "2026-12-01T10:00:00Z", "updated_at": draw(st.sampled_from(["2026-12-01T10:00:00Z", "x"]))}
    if draw(st.integers(0, 3)) == 0:  # one field replaced by anything
        item[draw(st.sampled_from(sorted(item)))] = draw(JSON)
    return item


@st.composite
def task(draw) -> dict:
    ids = draw(st.lists(st.text("abcdef", min_size=1, max_size=3), min_size=1, max_size=5, unique=True))
    data = {"prompt": draw(st.text(max_size=20)), LIST: [{"id": i, "title": i, "body": draw(st.text(max_size=8))}
                                                          for i in ids],
            "key": draw(st.text(max_size=6))}
    if draw(st.integers(0, 4)) == 0:
        data[draw(st.sampled_from(sorted(data)))] = draw(JSON)
    return {"id": draw(st.integers(1, 30)), "data": data,
            "annotations": draw(st.lists(annotation(ids), max_size=3))}


def check_export(export) -> None:
    rows, stats = comparisons_from_export(export)  # never raises
    assert sum(stats[outcome] for outcome in OUTCOMES) == stats["annotations"]
    assert stats["pairs"] == len(rows)
    assert all(row["chosen_rank"] < row["rejected_rank"] for row in rows)
    pa.Table.from_pylist([{name: row[name] for name in ROW_SCHEMA.names} for row in rows], schema=ROW_SCHEMA)


@FUZZ
@given(st.lists(task(), max_size=4))
def test_exports_one_mutation_from_valid_never_crash_and_add_up(export):
    check_export(export)


@FUZZ
@given(JSON)
def test_any_json_as_an_export_never_crashes(export):
    check_export(export)


def read(path) -> int:
    """Documents read from one file, or 0 when refused with a clear error; anything else fails the test."""
    try:
        frame, records = read_documents([str(path)])
    except InstructflowError as e:
        assert str(e) and "Traceback" not in str(e)
        return 0
    assert len(frame) == records[0]["documents"] and frame["text"].map(type).eq(str).all()
    return len(frame)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True, database=None)
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".jsonl", ".parquet"]))
def test_any_bytes_as_a_source_file_are_read_or_refused_clearly(tmp_path, raw, suffix):
    path = tmp_path / f"source{suffix}"
    path.write_bytes(raw)
    read(path)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True, database=None)
@given(lines=st.lists(JSON, max_size=8))
def test_json_lines_give_one_document_per_object_with_a_text_string(tmp_path, lines):
    path = tmp_path / "source.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    expected = sum(isinstance(line, dict) and isinstance(line.get("text"), str) for line in lines)
    assert read(path) == expected


@pytest.fixture(autouse=True)
def quiet_ingest_log(caplog):
    caplog.set_level("ERROR", logger="tasks.ingest")  # thousands of "n documents from 1 file" lines otherwise
