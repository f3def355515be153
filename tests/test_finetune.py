"""GPT-1 fine-tuning: input transformations (token layouts), the task head, the L3 loss, layer transfer, the loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.errors import InstructflowError
from model.finetune import (Example, FinetuneConfig, Specials, TaskModel, cap_lengths, classification_metrics,
                            collate, finetune, l3_loss, load_task_model, predict, save_task_model, transfer_layers,
                            transform)
from model.gpt import GPT
from model.train import lr_at

S = Specials(start=1, delim=2, extract=3)
CONFIG = GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def test_input_transformations_match_figure_1():
    assert transform("classification", [[10, 11]], S, 32) == ([[1, 10, 11, 3]], False)
    assert transform("entailment", [[10, 11], [20]], S, 32) == ([[1, 10, 11, 2, 20, 3]], False)
    assert transform("similarity", [[10, 11], [20]], S, 32) == ([[1, 10, 11, 2, 20, 3], [1, 20, 2, 10, 11, 3]], False)
    sequences, _ = transform("multiple_choice", [[10, 11]], S, 32, options=[[30], [31, 32]])
    assert sequences == [[1, 10, 11, 2, 30, 3], [1, 10, 11, 2, 31, 32, 3]]


def test_long_inputs_are_cut_longest_field_first_and_flagged():
    assert cap_lengths([10, 2], 6) == [4, 2]
    assert cap_lengths([5, 5], 6) == [3, 3]
    premise, hypothesis = list(range(10, 20)), [30, 31]
    sequences, truncated = transform("entailment", [premise, hypothesis], S, 9)
    # 3 specials leave 6 tokens: the premise keeps its last 4 (next to the delimiter), the hypothesis stays whole
    assert sequences == [[1, 16, 17, 18, 19, 2, 30, 31, 3]] and truncated
    assert len(sequences[0]) == 9


def test_an_option_that_cannot_fit_is_refused_and_bad_kinds_are_named():
    with pytest.raises(InstructflowError, match="longest option"):
        transform("multiple_choice", [[10]], S, 6, options=[[30], list(range(5))])
    with pytest.raises(InstructflowError, match="unknown task kind"):
        transform("regression", [[10]], S, 32)
    with pytest.raises(InstructflowError, match="2 text field"):
        transform("entailment", [[10]], S, 32)
    with pytest.raises(InstructflowError, match="at least 2 options"):
        transform("multiple_choice", [[10]], S, 32, options=[[30]])


def task_model(kind: str, n: int, seed: int = 0) -> TaskModel:
    torch.manual_seed(seed)
    model = TaskModel(GPT(CONFIG), kind, n, head_dropout=0.0)
    return model.eval()


def test_the_head_reads_the_extract_token_and_similarity_adds_both_orders():
    model = task_model("similarity", 3)
    a, b = [10, 11, 12], [20]
    forward = Example(transform("similarity", [a, b], S, 32)[0], label=0)
    backward = Example(transform("similarity", [b, a], S, 32)[0], label=0)
    with torch.no_grad():
        logits, _ = model(collate([forward, backward], pad=0), lm_loss=False)
        h = [model.gpt.hidden_states(torch.tensor([s]))[0, -1] for s in forward.sequences]
        manual = model.head(h[0] + h[1])
    torch.testing.assert_close(logits[0], manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)  # order of the pair does not matter


def test_multiple_choice_scores_each_option_and_pads_missing_ones_with_minus_infinity():
    model = task_model("multiple_choice", 1)
    two = Example(transform("multiple_choice", [[10]], S, 32, options=[[30], [31]])[0], label=1)
    three = Example(transform("multiple_choice", [[10, 11]], S, 32, options=[[30], [31], [32, 33]])[0], label=2)
    with torch.no_grad():
        logits, _ = model(collate([two, three], pad=0), lm_loss=False)
        alone, _ = model(collate([three], pad=0), lm_loss=False)
    assert logits.shape == (2, 3) and logits[0, 2] == float("-inf") and torch.isfinite(logits[1]).all()
    torch.testing.assert_close(logits[1], alone[0], atol=1e-5, rtol=1e-5)  # padding never leaks into real tokens


def test_l3_is_task_loss_plus_lambda_times_lm_loss():
    logits, labels, lm = torch.tensor([[2.0, 0.0]]), torch.tensor([0]), torch.tensor(3.0)
    task = math.log(1 + math.exp(-2))  # cross-entropy of the right class at logit margin 2
    total, parts = l3_loss(logits, labels, lm, 0.5)
    assert total.item() == pytest.approx(task + 1.5) and parts["task_loss"] == pytest.approx(task)
    total, parts = l3_loss(logits, labels, lm, 0.0)
    assert total.item() == pytest.approx(task) and parts["lm_loss"] == pytest.approx(3.0)


def test_auxiliary_lm_loss_covers_real_tokens_only():
    model = task_model("classification", 2)
    short = Example([[1, 10, 11, 3]], 0)
    long = Example([[1, 12, 13, 14, 15, 16, 3]], 1)
    with torch.no_grad():
        _, lm = model(collate([short, long], pad=0))
        nll, count = 0.0, 0
        for ex in (short, long):
            ids = torch.tensor(ex.sequences)
            logits, _ = model.gpt(ids)
            nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.size(1) - 1
    assert lm.item() == pytest.approx(nll / count, rel=1e-5)


def test_transfer_copies_embeddings_and_the_first_n_blocks_only():
    torch.manual_seed(1)
    source, target = GPT(CONFIG), GPT(CONFIG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    transfer_layers(source, target, 1)
    src, tgt = source.state_dict(), target.state_dict()
    assert torch.equal(tgt["wte.weight"], src["wte.weight"]) and torch.equal(tgt["wpe.weight"], src["wpe.weight"])
    assert torch.equal(tgt["blocks.0.attn.c_attn.weight"], src["blocks.0.attn.c_attn.weight"])
    assert torch.equal(tgt["blocks.1.attn.c_attn.weight"], before["blocks.1.attn.c_attn.weight"])
    assert torch.equal(tgt["ln_f.weight"], before["ln_f.weight"])  # only with every block
    transfer_layers(source, target, 2)
    assert torch.equal(target.state_dict()["ln_f.weight"], src["ln_f.weight"])
    with pytest.raises(InstructflowError, match="outside"):
        transfer_layers(source, target, 3)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    cfg = FinetuneConfig(learning_rate=1.0, warmup_fraction=0.1)
    assert cfg.warmup_steps(100) == 10

    def lr(step: int) -> float:
        return lr_at(step, cfg.learning_rate, warmup_steps=cfg.warmup_steps(100), decay="linear", total_steps=100)

    assert [round(lr(s), 3) for s in (0, 9, 10, 55, 99)] == [0.1, 1.0, 1.0, 0.5, 0.011]


def test_metrics_accuracy_and_macro_f1_by_hand():
    predicted, gold = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])
    scores = classification_metrics(predicted, gold, 2)
    # class 0: tp 2, fp 1, fn 0 -> F1 0.8; class 1: tp 1, fp 0, fn 1 -> F1 2/3
    assert scores == {"accuracy": 0.75, "macro_f1": pytest.approx((0.8 + 2 / 3) / 2)}


def keyword_task(n: int, seed: int) -> list[Example]:
    """Label 1 when token 7 occurs in the text: learnable only by reading the sequence, not from priors."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = list(rng.integers(10, 40, size=int(rng.integers(3, 10))))
        label = int(rng.random() < 0.5)
        if label:
            text[int(rng.integers(len(text)))] = 7
        out.append(Example(transform("classification", [[int(t) for t in text]], S, 32)[0], label))
    return out


