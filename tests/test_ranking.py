"""tasks/ranking.py: ranking tasks in a real Label Studio, rankings -> comparisons, the dataset, a simulated labeler."""

from __future__ import annotations

import hashlib
import itertools
import json
import random

import pytest
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from labelstudio_server import labelstudio_template, server_from_template  # noqa: F401 (a fixture)
from model.errors import InstructflowError
from tasks import labelstudio, ranking


@pytest.fixture(scope="module")
def server(labelstudio_template, tmp_path_factory):
    """One server for this module's tests (each uses its own projects)."""
    started = server_from_template(labelstudio_template, tmp_path_factory.mktemp("labelstudio"))
    try:
        yield started.start()
    finally:
        started.stop()


def admin(server) -> LabelStudio:
    return LabelStudio(base_url=server.url, api_key=server.credentials["token"])


def item(prompt: str, *texts: str, **origin) -> dict:
    return {"prompt": prompt, "responses": [{"text": t, "id": f"{prompt[:3]}-{i}", "meta": {"i": i}}
                                             for i, t in enumerate(texts)], **origin}


def ranker(buckets: dict) -> list[dict]:
    return [{"type": "ranker", "from_name": "rank", "to_name": "candidates", "value": {"ranker": buckets}}]


# ------------------------------------------------------------------------------------------------ pure: the export

def candidate(cid: str, body: str) -> dict:
    return {"id": cid, "title": "Response", "body": body}


def export_task(task_id: int, annotations: list, prompt: str = "P", bodies: dict | None = None, **data) -> dict:
    bodies = bodies or {"a": "A", "b": "B", "c": "C"}
    return {"id": task_id, "annotations": annotations,
            "data": {"prompt": prompt, "candidates": [candidate(c, b) for c, b in bodies.items()], "key": f"k{task_id}",
                     "responses": {c: {"id": f"resp-{c}", "meta": {}} for c in bodies}, "origin": {"round": 1},
                     **data}}


def annotation(annotation_id: int, result, who=1, **fields) -> dict:
    return {"id": annotation_id, "completed_by": who, "result": result, "was_cancelled": False, "lead_time": 2.0,
            "created_at": f"2026-01-01T00:00:0{annotation_id % 10}Z", "updated_at": f"u{annotation_id}", **fields}


def pairs(rows) -> list[tuple]:
    return [(r["annotation_id"], r["chosen"], r["rejected"], r["chosen_rank"], r["rejected_rank"]) for r in rows]


