"""Native rollout engine: continuous batching, paged KV with prefix sharing, chunked prefill, preemption,
CUDA-graph decode, weight updates, sleep/wake-up. See `LLMEngine`."""

from miles.engine.config import EngineConfig
from miles.engine.engine import EngineStats, LLMEngine
from miles.engine.sequence import RequestOutput, SamplingParams

__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]
