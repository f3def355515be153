"""InstructGPT step 2, the data side: rank K responses per prompt in Label Studio and turn rankings into comparisons.

    items ──import_tasks──▶ Label Studio project (RANKING_CONFIG) ──labelers / run_simulated_labeler──▶ annotations
    export_rankings ──▶ raw JSON export ──comparisons_from_export──▶ (rows, stats) ──append_comparisons──▶ dataset

The ranking semantics (RANKING_CONFIG / ranking_config):
  - the Ranker's buckets are ranks, `rank_1` (best) … `rank_N` (worst); a response's rank is its bucket's number;
  - responses in the same bucket are a tie: they make no comparison (counted as `tied_pairs`);
  - responses left in the unsorted column (`"_"`) or absent from the result are not ranked: they take part in no
    comparison, so a partial ranking is fine;
  - the order inside one bucket means nothing;
  - every pair of ranked responses in different buckets gives one row (chosen = the better rank, rejected = the worse).
  A bucketless Ranker's result (`{"rank": [ids best→worst]}`) is read as one rank per position.

Candidates carry opaque ids (a hash of the task key and the text), shown to nobody: the config hides the id line that
Label Studio prints under each item, and the items are shuffled per task (seed + task key), because a submit without
dragging stores the import order. Every task stores its content hash (`data.key`), so importing again never
duplicates a task.

The comparisons dataset is append-only and versioned: `<dir>/v0001.parquet`, `v0002.parquet`, … and
`<dir>/manifest.json` listing each version's rows, annotations and sha256. An annotation is identified by its id and
`updated_at`: a re-collection appends only annotations (or new edits of them) that no version holds yet, and
`read_comparisons` keeps each annotation's latest edit.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import random
import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from label_studio_sdk import LabelStudio

from model.errors import InstructflowError
from model.files import atomic_write
from tasks import labelstudio
from tasks.settings import file_lock

RANKER = "rank"  # the Ranker's name: the key of its results (`from_name`)
LIST = "candidates"  # the List object the Ranker sorts, fed by the task's `candidates`
UNSORTED = "_"  # Label Studio's column for items not dropped in any bucket
MAX_LEVELS = 9  # InstructGPT ranks K = 4..9 responses per prompt
_BUCKET = re.compile(r"rank_([1-9][0-9]*)")
_PAGE = 1000  # tasks per page when listing, and per import request

INSTRUCTIONS = (
    "Rank the responses to the prompt from best to worst. Drag each response into a rank column: 1 is the best. "
    "Judge whether it follows the instruction and is helpful, truthful and harmless. Put responses that are equally "
    "good into the same column (a tie). Leave a response in the 'Not ranked' column if you cannot judge it: it is "
    "then left out. The order of the responses is random and tells nothing."
)


def ranking_config(levels: int = 4) -> str:
    """A Label Studio labeling config ranking a task's candidates into `levels` rank buckets (ties allowed)."""
    if not 2 <= levels <= MAX_LEVELS:
        raise InstructflowError(f"a ranking needs 2 to {MAX_LEVELS} rank levels, not {levels}")
    buckets = "\n".join(
        f'    <Bucket name="rank_{n}" title="{n}{" (best)" if n == 1 else " (worst)" if n == levels else ""}"/>'
        for n in range(1, levels + 1)
    )
    return f"""<View>
  <Header value="Rank the responses" size="4"/>
  <Text name="instructions" value="{INSTRUCTIONS}"/>
  <Header value="Prompt" size="5"/>
  <Text name="prompt" value="$prompt"/>
  <Style>
    .htx-ranker-item p:last-child {{ display: none }}
  </Style>
  <List name="{LIST}" value="${LIST}" title="Not ranked"/>
  <Ranker name="{RANKER}" toName="{LIST}">
{buckets}
  </Ranker>
</View>"""


# The style hides the last line of each ranked item: the (opaque) candidate id Label Studio prints there.
RANKING_CONFIG = ranking_config(4)


# ---------------------------------------------------------------------------------------------------------- import


def task_key(prompt: str, responses: Sequence[str | dict]) -> str:
    """Content hash of a ranking task: the prompt and the set of response texts (order and duplicates ignored)."""
    texts = sorted({r if isinstance(r, str) else r["text"] for r in responses})
    return hashlib.sha256(json.dumps([prompt, texts], ensure_ascii=False).encode()).hexdigest()


