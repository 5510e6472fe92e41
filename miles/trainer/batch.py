"""`TrainSample`: the trainer's input record, and its validation.

A training batch (`TrainBatch`) is the *whole* rollout batch — a list of `TrainSample` in rollout order —
passed identically to every rank; each rank trains its own token-balanced share (see packing.py).

Per sample:
    tokens             prompt ids + response ids (the response is the last `response_length` tokens)
    response_length    >= 1, and at least one prompt token before it
    loss_mask          0/1 per response token (None = all ones); must have at least one 1
    reward             scalar reward (the trainer computes advantages from it), or
    advantages         precomputed per-response-token advantages (then no estimator runs)
    rollout_log_probs  the engine's log-probs per response token (needed by --use-tis,
                       --use-rollout-logprobs and the train/rollout mismatch metric)
    ref_log_probs      reference log-probs per response token (else the trainer computes them when needed)
    group_index        prompt group (GRPO statistics); None = consecutive chunks of n_samples_per_prompt
    remove_sample      slime's flag: the sample still counts in its group's reward statistics and in the
                       per-sample normaliser, but trains no token (its loss mask may be all zeros)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class TrainSample:
    tokens: list[int]
    response_length: int
    loss_mask: list[int] | None = None
    reward: float | None = None
    advantages: list[float] | None = None
    rollout_log_probs: list[float] | None = None
    ref_log_probs: list[float] | None = None
    group_index: int | None = None
    remove_sample: bool = False

    def mask_tensor(self) -> Tensor:
        if self.remove_sample:
            return torch.zeros(self.response_length, dtype=torch.float32)
        if self.loss_mask is None:
            return torch.ones(self.response_length, dtype=torch.float32)
        return torch.as_tensor(self.loss_mask, dtype=torch.float32)


TrainBatch = list[TrainSample]
_FIELDS = [f.name for f in fields(TrainSample)]


class BatchError(ValueError):
    """A malformed training batch; the message names the sample index and field."""


def as_train_sample(x: Any) -> TrainSample:
    """TrainSample from a TrainSample, a mapping, or any object with the same attribute names (rollout Sample)."""
    if isinstance(x, TrainSample):
        return x
    get = x.get if isinstance(x, Mapping) else (lambda k, d=None: getattr(x, k, d))
    kw = {k: get(k, None) for k in _FIELDS}
    kw["remove_sample"] = bool(kw["remove_sample"])
    return TrainSample(**kw)


def validate_batch(batch: Sequence[Any], vocab_size: int, n_samples_per_prompt: int = 1, *,
                   need_reward: bool = True, need_rollout_logprobs: bool = False) -> TrainBatch:
    """Convert and check every sample; raise BatchError naming the first bad sample and field."""
    if len(batch) == 0:
        raise BatchError("empty training batch")
    samples = [as_train_sample(x) for x in batch]
    if all(s.remove_sample for s in samples):
        raise BatchError("every sample of the batch has remove_sample set: nothing to train")
    have_adv = [s.advantages is not None for s in samples]
    if any(have_adv) and not all(have_adv):
        raise BatchError(f"sample {have_adv.index(not have_adv[0])}: either every sample carries advantages or none")
    for i, s in enumerate(samples):
        where = f"sample {i}"
        if not isinstance(s.tokens, (list, tuple, Tensor)) or len(s.tokens) == 0:
            raise BatchError(f"{where}: tokens must be a non-empty list of token ids")
        n, r = len(s.tokens), s.response_length
        if not isinstance(r, int) or r < 1:
            raise BatchError(f"{where}: response_length must be an int >= 1, got {r!r}")
        if r >= n:
            raise BatchError(f"{where}: response_length {r} leaves no prompt token in {n} tokens")
        toks = torch.as_tensor(s.tokens)
        if toks.dtype.is_floating_point or int(toks.min()) < 0 or int(toks.max()) >= vocab_size:
            raise BatchError(f"{where}: token ids must be integers in [0, {vocab_size}) (model vocab size)")
        for name in ("loss_mask", "advantages", "rollout_log_probs", "ref_log_probs"):
            v = getattr(s, name)
            if v is not None and len(v) != r:
                raise BatchError(f"{where}: {name} has {len(v)} entries but response_length is {r}")
        if s.loss_mask is not None:
            m = torch.as_tensor(s.loss_mask)
            if not bool(((m == 0) | (m == 1)).all()):
                raise BatchError(f"{where}: loss_mask must contain only 0/1")
            if int(m.sum()) == 0 and not s.remove_sample:
                raise BatchError(f"{where}: loss_mask is empty (all zeros); drop the sample or set remove_sample")
        if need_reward and s.advantages is None:
            if s.reward is None or isinstance(s.reward, Mapping):
                raise BatchError(f"{where}: reward must be a number (select dict rewards with --reward-key), "
                                 f"got {s.reward!r}")
            if not math.isfinite(float(s.reward)):
                raise BatchError(f"{where}: reward is not finite ({s.reward})")
        if need_rollout_logprobs and s.rollout_log_probs is None:
            raise BatchError(f"{where}: rollout_log_probs missing (needed by --use-tis / --use-rollout-logprobs)")
        if s.group_index is None:
            s.group_index = i // max(n_samples_per_prompt, 1)
    return samples
