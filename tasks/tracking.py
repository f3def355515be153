"""MLflow bookkeeping: one experiment, one run per stage nested under the pipeline's, stage cache lookups, metrics.

Everything goes through `MlflowClient` with explicit run ids (no fluent "active run"), so Prefect task
threads and Ray workers can log safely. Params hold configs only: tokens and passwords never reach MLflow.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model.errors import InstructflowError
from tasks.console import library_chatter
from tasks.settings import CHECKOUT, mlflow_artifact_root, mlflow_tracking_uri

EXPERIMENT = "instructflow"
STAGE_TAG, KEY_TAG, OUTPUT_TAG = "instructflow.stage", "instructflow.key", "instructflow.output_uri"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting runs


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_tracking_uri())


OUTAGE = "stopped answering"  # in every outage message, so one raised inside a Ray worker is recognised outside it


def unreachable(error: BaseException) -> bool:
    """Whether `error` (or what caused it, or a Ray worker's error quoted in it) is the MLflow server not answering.

    MLflow's REST client retries a refused or timed-out request a few times, then raises an MlflowException
    quoting the connection error; a stage on Ray sees it quoted inside the trainer's error.
    """
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if OUTAGE in text or ("API request to" in text and ("Max retries exceeded" in text or "Connection" in text)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def outage_error(stage: str) -> InstructflowError:
    return InstructflowError(
        f"the MLflow server at {mlflow_tracking_uri()} {OUTAGE} during the {stage} stage; start it again "
        f"(`make up`) and re-run: finished stages are reused and {stage} continues its MLflow run from its last "
        "checkpoint"
    )


def experiment_id() -> str:
    """The project's experiment, created on first use (artifacts in the state dir for the embedded store)."""
    tracking = client()
    try:
        experiment = tracking.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        local = mlflow_tracking_uri().startswith("sqlite:")
        return tracking.create_experiment(EXPERIMENT, artifact_location=mlflow_artifact_root() if local else None)
    except MlflowException as e:
        raise InstructflowError(
            f"cannot reach MLflow at {mlflow_tracking_uri()} ({e.message.splitlines()[0]}); start it (`make up`) "
            f"or unset MLFLOW_TRACKING_URI to use the embedded store"
        ) from None


@dataclass(frozen=True)
class StageRun:
    run_id: str
    finished: bool  # a FINISHED run whose output can be reused
    output_uri: str | None


def find_stage_run(stage: str, key: str) -> StageRun | None:
    """The newest run of `stage` for this input+config key, if any."""
    runs = client().search_runs(
        [experiment_id()],
        filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return StageRun(run.info.run_id, run.info.status == "FINISHED", run.data.tags.get(OUTPUT_TAG))


def create_stage_run(stage: str, key: str, params: Mapping[str, object], parent_run_id: str | None) -> str:
    """A new MLflow run for a stage and input+config key, nested under the pipeline run when there is one."""
    tags = {STAGE_TAG: stage, KEY_TAG: key}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return _create_run(stage, tags, params)


def run_url(run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's, or `mlflow ui`'s default address for a local store."""
    uri = mlflow_tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id()}/runs/{run_id}"


def reopen_stage_run(run_id: str) -> str:
    """Mark an unfinished stage run RUNNING again: a re-run continues it, so its curves continue."""
    client().update_run(run_id, status="RUNNING")
    return run_id


def start_pipeline_run(name: str, params: Mapping[str, object]) -> str:
    """A new parent run for one run of a pipeline flow (never reused: each run of the flow is its own)."""
    return _create_run(name, {"instructflow.flow": name}, params)


@functools.cache
def git_commit() -> str:
    """The checkout's commit (with "+ local changes" when tracked files differ), or "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" + local changes" if dirty else "")


def source_tags() -> dict[str, str]:
    """MLflow's own source tags: the UI shows the commit and the entry point of every run."""
    commit = git_commit()
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": Path(sys.argv[0]).name or "python"}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.split()[0]
        tags["instructflow.source.dirty"] = str(commit.endswith("local changes")).lower()
    return tags


def _create_run(name: str, tags: Mapping[str, str], params: Mapping[str, object]) -> str:
    tracking = client()
    run = tracking.create_run(experiment_id(), run_name=name, tags={**source_tags(), **tags})
    tracking.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(params).items()])
    return run.info.run_id


def finish_stage_run(run_id: str, output_uri: str, tags: Mapping[str, str] | None = None) -> None:
    tracking = client()
    for name, value in {OUTPUT_TAG: output_uri, **(tags or {})}.items():
        tracking.set_tag(run_id, name, value)
    tracking.set_terminated(run_id, "FINISHED")


def fail_stage_run(run_id: str) -> None:
    client().set_terminated(run_id, "FAILED")


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int, prefix: str = "") -> None:
    now = int(time.time() * 1000)
    batch = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()]
    client().log_batch(run_id, metrics=batch)


