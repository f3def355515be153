"""The GPT configuration: one dataclass of architectural choices, and the papers' sizes as a table of presets.

Variants are data (minGPT): GPT-1, GPT-2 and GPT-3 differ only in the fields below.
References:
  GPT-1  Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training", §4.1
  GPT-2  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", §2.3
  GPT-3  Brown et al. 2020, "Language Models are Few-Shot Learners", §2.1 and Table 2.1
  Sparse Transformer  Child et al. 2019, "Generating Long Sequences with Sparse Transformers", §4.2
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from model.errors import InstructflowError


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # GPT-2/3 byte-level BPE: 256 bytes + 50,000 merges + <|endoftext|>; GPT-1: 40,478
    block_size: int = 1024  # context length n_ctx: GPT-1 512, GPT-2 1024, GPT-3 2048
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # d_model; every paper's MLP is 4 * n_embd wide
    dropout: float = 0.1  # residual, embedding and attention dropout (GPT-1 §4.1: 0.1)
    norm: Literal["post", "pre"] = "pre"  # post-LN after each residual add (GPT-1) or pre-LN on each sub-block input (GPT-2 §2.3)
    final_norm: bool = True  # GPT-2 §2.3: "an additional layer normalization was added after the final self-attention block"
    activation: Literal["gelu", "gelu_tanh"] = "gelu_tanh"  # GELU's tanh approximation (both OpenAI releases) or exact erf form
    layer_norm_eps: float = 1e-5
    bias: bool = True  # biases in Linear and LayerNorm, as in all three releases
    init_std: float = 0.02  # GPT-1 §4.1: weights initialised from N(0, 0.02)
    residual_init_scale: bool = True  # GPT-2 §2.3: residual projections scaled by 1/sqrt(N), N = 2 * n_layer residual layers
    attention: Literal["dense", "alternating"] = "dense"  # GPT-3 §2.1: "alternating dense and locally banded sparse"
    # Sparse layers use the Sparse Transformer's strided pattern: token i sees token j <= i when i - j < k
    # (the local band) or (i - j) % k == 0 (every k-th token further back). GPT-3 does not give k; 128 is the
    # stride the Sparse Transformer used for text (Enwik8, §7.3), about sqrt(n_ctx) * 3 at n_ctx = 2048.
    sparse_stride: int = 128

    def __post_init__(self) -> None:
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "sparse_stride")
        for name in positive:
            if getattr(self, name) < 1:
                raise InstructflowError(f"GPTConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise InstructflowError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"every head needs the same width; pick n_embd as a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InstructflowError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        choices = {"norm": ("post", "pre"), "activation": ("gelu", "gelu_tanh"), "attention": ("dense", "alternating")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InstructflowError(f"GPTConfig.{name}={getattr(self, name)!r} is not one of {allowed}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_sparse(self, layer: int) -> bool:
        """Odd layers are the locally banded sparse ones when attention alternates (GPT-3)."""
        return self.attention == "alternating" and layer % 2 == 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InstructflowError(f"unknown GPTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class TrainDefaults:
    """The optimisation settings a paper reports for a model size (token counts, so they survive any batch shape)."""

    learning_rate: float  # peak learning rate
    batch_tokens: int  # tokens per optimiser step
    warmup_tokens: int  # linear warmup from 0, then cosine decay
    min_lr_ratio: float  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float | None  # global gradient-norm clip
    source: str  # where these numbers come from


@dataclass(frozen=True)
class Preset:
    config: GPTConfig
    training: TrainDefaults
    paper_params: float | None  # the parameter count the paper reports, for the check in tests/test_config.py


# GPT-1 §4.1: Adam, max lr 2.5e-4 warmed up linearly over 2,000 updates then cosine-annealed to 0, minibatches of
# 64 sequences of 512 tokens, modified L2 regularisation w = 0.01.
_GPT1_TRAINING = TrainDefaults(2.5e-4, 64 * 512, 2000 * 64 * 512, 0.0, 0.01, (0.9, 0.999), None, "GPT-1 §4.1")
# GPT-2 §2.3 gives a batch of 512 sequences of 1,024 tokens but not the learning rate ("manually tuned"); we take
# GPT-3's settings for the same size, the closest published values.
_GPT2_TRAINING = TrainDefaults(6.0e-4, 512 * 1024, 375_000_000, 0.1, 0.1, (0.9, 0.95), 1.0, "GPT-2 §2.3 batch; GPT-3 Table 2.1 lr")


def _gpt3_training(batch_tokens: float, learning_rate: float) -> TrainDefaults:
    # GPT-3 Appendix B: Adam (0.9, 0.95), clip 1.0, cosine to 10% of the peak, 375M warmup tokens, weight decay 0.1.
    return TrainDefaults(learning_rate, int(batch_tokens), 375_000_000, 0.1, 0.1, (0.9, 0.95), 1.0, "GPT-3 Table 2.1 + Appendix B")


def _gpt2(n_layer: int, n_embd: int, n_head: int, paper_params: float) -> Preset:
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    return Preset(config, _GPT2_TRAINING, paper_params)


def _gpt3(n_layer: int, n_embd: int, n_head: int, batch_tokens: float, lr: float, paper_params: float) -> Preset:
    config = GPTConfig(
        vocab_size=50257, block_size=2048, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        dropout=0.0, attention="alternating",  # GPT-3 reports no dropout
    )
    return Preset(config, _gpt3_training(batch_tokens, lr), paper_params)


PRESETS: dict[str, Preset] = {
    # GPT-1: 12 layers, 768 wide, 12 heads, 512 context, post-LN, GELU, 40,000 BPE merges.
    "gpt1": Preset(
        GPTConfig(vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768, norm="post",
                  final_norm=False, residual_init_scale=False),
        _GPT1_TRAINING, 117e6),
    # GPT-2 Table 2 (the corrected counts of the released models: 124M, 355M, 774M, 1558M).
    "gpt2": _gpt2(12, 768, 12, 124e6),
    "gpt2-medium": _gpt2(24, 1024, 16, 355e6),
    "gpt2-large": _gpt2(36, 1280, 20, 774e6),
    "gpt2-xl": _gpt2(48, 1600, 25, 1558e6),
    # GPT-3 Table 2.1: n_layers, d_model, n_heads, batch size in tokens, learning rate.
    "gpt3-small": _gpt3(12, 768, 12, 0.5e6, 6.0e-4, 125e6),
    "gpt3-medium": _gpt3(24, 1024, 16, 0.5e6, 3.0e-4, 350e6),
    "gpt3-large": _gpt3(24, 1536, 16, 0.5e6, 2.5e-4, 760e6),
    # Table 2.1 prints 24 heads of 128 for d_model 2048 (24 * 128 = 3072); the 1.3B count needs an attention width
    # of d_model, so we keep d_model 2048 and the head width 128: 16 heads.
    "gpt3-xl": _gpt3(24, 2048, 16, 1e6, 2.0e-4, 1.3e9),
    "gpt3-2.7b": _gpt3(32, 2560, 32, 1e6, 1.6e-4, 2.7e9),
    "gpt3-6.7b": _gpt3(32, 4096, 32, 2e6, 1.2e-4, 6.7e9),
    # Table 2.1 prints d_model 5140 with 40 heads of 128; 40 * 128 = 5120, which we use (5140 is not divisible by 40).
    "gpt3-13b": _gpt3(40, 5120, 40, 2e6, 1.0e-4, 13.0e9),
    "gpt3-175b": _gpt3(96, 12288, 96, 3.2e6, 0.6e-4, 175.0e9),
    # tiny: ~1.3M parameters for CPU runs and tests; GPT-2's architecture with a corpus BPE of 4,096 tokens.
    "tiny": Preset(
        GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        TrainDefaults(1e-3, 16 * 256, 100 * 16 * 256, 0.1, 0.1, (0.9, 0.95), 1.0,
                      "ours, for CPU demos (nanoGPT's small-data runs use lr 1e-3)"),
        None),
}


def preset(name: str) -> Preset:
    """Look up a preset by name; an unknown name is a clear error listing the known ones."""
    if name not in PRESETS:
        raise InstructflowError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def config_for(name: str, **overrides) -> GPTConfig:
    """The preset's GPTConfig with some fields replaced, e.g. config_for("tiny", vocab_size=tokenizer.vocab_size)."""
    base = preset(name).config
    try:
        return dataclasses.replace(base, **overrides)
    except TypeError as e:  # an unknown field name
        raise InstructflowError(f"bad override for preset {name!r}: {e}") from None


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N for the weights plus the attention scores (PaLM Appendix B, nanoGPT's MFU)."""
    t = seq_len or config.block_size
    return 6 * n_params + 12 * config.n_layer * config.n_embd * t
