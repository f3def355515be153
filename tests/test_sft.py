"""InstructGPT SFT: the chat layout and loss mask, packing, the schedule, the loop (memorising, best step), sampling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from model.config import GPTConfig
from model.errors import InstructflowError
from model.gpt import GPT
from model.sft import (IGNORE, EpochPlan, Rendered, SFTConfig, SFTState, generate_response, generate_responses,
                       pack, render, response_loss, sft)
from model.tokenizer import EOT, Tokenizer
from model.train import lr_at, make_optimizer

# Prompts a tiny model can memorise; the same prompts with wrong answers make a validation set it must overfit.
DEMOS = [("Reverse: cat", "tac"), ("Uppercase: dog", "DOG"), ("Add 2 and 3", "5"), ("First letter of river", "r"),
         ("Repeat ha 3 times", "hahaha")]
WRONG = [("Reverse: cat", "cat"), ("Uppercase: dog", "dog"), ("Add 2 and 3", "6"), ("First letter of river", "v"),
         ("Repeat ha 3 times", "ha")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # No "hi", "yo" or "ok" in the corpus: those stay single bytes (printable ASCII c has id ord(c) - 25).
    return Tokenizer.train([p + " " + r for p, r in DEMOS] * 3 + ["the cat sat on the mat"], vocab_size=300)


def tiny_model(tok: Tokenizer, seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


# --- rendering -----------------------------------------------------------------------------------


def test_render_lays_out_the_turns_and_masks_everything_but_the_response(tok):
    # specials: <|endoftext|> 0, <|system|> 4, <|user|> 5, <|assistant|> 6, <|end|> 7; h 79, i 80, y 96, o 86, k 82
    r = render(tok, "hi", "yo")
    assert r.ids == [0, 5, 79, 80, 7, 6, 96, 86, 7]
    assert r.mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # the response and its closing <|end|>, nothing else
    r = render(tok, "hi", "yo", system="ok")
    assert r.ids == [0, 4, 86, 82, 7, 5, 79, 80, 7, 6, 96, 86, 7]
    assert r.mask == [0] * 10 + [1, 1, 1]
    prompt_only = render(tok, "hi")  # for sampling: ends right after <|assistant|>
    assert prompt_only.ids == [0, 5, 79, 80, 7, 6] and prompt_only.mask == [0] * 6 and prompt_only.prompt_len == 6


def test_special_token_text_in_a_prompt_stays_text(tok):
    r = render(tok, "<|end|>", "<|assistant|>")
    assert r.ids.count(7) == 2 and r.ids.count(6) == 1  # only the structural <|end|>s and <|assistant|>
    assert tok.decode(render(tok, "<|end|>").ids[2:-2]) == "<|end|>"


def only_eot_tokenizer() -> Tokenizer:
    """A byte-level BPE with <|endoftext|> as its only special token, as GPT-2's encoding."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["some text"], trainers.BpeTrainer(
        vocab_size=260, special_tokens=[AddedToken(EOT, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return Tokenizer(hf)


def test_a_tokenizer_without_chat_tokens_and_non_text_are_refused(tok):
    gpt2_like = only_eot_tokenizer()
    names = r"no <\|system\|>, <\|user\|>, <\|assistant\|>, <\|end\|> token\(s\).*Tokenizer.train"
    with pytest.raises(InstructflowError, match=names):
        render(gpt2_like, "hi", "yo")
    with pytest.raises(InstructflowError, match="no <"):
        generate_response(tiny_model(tok), gpt2_like, "hi")
    with pytest.raises(InstructflowError, match="response must be text"):
        render(tok, "Add 2 and 3", 5)


# --- packing -------------------------------------------------------------------------------------

A = Rendered([0, 5, 10, 7, 6, 20, 21, 7], [0, 0, 0, 0, 0, 1, 1, 1])  # 8 tokens, response 20 21 <|end|>
B = Rendered([0, 5, 11, 7, 6, 30, 7], [0, 0, 0, 0, 0, 1, 1])  # 7 tokens, response 30 <|end|>


def test_packing_by_hand_shifts_targets_and_pads_without_loss():
    one_per_row = pack([A, B], seq_len=8, pad=99, seed=0)  # rows hold 9 tokens: A and B cannot share one
    assert sorted(one_per_row.rows) == [[0], [1]]
    a = one_per_row.rows.index([0])
    assert one_per_row.inputs[a].tolist() == [0, 5, 10, 7, 6, 20, 21, 7]
    assert one_per_row.targets[a].tolist() == [-100, -100, -100, -100, 20, 21, 7, -100]
    assert one_per_row.inputs[1 - a].tolist() == [0, 5, 11, 7, 6, 30, 7, 99]
    assert one_per_row.targets[1 - a].tolist() == [-100, -100, -100, -100, 30, 7, -100, -100]
    shared = pack([A, B], seq_len=16, pad=99, seed=0)  # 17 tokens fit both, in the seed's order
    first, second = shared.rows[0]
    assert shared.rows == [[first, second]] and {first, second} == {0, 1}
    if shared.rows == [[0, 1]]:
        assert shared.inputs[0].tolist() == [0, 5, 10, 7, 6, 20, 21, 7, 0, 5, 11, 7, 6, 30, 7, 99]
        assert shared.targets[0].tolist() == [-100] * 4 + [20, 21, 7] + [-100] * 5 + [30, 7, -100, -100]
    else:
        assert shared.inputs[0].tolist() == [0, 5, 11, 7, 6, 30, 7, 0, 5, 10, 7, 6, 20, 21, 7, 99]
        assert shared.targets[0].tolist() == [-100] * 4 + [30, 7] + [-100] * 5 + [20, 21, 7, -100, -100]
    assert shared.tokens == 15 and shared.fill == pytest.approx(15 / 17)


def many_examples(tok: Tokenizer, n: int = 30) -> list[Rendered]:
    words = "apple river dog sun moon tree stone cloud bird fish".split()
    out = []
    for i in range(n):
        prompt = " ".join(words[(i + k) % len(words)] for k in range(1 + i % 4))
        response = " ".join(reversed(prompt.split())) * (1 + i % 3)
        out.append(render(tok, prompt, response, system="be brief" if i % 5 == 0 else None))
    return out


def test_packing_keeps_every_response_token_exactly_once_and_masks_prompts(tok):
    examples = many_examples(tok)
    packed = pack(examples, seq_len=96, pad=tok.eot_id, seed=3)
    assert sorted(i for row in packed.rows for i in row) == list(range(len(examples)))  # each example in one row
    assert packed.truncated == 0 and all(len(e.ids) <= 97 for e in examples)
    responses = [[t for t, m in zip(e.ids, e.mask) if m] for e in examples]
    for r, members in enumerate(packed.rows):
        row_targets = packed.targets[r]
        # the targets of a row are exactly its examples' responses, in order: no prompt token, nothing twice
        assert row_targets[row_targets != IGNORE].tolist() == [t for i in members for t in responses[i]]
        kept = (row_targets != IGNORE).nonzero().flatten().tolist()
        assert all(row_targets[t] == packed.inputs[r, t + 1] for t in kept if t + 1 < 96)  # next-token shift
        assert sum(len(examples[i].ids) for i in members) <= 97
    assert packed.response_tokens == sum(map(len, responses))
    assert len(packed) < len(examples)  # rows hold several examples
    again, other = pack(examples, 96, pad=tok.eot_id, seed=3), pack(examples, 96, pad=tok.eot_id, seed=4)
    assert torch.equal(again.inputs, packed.inputs) and again.rows == packed.rows
    assert other.rows != packed.rows


def test_a_too_long_response_is_cut_and_counted_a_too_long_prompt_refused():
    long_answer = Rendered([0, 5, 10, 7, 6, *range(20, 30), 7], [0] * 5 + [1] * 11)
    packed = pack([long_answer, A], seq_len=8, pad=99, seed=0)
    assert packed.truncated == 1
    row = packed.rows.index([0])
    assert packed.inputs[row].tolist() == [0, 5, 10, 7, 6, 20, 21, 22]
    assert packed.targets[row].tolist() == [-100] * 4 + [20, 21, 22, 23]  # no <|end|>: the answer was cut
    long_prompt = Rendered([0, 5, *range(10, 20), 7, 6, 20, 7], [0] * 14 + [1, 1])
    with pytest.raises(InstructflowError, match="example 1: its prompt takes 14 tokens.*raise seq_len"):
        pack([A, long_prompt], seq_len=12, pad=99)
    with pytest.raises(InstructflowError, match="split is empty"):
        pack([], seq_len=12, pad=99)


def test_every_epoch_is_packed_anew_deterministically_and_batches_split_across_workers(tok):
    examples = many_examples(tok)
    cfg = SFTConfig(batch_size=4, seq_len=96, epochs=3, seed=1)
    plan = EpochPlan(examples, cfg, pad=tok.eot_id)
    for rows in plan.layouts:
        assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert plan.layouts[0] != plan.layouts[1] != plan.layouts[2]
    assert EpochPlan(examples, cfg, pad=tok.eot_id).layouts == plan.layouts
    assert plan.total_steps == sum(math.ceil(len(rows) / 4) for rows in plan.layouts)
    assert any(len(rows) % 4 for rows in plan.layouts)  # some epoch ends in a batch completed from its first rows
    for step in range(plan.total_steps):  # every step has exactly batch_size rows, even an epoch's last
        x, y = plan.batch(step)
        assert x.shape == y.shape == (4, 96)
        x0, _ = plan.batch(step, rank=0, world_size=2)
        x1, _ = plan.batch(step, rank=1, world_size=2)
        assert torch.equal(x0, x[0::2]) and torch.equal(x1, x[1::2])
    assert plan.epoch_of(plan.total_steps - 1) == 2


# --- schedule and config ---------------------------------------------------------------------------


def test_schedule_is_cosine_to_ten_percent_without_warmup():
    cfg = SFTConfig(learning_rate=1.0)
    lrs = [lr_at(s, cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=100, min_ratio=cfg.min_lr_ratio)
           for s in (0, 50, 100)]
    assert [round(lr, 3) for lr in lrs] == [1.0, 0.55, 0.1]
    assert SFTConfig().residual_dropout == 0.2 and SFTConfig().learning_rate == 9.65e-6  # InstructGPT C.1
    with pytest.raises(InstructflowError, match="epochs must be at least 1"):
        SFTConfig(epochs=0)


# --- the loop ------------------------------------------------------------------------------------


def test_sft_memorises_demonstrations_and_answers_them_greedily(tok):
    model = tiny_model(tok)
    train = [render(tok, p, r) for p, r in DEMOS]
    cfg = SFTConfig(learning_rate=3e-3, batch_size=3, seq_len=40, epochs=150, eval_every=50, log_every=25,
                    residual_dropout=0.0, weight_decay=0.0)
    logged = []
    state = sft(model, train, train, cfg, pad=tok.eot_id, log=lambda m, step: logged.append((step, m)))
    assert logged[0] == (0, {"val_loss": state.history[0]["val_loss"], "best_val_loss": state.history[0]["val_loss"]})
    assert state.history[0]["val_loss"] > 4.0 and state.history[-1]["val_loss"] < 0.3
    assert state.history[1]["loss"] > 4.0 and state.history[-1]["loss"] < 0.3
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(state.history[-1])
    assert state.best_step == state.step == logged[-1][0]
    answers = generate_responses(model, tok, [p for p, _ in DEMOS], temperature=0.0, max_new_tokens=12)
    assert answers == [r for _, r in DEMOS]
    assert generate_response(model, tok, "Add 2 and 3", temperature=0.0) == "5"


def test_the_best_step_is_the_lowest_validation_loss_and_the_hook_can_keep_its_weights(tok):
    # Training on right answers, validating on wrong ones: val loss falls (format, <|end|>) then rises (memorising).
    model = tiny_model(tok)
    train = [render(tok, p, r) for p, r in DEMOS]
    val = [render(tok, p, r) for p, r in WRONG]
    cfg = SFTConfig(learning_rate=3e-3, batch_size=3, seq_len=40, epochs=40, eval_every=4, log_every=100,
                    residual_dropout=0.0, weight_decay=0.0)
    kept = {}

    def keep_best(state: SFTState) -> None:
        if state.best_step == state.step:
            kept["step"], kept["weights"] = state.step, {k: v.clone() for k, v in model.state_dict().items()}

    state = sft(model, train, val, cfg, pad=tok.eot_id, on_step_end=keep_best)
    curve = [(h["step"], h["val_loss"]) for h in state.history if "val_loss" in h]
    best_step, best_loss = min(curve, key=lambda c: c[1])
    assert 0 < state.best_step < state.step  # overfitting happened after the best step
    assert (state.best_step, state.best_val_loss) == (best_step, best_loss) and kept["step"] == best_step
    assert curve[-1][1] > best_loss + 0.3
    model.load_state_dict(kept["weights"])
    assert response_loss(model, pack(val, 40, pad=tok.eot_id, seed=cfg.seed)) == pytest.approx(best_loss, rel=1e-5)


def test_residual_dropout_is_set_for_the_run_and_restored(tok):
    model = tiny_model(tok, dropout=0.1)
    train = [render(tok, p, r) for p, r in DEMOS]
    seen = []
    sft(model, train, train, SFTConfig(batch_size=3, seq_len=40, epochs=1), pad=tok.eot_id,
        on_step_end=lambda s: seen.append((model.blocks[0].attn.resid_dropout.p, model.blocks[1].mlp.dropout.p)))
    assert seen and set(seen) == {(0.2, 0.2)}
    assert model.blocks[0].attn.resid_dropout.p == 0.1 and model.blocks[1].mlp.dropout.p == 0.1
    assert model.drop.p == 0.1  # embedding dropout is not residual dropout


def test_bad_runs_are_refused_with_the_fix(tok):
    model = tiny_model(tok)
    train = [render(tok, p, r) for p, r in DEMOS]
    with pytest.raises(InstructflowError, match="training split is empty"):
        sft(model, [], train, SFTConfig(seq_len=40), pad=0)
    with pytest.raises(InstructflowError, match="held-out split is empty"):
        sft(model, train, [], SFTConfig(seq_len=40), pad=0)
    with pytest.raises(InstructflowError, match="does not divide among 2 workers"):
        sft(model, train, train, SFTConfig(batch_size=3, seq_len=40), pad=0, rank=0, world_size=2)
    with pytest.raises(InstructflowError, match="longer than the model's context of 64"):
        sft(model, train, train, SFTConfig(seq_len=128), pad=0)
    with pytest.raises(InstructflowError, match="exceeds the model's context"):
        generate_response(model, tok, "word " * 80)


def test_a_resumed_run_continues_exactly(tok):
    train = [render(tok, p, r) for p, r in DEMOS]
    cfg = SFTConfig(learning_rate=3e-3, batch_size=1, seq_len=40, epochs=3, eval_every=2, residual_dropout=0.0)
    straight = tiny_model(tok)
    done = sft(straight, train, train, cfg, pad=tok.eot_id)

    class Killed(Exception):
        pass

    saved = {}

    def save_then_die(state: SFTState) -> None:
        if state.step == 4:
            saved.update(model={k: v.clone() for k, v in interrupted.state_dict().items()},
                         optimizer=copy.deepcopy(optimizer.state_dict()), state=copy.deepcopy(state))
            raise Killed

    interrupted = tiny_model(tok)
    optimizer = make_optimizer(interrupted, cfg)
    with pytest.raises(Killed):
        sft(interrupted, train, train, cfg, pad=tok.eot_id, optimizer=optimizer, on_step_end=save_then_die)
    resumed = tiny_model(tok, seed=1)
    resumed.load_state_dict(saved["model"])
    optimizer = make_optimizer(resumed, cfg)
    optimizer.load_state_dict(saved["optimizer"])
    state = sft(resumed, train, train, cfg, pad=tok.eot_id, optimizer=optimizer, state=saved["state"])
    assert state.step == done.step > 4
    drop_speed = lambda history: [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]  # noqa: E731
    assert drop_speed(state.history) == drop_speed(done.history)  # the same curve, no step logged twice
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    assert (state.best_step, state.best_val_loss) == (done.best_step, done.best_val_loss)
