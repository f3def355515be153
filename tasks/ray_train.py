"""Ray Train plumbing shared by every training stage: connecting to Ray, the TorchTrainer driver, a worker's scaffold.

Driver side: `ensure_ray` attaches to the cluster at RAY_ADDRESS or starts a local Ray, and `fit_trainer` runs a
stage's worker function as a TorchTrainer whose checkpoints live under the state dir, so a new run of the same name
resumes where the last one stopped. Worker side: `TrainWorker` is what each stage's worker has around its model/
loop: the rank, device and precision; restoring Ray's latest checkpoint; DDP; rank-0 metrics to MLflow with progress
lines on the console; and a checkpoint reported to Ray every N steps and at the last (each report costs Ray a round
trip, so not every step). A stage brings only its models, a function that saves them and one that restores them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from model.errors import InstructflowError
from model.files import atomic_directory
from tasks.console import quiet_libraries, quiet_ray_driver, ray_logging_config
from tasks.runtime import Runtime
from tasks.settings import ray_address, ray_temp_dir, state_dir

State = TypeVar("State")


# --- connecting to Ray ---------------------------------------------------------------------------


_CONNECTING = threading.Lock()  # one connection at a time: a second caller waits for the first one's Ray


def ensure_ray() -> None:
    """Attach to RAY_ADDRESS if set, else start a local Ray (files and auth token in the state dir)."""
    import ray

    with _CONNECTING:
        if ray.is_initialized():
            return
        address = ray_address()
        if address:
            _attach_to_cluster(address)
        elif threading.current_thread() is threading.main_thread():
            _start_local_ray()
        else:
            _start_local_ray_in_keeper_thread()


def start_ray_in_background() -> None:
    """ensure_ray() in a thread, so that Ray starts while the caller does other work; the first stage that needs Ray
    waits for it, and a failure is raised there again. The thread is not a daemon: a process that ends sooner waits
    for the start to finish, so Ray's exit handler shuts down a whole Ray, never half of one.

    Not before Prefect's temporary server is up: that server picks a free port in 8000-9000 and binds it moments
    later, and Ray's dashboard (8265) could take it in between."""
    def connect() -> None:
        try:
            ensure_ray()
        except BaseException:  # noqa: BLE001  the stage's own ensure_ray() raises it where it can be reported
            pass

    threading.Thread(target=connect, name="ray-start").start()


def _attach_to_cluster(address: str) -> None:
    """Connect to the cluster at RAY_ADDRESS; a cluster that is not there, or refuses our token, is a user error.

    Ray retries an unreachable address for minutes, so the port is probed first. Ray sends its auth token to an
    explicit address only when RAY_AUTH_MODE=token (it enables that by itself for local clusters only): with a
    token at hand (RAY_AUTH_TOKEN, or the file at RAY_AUTH_TOKEN_PATH) it is turned on here, as Ray does for
    `address="auto"`. A cluster without token auth ignores the token.
    """
    import ray
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.exceptions import AuthenticationError

    how_to_fix = "start the cluster (`ray start --head --port PORT`), correct RAY_ADDRESS, or unset it for a local Ray"
    host_port = _host_and_port(address)
    if host_port is not None and not _accepts_connections(*host_port):
        raise InstructflowError(f"no Ray cluster answers at RAY_ADDRESS={address}: {how_to_fix}")
    if "RAY_AUTH_MODE" not in os.environ and _token_at_hand():
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    # Workers on other nodes start with that node's environment: send them where this driver logs to.
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "INSTRUCTFLOW_VERBOSE"))}
    try:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": forwarded})
        quiet_ray_driver()
    except (ConnectionError, AuthenticationError) as e:
        if _refused_for_auth(e):
            raise InstructflowError(
                f"the Ray cluster at RAY_ADDRESS={address} refused this driver: it needs the cluster's auth token "
                f"(`ray get-auth-token` on the head) in the file {os.environ.get('RAY_AUTH_TOKEN_PATH')} "
                f"(RAY_AUTH_TOKEN_PATH) or in RAY_AUTH_TOKEN"
            ) from e
        raise InstructflowError(
            f"cannot connect to the Ray cluster at RAY_ADDRESS={address} ({e}): {how_to_fix}") from e


def _refused_for_auth(error: BaseException | None) -> bool:
    """Ray reports a refused token as AuthenticationError, or as a RuntimeError quoting InvalidAuthToken, under a
    ConnectionError."""
    from ray.exceptions import AuthenticationError

    while error is not None:
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _token_at_hand() -> bool:
    """A Ray auth token in RAY_AUTH_TOKEN or in the (non-empty) file at RAY_AUTH_TOKEN_PATH."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "")
    return path.is_file() and bool(path.read_text().strip())


def _host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "ray://host:port"; None for "auto" and other forms Ray resolves itself."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def _accepts_connections(host: str, port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def largest_node_cpus() -> int:
    """The CPUs of the largest live node: what one Ray task that uses a whole machine may ask for."""
    import ray

    return max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]), default=1) or 1


def _start_local_ray() -> None:
    import ray

    _ensure_ray_token()
    quiet_libraries()  # after `import ray`, which sets its loggers' levels
    ray.init(_temp_dir=str(ray_temp_dir()), include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             configure_logging=False)
    quiet_ray_driver()


def _start_local_ray_in_keeper_thread() -> None:
    """Start local Ray from a thread that lives as long as the process.

    Ray starts its head processes with PR_SET_PDEATHSIG, which Linux fires when the *thread* that started
    them exits: started from a Prefect task thread, the whole local cluster would die with that thread.
    """
    started, failure = threading.Event(), []

    def keeper() -> None:
        try:
            _start_local_ray()
        except BaseException as e:  # handed to the caller below
            failure.append(e)
        finally:
            started.set()
        threading.Event().wait()  # never returns; the daemon thread ends with the process

    threading.Thread(target=keeper, name="ray-head-keeper", daemon=True).start()
    started.wait()
    if failure:
        raise failure[0]


def _ensure_ray_token() -> None:
    """Ray's token auth needs a token; a local cluster gets a random one, readable only by this user."""
    path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_hex(32))


