"""A labeler ranks responses in a real headless Chromium against a real Label Studio; the ranking becomes comparisons.

Debian's Chromium (/usr/bin/chromium, installed by infra/browser/install.sh, which `make test` runs) is driven through
Playwright; Playwright's own browser download is never used. A missing browser fails the test, it is never skipped.

The candidates are moved into the rank buckets with the keyboard, as react-beautiful-dnd (the Ranker's drag and drop)
offers it: focus the item, Space lifts it, each ArrowRight moves it to the next column, Space drops it. Every step waits
for the drag-and-drop's own screen-reader announcement, so nothing depends on fixed sleeps.
"""

from __future__ import annotations

import json
import re
import shutil

import pyarrow.parquet as pq
from label_studio_sdk import LabelStudio

from browser import chromium  # noqa: F401 (a fixture)
from labelstudio_server import labelstudio_server, labelstudio_template  # noqa: F401 (fixtures)
from tasks import labelstudio, ranking
from tasks.settings import CHECKOUT

SCREENSHOT = CHECKOUT / ".instructflow-test" / "screenshots" / "ranking-ui.png"  # untracked; kept after the run
TIMEOUT_MS = 60_000  # per wait: Label Studio's front end is heavy on two shared cores

EMAIL, PASSWORD = "browser-labeler@instructflow.local", "a-labeler-password-7"
PROMPT = "Name a primary colour."
ITEM = {"prompt": PROMPT, "policy": "sft-1", "round": 1,
        "responses": [{"text": text, "id": f"colour-{i}"}
                      for i, text in enumerate(["Red.", "Blue is one.", "Banana.", "I like turtles."])]}
RESPONSE_ID = {r["text"]: r["id"] for r in ITEM["responses"]}
COLUMNS = [ranking.UNSORTED, "rank_1", "rank_2", "rank_3", "rank_4"]  # left to right, as RANKING_CONFIG lays them out
PLAN = {"Red.": "rank_1", "Blue is one.": "rank_2", "Banana.": "rank_4", "I like turtles.": "rank_4"}  # a tie last


def announcement(page) -> str:
    """What the drag and drop last announced to screen readers, whitespace collapsed."""
    return page.evaluate(
        "() => [...document.querySelectorAll('[id^=rbd-announcement]')].map(e => e.textContent).join(' ')"
        ".replace(/\\s+/g, ' ').trim()")


def wait_for_announcement(page, pattern: str, step: str, errors: list[str]) -> None:
    try:
        page.wait_for_function(
            """pattern => new RegExp(pattern).test([...document.querySelectorAll('[id^=rbd-announcement]')]
                   .map(e => e.textContent).join(' ').replace(/\\s+/g, ' '))""",
            arg=pattern, timeout=TIMEOUT_MS)
    except Exception as error:  # playwright's TimeoutError: say what the page said instead
        raise AssertionError(f"{step}: the drag and drop never announced /{pattern}/; it last said "
                             f"{announcement(page)!r}; page errors: {errors}") from error


