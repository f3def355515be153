"""The GPT model: attention -> MLP -> block -> GPT, one implementation for GPT-1, GPT-2 and GPT-3.

Pure PyTorch. The model follows its inputs' device and dtype; only entry points choose them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.errors import InstructflowError


class KVCache:
    """Keys and values of every layer for the positions already seen, room for `max_len` positions.

    The buffers are allocated on the first update, in the keys' own dtype (bf16 under autocast, else fp32).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int) -> None:
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # positions filled so far (the same for every layer once a forward pass ends)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, nh, T, hs) keys/values and return all of this layer's so far, (B, nh, S, hs)."""
        if self.k is None:
            self.k = k.new_zeros(self.shape)
            self.v = v.new_zeros(self.shape)
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs), S = cached + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.sparse = config.is_sparse(layer)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, masks: dict, cache: KVCache | None) -> torch.Tensor:
        mask = masks["sparse" if self.sparse else "dense"]
        if self.pre_norm:  # GPT-2/3: x + f(LN(x))
            x = x + self.attn(self.ln_1(x), mask, cache)
            return x + self.mlp(self.ln_2(x))
        # GPT-1, as the original Transformer: LN(x + f(x))
        x = self.ln_1(x + self.attn(x, mask, cache))
        return self.ln_2(x + self.mlp(x))


def attention_masks(
    config: GPTConfig, T: int, past: int, attention_mask: torch.Tensor | None, device
) -> dict[str, torch.Tensor | None]:
    """Boolean masks (True = may attend) of shape (B or 1, 1, T, past + T) for dense and sparse layers.

    `attention_mask` is (B, past + T) with 0 on left padding. The dense mask is None when plain causal
    attention suffices, so SDPA can take its fused `is_causal` path.
    """
    S = past + T
    i = torch.arange(past, S, device=device).view(T, 1)  # query positions
    j = torch.arange(S, device=device).view(1, S)  # key positions
    causal = j <= i  # (T, S)
    distance = i - j
    band = causal & ((distance < config.sparse_stride) | (distance % config.sparse_stride == 0))
    if attention_mask is None:
        dense = None if past == 0 else causal
        masks = {"dense": dense, "sparse": band}
        return {k: (m.view(1, 1, T, S) if m is not None else None) for k, m in masks.items()}
    keep = attention_mask.bool().view(-1, 1, 1, S)  # (B, 1, 1, S): never attend to padding...
    own = (j == i).view(1, 1, T, S)  # ...but every query sees itself, so a padding row is not all -inf (NaN)
    return {
        "dense": (causal.view(1, 1, T, S) & keep) | own,
        "sparse": (band.view(1, 1, T, S) & keep) | own,
    }


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned positions (all three papers)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = (
            nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias) if config.final_norm else nn.Identity()
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: input and output embeddings share one matrix
        self.apply(self._init_weights)
        if config.residual_init_scale:  # GPT-2 §2.3: 1/sqrt(N) for the N = 2 * n_layer residual projections
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied embedding is one matrix); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C) for token ids (B, T).

        attention_mask: (B, past + T) with 0 on left padding; positions then count real tokens only.
        cache: keys/values of earlier positions; it is extended by this call.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise InstructflowError(
                f"sequence of {past + T} tokens is longer than the model's context of {self.config.block_size}; "
                f"truncate the input or use a model with a larger block_size"
            )
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T): padding does not count
        masks = attention_masks(self.config, T, past, attention_mask, idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, masks, cache)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T), the mean next-token cross-entropy (-100 = ignored)."""
        x = self.hidden_states(idx, attention_mask=attention_mask, cache=cache)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len or self.config.block_size)