def _candidate_id(key: str, text: str) -> str:
    return "r" + hashlib.sha256(f"{key}\0{text}".encode()).hexdigest()[:12]


def ranking_task(item: dict, seed: int) -> dict | None:
    """The Label Studio task data of one item, or None when it has fewer than two distinct responses.

    item: {"prompt": str, "responses": [{"text": str, "id"?: str, "meta"?: dict}, ...], **origin} where the other
    keys (policy, round, ...) are kept as `origin`. Identical texts are kept once (the first).
    """
    if not isinstance(item, dict):
        raise InstructflowError(f"a ranking item must be a dict with 'prompt' and 'responses', not {item!r:.80}")
    prompt, responses = item.get("prompt"), item.get("responses")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InstructflowError(f"a ranking item needs a non-empty 'prompt' string, not {prompt!r:.80}")
    if not isinstance(responses, list):
        raise InstructflowError(f"the 'responses' of prompt {prompt!r:.60} must be a list, not {responses!r:.80}")
    unique: dict[str, dict] = {}
    for response in responses:
        if not isinstance(response, dict) or not isinstance(response.get("text"), str):
            raise InstructflowError(f"each response of prompt {prompt!r:.60} must be a dict with a 'text' string, "
                                    f"not {response!r:.80}")
        unique.setdefault(response["text"], response)
    given = [r["id"] for r in unique.values() if r.get("id") is not None]
    if len(given) != len(set(map(str, given))):
        raise InstructflowError(f"the responses of prompt {prompt!r:.60} repeat an id: {given}")
    try:
        json.dumps([item, *unique.values()])
    except (TypeError, ValueError) as error:
        raise InstructflowError(f"the item of prompt {prompt!r:.60} holds a value that is not JSON: {error}") from None
    if len(unique) < 2:
        return None
    key = task_key(prompt, list(unique))
    candidates = sorted(({"id": _candidate_id(key, text), "body": text} for text in unique), key=lambda c: c["id"])
    random.Random(f"{seed}:{key}").shuffle(candidates)
    for n, candidate in enumerate(candidates):  # cards a labeler can name: "B beats D"
        letter = string.ascii_uppercase[n] if n < 26 else str(n + 1)
        candidate["title"] = letter if candidate["body"].strip() else f"{letter} (empty response)"
    return {
        "prompt": prompt,
        LIST: candidates,
        "key": key,
        "responses": {
            _candidate_id(key, text): {"id": str(_candidate_id(key, text) if r.get("id") is None else r["id"]),
                                       "meta": r.get("meta") or {}}
            for text, r in unique.items()
        },
        "origin": {k: v for k, v in item.items() if k not in ("prompt", "responses")},
    }


def existing_keys(project_id: int, ls: LabelStudio | None = None) -> dict[str, int]:
    """Task key -> task id of the project's tasks (tasks without a key are left out)."""
    ls = ls or labelstudio.client()
    keys: dict[str, int] = {}
    for task in ls.tasks.list(project=project_id, fields="task_only", page_size=_PAGE):
        key = (task.data or {}).get("key")
        if isinstance(key, str):
            keys.setdefault(key, task.id)
    return keys


def import_tasks(project_id: int, items: Iterable[dict], seed: int = 0, ls: LabelStudio | None = None,
                 annotate: Callable[[dict], dict] | None = None) -> dict:
    """Imports the items the project lacks (by content hash), candidates shuffled per task; returns the counts.

    `annotate(task_data)`, when given, returns an annotation ({"result", "completed_by"}) imported with each new task:
    how the simulated labeler ranks a whole round in one request (posting rankings one by one takes ~0.2 s each).

    {"imported": new tasks, "already_present": items whose task exists (or repeat an earlier item),
     "unrankable": items with fewer than two distinct responses (not imported), "task_ids": the new tasks' ids}
    """
    tasks = [ranking_task(item, seed) for item in items]  # validates everything before touching the server
    ls = ls or labelstudio.client()
    present = set(existing_keys(project_id, ls))
    new, counts = [], {"imported": 0, "already_present": 0, "unrankable": 0, "task_ids": []}
    for task in tasks:
        if task is None:
            counts["unrankable"] += 1
        elif task["key"] in present:
            counts["already_present"] += 1
        else:
            present.add(task["key"])
            new.append(task)
    if annotate is not None:
        new = [{"data": task, "annotations": [annotate(task)]} for task in new]
    for start in range(0, len(new), _PAGE):
        done = ls.projects.import_tasks(project_id, request=new[start:start + _PAGE], return_task_ids=True)
        counts["task_ids"] += list(done.task_ids or [])
    counts["imported"] = len(new)
    return counts