def buckets_shown(page) -> dict[str, set[str]]:
    """Column id -> the response texts the page shows in it."""
    shown = page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll('.lsf-main-view [data-rbd-droppable-id]')].map(column => [
            column.dataset.rbdDroppableId,
            [...column.querySelectorAll('[data-ranker-id]')].map(item => item.querySelector('p').textContent)]))""")
    return {column: set(texts) for column, texts in shown.items()}


def move_with_keyboard(page, candidate_id: str, text: str, bucket: str, errors: list[str]) -> None:
    """Moves one item from the unsorted column to `bucket`: focus, Space, ArrowRight per column, Space."""
    item = page.locator(f'.lsf-main-view [data-ranker-id="{candidate_id}"]')
    item.focus()
    page.keyboard.press("Space")
    wait_for_announcement(page, "You have lifted an item", f"lifting {text!r}", errors)
    for column in COLUMNS[1:COLUMNS.index(bucket) + 1]:
        page.keyboard.press("ArrowRight")
        wait_for_announcement(page, f"^(?!.*dropped).*to list {column} in position", f"moving {text!r} to {column}",
                              errors)
    page.keyboard.press("Space")
    wait_for_announcement(page, f"You have dropped the item.*to list {bucket} in position", f"dropping {text!r}",
                          errors)
    page.locator(f'.lsf-main-view [data-rbd-droppable-id="{bucket}"] [data-ranker-id="{candidate_id}"]').wait_for(
        state="visible", timeout=TIMEOUT_MS)


def test_a_labeler_ranks_in_the_browser_and_the_export_gives_the_comparisons(
        chromium, labelstudio_server, tmp_path, monkeypatch):  # noqa: F811 (a fixture); a missing browser fails first
    server = labelstudio_server
    # create_user(password=...) sets the password through labelstudio.sh on the local server: this one
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INSTRUCTFLOW_STATE_DIR", str(server.state))
    monkeypatch.setenv("LABEL_STUDIO_PORT", str(server.port))
    ls = LabelStudio(base_url=server.url, api_key=server.credentials["token"])

    project = labelstudio.find_or_create_project("ranking in a browser", ranking.RANKING_CONFIG, ls=ls)
    imported = ranking.import_tasks(project, [ITEM], seed=3, ls=ls)
    assert imported["imported"] == 1
    (task,) = imported["task_ids"]
    candidates = ls.tasks.get(task).data["candidates"]
    candidate_id = {c["body"]: c["id"] for c in candidates}
    assert sorted(candidate_id) == sorted(PLAN)
    labeler = labelstudio.create_user(EMAIL, password=PASSWORD, first_name="Browser", ls=ls)

    page = chromium.new_context(viewport={"width": 1600, "height": 1000}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # log in through the form, as the labeler
    page.goto(f"{server.url}/user/login/")
    page.fill("input[name=email]", EMAIL)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)
    assert page.request.get(f"{server.url}/api/current-user/whoami").json()["id"] == labeler

    # open the task and wait until the labeling view has settled (acting earlier can crash its drag and drop)
    page.goto(f"{server.url}/projects/{project}/data?task={task}")
    for body, cid in candidate_id.items():
        page.locator(f'.lsf-main-view [data-rbd-droppable-id="_"] [data-ranker-id="{cid}"]').wait_for(state="visible")
    page.locator('[data-testid="bottombar-submit-button"]').wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    assert buckets_shown(page) == {"_": set(PLAN), "rank_1": set(), "rank_2": set(), "rank_3": set(),
                                   "rank_4": set()}, errors

    for text, bucket in PLAN.items():
        move_with_keyboard(page, candidate_id[text], text, bucket, errors)
    expected_buckets = {column: {t for t, b in PLAN.items() if b == column} for column in COLUMNS}
    assert buckets_shown(page) == expected_buckets, errors

    # the items carry the candidate ids, but the labeling view shows none of them (the config's style hides them).
    # Only the labeling view: the data manager's task table beside it lists the task data, ids included.
    shown_text = page.locator(".lsf-main-view").inner_text()
    for text, cid in candidate_id.items():
        assert text in shown_text
        assert page.locator(f'.lsf-main-view [data-ranker-id="{cid}"]').count() == 1
        assert cid not in shown_text, f"candidate id {cid} is visible in the labeling view"

    screenshot = tmp_path / "screenshots" / "ranking-ui.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT)

    with page.expect_response(lambda r: r.request.method == "POST"
                              and re.search(rf"/api/tasks/{task}/annotations\b", r.url) is not None) as posted:
        page.locator('[data-testid="bottombar-submit-button"]').click()
    assert posted.value.status == 201, (posted.value.status, posted.value.text(), errors)
    submitted = posted.value.json()
    assert submitted["completed_by"] == labeler and not submitted["was_cancelled"]

    # the export: exactly the labeler's annotation, and exactly the comparisons of the order made above
    export = ranking.export_rankings(project, ls=ls)
    (exported_task,) = export
    (annotation,) = exported_task["annotations"]
    assert annotation["id"] == submitted["id"] and annotation["completed_by"] == labeler
    (result,) = annotation["result"]
    assert (result["type"], result["from_name"], result["to_name"]) == ("ranker", ranking.RANKER, ranking.LIST)
    assert {column: set(ids) for column, ids in result["value"]["ranker"].items()} == {
        column: {candidate_id[t] for t in texts} for column, texts in expected_buckets.items()}
    assert isinstance(annotation["lead_time"], (int, float)) and annotation["lead_time"] > 0

    rows, stats = ranking.comparisons_from_export(export)
    order = [c["body"] for c in candidates]  # the task's (shuffled) candidate order orders the tied ones
    tied = sorted(["Banana.", "I like turtles."], key=order.index)
    pairs = [("Red.", "Blue is one.", 1, 2), ("Red.", tied[0], 1, 4), ("Red.", tied[1], 1, 4),
             ("Blue is one.", tied[0], 2, 4), ("Blue is one.", tied[1], 2, 4)]
    assert rows == [{
        "task_key": ranking.task_key(PROMPT, ITEM["responses"]), "task_id": task, "annotation_id": submitted["id"],
        "annotator": labeler, "prompt": PROMPT, "chosen": chosen, "rejected": rejected,
        "chosen_id": RESPONSE_ID[chosen], "rejected_id": RESPONSE_ID[rejected],
        "chosen_rank": chosen_rank, "rejected_rank": rejected_rank, "lead_time": float(annotation["lead_time"]),
        "created_at": submitted["created_at"], "updated_at": submitted["updated_at"], "simulated": False,
        "origin": json.dumps({"policy": "sft-1", "round": 1}),
    } for chosen, rejected, chosen_rank, rejected_rank in pairs]
    assert {k: stats[k] for k in ("tasks", "annotations", "ranked", "pairs", "tied_pairs", "malformed",
                                  "annotators")} == {
        "tasks": 1, "annotations": 1, "ranked": 1, "pairs": 5, "tied_pairs": 1, "malformed": 0, "annotators": 1}

    dataset = tmp_path / "comparisons"
    written = ranking.append_comparisons(dataset, rows)
    assert written == dataset / "v0001.parquet"
    assert pq.read_table(written).to_pylist() == rows
    assert ranking.read_comparisons(dataset).to_dict("records") == rows
    assert ranking.append_comparisons(dataset, rows) is None  # nothing new the second time