def test_comparisons_from_a_hand_written_export():
    tasks = [
        export_task(1, [
            annotation(1, ranker({"_": [], "rank_1": ["b"], "rank_2": ["a"], "rank_3": ["c"]}), who=1),
            annotation(2, ranker({"rank_1": ["a", "b"], "rank_2": ["c"]}), who={"id": 2, "email": "x"}),  # a tie
            annotation(3, [], who=3, was_cancelled=True),  # skipped
            annotation(4, [], who=3),  # empty
            annotation(5, ranker({"_": ["a", "b", "c"], "rank_1": [], "rank_2": []}), who=4),  # submitted untouched
            annotation(6, ranker({"_": ["a", "c"], "rank_1": ["b"]}), who=4),  # one ranked: nothing to compare
        ]),
        export_task(2, [
            annotation(7, ranker({"rank": ["c", "a", "b"]}), who=1),  # a bucketless Ranker: one rank per position
            annotation(8, ranker({"_": ["c"], "rank_2": ["b"], "rank_1": ["a"]}), who=2, lead_time=None),  # partial
            annotation(9, "garbage"),
            annotation(10, [{"foo": 1}]),
            annotation(11, [5]),
            annotation(12, ranker("notadict")),
            annotation(13, ranker({"rank_1": ["zz"], "rank_2": ["a"]})),
            annotation(14, ranker({"rank_1": ["a"], "rank_2": ["a", "b"]})),
            annotation(15, ranker({"best": ["a"], "rank_2": ["b"]})),
            annotation(16, ranker({"rank_1": "a"})),
            annotation(17, ranker({"rank_1": ["a"]}) * 2),
            annotation(18, [{"type": "choices", "from_name": "rank", "value": {"ranker": {}}}]),
            annotation(19, ranker({"rank": ["a"], "rank_1": ["b"]})),
            annotation(20, [{"type": "ranker", "from_name": "rank"}]),
            "not an annotation",
            {"result": ranker({"rank_1": ["a"], "rank_2": ["b"]})},  # no id
        ]),
        {"id": 3, "annotations": [annotation(21, ranker({"rank_1": ["a"], "rank_2": ["b"]}))], "data": {"prompt": "Q"}},
        {"id": 4, "annotations": [], "data": {}},
        "not a task",
        {"id": 5, "annotations": "nope"},
        {"id": "6", "annotations": []},
        {"id": 7},
    ]
    rows, stats = ranking.comparisons_from_export(json.loads(json.dumps(tasks)))

    assert pairs(rows) == [
        (1, "B", "A", 1, 2), (1, "B", "C", 1, 3), (1, "A", "C", 2, 3),
        (2, "A", "C", 1, 2), (2, "B", "C", 1, 2),
        (7, "C", "A", 1, 2), (7, "C", "B", 1, 3), (7, "A", "B", 2, 3),
        (8, "A", "B", 1, 2),
    ]
    assert rows[0] == {
        "task_key": "k1", "task_id": 1, "annotation_id": 1, "annotator": 1, "prompt": "P",
        "chosen": "B", "rejected": "A", "chosen_id": "resp-b", "rejected_id": "resp-a", "chosen_rank": 1,
        "rejected_rank": 2, "lead_time": 2.0, "created_at": "2026-01-01T00:00:01Z", "updated_at": "u1",
        "simulated": False, "origin": '{"round": 1}',
    }
    assert rows[3]["annotator"] == 2 and rows[-1]["lead_time"] is None
    not_a_task = "not a task with an id and an 'annotations' list"
    assert stats == {
        "tasks": 4, "tasks_unannotated": 1, "annotations": 23,
        "ranked": 4, "tied": 0, "unranked": 2, "skipped": 1, "empty": 1, "malformed": 15,
        "pairs": 9, "tied_pairs": 1, "malformed_tasks": 4, "annotators": 2,
        "problems": [
            {"task_id": 2, "annotation_id": 9, "reason": "result is a str, not a list"},
            {"task_id": 2, "annotation_id": 10, "reason": "result has no item from the Ranker 'rank'"},
            {"task_id": 2, "annotation_id": 11, "reason": "result holds an item that is not an object"},
            {"task_id": 2, "annotation_id": 12, "reason": "the Ranker's value has no 'ranker' object"},
            {"task_id": 2, "annotation_id": 13, "reason": "unknown candidate id 'zz'"},
            {"task_id": 2, "annotation_id": 14, "reason": "candidate 'a' is ranked twice"},
            {"task_id": 2, "annotation_id": 15, "reason": "unknown bucket 'best'"},
            {"task_id": 2, "annotation_id": 16, "reason": "bucket 'rank_1' is not a list of candidate ids"},
            {"task_id": 2, "annotation_id": 17, "reason": "result has 2 items from the Ranker 'rank'"},
            {"task_id": 2, "annotation_id": 18, "reason": "the Ranker's item has type 'choices', not 'ranker'"},
            {"task_id": 2, "annotation_id": 19, "reason": "the ranking mixes a plain 'rank' list with buckets"},
            {"task_id": 2, "annotation_id": 20, "reason": "the Ranker's value has no 'ranker' object"},
            {"task_id": 2, "annotation_id": None, "reason": "annotation is not an object with an id"},
            {"task_id": 2, "annotation_id": None, "reason": "annotation is not an object with an id"},
            {"task_id": 3, "annotation_id": 21, "reason": "task data has no 'candidates' list of {id, body} items"},
            {"task_id": None, "annotation_id": None, "reason": not_a_task},
            {"task_id": 5, "annotation_id": None, "reason": not_a_task},
            {"task_id": "6", "annotation_id": None, "reason": not_a_task},
            {"task_id": 7, "annotation_id": None, "reason": not_a_task},
        ],
        # task 1: (a,b) is strict for annotator 1 only (2 tied it); (a,c) and (b,c) agree.
        # task 2: 1 ranks c>a>b, 2 ranks a>b (c unranked): only (a,b) is judged by both, and they agree
        "agreement": {"pairs": 3, "judgments": 3, "agreeing": 3, "rate": 1.0},
    }