# ------------------------------------------------------------------------------------------------------ collection


def export_rankings(project_id: int, ls: LabelStudio | None = None) -> list[dict]:
    """Every task of the project with all its annotations, skipped (was_cancelled) ones included: the JSON export.

    GET /api/projects/{id}/export?exportType=JSON&download_all_tasks=true, through the SDK's `download_sync`
    (Label Studio Enterprise answers it 404 and needs the snapshot API instead).
    """
    ls = ls or labelstudio.client()
    data = b"".join(ls.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=True))
    tasks = json.loads(data)
    if not isinstance(tasks, list):
        raise InstructflowError(f"the JSON export of Label Studio project {project_id} is not a list of tasks")
    return tasks


ROW_SCHEMA = pa.schema([
    ("task_key", pa.string()),
    ("task_id", pa.int64()),
    ("annotation_id", pa.int64()),
    ("annotator", pa.int64()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("chosen_id", pa.string()),
    ("rejected_id", pa.string()),
    ("chosen_rank", pa.int64()),
    ("rejected_rank", pa.int64()),
    ("lead_time", pa.float64()),
    ("created_at", pa.string()),
    ("updated_at", pa.string()),
    ("simulated", pa.bool_()),
    ("origin", pa.string()),  # the item's other keys (policy, round, ...) as JSON
])


class _Malformed(Exception):
    pass


def _candidates(task: dict) -> tuple[list[dict], dict[str, str]]:
    """The task's candidates and candidate id -> response id; raises _Malformed for task data we did not write."""
    data = task.get("data")
    candidates = data.get(LIST) if isinstance(data, dict) else None
    if not isinstance(candidates, list) or not all(
        isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("body"), str) for c in candidates
    ):
        raise _Malformed(f"task data has no '{LIST}' list of {{id, body}} items")
    ids = [c["id"] for c in candidates]
    if len(set(ids)) != len(ids):
        raise _Malformed("task data repeats a candidate id")
    if not isinstance(data.get("prompt"), str):
        raise _Malformed("task data has no 'prompt' string")
    responses = data.get("responses") if isinstance(data.get("responses"), dict) else {}
    response_ids = {}
    for cid in ids:
        given = responses.get(cid)
        response_ids[cid] = str(given["id"]) if isinstance(given, dict) and given.get("id") is not None else cid
    return candidates, response_ids


def _ranks(result: Any, known: set[str]) -> tuple[dict[str, int], bool]:
    """Candidate id -> rank (1 best) of the ranked candidates, and whether the result says it is simulated."""
    if not isinstance(result, list):
        raise _Malformed(f"result is a {type(result).__name__}, not a list")
    if not all(isinstance(r, dict) for r in result):
        raise _Malformed("result holds an item that is not an object")
    mine = [r for r in result if r.get("from_name") == RANKER]
    if not mine:
        raise _Malformed(f"result has no item from the Ranker '{RANKER}'")
    if len(mine) > 1:
        raise _Malformed(f"result has {len(mine)} items from the Ranker '{RANKER}'")
    item = mine[0]
    if item.get("type") != "ranker":
        raise _Malformed(f"the Ranker's item has type {item.get('type')!r}, not 'ranker'")
    value = item.get("value")
    ranker = value.get("ranker") if isinstance(value, dict) else None
    if not isinstance(ranker, dict):
        raise _Malformed("the Ranker's value has no 'ranker' object")
    if RANKER in ranker and len(ranker) > 1:
        raise _Malformed(f"the ranking mixes a plain '{RANKER}' list with buckets")
    ranks: dict[str, int] = {}
    seen: set[str] = set()
    for bucket, ids in ranker.items():
        level = None
        if bucket != RANKER and bucket != UNSORTED:
            match = _BUCKET.fullmatch(str(bucket))
            if not match:
                raise _Malformed(f"unknown bucket {bucket!r}")
            level = int(match.group(1))
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _Malformed(f"bucket {bucket!r} is not a list of candidate ids")
        for position, cid in enumerate(ids):
            if cid not in known:
                raise _Malformed(f"unknown candidate id {cid!r}")
            if cid in seen:
                raise _Malformed(f"candidate {cid!r} is ranked twice")
            seen.add(cid)
            if bucket == RANKER:
                ranks[cid] = position + 1
            elif level is not None:
                ranks[cid] = level
    meta = item.get("meta")
    return ranks, isinstance(meta, dict) and meta.get("simulated") is True


