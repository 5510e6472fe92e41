"""`Sample`: one prompt/response trajectory, with slime's field names and statuses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


@dataclass
class Sample:
    """One trajectory. Field names and semantics follow slime's `slime.utils.types.Sample`.

    `tokens` holds prompt ids followed by response ids; the last `response_length` of them are the
    response. `loss_mask` and `rollout_log_probs` (when set) have exactly `response_length` entries.
    """

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    group_index: int | None = None
    index: int | None = None
    rollout_id: int | None = None
    prompt: str | list[dict] = ""
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    rollout_routed_experts: Any = None
    remove_sample: bool = False
    teacher_log_probs: list[float] | None = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    generate_function_path: str | None = None
    custom_rm_path: str | None = None
    train_metadata: dict | None = None
    apply_chat_template_kwargs: dict = field(default_factory=dict)
    session_id: str | None = None
    non_generation_time: float = 0.0

    # ---- derived values -------------------------------------------------------------------
    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def effective_response_length(self) -> int:
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def get_reward_value(self, args: Any, key: str | None = None) -> float:
        """The scalar reward: `reward[key]` for dict rewards (key defaults to `args.reward_key`)."""
        if key is None:
            key = getattr(args, "reward_key", None)
        if isinstance(self.reward, dict):
            if key is None:
                raise ValueError(f"sample {self.index}: reward is a dict {sorted(self.reward)}; set --reward-key")
            if key not in self.reward:
                raise KeyError(f"sample {self.index}: --reward-key {key!r} not in reward keys {sorted(self.reward)}")
            return float(self.reward[key])
        if self.reward is None:
            raise ValueError(f"sample {self.index}: reward is None")
        return float(self.reward)

    # ---- building a response --------------------------------------------------------------
    def append_response_tokens(
        self,
        tokens: list[int],
        log_probs: list[float] | None = None,
        trainable: bool = True,
        text: str | None = None,
        meta_info: dict | None = None,
    ) -> None:
        """Append response tokens keeping `tokens`, `loss_mask`, `rollout_log_probs` aligned.

        Non-trainable tokens (tool/environment output) get loss mask 0 and log-prob 0.0.
        `meta_info` (an SGLang `/generate` meta_info) updates status and weight_versions.
        """
        n = len(tokens)
        if log_probs is None:
            log_probs = [0.0] * n
        if len(log_probs) != n:
            raise ValueError(f"append_response_tokens: {n} tokens but {len(log_probs)} log-probs")
        if self.loss_mask is None:
            self.loss_mask = [1] * self.response_length
        if self.rollout_log_probs is None:
            self.rollout_log_probs = [0.0] * self.response_length
        self.tokens = list(self.tokens) + list(tokens)
        self.response_length += n
        self.loss_mask = list(self.loss_mask) + [1 if trainable else 0] * n
        self.rollout_log_probs = list(self.rollout_log_probs) + [float(x) for x in log_probs]
        if text is not None:
            self.response += text
        if meta_info is not None:
            self.update_from_meta_info(meta_info)

    def update_from_meta_info(self, meta_info: dict) -> None:
        """Apply an SGLang `meta_info`: finish_reason → status, weight_version → weight_versions."""
        version = meta_info.get("weight_version")
        if version is not None:
            self.weight_versions.append(str(version))
        finish = meta_info.get("finish_reason")
        if finish:
            self.status = status_from_finish_reason(finish)

    # ---- (de)serialization ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict (status as its string value); inverse of `from_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update({k: v for k, v in self.__dict__.items() if k not in out})
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Sample:
        data = dict(data)
        status = data.pop("status", cls.Status.PENDING)
        names = {f.name for f in dataclasses.fields(cls)}
        sample = cls(**{k: v for k, v in data.items() if k in names})
        sample.status = status if isinstance(status, cls.Status) else cls.Status(status)
        for k, v in data.items():  # unknown keys become attributes, as in slime
            if k not in names:
                setattr(sample, k, v)
        return sample


def status_from_finish_reason(finish_reason: dict | str) -> Sample.Status:
    """Map SGLang `finish_reason.type` to a status: stop→COMPLETED, length→TRUNCATED, abort→ABORTED."""
    kind = finish_reason.get("type") if isinstance(finish_reason, dict) else finish_reason
    return {
        "stop": Sample.Status.COMPLETED,
        "length": Sample.Status.TRUNCATED,
        "abort": Sample.Status.ABORTED,
    }.get(kind, Sample.Status.FAILED)
