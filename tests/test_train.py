"""The plain training loop: the schedule, that loss falls, exact resume, and atomic checkpoints."""

import math

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import GPTConfig, preset
from model.errors import InstructflowError
from model.finetune import FinetuneConfig
from model.gpt import GPT
from model.reward import RewardConfig
from model.rlhf import PPOConfig
from model.sft import SFTConfig
from model.train import TrainConfig, TrainState, batch_at, lr_at, make_optimizer, train


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0))


def pattern_tokens(n: int = 4000) -> np.ndarray:
    # A learnable stream: a repeated phrase with noise, so loss can fall well below log(50).
    phrase = np.array([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32], dtype=np.uint16)
    return np.tile(phrase, n // len(phrase) + 1)[:n]


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)

    def lr(step: int) -> float:
        return lr_at(step, cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                     min_ratio=cfg.min_lr_ratio)

    assert lr(0) == pytest.approx(1e-4)
    assert lr(9) == pytest.approx(1e-3)
    assert lr(55) == pytest.approx(0.55e-3)  # halfway through the cosine: midway between peak and floor
    assert lr(100) == pytest.approx(1e-4)


# The four schedules the loops had before they shared lr_at, written out as they were: the reference that the
# shared function must reproduce to the last bit at every step.
def old_pretrain_lr(step, cfg):
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - floor)


def old_sft_and_reward_lr(step, total_steps, cfg):
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - floor)


def old_finetune_lr(step, total_steps, cfg):
    warmup = max(1, math.ceil(cfg.warmup_fraction * total_steps))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    return cfg.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def old_ppo_lr(iteration, base, cfg):
    if iteration >= cfg.warmup_iterations:
        return base
    return base * (0.1 + 0.9 * iteration / cfg.warmup_iterations)


@pytest.mark.parametrize("overrides", [{}, {"warmup_steps": 0}, {"warmup_steps": 1, "max_steps": 7},
                                       {"learning_rate": 3e-4, "max_steps": 1000, "warmup_steps": 37,
                                        "min_lr_ratio": 0.0}])
def test_pretraining_schedule_is_the_old_one_exactly(overrides):
    cfg = TrainConfig(**overrides)
    new = [lr_at(s, cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                 min_ratio=cfg.min_lr_ratio) for s in range(cfg.max_steps + 5)]
    assert new == [old_pretrain_lr(s, cfg) for s in range(cfg.max_steps + 5)]


@pytest.mark.parametrize("config", [SFTConfig, RewardConfig])
@pytest.mark.parametrize("overrides, total", [({}, 100), ({}, 1), ({"warmup_steps": 5, "learning_rate": 1.0}, 100),
                                              ({"warmup_steps": 3, "min_lr_ratio": 0.0}, 11)])
def test_sft_and_reward_schedules_are_the_old_one_exactly(config, overrides, total):
    cfg = config(**overrides)
    new = [lr_at(s, cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=total, min_ratio=cfg.min_lr_ratio)
           for s in range(total + 3)]
    assert new == [old_sft_and_reward_lr(s, total, cfg) for s in range(total + 3)]


@pytest.mark.parametrize("overrides, total", [({}, 100), ({}, 1), ({}, 3000), ({"warmup_fraction": 0.1}, 100),
                                              ({"warmup_fraction": 0.3, "learning_rate": 7e-5}, 17)])
def test_finetuning_schedule_is_the_old_one_exactly(overrides, total):
    cfg = FinetuneConfig(**overrides)
    new = [lr_at(s, cfg.learning_rate, warmup_steps=cfg.warmup_steps(total), decay="linear", total_steps=total)
           for s in range(total + 3)]
    assert new == [old_finetune_lr(s, total, cfg) for s in range(total + 3)]


@pytest.mark.parametrize("overrides", [{}, {"warmup_iterations": 0},
                                       {"warmup_iterations": 3, "learning_rate": 1e-4, "value_learning_rate": 3e-5}])
def test_ppo_schedule_is_the_old_one_exactly(overrides):
    cfg = PPOConfig(**overrides)
    for base in (cfg.learning_rate, cfg.value_learning_rate or cfg.learning_rate):
        new = [lr_at(i, base, warmup_steps=cfg.warmup_iterations, warmup_start=0.1, decay="constant")
               for i in range(40)]
        assert new == [old_ppo_lr(i, base, cfg) for i in range(40)]