def test_agreement_counts_each_annotators_latest_ranking_and_skips_ties():
    tasks = [export_task(1, [
        annotation(1, ranker({"rank_1": ["a"], "rank_2": ["b"], "rank_3": ["c"]}), who=1),
        annotation(2, ranker({"rank_1": ["b"], "rank_2": ["a"], "rank_3": ["c"]}), who=2),
        annotation(3, ranker({"rank_1": ["b"], "rank_2": ["a", "c"]}), who=3),
        annotation(4, ranker({"rank_1": ["c"], "rank_2": ["b"], "rank_3": ["a"]}), who=3, updated_at="u0"),  # older
    ])]
    rows, stats = ranking.comparisons_from_export(tasks)
    assert len(rows) == 3 + 3 + 2 + 3 and stats["tied_pairs"] == 1 and stats["annotators"] == 3
    # (a,b): 1 a>b, 2 b>a, 3 b>a -> 1 of 3 annotator pairs agree; (a,c): 1, 2 a>c (3 ties) -> 1 of 1;
    # (b,c): all three b>c -> 3 of 3
    assert stats["agreement"] == {"pairs": 3, "judgments": 7, "agreeing": 5, "rate": 5 / 7}
    assert ranking.comparisons_from_export({"not": "a list"})[1]["malformed_tasks"] == 1
    assert ranking.comparisons_from_export([])[1]["agreement"] == {"pairs": 0, "judgments": 0, "agreeing": 0,
                                                                    "rate": None}


# ------------------------------------------------------------------------------------------ pure: tasks and config

def test_task_key_and_task_data():
    assert ranking.task_key("p", ["x", "y"]) == ranking.task_key("p", [{"text": "y"}, {"text": "x"}, "x"])
    assert ranking.task_key("p", ["x", "y"]) != ranking.task_key("q", ["x", "y"])
    assert ranking.task_key("p", ["x", "y"]) != ranking.task_key("p", ["x", "y", "z"])

    source = item("Name a colour.", "Red.", "Blue.", "Red.", "Green.", policy="sft-1", round=2)
    task = ranking.ranking_task(source, seed=0)
    key = ranking.task_key("Name a colour.", ["Red.", "Blue.", "Green."])
    assert task["key"] == key and task["prompt"] == "Name a colour."
    assert task["origin"] == {"policy": "sft-1", "round": 2}
    ids = [c["id"] for c in task["candidates"]]
    assert ids == [ranking._candidate_id(key, c["body"]) for c in task["candidates"]]
    assert all(i.startswith("r") and len(i) == 13 for i in ids)  # opaque: no order or origin hint
    assert [c["title"] for c in task["candidates"]] == ["A", "B", "C"]  # in the order shown
    blank = ranking.ranking_task(item("Say nothing.", "", "Something."), seed=0)["candidates"]
    assert sorted(c["title"] for c in blank) == ["A", "B (empty response)"] or \
        sorted(c["title"] for c in blank) == ["A (empty response)", "B"]
    assert {task["responses"][c["id"]]["id"] for c in task["candidates"]} == {"Nam-0", "Nam-1", "Nam-3"}
    # the shuffle depends on seed and key only: not on the order the responses came in
    again = ranking.ranking_task({**source, "responses": source["responses"][::-1]}, seed=0)
    assert again["candidates"] == task["candidates"]
    orders = {tuple(c["body"] for c in ranking.ranking_task(source, seed=s)["candidates"]) for s in range(20)}
    assert len(orders) == 6  # every order of 3 shows up over 20 seeds

    assert ranking.ranking_task(item("p", "same", "same"), seed=0) is None
    zero = ranking.ranking_task({"prompt": "p", "responses": [{"text": "x", "id": 0}, {"text": "y"}]}, seed=0)
    assert sorted(r["id"] for r in zero["responses"].values()) == ["0", ranking._candidate_id(zero["key"], "y")]
    for bad, message in [
        ("text", "must be a dict"), ({"responses": []}, "non-empty 'prompt'"), ({"prompt": "p"}, "must be a list"),
        ({"prompt": "p", "responses": ["x"]}, "a 'text' string"),
        ({"prompt": "p", "responses": [{"text": "x", "id": 1}, {"text": "y", "id": 1}]}, "repeat an id"),
        ({"prompt": "p", "responses": [{"text": "x"}, {"text": "y"}], "round": {1, 2}}, "not JSON"),
    ]:
        with pytest.raises(InstructflowError, match=message):
            ranking.import_tasks(1, [bad], ls=object())  # validated before any call to the server


