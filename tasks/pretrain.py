"""Pretraining as a Ray Train job: the plain loop from model/ in each worker, checkpoints through ray.train.report.

The driver side (`run_pretraining`) starts or attaches to Ray and runs a `TorchTrainer`; the worker side
(`worker_loop`) adds what distribution needs around `model.train.train`: DDP, a per-rank data shard,
checkpoints every N steps (each report costs Ray a round trip, so not every step), resume from the latest
checkpoint, and rank-0-only metrics to MLflow. A new run with the same key continues where the last one
stopped: Ray Train restores its checkpoint list from the run's storage directory.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import GPTConfig
from model.errors import InstructflowError
from model.files import atomic_directory
from model.generate import generate
from model.gpt import GPT
from model.tokenizer import Tokenizer
from model.train import TrainConfig, TrainState, make_optimizer, train
from tasks.console import quiet_libraries, quiet_ray_driver, ray_logging_config
from tasks.runtime import Runtime, choose_runtime, matmul_peak_flops
from tasks.settings import ray_address, ray_temp_dir, state_dir

METRIC_PREFIX = "pretrain/"


def ensure_ray() -> None:
    """Attach to RAY_ADDRESS if set, else start a local Ray (files and auth token in the state dir)."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address()
    if address:
        _attach_to_cluster(address)
    elif threading.current_thread() is threading.main_thread():
        _start_local_ray()
    else:
        _start_local_ray_in_keeper_thread()


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


def worker_loop(job: dict) -> None:
    """One Ray Train worker: resume if a checkpoint exists, train, report checkpoints every N steps."""
    import ray.train
    import ray.train.torch

    from tasks.console import Progress
    from tasks.tracking import MetricBuffer, NullMetricBuffer

    rank, _, runtime = worker_runtime(job)
    device = runtime.device
    cfg = TrainConfig(**job["train"])
    if cfg.peak_flops is None:
        cfg.peak_flops = matmul_peak_flops(device, runtime.dtype, repeats=3)
    vocab = job["vocab_size"]
    train_tokens, val_tokens = _tokens(job["train_tokens"], vocab), _tokens(job["val_tokens"], vocab)

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig.from_dict(job["model"])).to(device)
    optimizer = make_optimizer(model, cfg)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a new run of the same key
        with checkpoint.as_directory() as directory:
            restored, extra = load_checkpoint(directory, device=device)
        model.load_state_dict(restored.state_dict())
        optimizer.load_state_dict(extra["optimizer"])
        state = TrainState(step=extra["step"], tokens_seen=extra["tokens_seen"])
    ddp = ray.train.torch.prepare_model(model)  # DistributedDataParallel when there are several workers
    if job["compile"]:
        ddp = torch.compile(ddp)
    progress = Progress("pretrain", cfg.max_steps, initial=state.step)
    metrics = MetricBuffer(job["run_id"], METRIC_PREFIX, progress=progress) if rank == 0 and job["run_id"] \
        else NullMetricBuffer()
    if state.step:
        metrics.mark_resume(state.step)

    def report(state: TrainState) -> None:
        if state.step % job["checkpoint_every"] and state.step != cfg.max_steps:
            return
        last = state.history[-1] if state.history else {}
        summary = {"step": state.step, **{k: last[k] for k in ("loss", "val_loss") if k in last}}
        metrics.flush()  # before the checkpoint, so an MLflow outage cannot lose these steps
        with tempfile.TemporaryDirectory() as staging:
            checkpoint = None
            if rank == 0:
                extra = {"optimizer": optimizer.state_dict(), "step": state.step, "tokens_seen": state.tokens_seen}
                save_checkpoint(model, Path(staging) / "checkpoint", extra=extra)
                checkpoint = ray.train.Checkpoint.from_directory(str(Path(staging) / "checkpoint"))
            ray.train.report(summary, checkpoint=checkpoint)  # every rank reports: it is a barrier

    train(ddp, train_tokens, val_tokens, cfg, log=metrics.add, state=state, optimizer=optimizer,
          on_step_end=report, autocast=runtime.autocast_factory, rank=rank)