def _annotator(annotation: dict) -> int | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("id")
    return who if _integer(who) else None


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def comparisons_from_export(tasks_json: Any) -> tuple[list[dict], dict]:
    """One row per (chosen, rejected) pair of every annotation's ranking, and what happened to every annotation.

    Rows (ROW_SCHEMA's columns) come in export order of tasks and annotations; within an annotation, by the chosen
    response's rank, then the rejected one's, then by the task's candidate order. Never raises on bad input.

    stats: tasks, tasks_unannotated (no annotation at all), annotations, and each annotation's outcome (they add up):
      ranked (≥ 1 pair), tied (≥ 2 ranked responses, all in one bucket), unranked (< 2 ranked responses),
      skipped (was_cancelled), empty (no result), malformed (see `problems`: task/annotation id and the reason);
    pairs (= len(rows)), tied_pairs (pairs of ranked responses in one bucket: no row), malformed_tasks (entries that
    are not tasks), annotators (distinct ones with a ranked or tied annotation), and agreement: over the response
    pairs that ≥ 2 annotators both ranked strictly (each annotator's latest ranked/tied annotation of the task),
    `pairs` such pairs, `judgments` annotator pairs judging one of them, `agreeing` of those that agree, `rate`.
    """
    stats: dict[str, Any] = {
        "tasks": 0, "tasks_unannotated": 0, "annotations": 0,
        "ranked": 0, "tied": 0, "unranked": 0, "skipped": 0, "empty": 0, "malformed": 0,
        "pairs": 0, "tied_pairs": 0, "malformed_tasks": 0, "annotators": 0, "problems": [],
    }
    rows: list[dict] = []
    annotators: set = set()
    judged: dict[tuple, dict] = defaultdict(dict)  # (task, a, b) with a < b -> annotator -> +1 (a better) / -1 / 0
    if not isinstance(tasks_json, list):
        stats["problems"].append({"task_id": None, "annotation_id": None, "reason": "the export is not a list"})
        stats["malformed_tasks"] += 1
        tasks_json = []
    for number, task in enumerate(tasks_json):
        if not isinstance(task, dict) or not _integer(task.get("id")) or not isinstance(task.get("annotations"), list):
            stats["malformed_tasks"] += 1
            stats["problems"].append({"task_id": task.get("id") if isinstance(task, dict) else None,
                                      "annotation_id": None,
                                      "reason": "not a task with an id and an 'annotations' list"})
            continue
        stats["tasks"] += 1
        annotations = task.get("annotations") or []
        if not annotations:
            stats["tasks_unannotated"] += 1
        task_id = task.get("id")
        try:
            candidates, response_ids, task_problem = *_candidates(task), None
        except _Malformed as problem:
            candidates, response_ids, task_problem = [], {}, str(problem)
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        order = {c["id"]: i for i, c in enumerate(candidates)}
        text = {c["id"]: c["body"] for c in candidates}
        latest: dict[Any, tuple] = {}  # annotator -> (updated_at, id, ranks) of the latest ranked/tied annotation
        for annotation in annotations:
            stats["annotations"] += 1
            annotation_id = annotation.get("id") if isinstance(annotation, dict) else None
            annotation_id = annotation_id if _integer(annotation_id) else None
            try:
                if not isinstance(annotation, dict) or annotation_id is None:
                    raise _Malformed("annotation is not an object with an id")
                if annotation.get("was_cancelled"):
                    stats["skipped"] += 1
                    continue
                if annotation.get("result") in (None, []):
                    stats["empty"] += 1
                    continue
                if task_problem:
                    raise _Malformed(task_problem)
                ranks, simulated = _ranks(annotation["result"], set(order))
            except _Malformed as problem:
                stats["malformed"] += 1
                stats["problems"].append({"task_id": task_id, "annotation_id": annotation_id, "reason": str(problem)})
                continue
            ranked = sorted(ranks, key=lambda c: (ranks[c], order[c]))
            if len(ranked) < 2:
                stats["unranked"] += 1
                continue
            annotator = _annotator(annotation)
            who = annotator if annotator is not None else ("annotation", annotation_id)
            annotators.add(who)
            new = []
            for better, worse in itertools.combinations(ranked, 2):
                if ranks[better] == ranks[worse]:
                    stats["tied_pairs"] += 1
                    continue
                new.append({
                    "task_key": data.get("key") if isinstance(data.get("key"), str) else None,
                    "task_id": task_id,
                    "annotation_id": annotation_id,
                    "annotator": annotator,
                    "prompt": data["prompt"],
                    "chosen": text[better],
                    "rejected": text[worse],
                    "chosen_id": response_ids[better],
                    "rejected_id": response_ids[worse],
                    "chosen_rank": ranks[better],
                    "rejected_rank": ranks[worse],
                    "lead_time": _number(annotation.get("lead_time")),
                    "created_at": _string(annotation.get("created_at")),
                    "updated_at": _string(annotation.get("updated_at")),
                    "simulated": simulated,
                    "origin": json.dumps(data.get("origin") or {}, sort_keys=True, ensure_ascii=False),
                })
            new.sort(key=lambda r: (r["chosen_rank"], r["rejected_rank"]))  # stable: keeps the candidate order
            rows += new
            stats["ranked" if new else "tied"] += 1
            stamp = (_string(annotation.get("updated_at")) or "", annotation_id)
            if who not in latest or stamp > latest[who][:2]:
                latest[who] = (*stamp, ranks)
        for who, (_, _, ranks) in latest.items():
            for a, b in itertools.combinations(sorted(ranks), 2):
                judged[(number, a, b)][who] = (ranks[a] < ranks[b]) - (ranks[a] > ranks[b])
    stats["pairs"] = len(rows)
    stats["annotators"] = len(annotators)
    agreement = {"pairs": 0, "judgments": 0, "agreeing": 0, "rate": None}
    for votes in judged.values():
        strict = [v for v in votes.values() if v != 0]
        if len(strict) < 2:
            continue
        agreement["pairs"] += 1
        for x, y in itertools.combinations(strict, 2):
            agreement["judgments"] += 1
            agreement["agreeing"] += x == y
    if agreement["judgments"]:
        agreement["rate"] = agreement["agreeing"] / agreement["judgments"]
    stats["agreement"] = agreement
    return rows, stats