def test_the_loop_learns_a_task_that_needs_the_text_and_saves_a_loadable_model(tmp_path):
    torch.manual_seed(0)
    model = TaskModel(GPT(CONFIG), "classification", 2)
    cfg = FinetuneConfig(learning_rate=3e-3, batch_size=16, epochs=6, eval_every=1000, log_every=20)
    logged = []
    state = finetune(model, keyword_task(400, 0), keyword_task(100, 1), cfg, pad=0, n_classes=2,
                     log=lambda m, step: logged.append(step))
    assert state.step == 25 * 6 and logged[-1] == state.step
    assert state.history[-1]["val_accuracy"] > 0.9, state.history[-1]
    save_task_model(model, tmp_path / "ft", labels=["no", "yes"])
    restored, task, _ = load_task_model(tmp_path / "ft")
    assert task == {"kind": "classification", "n_outputs": 2, "labels": ["no", "yes"]}
    test = keyword_task(50, 2)
    assert np.array_equal(predict(model, test, 0), predict(restored, test, 0))


def test_empty_splits_are_refused():
    model = task_model("classification", 2)
    with pytest.raises(InstructflowError, match="training split is empty"):
        finetune(model, [], keyword_task(4, 0), FinetuneConfig(), pad=0, n_classes=2)
    with pytest.raises(InstructflowError, match="held-out split is empty"):
        finetune(model, keyword_task(4, 0), [], FinetuneConfig(), pad=0, n_classes=2)