def _tokens(path: str, vocab_size: int) -> np.ndarray:
    from tasks.corpus import read_tokens

    return read_tokens(Path(path), vocab_size)


def run_pretraining(
    *,
    key: str,
    model_config: GPTConfig,
    train_config: TrainConfig,
    train_tokens: Path,
    val_tokens: Path,
    vocab_size: int,
    output_dir: Path,
    run_id: str | None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    checkpoint_every: int = 100,
    max_failures: int = 1,
    compile_model: bool = False,
    snapshots_dir: Path | None = None,
    placement_strategy: str = "PACK",
) -> Path:
    """Run the TorchTrainer for this key (resuming its latest checkpoint) and copy the final one to output_dir.

    With `snapshots_dir`, every reported checkpoint is kept and copied to `snapshots_dir/step-NNNNNN`
    (for curves over pretraining, e.g. GPT-1's zero-shot behaviour as pretraining goes on).
    """
    if train_config.max_seconds is not None:
        raise InstructflowError("max_seconds is for the single-process demo loop; give Ray jobs max_steps")
    job = {
        "model": model_config.to_dict(), "train": dataclasses.asdict(train_config), "vocab_size": vocab_size,
        "train_tokens": str(train_tokens), "val_tokens": str(val_tokens), "run_id": run_id,
        "checkpoint_every": checkpoint_every, "compile": compile_model,
    }
    result = fit_trainer(worker_loop, job, name=f"pretrain-{key}", num_workers=num_workers, use_gpu=use_gpu,
                         max_failures=max_failures, keep=None if snapshots_dir else 2,
                         placement_strategy=placement_strategy)
    if result.checkpoint is None:
        raise RuntimeError("the pretraining job ended without a checkpoint")
    for snapshot, metrics in (result.best_checkpoints or []) if snapshots_dir else []:
        with snapshot.as_directory() as directory:
            copy_checkpoint(Path(directory), snapshots_dir / f"step-{metrics['step']:06d}")
    with result.checkpoint.as_directory() as directory:
        copy_checkpoint(Path(directory), output_dir)
    return output_dir


def copy_checkpoint(source: Path, target: Path, names: tuple[str, ...] = ("model.pt", "config.json")) -> None:
    """Copy a checkpoint's weights and config (not its optimiser state); `target` appears complete or not at all."""
    with atomic_directory(target) as staging:
        for name in names:
            shutil.copy2(source / name, staging / name)


def pretrain_local(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    config: GPTConfig,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    log: Callable[[dict, int], None],
) -> TrainState:
    """The same training without Ray, in this process (the benchmark's baseline and the quick demo)."""
    runtime = choose_runtime()
    torch.manual_seed(cfg.seed)
    model = GPT(config).to(runtime.device)
    state = train(model, train_tokens, val_tokens, cfg, log=log, autocast=runtime.autocast_factory)
    save_checkpoint(model, checkpoint_dir, extra={"step": state.step, "tokens_seen": state.tokens_seen})
    return state


def sample_texts(checkpoint_dir: Path, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 80,
                 seed: int = 0) -> list[str]:
    """Prompt + continuation for each prompt, sampled with temperature 0.8 and top-k 50."""
    model, _ = load_checkpoint(checkpoint_dir, device=choose_runtime().device)
    encoded = [tokenizer.encode(p) for p in prompts]
    room = model.config.block_size - max(len(e) for e in encoded)  # a short context caps the sample's length
    out = generate(model, encoded, max(1, min(max_new_tokens, room)), temperature=0.8, top_k=50, seed=seed,
                   stop_tokens=[tokenizer.eot_id], pad_token=tokenizer.eot_id)
    return [p + tokenizer.decode([t for t in o if t != tokenizer.eot_id]) for p, o in zip(prompts, out)]