def test_ranking_config_has_ordered_buckets_hidden_ids_and_instructions():
    config = ranking.RANKING_CONFIG
    assert '<List name="candidates" value="$candidates" title="Not ranked"/>' in config
    assert '<Ranker name="rank" toName="candidates">' in config
    assert [f'<Bucket name="rank_{n}"' in config for n in range(1, 6)] == [True] * 4 + [False]
    assert 'title="1 (best)"' in config and 'title="4 (worst)"' in config
    assert ".htx-ranker-item p:last-child { display: none }" in config and ranking.INSTRUCTIONS in config
    assert ranking.ranking_config(9).count("<Bucket ") == 9
    with pytest.raises(InstructflowError, match="2 to 9 rank levels"):
        ranking.ranking_config(10)


# -------------------------------------------------------------------------------------- pure: simulated labeler

def test_simulated_rank_follows_the_preference_and_noise_swaps_adjacent_tiers():
    responses = [{"id": i, "text": t} for i, t in zip("wxyz", ["ccc", "a", "bb", "dd"])]
    by_length = lambda prompt, text: -len(text)  # noqa: E731 (shorter is better)
    assert ranking.simulated_rank("p", responses, by_length) == [["x"], ["y", "z"], ["w"]]
    # noise 1 swaps every adjacent pair in one pass, best to worst: the best sinks to the bottom
    assert ranking.simulated_rank("p", responses, by_length, 1.0, random.Random(0)) == [["y", "z"], ["w"], ["x"]]
    rng, swapped = random.Random(1), 0
    for _ in range(2000):
        swapped += ranking.simulated_rank("p", responses[:2], by_length, 0.25, rng) == [["w"], ["x"]]
    assert 0.22 < swapped / 2000 < 0.28
    with pytest.raises(InstructflowError, match="noise"):
        ranking.simulated_rank("p", responses, by_length, 1.5)

    result = ranking.ranking_result([["x"], ["y", "z"], ["w"]], levels=2, simulated=True)
    assert result == [{"type": "ranker", "from_name": "rank", "to_name": "candidates",
                       "value": {"ranker": {"_": [], "rank_1": ["x"], "rank_2": ["y", "z", "w"]}},
                       "meta": {"simulated": True, "labeler": "simulated-labeler"}}]
    assert ranking.gold_preference("name a red fruit", "a red apple") > ranking.gold_preference(
        "name a red fruit", "the sky")


# ------------------------------------------------------------------------------------------- pure: the dataset

def fake_rows(annotation_id: int, n: int, updated_at: str = "t0") -> list[dict]:
    rows, _ = ranking.comparisons_from_export([export_task(annotation_id, [
        annotation(annotation_id, ranker({f"rank_{i + 1}": [c] for i, c in enumerate("abc")}), updated_at=updated_at)
    ])])
    return rows[:n]