# --- the driver: one TorchTrainer per stage run ------------------------------------------------


PLACEMENT_STRATEGIES = ("PACK", "SPREAD")


def fit_trainer(loop: Callable[[dict], None], job: dict, *, name: str, num_workers: int, use_gpu: bool | None,
                max_failures: int, keep: int | None = 2, placement_strategy: str = "PACK"):
    """Run `loop(job)` as a TorchTrainer named `name` (a new run of the same name resumes its checkpoints).

    CPU workers share the node's CPUs between them (job["cpus_per_worker"] tells each how many threads to use);
    GPU workers keep Ray's default of one CPU. `placement_strategy` is Ray's: "PACK" fills one node first
    (fast all-reduce), "SPREAD" puts workers on different nodes where it can (e.g. to test a cluster's network).
    Returns Ray's Result; a failed run raises its error.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise InstructflowError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {placement_strategy!r}")
    ensure_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    cpus_per_worker = 1 if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**job, "cpus_per_worker": cpus_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker},
                                               placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(state_dir() / "ray_results"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            logging_config=ray_logging_config(),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def copy_checkpoint(source: Path, target: Path, names: tuple[str, ...] = ("model.pt", "config.json")) -> None:
    """Copy a checkpoint's weights and config (not its optimiser state); `target` appears complete or not at all."""
    with atomic_directory(target) as staging:
        for name in names:
            shutil.copy2(source / name, staging / name)


# --- the worker side ----------------------------------------------------------------------------


def worker_runtime(job: dict) -> tuple[int, int, Runtime]:
    """Inside a Ray Train worker: (rank, world size, device + dtype), torch threads set to this worker's CPUs."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    quiet_libraries()
    torch.set_num_threads(job["cpus_per_worker"])  # Ray pins a worker to 1 thread unless told otherwise
    device = ray.train.torch.get_device()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return context.get_world_rank(), context.get_world_size(), Runtime(device, torch.bfloat16 if bf16 else torch.float32)


class TrainWorker:
    """The scaffold of one Ray Train worker, the same in every stage. A stage's worker reads:

        worker = TrainWorker(job)                       # rank, world size, device + dtype, torch threads
        ...build the models on worker.device...
        state = worker.resume(restore) or FreshState()  # restore(directory) on Ray's latest checkpoint, if any
        ddp = worker.prepare(model)                     # DDP when there are several workers
        metrics = worker.track("sft/", "sft", total, initial=state.step)
        ...the model/ loop, logging to metrics.add; its on_step_end calls
           worker.on_step_end(state.step, total, summary, save)  # save(directory) writes the checkpoint

    `job` is fit_trainer's train_loop_config; "cpus_per_worker", "run_id" (None: no MLflow) and "checkpoint_every"
    are read here.
    """

    def __init__(self, job: dict) -> None:
        self.job = job
        self.rank, self.world_size, self.runtime = worker_runtime(job)
        self.metrics = None  # set by track()

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def resume(self, restore: Callable[[Path], State]) -> State | None:
        """restore(directory) on the latest checkpoint of this run (a restarted worker group, or a new run of the same
        name), returning the loop's state to continue from; None on a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return restore(Path(directory))

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` wrapped in DistributedDataParallel when there are several workers (Ray's prepare_model)."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def track(self, prefix: str, label: str, total: int, *, initial: int = 0, watch: str = "loss", **progress_options):
        """The metrics buffer the loop logs to: on rank 0 of a tracked run, MLflow metrics named `prefix`+key, each
        logged step also a progress line (tasks.console.Progress(label, total, **progress_options)); elsewhere one that
        does nothing. `initial` is the step a resumed run starts from (logged as `prefix`resumed_from)."""
        from tasks.console import Progress
        from tasks.tracking import MetricBuffer, NullMetricBuffer

        progress = Progress(label, total, initial=initial, **progress_options)
        run_id = self.job["run_id"]
        self.metrics = MetricBuffer(run_id, prefix, watch=watch, progress=progress) if self.rank == 0 and run_id \
            else NullMetricBuffer()
        if initial:
            self.metrics.mark_resume(initial)
        return self.metrics

    def on_step_end(self, step: int, last: int, summary: dict, save: Callable[[Path], None]) -> None:
        """Every job["checkpoint_every"] steps and at the `last`: report `summary` and a checkpoint to Ray."""
        if step % self.job["checkpoint_every"] and step != last:
            return
        self.report(summary, save)

    def report(self, summary: dict, save: Callable[[Path], None]) -> None:
        """Flush the metrics, then report `summary` with the checkpoint that rank 0 writes by save(directory).

        Every rank reports (it is a barrier); only rank 0 hands Ray a checkpoint. The flush comes first, so an MLflow
        outage fails the job without this checkpoint and a resumed run recomputes these steps instead of losing them.
        """
        import ray.train

        if self.metrics is not None:
            self.metrics.flush()
        with tempfile.TemporaryDirectory() as staging:
            checkpoint = None
            if self.rank == 0:
                directory = Path(staging) / "checkpoint"
                save(directory)
                checkpoint = ray.train.Checkpoint.from_directory(str(directory))
            ray.train.report(summary, checkpoint=checkpoint)