def test_paper_defaults_scale_to_a_batch_shape():
    cfg = TrainConfig.from_defaults(preset("gpt3-small").training, seq_len=2048, batch_size=8, max_steps=1000)
    assert cfg.tokens_per_step == 8 * 2048 * 31  # 0.5M tokens per step through gradient accumulation
    assert cfg.learning_rate == 6e-4 and cfg.betas == (0.9, 0.95)
    assert cfg.warmup_steps == 739  # ceil(375M warmup tokens / 507,904 per step)


def test_loss_falls_on_a_learnable_stream():
    cfg = TrainConfig(max_steps=150, batch_size=8, seq_len=16, learning_rate=3e-3, warmup_steps=5, log_every=10,
                      eval_every=75, eval_batches=2)
    tokens = pattern_tokens()
    state = train(tiny_model(), tokens, tokens[:500], cfg)
    first, last = state.history[0], state.history[-1]
    assert first["loss"] > 3.0 and last["loss"] < 0.5
    assert last["val_loss"] < 0.5 and last["step"] == 150


def test_resume_continues_exactly():
    cfg = TrainConfig(max_steps=12, batch_size=4, seq_len=16, warmup_steps=2, grad_accum=2, log_every=1)
    tokens = pattern_tokens()
    straight = tiny_model()
    train(straight, tokens, None, cfg)

    class Killed(Exception):
        pass

    saved = {}

    def checkpoint_then_die(state):  # what a checkpoint hook saves, then the worker dies mid-run
        if state.step == 6:
            saved.update(model=crashed.state_dict(), optimizer=optimizer.state_dict(), step=state.step)
            raise Killed

    crashed = tiny_model()
    optimizer = make_optimizer(crashed, cfg)
    with pytest.raises(Killed):
        train(crashed, tokens, None, cfg, optimizer=optimizer, on_step_end=checkpoint_then_die)

    fresh = tiny_model(seed=99)  # a new process: weights, optimiser and step come from the checkpoint
    fresh.load_state_dict(saved["model"])
    fresh_opt = make_optimizer(fresh, cfg)
    fresh_opt.load_state_dict(saved["optimizer"])
    state = train(fresh, tokens, None, cfg, state=TrainState(step=saved["step"]), optimizer=fresh_opt)
    assert [h["step"] for h in state.history] == list(range(7, 13))  # no step repeated, none skipped
    for a, b in zip(straight.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b)


def test_batches_depend_only_on_seed_and_step():
    cfg = TrainConfig(batch_size=3, seq_len=8)
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = batch_at(tokens, step=5, micro=0, cfg=cfg)
    x2, y2 = batch_at(tokens, step=5, micro=0, cfg=cfg)
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    assert not torch.equal(x1, batch_at(tokens, step=6, micro=0, cfg=cfg)[0])
    with pytest.raises(InstructflowError, match="fewer than one context window"):
        batch_at(tokens[:8], step=0, micro=0, cfg=cfg)


def test_checkpoint_round_trip_and_no_half_written_directory(tmp_path):
    model = tiny_model()
    path = save_checkpoint(model, tmp_path / "ckpt", extra={"step": 3})
    loaded, extra = load_checkpoint(path)
    assert extra == {"step": 3} and loaded.config == model.config
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directories left
    with pytest.raises(InstructflowError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "missing")
    (path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(InstructflowError, match="unreadable"):
        load_checkpoint(path)


class _Payload:
    """Stands for whatever a hostile checkpoint could carry: unpickling it would run its __reduce__."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_carrying_a_pickled_object_is_refused(tmp_path, capsys):
    model = tiny_model()
    # an optimiser's state and counters load: tensors and plain values
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    path = save_checkpoint(model, tmp_path / "ok", extra={"optimizer": optimizer.state_dict(), "step": 1,
                                                         "betas": (0.9, 0.95), "round": "r1"})
    assert load_checkpoint(path)[1]["step"] == 1
    torch.save({"step": 1, "payload": _Payload()}, path / "extra.pt")
    with pytest.raises(InstructflowError, match="holds more than tensors and plain values"):
        load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out