def test_append_comparisons_versions_dedupes_and_checks_files(tmp_path):
    dataset = tmp_path / "comparisons"
    first = fake_rows(1, 3) + fake_rows(2, 2)
    assert ranking.append_comparisons(dataset, first) == dataset / "v0001.parquet"
    assert ranking.append_comparisons(dataset, first) is None
    assert ranking.append_comparisons(dataset, []) is None
    # annotation 2 again (already there), a new annotation 3, and an edit of annotation 1 (a new updated_at)
    second = fake_rows(2, 2) + fake_rows(3, 1) + fake_rows(1, 3, updated_at="t1")
    assert ranking.append_comparisons(dataset, second) == dataset / "v0002.parquet"

    manifest = ranking.read_manifest(dataset)
    assert [(v["version"], v["file"], v["rows"], v["annotations"]) for v in manifest["versions"]] == [
        (1, "v0001.parquet", 5, 2), (2, "v0002.parquet", 4, 2)]
    for version in manifest["versions"]:
        assert version["sha256"] == hashlib.sha256((dataset / version["file"]).read_bytes()).hexdigest()
    assert sorted(p.name for p in dataset.iterdir()) == [".lock", "manifest.json", "v0001.parquet", "v0002.parquet"]

    everything = ranking.read_comparisons(dataset)
    assert sorted(zip(everything["annotation_id"], everything["updated_at"])) == (
        [(1, "t1")] * 3 + [(2, "t0")] * 2 + [(3, "t0")])  # annotation 1 at its latest edit only
    assert list(everything.columns) == ranking.ROW_SCHEMA.names
    assert everything.to_dict("records")[-1] == {**fake_rows(1, 3, "t1")[-1], "annotator": 1}
    assert len(ranking.read_comparisons(dataset, version=1)) == 5
    with pytest.raises(InstructflowError, match="no comparisons version 3"):
        ranking.read_comparisons(dataset, version=3)

    with pytest.raises(InstructflowError, match="lacks"):
        ranking.append_comparisons(dataset, [{"annotation_id": 9}])
    (dataset / "v0001.parquet").write_bytes(b"changed")
    with pytest.raises(InstructflowError, match="does not match the sha256"):
        ranking.append_comparisons(dataset, fake_rows(4, 1))


def test_a_failed_manifest_write_leaves_the_dataset_as_it_was(tmp_path, monkeypatch):
    dataset = tmp_path / "comparisons"
    ranking.append_comparisons(dataset, fake_rows(1, 2))
    before = (dataset / "manifest.json").read_bytes()
    real = ranking.atomic_write

    def crash_on_manifest(path, data):
        if path.name == "manifest.json":
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(ranking, "atomic_write", crash_on_manifest)
    with pytest.raises(OSError):
        ranking.append_comparisons(dataset, fake_rows(2, 2))
    assert (dataset / "manifest.json").read_bytes() == before and len(ranking.read_comparisons(dataset)) == 2
    monkeypatch.setattr(ranking, "atomic_write", real)
    assert ranking.append_comparisons(dataset, fake_rows(2, 2)) == dataset / "v0002.parquet"  # the orphan replaced
    assert len(ranking.read_comparisons(dataset)) == 4


# ------------------------------------------------------------------------------------------ a real Label Studio

def test_the_config_is_accepted_by_label_studio(server):
    ls = admin(server)
    for levels in (2, 4, 9):
        project = labelstudio.find_or_create_project(f"ranking config {levels}", ranking.ranking_config(levels), ls=ls)
        assert ranking.project_levels(project, ls) == levels
        assert ranking.import_tasks(project, [item("Say hi.", "Hi!", "Hello.")], ls=ls)["imported"] == 1
    with pytest.raises(ApiError) as refused:  # the server does check configs: a Ranker pointing nowhere is refused
        ls.projects.create(title="broken ranking config", label_config=ranking.RANKING_CONFIG.replace(
            'toName="candidates"', 'toName="nowhere"'))
    assert refused.value.status_code == 400


ITEMS = [
    item("Name a primary colour.", "Red.", "Blue is one.", "Banana.", "I like turtles.", policy="sft-1", round=1),
    item("Say hi.", "Hi!", "Hello there.", "Bye.", policy="sft-1", round=1),
    item("Count to three.", "1 2 3", "one two three", "3 2 1", policy="sft-1", round=1),
    item("Repeat: ok", "ok", "ok", policy="sft-1", round=1),
]
LATER = item("What is 2+2?", "4", "5", "22", policy="sft-1", round=1)


