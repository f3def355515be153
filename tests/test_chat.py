"""The chat command: streamed replies equal the batch sampler's, and a missing model is a clear error."""

from __future__ import annotations

import pytest
import torch

from model.config import GPTConfig
from model.errors import InstructflowError
from model.gpt import GPT
from model.sft import generate_response
from model.tokenizer import Tokenizer


def tiny_chat_model() -> tuple[GPT, Tokenizer]:
    """A random-weight chat model (64-token context) and a tokenizer with the chat tokens: seconds to build."""
    tok = Tokenizer.train(["Uppercase: dog DOG", "Add 2 and 3 5", "the cat sat on the mat"] * 3, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    return model, tok


def test_a_streamed_greedy_reply_is_the_samplers_greedy_reply():
    from tasks.chat import reply_stream

    model, tok = tiny_chat_model()
    for message in ("Uppercase: dog", "Add 2 and 3"):
        streamed = "".join(reply_stream(model, tok, message, temperature=0, max_new_tokens=12))
        assert streamed == generate_response(model, tok, message, temperature=0, max_new_tokens=12)


def test_chat_without_any_trained_policy_says_what_to_run(tmp_path, monkeypatch):
    from tasks.chat import resolve_chat_model

    monkeypatch.setenv("INSTRUCTFLOW_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(InstructflowError, match="no trained policy to chat with"):
        resolve_chat_model(None, None)


def test_the_champion_policy_resolves_to_its_checkpoint_whatever_its_folder_is_called(tmp_path):
    """A PPO stage writes its policy to a folder named `policy`; MLflow keeps that name inside the registered model."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from tasks import tracking
    from tasks.chat import resolve_chat_model

    model, tok = tiny_chat_model()
    save_checkpoint(model, tmp_path / "policy")
    tok.save(tmp_path / "tokenizer.json")
    run_id = tracking.start_pipeline_run("champion-resolution-test", {})
    version = tracking.register_chat_model(run_id, "policy-folder-test", tmp_path / "policy", tmp_path / "tokenizer.json")
    tracking.set_alias("policy-folder-test", "champion", version)

    checkpoint, tokenizer = tracking.registered_checkpoint("models:/policy-folder-test@champion")
    restored, _ = load_checkpoint(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))
    assert Tokenizer.load(tokenizer).encode("Uppercase: dog") == tok.encode("Uppercase: dog")
    assert tracking.register_chat_model(run_id, "policy-folder-test", tmp_path / "policy",
                                        tmp_path / "tokenizer.json") == version  # one version per run, never two
    assert resolve_chat_model("models:/policy-folder-test@champion", None)[0] is not None
