"""Ray beyond one process: a two-node cluster on this machine, attached through RAY_ADDRESS like a real one.

The cluster is a `ray start --head` and a `ray start --address` worker node (two real raylets, one CPU each),
run as subprocesses this module owns and stops by process group: never `ray stop`, which would also stop other
Ray instances on the machine. They use the session's auth token, as a head started for the state dir does.
In multi-node mode Ray advertises the machine's address even for --node-ip-address 127.0.0.1 (its ports listen on
every interface anyway), so the nodes meet on the machine's own address.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.5)


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the `ray start` and everything it started (its own session), SIGKILL what is left after `timeout`."""
    def group_alive() -> bool:
        process.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(process.pid, 0)
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group_alive():
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + timeout
        while group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    process.wait()


def detach_ray() -> None:
    """Earlier tests leave a local Ray in this process (ensure_ray starts one again when a later test needs it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster():
    """RAY_ADDRESS of a running two-node cluster; the driver (this process) is attached to it."""
    import ray

    from tasks.ray_train import ensure_ray

    detach_ray()
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])  # the session's, as in <state>/ray/auth_token
    if not token.is_file() or not token.read_text().strip():
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    temp = tempfile.mkdtemp(prefix="ifc-")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    # The test process keeps multi-node mode off for its local Ray (tasks/settings.py), and `ray start --address`
    # refuses to run with it off. RAY_AUTH_MODE=token: a joining node never turns token auth on by itself.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_TMPDIR": temp, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    processes = []
    with open(Path(temp) / "cluster.log", "w") as log, pytest.MonkeyPatch.context() as mp:
        def start(*args: str) -> None:
            command = [str(RAY), "start", *args, "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                       "--temp-dir", temp, "--dashboard-agent-listen-port", str(free_port())]
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))

        try:
            start("--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
                  "--ray-client-server-port", str(free_port()))
            wait_for(lambda: listening(port), 90, "the head did not listen")
            start("--address", f"127.0.0.1:{port}")
            mp.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
            mp.delenv("RAY_AUTH_MODE", raising=False)  # the driver turns token mode on by itself (tasks/ray_train.py)
            ensure_ray()
            wait_for(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, 90, "the worker node did not join")
            yield f"127.0.0.1:{port}"
        finally:
            detach_ray()
            for process in reversed(processes):
                stop_process_group(process)
    shutil.rmtree(temp, ignore_errors=True)


def test_unreachable_address_is_one_clear_error(monkeypatch, capsys):
    from flows.cli import main

    detach_ray()
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", address)
    started = time.monotonic()
    assert main(["cluster-check"]) == 2
    assert time.monotonic() - started < 30  # not Ray's minutes of retries
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: no Ray cluster answers at RAY_ADDRESS={address}: start the cluster "
                     "(`ray start --head --port PORT`), correct RAY_ADDRESS, or unset it for a local Ray"]


def test_ddp_gradients_across_two_nodes_equal_one_process(cluster):
    from tasks.cluster import check_ddp

    result = check_ddp(num_workers=2, placement_strategy="SPREAD")
    assert result["nodes"] == 2 and len(result["node_ids"]) == 2, result  # SPREAD put a worker on each raylet
    # measured: max abs 7.5e-9, relative 8.3e-8 (fp32 sums in another order); an all-reduce left out gives ~1
    assert result["max_abs_diff"] < 1e-6 and result["max_rel_diff"] < 1e-5, result
    assert result["unsynced_rel_diff"] > 0.1 and result["ok"], result


def test_pretraining_runs_spread_over_two_nodes(cluster, tmp_path):
    from model.checkpoint import load_checkpoint
    from model.config import GPTConfig
    from model.train import TrainConfig, batch_at
    from tasks.corpus import write_tokens
    from tasks.pretrain import run_pretraining

    vocab = 256
    rng = np.random.default_rng(0)
    write_tokens(rng.integers(0, vocab, 20_000), tmp_path / "train.bin", vocab)
    write_tokens(rng.integers(0, vocab, 5_000), tmp_path / "val.bin", vocab)
    config = GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    train = TrainConfig(max_steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=6, eval_batches=2,
                        log_every=3, peak_flops=1e11)  # a given peak spares each worker its matmul benchmark
    out = run_pretraining(key=f"two-nodes-{secrets.token_hex(4)}", model_config=config, train_config=train,
                          train_tokens=tmp_path / "train.bin", val_tokens=tmp_path / "val.bin", vocab_size=vocab,
                          output_dir=tmp_path / "checkpoint", run_id=None, num_workers=2, checkpoint_every=3,
                          placement_strategy="SPREAD")
    model, _ = load_checkpoint(out)
    x, y = batch_at(rng.integers(0, vocab, 5_000), 0, 0, train)
    with torch.no_grad():
        _, loss = model(x, y)
    assert math.isfinite(loss.item()) and loss.item() < 2 * math.log(vocab)
