"""`CausalLM`: one decoder-only implementation for Llama 3, Qwen2/2.5, Qwen3 and Qwen3-MoE.

Flat token layout (no batch dim): ``forward(input_ids[T], positions[T], attn, routing) -> hidden[T, H]``.
Parameter names mirror HF (``model.layers.0.self_attn.q_proj.weight`` ...), except MoE experts, which are
stacked (``model.layers.N.mlp.experts.gate_up_proj [E, 2I, H]``, ``...down_proj [E, H, I]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend
from .config import ModelConfig
from .layers import MLP, RMSNorm, RotaryEmbedding, apply_rope
from .moe import Experts, Router, SparseMoeBlock
from .routing import RoutingCapture


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attn(self.layer_idx, q, k, v)
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


def build_moe(config: ModelConfig) -> SparseMoeBlock:
    c = config
    router = Router(c.hidden_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)
    return SparseMoeBlock(router, Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = build_moe(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        routing: RoutingCapture | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        h = self.post_attention_layernorm(x)
        h = self.mlp(h, self.layer_idx, routing) if self.is_moe else self.mlp(h)
        return x + h


class Backbone(nn.Module):
    """HF's ``model.*`` submodule: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """Decoder-only causal LM on a flat token layout; see module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H] output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE) -- call after ``to_empty`` from a meta-device init."""
        self.model.rotary_emb.reset_buffers()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        routing: RoutingCapture | None = None,
    ) -> torch.Tensor:
        """input_ids/positions [T] -> final-normed hidden states [T, H]."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"CausalLM.forward: expected flat input_ids[T] and positions[T], got "
                f"{list(input_ids.shape)} and {list(positions.shape)}"
            )
        m = self.model
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary_emb(positions, x.dtype)
        for layer in m.layers:
            x = layer(x, cos, sin, attn, routing)
        return m.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] in the model dtype."""
        return F.linear(hidden, self.lm_head_weight)
