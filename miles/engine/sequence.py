"""Per-request state: sampling parameters, the running `Sequence`, and the `RequestOutput` returned by steps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How one request is sampled. `temperature == 0` means greedy; `top_k <= 0` and `top_p == 1` disable them.

    `seed` makes the sample reproducible and independent of batch composition and preemption: the noise of
    the token at position p is a pure function of (seed, p). Unseeded requests draw a seed from the engine.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    return_routed_experts: bool = False
    no_stop_trim: bool = False  # keep the matched stop string in `text` (SGLang semantics)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What a step reports for one request. `logprobs[i]` is the log-prob of `output_ids[i]` (see sampler.py).

    `new_token_count` is how many tokens were appended since the previous report for this request (the new
    ones are `output_ids[-new_token_count:]`). While a request runs, `output_ids` / `logprobs` are live lists
    that later steps extend (no per-step copies): copy them to keep a snapshot.
    """

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    finished: bool
    weight_version: int
    routed_experts: list[list[list[int]]] | None = None  # [token][layer][k], prompt + output tokens
    new_token_count: int = 0
    text: str | None = None  # set when finished and the engine has a tokenizer
    matched_stop: int | str | None = None  # the stop token id or stop string that ended the request
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass(eq=False)
class Sequence:
    """One request being generated. `token_ids` = prompt + output; KV of the first `num_computed` tokens is cached."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    arrival: int = 0
    status: SeqStatus = SeqStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of this seq's full blocks
    num_computed: int = 0
    num_cached_prompt: int = 0
    num_preemptions: int = 0
    num_reported: int = 0
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    detok: Any = None  # IncrementalDetokenizer when stop strings are used
    routed_experts: list[Any] = field(default_factory=list)  # per computed token: [layers, k]
    bt_row: int = -1  # row of the model runner's device block table (CUDA-graph decode)
    bt_synced: int = 0  # block-table entries already copied to that row

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.out_ids

    @property
    def num_output(self) -> int:
        return len(self.out_ids)

    def append(self, token: int, logprob: float) -> None:
        self.token_ids.append(token)
        self.out_ids.append(token)
        self.logprobs.append(logprob)

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED
