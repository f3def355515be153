"""The worker scaffold of tasks/ray_train.py without a Ray cluster: Ray Train's calls are replaced by recorders."""

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tasks import ray_train
from tasks.runtime import Runtime


class Recorder:
    """Stands in for Ray Train's checkpoint calls and for a MetricBuffer, writing down what happens in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def flush(self) -> None:
        self.events.append(("flush",))

    def from_directory(self, path: str) -> str:
        self.events.append(("checkpoint", sorted(p.name for p in Path(path).iterdir())))
        return path

    def report(self, metrics: dict, checkpoint=None) -> None:
        self.events.append(("report", metrics, checkpoint is not None))


@pytest.fixture
def ray_calls(monkeypatch):
    import ray.train

    recorder = Recorder()
    monkeypatch.setattr(ray.train, "report", recorder.report)
    monkeypatch.setattr(ray.train.Checkpoint, "from_directory", staticmethod(recorder.from_directory))
    return recorder


def worker_at(monkeypatch, rank: int, **job) -> ray_train.TrainWorker:
    monkeypatch.setattr(ray_train, "worker_runtime", lambda job: (rank, 2, Runtime(torch.device("cpu"), torch.float32)))
    return ray_train.TrainWorker({"run_id": None, "checkpoint_every": 3, **job})


def save_weights(directory: Path) -> None:
    directory.mkdir()
    (directory / "model.pt").write_bytes(b"weights")


def test_reports_every_n_steps_and_at_the_last_flushing_metrics_first(monkeypatch, ray_calls):
    worker = worker_at(monkeypatch, rank=0)
    worker.metrics = ray_calls  # as track() would set it
    for step in range(1, 8):
        worker.on_step_end(step, 7, {"step": step}, save_weights)
    expected = []
    for step in (3, 6, 7):
        expected += [("flush",), ("checkpoint", ["model.pt"]), ("report", {"step": step}, True)]
    assert ray_calls.events == expected


def test_other_ranks_report_without_saving(monkeypatch, ray_calls):
    worker = worker_at(monkeypatch, rank=1)
    worker.on_step_end(3, 7, {"step": 3}, lambda directory: pytest.fail("only rank 0 saves"))
    assert ray_calls.events == [("report", {"step": 3}, False)]


def test_resume_restores_the_latest_checkpoint_or_returns_none(monkeypatch, tmp_path):
    import ray.train

    worker = worker_at(monkeypatch, rank=0)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert worker.resume(lambda directory: pytest.fail("nothing to restore")) is None

    class Saved:
        @contextmanager
        def as_directory(self):
            yield str(tmp_path)

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: Saved())
    assert worker.resume(lambda directory: directory) == tmp_path


def test_an_untracked_run_logs_nowhere(monkeypatch):
    from tasks.tracking import NullMetricBuffer

    worker = worker_at(monkeypatch, rank=0)
    assert isinstance(worker.track("sft/", "sft", 10, initial=4), NullMetricBuffer)