# --------------------------------------------------------------------------------------------------------- dataset

MANIFEST = "manifest.json"


def read_manifest(dataset_dir: Path) -> dict:
    """The dataset's manifest ({"versions": [...]}), empty for a new dataset."""
    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        return {"format": 1, "versions": []}
    try:
        manifest = json.loads(path.read_text())
        assert isinstance(manifest.get("versions"), list)
    except (ValueError, AssertionError, AttributeError):
        raise InstructflowError(f"{path} is not a comparisons manifest") from None
    return manifest


def _version_table(dataset_dir: Path, entry: dict, columns: list[str] | None = None) -> pa.Table:
    path = Path(dataset_dir) / entry["file"]
    if not path.exists():
        raise InstructflowError(f"{path}, version {entry['version']} of the comparisons, is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InstructflowError(f"{path} does not match the sha256 in {Path(dataset_dir) / MANIFEST}: it was changed")
    return pq.read_table(io.BytesIO(data), columns=columns)


def _locked(dataset_dir: Path):
    """One writer at a time (an advisory lock on <dir>/.lock)."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    return file_lock(dataset_dir / ".lock")


def append_comparisons(dataset_dir: Path, rows: Sequence[dict]) -> Path | None:
    """Appends, as a new version, the rows of annotations (id + updated_at) that no version holds yet.

    Returns the new version's parquet path, or None when nothing was new. The parquet file is written first and the
    manifest last, each atomically, so a crash leaves the previous versions intact (an unlisted file is overwritten).
    """
    dataset_dir = Path(dataset_dir)
    for row in rows:
        missing = [name for name in ROW_SCHEMA.names if name not in row]
        if missing:
            raise InstructflowError(f"a comparison row lacks {missing}: rows come from comparisons_from_export")
    with _locked(dataset_dir):
        manifest = read_manifest(dataset_dir)
        present = set()
        for entry in manifest["versions"]:
            held = _version_table(dataset_dir, entry, ["annotation_id", "updated_at"]).to_pydict()
            present.update(zip(held["annotation_id"], held["updated_at"]))
        new = [r for r in rows if (r["annotation_id"], r["updated_at"]) not in present]
        if not new:
            return None
        version = max((e["version"] for e in manifest["versions"]), default=0) + 1
        table = pa.Table.from_pylist([{name: r[name] for name in ROW_SCHEMA.names} for r in new], schema=ROW_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        path = atomic_write(dataset_dir / f"v{version:04d}.parquet", data)
        manifest["versions"].append({
            "version": version,
            "file": path.name,
            "rows": len(new),
            "annotations": len({r["annotation_id"] for r in new}),
            "sha256": hashlib.sha256(data).hexdigest(),
            "created_at": datetime.now(UTC).isoformat(),
        })
        atomic_write(dataset_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        return path


def round_version(dataset_dir: Path, round_name: str, appended: bool) -> int | None:
    """The dataset version a feedback round ended with (None when the dataset had no comparisons then): recorded when
    the round first collects, and again whenever its collection appended something. A re-run that collects nothing
    new gets the recorded version back, whatever later rounds added, so the round's reward model is trained on the
    same data every time."""
    dataset_dir = Path(dataset_dir)
    with _locked(dataset_dir):
        manifest = read_manifest(dataset_dir)
        rounds = manifest.setdefault("rounds", {})
        if appended or round_name not in rounds:
            rounds[round_name] = max((e["version"] for e in manifest["versions"]), default=None)
            atomic_write(dataset_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        return rounds[round_name]


def read_comparisons(dataset_dir: Path, version: int | None = None):
    """The comparisons of versions 1..version (default: all) as a DataFrame, each annotation at its latest edit.

    Every file is checked against the manifest's sha256.
    """
    manifest = read_manifest(dataset_dir)
    entries = [e for e in manifest["versions"] if version is None or e["version"] <= version]
    if version is not None and not any(e["version"] == version for e in entries):
        raise InstructflowError(f"{dataset_dir} has no comparisons version {version} "
                                f"(it has {[e['version'] for e in manifest['versions']]})")
    tables = [_version_table(dataset_dir, e) for e in entries]
    frame = (pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()).to_pandas()
    if len(frame):
        latest = frame.groupby("annotation_id")["updated_at"].transform("max")
        frame = frame[frame["updated_at"] == latest].reset_index(drop=True)
    return frame


# ------------------------------------------------------------------------------------------- the simulated labeler

SIMULATED_LABELER = "simulated-labeler"
SIMULATED_LABELER_EMAIL = "simulated-labeler@instructflow.local"

Preference = Callable[[str, str], float]


def gold_preference(prompt: str, response: str) -> float:
    """The demo's hidden ("gold") preference: on-topic, then concise.

    score = (distinct words of the prompt that the response uses) - |words in the response - 12| / 12, words being
    lowercase runs of letters and digits. Deterministic; the reward model should learn to agree with it.
    """
    words = re.findall(r"[a-z0-9]+", response.lower())
    on_topic = len(set(re.findall(r"[a-z0-9]+", prompt.lower())) & set(words))
    return on_topic - abs(len(words) - 12) / 12


def simulated_rank(prompt: str, responses: Sequence[dict], preference: Preference, noise: float = 0.0,
                   rng: random.Random | None = None) -> list[list[str]]:
    """The responses' ids in tiers, best first: equal scores share a tier (a tie), ids sorted within a tier.

    responses: [{"id": ..., "text": ...}]. Noise: one pass over the adjacent tiers, best to worst, swapping each
    pair with probability `noise` (so a tier can sink further), drawn from `rng`.
    """
    if not 0.0 <= noise <= 1.0:
        raise InstructflowError(f"the simulated labeler's noise is a probability in [0, 1], not {noise}")
    scored: dict[float, list[str]] = defaultdict(list)
    for response in responses:
        score = float(preference(prompt, response["text"]))
        if math.isnan(score):
            raise InstructflowError(f"the preference scored a response of prompt {prompt!r:.60} as NaN")
        scored[score].append(response["id"])
    tiers = [sorted(scored[score]) for score in sorted(scored, reverse=True)]
    if noise > 0:
        rng = rng or random.Random(0)
        for i in range(len(tiers) - 1):
            if rng.random() < noise:
                tiers[i], tiers[i + 1] = tiers[i + 1], tiers[i]
    return tiers


def ranking_result(tiers: Sequence[Sequence[str]], levels: int, simulated: bool = False,
                   unranked: Sequence[str] = ()) -> list[dict]:
    """A Ranker result as the UI stores it: tier i in bucket rank_{i+1}, tiers past `levels` merged into the last."""
    buckets: dict[str, list[str]] = {f"rank_{n}": [] for n in range(1, levels + 1)}
    for i, tier in enumerate(tiers):
        buckets[f"rank_{min(i + 1, levels)}"] += list(tier)
    item = {"type": "ranker", "from_name": RANKER, "to_name": LIST,
            "value": {"ranker": {UNSORTED: list(unranked), **buckets}}}
    if simulated:
        item["meta"] = {"simulated": True, "labeler": SIMULATED_LABELER}
    return [item]


def simulated_labeler(ls: LabelStudio | None = None) -> int:
    """Id of the simulated labeler's Label Studio user (created if missing; it never logs in)."""
    return labelstudio.create_user(SIMULATED_LABELER_EMAIL, first_name=SIMULATED_LABELER, ls=ls or labelstudio.client())


def project_levels(project_id: int, ls: LabelStudio) -> int:
    """How many rank_N buckets the project's Ranker has."""
    config = ls.projects.get(project_id).label_config or ""
    levels = {int(n) for n in re.findall(r'<Bucket\s[^>]*name="rank_([1-9][0-9]*)"', config)}
    if not levels or levels != set(range(1, max(levels) + 1)):
        raise InstructflowError(f"Label Studio project {project_id} has no Ranker with buckets rank_1..rank_N: "
                                "create it with tasks.ranking.ranking_config()")
    return max(levels)


def run_simulated_labeler(project_id: int, preference: Preference = gold_preference, *,
                          ls: LabelStudio | None = None, user_id: int | None = None, noise: float = 0.0,
                          seed: int = 0, limit: int | None = None) -> dict:
    """Ranks, through the API, the project's tasks this labeler has not annotated (skips included), in task order.

    The annotations are the simulated user's (`user_id`, default the "simulated-labeler" user): they are posted with
    an admin client and `completed_by`, which works on any Label Studio (no password needed). Each task's noise is
    drawn from Random(f"{seed}:{task key}"), so a ranking does not depend on which tasks were ranked before.
    Every response is ranked (no "_"); the result's meta says {"simulated": true}.
    Returns {"annotated": tasks ranked now, "already_done": tasks this labeler had annotated}.
    """
    ls = ls or labelstudio.client()
    user_id = simulated_labeler(ls) if user_id is None else user_id
    levels = project_levels(project_id, ls)
    counts = {"annotated": 0, "already_done": 0}
    for task in sorted(export_rankings(project_id, ls), key=lambda t: t.get("id", 0)):
        if any(isinstance(a, dict) and _annotator(a) == user_id for a in task.get("annotations") or []):
            counts["already_done"] += 1
            continue
        if limit is not None and counts["annotated"] >= limit:
            continue
        try:
            candidates, _ = _candidates(task)
        except _Malformed:
            continue
        data = task["data"]
        ls.annotations.create(id=task["id"], **simulated_annotation(
            data, candidates, preference, noise=noise, seed=seed, levels=levels, user_id=user_id, fallback_key=task["id"]))
        counts["annotated"] += 1
    return counts


def simulated_annotation(data: dict, candidates: Sequence[dict], preference: Preference, *, noise: float, seed: int,
                         levels: int, user_id: int, fallback_key: Any = None) -> dict:
    """The simulated labeler's annotation of one task ({"result", "completed_by"}): its noise is drawn from
    Random(f"{seed}:{task key}"), so a task gets the same ranking whether it is ranked on import or later."""
    rng = random.Random(f"{seed}:{data.get('key', fallback_key)}")
    responses = [{"id": c["id"], "text": c["body"]} for c in candidates]
    tiers = simulated_rank(data["prompt"], responses, preference, noise, rng)
    return {"result": ranking_result(tiers, levels, simulated=True), "completed_by": user_id}


def simulated_importer(preference: Preference, *, noise: float, seed: int, levels: int,
                       ls: LabelStudio | None = None) -> Callable[[dict], dict]:
    """`import_tasks`' annotate function for the simulated labeler (its user is created if missing)."""
    user_id = simulated_labeler(ls)
    return lambda data: simulated_annotation(data, data[LIST], preference, noise=noise, seed=seed, levels=levels,
                                             user_id=user_id)