def log_dataset(run_id: str, parquet: Path, name: str, digest: str) -> None:
    """Record a parquet dataset as an input of the run (MLflow's dataset tracking: schema, digest, source)."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.read_parquet(parquet).drop(columns=["text"], errors="ignore")  # per-document stats, not the text
    dataset = mlflow.data.from_pandas(frame, source=str(parquet), name=name, digest=digest[:16])
    context = InputTag(key="mlflow.data.context", value="training")
    client().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])])


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def flatten(values: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": 4}, for MLflow params."""
    flat: dict[str, object] = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


class MetricBuffer:
    """Training metrics of one run, sent to MLflow in batches; steps it already has are never sent again.

    A run that crashes resumes from its last checkpoint and recomputes the steps after it. Whatever MLflow
    recorded for those steps before the crash stays; the recomputed ones are dropped, so the curve simply
    continues with no step logged twice (`watch` names the metric whose last step marks the resume point).
    """

    def __init__(self, run_id: str, prefix: str, watch: str = "loss", progress=None) -> None:
        self.run_id, self.prefix = run_id, prefix
        self.progress = progress  # a tasks.console.Progress shown on the console as steps come
        history = client().get_metric_history(run_id, f"{prefix}{watch}")
        self.logged_through = max((m.step for m in history), default=-1)  # -1: step 0 (a baseline) is new too
        self.pending: list[tuple[dict, int]] = []

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        if self.progress is not None:
            self.progress.update(step, metrics)
        if step > self.logged_through:
            self.pending.append((dict(metrics), step))

    def mark_resume(self, step: int) -> None:
        """Record that training resumed from a checkpoint at `step` (metric `<prefix>resumed_from`)."""
        log_metrics(self.run_id, {f"{self.prefix}resumed_from": step}, step=step)

    def flush(self) -> None:
        """Send what is pending. Workers flush BEFORE reporting a checkpoint: if MLflow is down, the job fails
        without that checkpoint, so a resumed run recomputes (and logs) these steps instead of losing them."""
        now = int(time.time() * 1000)
        batch = [Metric(f"{self.prefix}{k}", float(v), now, step) for metrics, step in self.pending
                 for k, v in metrics.items()]
        try:
            for start in range(0, len(batch), 1000):  # MLflow accepts at most 1000 metrics per batch
                client().log_batch(self.run_id, metrics=batch[start:start + 1000])
        except MlflowException as error:
            if unreachable(error):
                raise InstructflowError(f"the MLflow server at {mlflow_tracking_uri()} {OUTAGE} while a training "
                                        "job logged its metrics") from None
            raise
        if self.pending:
            self.logged_through = self.pending[-1][1]
        self.pending.clear()


class NullMetricBuffer:
    """What ranks other than 0 get: the same calls, no side effects."""

    def mark_resume(self, step: int) -> None:
        pass

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass


def register_model(run_id: str, name: str, python_model: str, artifacts: Mapping[str, Path], input_example,
                   aliases: tuple[str, ...] = ()) -> str:
    """Log a pyfunc model (a "models from code" file in tasks/) with its artifacts in `run_id`, register it as
    `name`; returns the version. Every call adds a version; `models:/NAME/latest` is always the newest (MLflow
    reserves the alias "latest" for that), other aliases are set here.

    A run registers a model name once: a stage re-run after a failure past this point (MLflow went away before the
    run was marked finished, say) gets the version it already registered rather than a duplicate."""
    import mlflow

    earlier = client().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if earlier:
        version = str(min(int(v.version) for v in earlier))
        for alias in aliases:
            client().set_registered_model_alias(name, alias, version)
        return version
    with mlflow.start_run(run_id=run_id), library_chatter():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name(python_model)),
            artifacts={k: str(v) for k, v in artifacts.items()},
            code_paths=[str(CHECKOUT / "model")],
            pip_requirements=[f"torch=={_version('torch')}", f"tokenizers=={_version('tokenizers')}", "pandas"],
            input_example=input_example,  # also declares the params
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    for alias in aliases:
        client().set_registered_model_alias(name, alias, version)
    return version


