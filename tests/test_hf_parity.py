"""Parity with Hugging Face's GPT-2 and GPT-1 (OpenAI GPT): copied weights must give the same logits in fp32."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e '.[test]'")

from model.errors import InstructflowError  # noqa: E402
from model.hf import config_from_hf, convert_state_dict, from_hf  # noqa: E402


def seeded(kind: str):
    torch.manual_seed(1234)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=211, n_positions=48, n_embd=64, n_layer=3, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.OpenAIGPTConfig(vocab_size=211, n_positions=48, n_embd=64, n_layer=3, n_head=4)
        model = transformers.OpenAIGPTLMHeadModel(config)
    with torch.no_grad():  # a 0.02 init makes every logit tiny; larger weights make the comparison sensitive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_logits_match_hugging_face(kind):
    hf = seeded(kind)
    ours = from_hf(hf).eval()
    ids = torch.randint(0, 211, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
    assert expected.std() > 0.5  # the check below is not trivially met by near-zero logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_hugging_face_with_position_ids():
    hf = seeded("gpt2")
    ours = from_hf(hf).eval()
    ids = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # the first row is left-padded
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        got, _ = ours(ids, attention_mask=mask)
    assert (got[0, 5:] - expected[0, 5:]).abs().max().item() <= 1e-4  # real tokens only
    assert (got[1] - expected[1]).abs().max().item() <= 1e-4


def test_the_comparison_would_catch_a_wrong_activation():
    hf = seeded("gpt2")
    config = config_from_hf(hf.config)
    wrong = type(config)(**{**config.to_dict(), "activation": "gelu"})  # exact GELU instead of GPT-2's tanh form
    from model.gpt import GPT

    model = GPT(wrong).eval()
    model.load_state_dict(convert_state_dict("gpt2", hf.state_dict(), wrong))
    ids = torch.randint(0, 211, (2, 16))
    with torch.no_grad():
        diff = (model(ids)[0] - hf(ids).logits).abs().max().item()
    assert diff > 1e-4


def test_unsupported_model_is_a_clear_error():
    config = transformers.BertConfig()
    with pytest.raises(InstructflowError, match="only 'gpt2' and 'openai-gpt'"):
        config_from_hf(config)
