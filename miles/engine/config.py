"""`EngineConfig`: everything the rollout engine needs to start."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    """Engine settings. KV cache size: `num_kv_blocks` if set, else `kv_memory_fraction` of the free accelerator
    memory after weights (CUDA), else `kv_cache_tokens` tokens (CPU)."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu; or float32 / bfloat16 / float16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int | None = None
    kv_memory_fraction: float = 0.85
    kv_cache_tokens: int = 65536
    block_size: int = 16
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    compile: bool = False  # torch.compile the CUDA-graph decode forward (fuses the model's elementwise ops)
    cuda_graph_max_bs: int = 256
    seed: int = 0
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    tokenizer: str | None = None  # default: `model`
    load_tokenizer: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")

    @property
    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        except KeyError:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}") from None