def test_rankings_round_trip_through_label_studio(server, tmp_path, monkeypatch):
    monkeypatch.setattr(ranking, "_PAGE", 2)  # list and import in pages of 2: the paging is exercised
    ls = admin(server)
    project = labelstudio.find_or_create_project("rank round trip", ranking.RANKING_CONFIG, ls=ls)
    imported = ranking.import_tasks(project, ITEMS, seed=7, ls=ls)
    assert {k: v for k, v in imported.items() if k != "task_ids"} == {
        "imported": 3, "already_present": 0, "unrankable": 1}
    t1, t2, t3 = imported["task_ids"]
    # again, with the responses in another order and a repeated text: the same tasks, nothing new
    shuffled = [{**i, "responses": i["responses"][::-1] + i["responses"][:1]} for i in ITEMS]
    again = ranking.import_tasks(project, shuffled, seed=7, ls=ls)
    assert (again["imported"], again["already_present"], again["unrankable"]) == (0, 3, 1)

    tasks = {t.id: t.data for t in ls.tasks.list(project=project)}
    assert sorted(tasks) == [t1, t2, t3]
    assert [tasks[t]["key"] for t in (t1, t2, t3)] == [ranking.task_key(i["prompt"], i["responses"])
                                                       for i in ITEMS[:3]]
    assert tasks[t1]["candidates"] == ranking.ranking_task(ITEMS[0], seed=7)["candidates"]
    assert [c["body"] for c in tasks[t1]["candidates"]] != ["Red.", "Blue is one.", "Banana.", "I like turtles."]
    ids = {t: {c["body"]: c["id"] for c in tasks[t]["candidates"]} for t in tasks}

    labeler = labelstudio.create_user("labeler2@instructflow.local", first_name="Second", ls=ls)
    me = ls.users.whoami().id
    post = {}

    def annotate(name, task, buckets=None, who=me, **fields):
        result = fields.pop("result", None)
        if result is None:
            result = ranker({b: [ids[task][text] for text in texts] for b, texts in buckets.items()})
        post[name] = ls.annotations.create(id=task, result=result, completed_by=who, **fields)

    annotate("full", t1, {"_": [], "rank_1": ["Red."], "rank_2": ["Blue is one."], "rank_3": ["Banana."],
                          "rank_4": ["I like turtles."]}, lead_time=12.5)
    annotate("second", t1, {"_": [], "rank_1": ["Blue is one."], "rank_2": ["Red."],
                            "rank_3": ["Banana.", "I like turtles."], "rank_4": []}, who=labeler)
    annotate("tie", t2, {"_": ["Bye."], "rank_1": ["Hi!", "Hello there."]})
    annotate("untouched", t2, {"_": ["Hello there.", "Bye.", "Hi!"], "rank_1": [], "rank_2": [], "rank_3": [],
                               "rank_4": []}, who=labeler)
    annotate("skip", t3, result=[], was_cancelled=True)
    annotate("empty", t3, result=[], who=labeler)

    server.stop()  # nothing is lost over a restart on the same data dir
    server.start()
    ls = admin(server)
    later = ranking.import_tasks(project, [*ITEMS, LATER], seed=7, ls=ls)
    assert (later["imported"], later["already_present"], later["unrankable"]) == (1, 3, 1)
    (t4,) = later["task_ids"]
    ids[t4] = {c["body"]: c["id"] for c in ls.tasks.get(t4).data["candidates"]}
    annotate("unknown id", t4, result=ranker({"rank_1": ["r000000000000"], "rank_2": [ids[t4]["4"]]}))
    annotate("garbage", t4, result=[{"foo": 1}], who=labeler)

    export = ranking.export_rankings(project, ls=ls)
    assert sorted(t["id"] for t in export) == [t1, t2, t3, t4]
    assert sorted(a["id"] for t in export for a in t["annotations"]) == sorted(a.id for a in post.values())
    rows, stats = ranking.comparisons_from_export(export)

    def expected(name, task, chosen, rejected, chosen_rank, rejected_rank, who=me, lead_time=None):
        source = (ITEMS + [LATER])[[t1, t2, t3, None, t4].index(task)]
        response_id = {r["text"]: r["id"] for r in source["responses"]}
        made = post[name]
        return {"task_key": ranking.task_key(source["prompt"], source["responses"]), "task_id": task,
                "annotation_id": made.id, "annotator": who, "prompt": source["prompt"], "chosen": chosen,
                "rejected": rejected, "chosen_id": response_id[chosen], "rejected_id": response_id[rejected],
                "chosen_rank": chosen_rank, "rejected_rank": rejected_rank, "lead_time": lead_time,
                "created_at": made.created_at.isoformat().replace("+00:00", "Z"),
                "updated_at": made.updated_at.isoformat().replace("+00:00", "Z"),
                "simulated": False, "origin": '{"policy": "sft-1", "round": 1}'}

    full = [("Red.", "Blue is one.", 1, 2), ("Red.", "Banana.", 1, 3), ("Red.", "I like turtles.", 1, 4),
            ("Blue is one.", "Banana.", 2, 3), ("Blue is one.", "I like turtles.", 2, 4),
            ("Banana.", "I like turtles.", 3, 4)]
    # within a bucket the task's (shuffled) candidate order decides which of the tied ones comes first
    order = [c["body"] for c in tasks[t1]["candidates"]]
    tied = sorted(["Banana.", "I like turtles."], key=order.index)
    second = [("Blue is one.", "Red.", 1, 2), ("Blue is one.", tied[0], 1, 3), ("Blue is one.", tied[1], 1, 3),
              ("Red.", tied[0], 2, 3), ("Red.", tied[1], 2, 3)]
    assert rows == ([expected("full", t1, *pair, lead_time=12.5) for pair in full]
                    + [expected("second", t1, *pair, who=labeler) for pair in second])
    assert stats == {
        "tasks": 4, "tasks_unannotated": 0, "annotations": 8,
        "ranked": 2, "tied": 1, "unranked": 1, "skipped": 1, "empty": 1, "malformed": 2,
        "pairs": 11, "tied_pairs": 2, "malformed_tasks": 0, "annotators": 2,
        "problems": [
            {"task_id": t4, "annotation_id": post["unknown id"].id, "reason": "unknown candidate id 'r000000000000'"},
            {"task_id": t4, "annotation_id": post["garbage"].id, "reason": "result has no item from the Ranker 'rank'"},
        ],
        # both ranked task 1: they disagree on Red. vs Blue is one. only; the second tied Banana. with turtles
        "agreement": {"pairs": 5, "judgments": 5, "agreeing": 4, "rate": 0.8},
    }

    # the dataset: a second collection appends only what changed
    dataset = tmp_path / "comparisons"
    assert ranking.append_comparisons(dataset, rows) == dataset / "v0001.parquet"
    assert ranking.append_comparisons(dataset, ranking.comparisons_from_export(ranking.export_rankings(project, ls))[0]
                                      ) is None
    ls.annotations.update(post["untouched"].id, result=ranker(
        {"_": [], "rank_1": [ids[t2]["Hello there."]], "rank_2": [ids[t2]["Hi!"]], "rank_3": [ids[t2]["Bye."]]}))
    ls.annotations.update(post["full"].id, result=ranker(
        {"rank_1": [ids[t1]["I like turtles."]], "rank_2": [ids[t1]["Red."]]}))  # an edit: a new updated_at
    rows, stats = ranking.comparisons_from_export(ranking.export_rankings(project, ls))
    assert (stats["ranked"], stats["unranked"], stats["pairs"]) == (3, 0, 3 + 1 + 5)
    assert ranking.append_comparisons(dataset, rows) == dataset / "v0002.parquet"
    assert [v["rows"] for v in ranking.read_manifest(dataset)["versions"]] == [11, 4]
    collected = ranking.read_comparisons(dataset)
    assert len(collected) == 9 and len(ranking.read_comparisons(dataset, version=1)) == 11
    assert sorted(collected["annotation_id"].tolist()) == sorted(
        [post["full"].id] + [post["second"].id] * 5 + [post["untouched"].id] * 3)


