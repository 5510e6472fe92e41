"""Native rollout engine over the unified `miles.models` model.

- `LLMEngine(EngineConfig)`: `add_request` / `step` / `abort` / `has_unfinished` (servers), `generate` (offline),
  `update_weights` (HF-named tensor buckets) / `update_weights_from_disk`, `weight_version`, `pause` / `resume`,
  `sleep` / `wake_up`, `stats`.
- Scheduling: continuous batching, chunked prefill under a token budget, preemption by recompute
  (`scheduler.py`); paged KV blocks with hash-based prefix sharing (`block_manager.py`).
- Log-prob of a generated token: `log_softmax(logits / T)[token]` in fp32, T = 1 for greedy, before any
  top-p / top-k truncation (`sampler.py`) -- the quantity `miles.models.token_logprobs` computes in training.
- GPU: Triton paged attention (split-K decode, varlen prefill), CUDA-graph decode per batch-size bucket,
  optional `torch.compile` of the decode forward (`EngineConfig.compile`), fused Triton sampler.
"""

from miles.engine.config import EngineConfig
from miles.engine.engine import EngineStats, LLMEngine
from miles.engine.sequence import RequestOutput, SamplingParams

__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]