def register_text_model(run_id: str, name: str, checkpoint_dir: Path, tokenizer_path: Path,
                        aliases: tuple[str, ...] = ()) -> str:
    """A checkpoint as a pyfunc text generator (tasks/text_model.py: prompts in, completions out)."""
    with library_chatter():  # defining a PythonModel makes MLflow warn about its predict's type hints
        from tasks.text_model import DEFAULT_PARAMS

    return register_model(run_id, name, "text_model.py", {"checkpoint": checkpoint_dir, "tokenizer": tokenizer_path},
                          (["Once upon a time"], DEFAULT_PARAMS), aliases)


def register_chat_model(run_id: str, name: str, checkpoint_dir: Path, tokenizer_path: Path,
                        aliases: tuple[str, ...] = ()) -> str:
    """A chat policy as a pyfunc (tasks/chat_model.py: user messages in, assistant replies out)."""
    with library_chatter():  # defining a PythonModel makes MLflow warn about its predict's type hints
        from tasks.chat_model import DEFAULT_PARAMS

    return register_model(run_id, name, "chat_model.py", {"checkpoint": checkpoint_dir, "tokenizer": tokenizer_path},
                          (["Uppercase: dog"], DEFAULT_PARAMS), aliases)


def register_reward_model(run_id: str, name: str, model_dir: Path, tokenizer_path: Path,
                          aliases: tuple[str, ...] = ()) -> str:
    """A reward model as a pyfunc scorer (tasks/reward_scorer.py: prompt/response rows in, rewards out)."""
    import pandas as pd

    example = pd.DataFrame([{"prompt": "Uppercase: dog", "response": "DOG"}])
    return register_model(run_id, name, "reward_scorer.py", {"reward_model": model_dir, "tokenizer": tokenizer_path},
                          example, aliases)


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def alias_version(name: str, alias: str):
    """The model version behind models:/NAME@ALIAS, or None when the alias (or the model) does not exist."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def registered_checkpoint(uri: str) -> tuple[Path, Path]:
    """Checkpoint dir and tokenizer file of a registered text model (models:/NAME/VERSION or models:/NAME@ALIAS).

    The model's artifacts are downloaded once into <state>/registry/NAME/VERSION/ and reused after that.
    """
    import mlflow

    from model.files import atomic_directory
    from tasks.settings import state_dir

    spec = uri.removeprefix("models:/")
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = client().get_model_version_by_alias(name, alias)
        else:
            name, number = spec.rsplit("/", 1)
            version = client().get_model_version(name, number) if number != "latest" else max(
                client().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    except (MlflowException, ValueError) as e:
        raise InstructflowError(f"no registered model {uri} ({str(e).splitlines()[0]}); list them in the MLflow UI "
                                f"under Models, e.g. models:/pretrain/1 or models:/pretrain@champion") from None
    target = state_dir() / "registry" / version.name / str(version.version)
    if not (target / "MLmodel").is_file():  # downloaded whole or not at all
        with atomic_directory(target) as staging:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                dst_path=str(staging))
    # MLflow stores each artifact under its source's own name (a PPO policy's folder is "policy", not "checkpoint"):
    # the MLmodel file says where the "checkpoint" and "tokenizer" artifacts went
    artifacts = yaml.safe_load((target / "MLmodel").read_text())["flavors"]["python_function"].get("artifacts", {})
    if "checkpoint" not in artifacts or "tokenizer" not in artifacts:
        raise InstructflowError(f"registered model {uri} has no checkpoint and tokenizer artifacts; it was not logged "
                                "by instructflow as a text or chat model")
    return target / artifacts["checkpoint"]["path"], target / artifacts["tokenizer"]["path"]