def test_the_simulated_labeler_ranks_by_its_preference(server):
    ls = admin(server)
    project = labelstudio.find_or_create_project("simulated ranking", ranking.ranking_config(4), ls=ls)
    items = [item(f"Prompt {n}.", *texts) for n, texts in enumerate([
        ["a", "bbb", "cc", "dddd"], ["xx", "y", "zzzz", "www"], ["1", "22", "333", "4444"],
        ["tie", "too", "longer", "x"],  # "tie" and "too" score the same: a tie
    ])]
    ranking.import_tasks(project, items, ls=ls)
    by_length = lambda prompt, text: -len(text)  # noqa: E731 (the hidden preference: shorter is better)

    assert ranking.run_simulated_labeler(project, by_length, ls=ls, limit=3) == {"annotated": 3, "already_done": 0}
    assert ranking.run_simulated_labeler(project, by_length, ls=ls) == {"annotated": 1, "already_done": 3}
    assert ranking.run_simulated_labeler(project, by_length, ls=ls) == {"annotated": 0, "already_done": 4}

    user = next(u for u in ls.users.list() if u.email == ranking.SIMULATED_LABELER_EMAIL)
    assert user.first_name == "simulated-labeler"
    rows, stats = ranking.comparisons_from_export(ranking.export_rankings(project, ls))
    assert (stats["ranked"], stats["annotations"], stats["malformed"], stats["tied_pairs"]) == (4, 4, 0, 1)
    assert {r["annotator"] for r in rows} == {user.id} and all(r["simulated"] for r in rows)
    for source in items:
        texts = [r["text"] for r in source["responses"]]
        want = {(a, b) for a, b in itertools.permutations(texts, 2) if by_length("", a) > by_length("", b)}
        assert {(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == source["prompt"]} == want

    # with noise, the same seed gives the same rankings; a labeler with another seed disagrees somewhere
    noisy = labelstudio.create_user("noisy@instructflow.local", ls=ls)
    assert ranking.run_simulated_labeler(project, by_length, ls=ls, user_id=noisy, noise=0.5, seed=3)["annotated"] == 4
    rows, stats = ranking.comparisons_from_export(ranking.export_rankings(project, ls))
    assert stats["annotators"] == 2 and stats["agreement"]["pairs"] == 6 * 4 - 1
    assert 0 < stats["agreement"]["rate"] < 1


def test_the_simulated_labeler_ranks_a_round_on_import_exactly_as_one_by_one(server):
    ls = admin(server)
    by_length = lambda prompt, text: -len(text)  # noqa: E731
    items = [item(f"Import prompt {n}.", *texts) for n, texts in enumerate([
        ["a", "bbb", "cc", "dddd"], ["xx", "y", "zzzz", "www"], ["1", "22", "333", "4444"]])]
    one_by_one = labelstudio.find_or_create_project("ranked one by one", ranking.ranking_config(4), ls=ls)
    ranking.import_tasks(one_by_one, items, seed=5, ls=ls)
    ranking.run_simulated_labeler(one_by_one, by_length, ls=ls, noise=0.5, seed=5)
    on_import = labelstudio.find_or_create_project("ranked on import", ranking.ranking_config(4), ls=ls)
    annotate = ranking.simulated_importer(by_length, noise=0.5, seed=5, levels=4, ls=ls)
    assert ranking.import_tasks(on_import, items, seed=5, ls=ls, annotate=annotate)["imported"] == 3
    # nothing is left for the labeler, and the comparisons are the same, marked simulated, by the same user
    assert ranking.run_simulated_labeler(on_import, by_length, ls=ls, noise=0.5, seed=5)["annotated"] == 0

    def pairs(project):
        rows, stats = ranking.comparisons_from_export(ranking.export_rankings(project, ls))
        assert stats["malformed"] == 0 and all(r["simulated"] for r in rows)
        return {(r["prompt"], r["chosen"], r["rejected"], r["annotator"]) for r in rows}

    assert pairs(on_import) == pairs(one_by_one) and len(pairs(on_import)) > 6
