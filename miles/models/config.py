"""`ModelConfig`: the typed subset of an HF ``config.json`` that Miles' architectures need."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# model_type -> HF architecture class name
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_MOE_TYPES = {"qwen3_moe"}


class ConfigError(ValueError):
    """A config.json that Miles cannot use; the message names the file and the field."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # llama3 parameters, None for default RoPE
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    # MoE (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # tokens
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    source: str = "<dict>"
    hf: dict[str, Any] = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    @property
    def architecture(self) -> str:
        return SUPPORTED[self.model_type]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen3-MoE rule: sparse unless in ``mlp_only_layers``; every ``decoder_sparse_step``-th layer."""
        return (
            self.is_moe
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``<path>/config.json`` (``path`` may also be the json file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p}: config.json not found")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e})") from e
        return cls.from_hf(d, source=str(p))

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Parse an HF config dict; errors name ``source`` and the offending field."""

        def need(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            raise ConfigError(f"{source}: missing required field {key!r} (model_type={d.get('model_type')!r})")

        mt = d.get("model_type")
        if mt is None:
            raise ConfigError(f"{source}: missing required field 'model_type'")
        if mt not in SUPPORTED:
            raise ConfigError(f"{source}: unsupported model_type {mt!r}; supported: {sorted(SUPPORTED)}")
        archs = d.get("architectures") or [SUPPORTED[mt]]
        if SUPPORTED[mt] not in archs:
            raise ConfigError(
                f"{source}: unsupported architectures {archs!r} for model_type {mt!r}; expected {SUPPORTED[mt]!r}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act {act!r} (only 'silu')")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = d.get("head_dim") or (128 if mt == "qwen3" else hidden // heads)
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"{source}: unsupported rope type {rope_type!r} (field rope_parameters/rope_scaling)")
        scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            for k in keys:
                if k not in rope:
                    raise ConfigError(f"{source}: llama3 rope scaling is missing field {k!r}")
            scaling = {k: rope[k] for k in keys}
        attention_bias = bool(d.get("attention_bias", False))
        moe = mt in _MOE_TYPES
        return cls(
            model_type=mt,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attention_bias,
            o_bias=False if mt == "qwen2" else attention_bias,
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            num_experts=int(need("num_experts", "num_local_experts")) if moe else 0,
            num_experts_per_tok=int(need("num_experts_per_tok")) if moe else 0,
            moe_intermediate_size=int(need("moe_intermediate_size")) if moe else 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=int(d.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=list(d.get("mlp_only_layers") or []),
            eos_token_id=d.get("eos_token_id"),
            bos_token_id=d.get("bos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            source=source,
            hf=dict(d),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict to write as config.json (the original one when parsed from HF)."""
        if self.hf:
            return dict(self.hf)
        rope = {"rope_type": "llama3" if self.rope_scaling else "default", "rope_theta": self.rope_theta}
        rope.update(self.rope_scaling or {})
        d = dict(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.is_moe:
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=self.mlp_only_layers,
            )
        return d
