"""Import Hugging Face GPT-2 (`GPT2LMHeadModel`) and GPT-1 (`OpenAIGPTLMHeadModel`) weights into our GPT.

A user who can reach a model hub loads the released weights with `from_pretrained("gpt2")`; offline, tests copy
the weights of seeded, randomly initialised HF models and compare logits. `transformers` is imported lazily
and only by `from_pretrained`: the rest works on plain state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.config import GPTConfig
from model.errors import InstructflowError
from model.gpt import GPT

# (our name, HF GPT-2 name, HF GPT-1 name); HF's Conv1D stores weights as (in, out), so those are transposed.
_EMBEDDINGS = [("wte.weight", "transformer.wte.weight", "transformer.tokens_embed.weight"),
               ("wpe.weight", "transformer.wpe.weight", "transformer.positions_embed.weight")]
_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
          "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
          "mlp.c_proj.bias"]
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf_config) -> GPTConfig:
    """Our config for a transformers GPT2Config or OpenAIGPTConfig."""
    kind = getattr(hf_config, "model_type", None)
    if kind not in ("gpt2", "openai-gpt"):
        raise InstructflowError(f"cannot import a {kind!r} model: only 'gpt2' and 'openai-gpt' are supported")
    # GPT-2's "gelu_new" and OpenAI GPT's "gelu" are both the tanh approximation; GPT-2's "gelu" is the exact form.
    names = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"} if kind == "gpt2" else {"gelu": "gelu_tanh"}
    activation = names.get(hf_config.activation_function if kind == "gpt2" else hf_config.afn)
    if activation is None:
        raise InstructflowError(f"unsupported activation in the {kind} config; expected gelu or gelu_new")
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.n_positions,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        dropout=hf_config.resid_pdrop,
        norm="pre" if kind == "gpt2" else "post",
        final_norm=kind == "gpt2",
        activation=activation,
        layer_norm_eps=hf_config.layer_norm_epsilon,
        residual_init_scale=kind == "gpt2",
    )


def convert_state_dict(kind: str, hf_state: Mapping[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename (and transpose Conv1D weights of) a HF state dict into ours; missing weights are a clear error."""
    column = {"gpt2": 1, "openai-gpt": 2}[kind]
    names = {row[0]: row[column] for row in _EMBEDDINGS}
    for layer in range(config.n_layer):
        for name in _BLOCK:
            names[f"blocks.{layer}.{name}"] = f"transformer.h.{layer}.{name}"
    if config.final_norm:
        names["ln_f.weight"], names["ln_f.bias"] = "transformer.ln_f.weight", "transformer.ln_f.bias"
    missing = sorted(hf for hf in names.values() if hf not in hf_state)
    if missing:
        raise InstructflowError(f"the {kind} checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    ours = {}
    for name, hf_name in names.items():
        tensor = hf_state[hf_name]
        ours[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor.clone()
    ours["lm_head.weight"] = ours["wte.weight"]  # tied
    return ours


def from_hf(hf_model) -> GPT:
    """Our GPT with the weights of a transformers GPT2LMHeadModel / OpenAIGPTLMHeadModel (any size)."""
    config = config_from_hf(hf_model.config)
    model = GPT(config)
    state = convert_state_dict(hf_model.config.model_type, hf_model.state_dict(), config)
    model.load_state_dict(state, strict=True)
    return model


def from_pretrained(name: str) -> GPT:
    """Load released weights by hub name ("gpt2", "gpt2-medium", ..., "openai-gpt"); needs transformers and a hub."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise InstructflowError("importing hub weights needs transformers: pip install 'instructflow[test]'") from None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(name)
    except OSError as e:
        raise InstructflowError(f"could not load {name!r} from the model hub ({e}); offline, no weights exist") from None
    return from_hf(hf_model)
