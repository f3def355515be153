"""Pretraining benchmarks: (a) the plain loop vs the same loop in a one-worker Ray Train job, (b) the demo by stage.

(a) trains the same `tiny` model on the same tokens for the same steps both ways and reports the steady-state
tokens/s (median of the logged windows, the first two left out) and the fixed overhead (wall time minus
steps at the steady rate). (b) runs the demo pipeline in a fresh state directory and splits its wall time
by stage. Writes <state dir>/bench/pretrain.json. Run with `make bench`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def steady_rate(rates: list[float]) -> float:
    return statistics.median(rates[2:] if len(rates) > 4 else rates)


def plain_vs_ray(steps: int) -> dict:
    from model.config import config_for
    from model.tokenizer import Tokenizer
    from model.train import TrainConfig
    from tasks import tracking
    from tasks.carriers import tiny_shakespeare_file
    from tasks.corpus import read_tokens, split_tokens, write_tokens
    from tasks.pretrain import pretrain_local, run_pretraining
    from tasks.ray_train import ensure_ray
    from tasks.settings import state_dir

    work = state_dir() / "bench"
    text = tiny_shakespeare_file().read_text(encoding="utf-8")
    tokenizer = Tokenizer.train([text], vocab_size=4096)
    train_ids, val_ids = split_tokens(text, tokenizer)
    paths = {name: write_tokens(ids, work / f"{name}.bin", tokenizer.vocab_size)
             for name, ids in (("train", train_ids), ("val", val_ids))}
    config = config_for("tiny", vocab_size=tokenizer.vocab_size)
    cfg = TrainConfig(max_steps=steps, batch_size=8, seq_len=128, warmup_steps=30, log_every=10, eval_every=10**9,
                      learning_rate=1e-3)
    tokens = cfg.tokens_per_step * steps

    rates: list[float] = []
    start = time.perf_counter()
    pretrain_local(read_tokens(paths["train"], 4096), read_tokens(paths["val"], 4096), config, cfg,
                   work / "plain-checkpoint", lambda m, step: rates.append(m["tokens_per_s"]))
    plain_wall = time.perf_counter() - start
    plain_rate = steady_rate(rates)

    ray_start = time.perf_counter()
    ensure_ray()
    ray_init = time.perf_counter() - ray_start
    run_id = tracking.create_stage_run("bench-pretrain", f"bench-{time.time_ns()}", {"steps": steps}, None)
    start = time.perf_counter()
    run_pretraining(key=f"bench-{time.time_ns()}", model_config=config, train_config=cfg, train_tokens=paths["train"],
                    val_tokens=paths["val"], vocab_size=tokenizer.vocab_size, output_dir=work / "ray-checkpoint",
                    run_id=run_id, checkpoint_every=steps)
    ray_wall = time.perf_counter() - start
    history = tracking.client().get_metric_history(run_id, "pretrain/tokens_per_s")
    ray_rate = steady_rate([m.value for m in sorted(history, key=lambda m: m.step)])
    return {
        "steps": steps, "tokens_per_step": cfg.tokens_per_step,
        "plain": {"wall_s": plain_wall, "tokens_per_s": plain_rate, "overhead_s": plain_wall - tokens / plain_rate},
        "ray": {"wall_s": ray_wall, "tokens_per_s": ray_rate, "overhead_s": ray_wall - tokens / ray_rate,
                "ray_init_s": ray_init},
        "steady_ratio_ray_over_plain": ray_rate / plain_rate,
    }


def demo_by_stage() -> dict:
    from flows.demo import demo
    from tasks.reports import stage_timings

    start = time.perf_counter()
    result = demo()
    return {"wall_s": time.perf_counter() - start, "stages_s": stage_timings(result["mlflow_run_id"])}


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    # a fresh state dir: nothing cached, so the demo's stages all run (downloads come from the usual cache)
    os.environ.setdefault("INSTRUCTFLOW_CACHE_DIR", str(Path(".instructflow/cache").resolve()))
    os.environ["INSTRUCTFLOW_STATE_DIR"] = tempfile.mkdtemp(prefix="if-bench-")
    from tasks.settings import CHECKOUT

    report = {"plain_vs_ray": plain_vs_ray(steps), "demo": demo_by_stage()}
    a, b = report["plain_vs_ray"], report["demo"]
    print(f"\n(a) tiny, {a['steps']} steps of {a['tokens_per_step']} tokens")
    print(f"{'':<8}{'wall s':>9}{'tokens/s':>10}{'fixed overhead s':>18}")
    for name in ("plain", "ray"):
        r = a[name]
        print(f"{name:<8}{r['wall_s']:>9.1f}{r['tokens_per_s']:>10.0f}{r['overhead_s']:>18.1f}")
    print(f"steady-state tokens/s, Ray Train / plain: {a['steady_ratio_ray_over_plain']:.2f}; "
          f"ray.init {a['ray']['ray_init_s']:.1f} s (not in the Ray row)")
    print(f"\n(b) demo pipeline, fresh state: {b['wall_s']:.0f} s")
    for stage, seconds in b["stages_s"].items():
        print(f"  {stage:<10}{seconds:>7.1f} s")
    out = CHECKOUT / ".instructflow" / "bench" / "pretrain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
