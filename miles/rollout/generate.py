"""Default per-sample generate function: POST the router's SGLang-compatible `/generate`.

Signature as slime's: `async def generate(args, sample, sampling_params) -> Sample`.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

from miles.rollout.http import get_json, post_json, router_url
from miles.rollout.sample import Sample

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def get_tokenizer(args: Any) -> Any:
    """The tokenizer of `args.hf_checkpoint` (cached)."""
    path = getattr(args, "hf_checkpoint", None)
    if not path:
        raise ValueError("a tokenizer is needed to tokenize prompts: set --hf-checkpoint")
    return _tokenizer(path)


def default_sampling_params(args: Any, evaluation: bool = False) -> dict:
    """The sampling dict slime sends (train values, or eval overrides when `evaluation`)."""

    def pick(eval_name: str, train_name: str) -> Any:
        value = getattr(args, eval_name, None) if evaluation else None
        return getattr(args, train_name) if value is None else value

    return {
        "temperature": pick("eval_temperature", "rollout_temperature"),
        "top_p": pick("eval_top_p", "rollout_top_p"),
        "top_k": pick("eval_top_k", "rollout_top_k"),
        "max_new_tokens": pick("eval_max_response_len", "rollout_max_response_len"),
        "stop": getattr(args, "rollout_stop", None),
        "stop_token_ids": getattr(args, "rollout_stop_token_ids", None),
        "skip_special_tokens": getattr(args, "rollout_skip_special_tokens", False),
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }


def parse_generate_output(output: dict) -> tuple[list[int], list[float], str, dict]:
    """SGLang `/generate` reply → (token ids, log-probs, text, meta_info).

    Ids and log-probs come from `meta_info.output_token_logprobs` ([logprob, id, text] per token);
    without it, ids from `output_ids` and log-probs 0.0.
    """
    meta = output.get("meta_info") or {}
    lp = meta.get("output_token_logprobs")
    if lp is not None:
        ids = [int(x[1]) for x in lp]
        logprobs = [float(x[0]) if x[0] is not None else 0.0 for x in lp]
    else:
        ids = [int(t) for t in output.get("output_ids", [])]
        logprobs = [0.0] * len(ids)
    return ids, logprobs, output.get("text", "") or "", meta


async def call_generate(args: Any, input_ids: list[int], sampling_params: dict, headers: Any = None) -> dict:
    """One `/generate` request with log-probs; returns the reply object."""
    payload = {"input_ids": list(input_ids), "sampling_params": sampling_params, "return_logprob": True}
    if getattr(args, "use_rollout_routing_replay", False):
        payload["return_routed_experts"] = True
    return await post_json(
        router_url(args) + "/generate",
        payload,
        timeout=getattr(args, "rollout_request_timeout", 3600.0),
        retries=getattr(args, "rollout_request_retries", 3),
    )


async def generate(args: Any, sample: Sample, sampling_params: dict) -> Sample:
    """Generate (or continue, for a partial rollout) one sample's response through the router.

    Fills `tokens`, `response`, `response_length`, `rollout_log_probs`, `loss_mask`, `status`,
    `weight_versions`. A resumed ABORTED sample continues from its tokens with `max_new_tokens`
    reduced by what it already generated; if nothing is left it becomes TRUNCATED without a request.
    """
    if sample.status not in (Sample.Status.PENDING, Sample.Status.ABORTED):
        raise ValueError(f"generate: sample {sample.index} has status {sample.status}, expected PENDING or ABORTED")
    if not sample.tokens:
        if not isinstance(sample.prompt, str):
            raise ValueError(f"sample {sample.index}: prompt is a message list; use --apply-chat-template")
        sample.tokens = list(get_tokenizer(args)(sample.prompt, add_special_tokens=False)["input_ids"])
    params = copy.copy(sampling_params)
    max_new = params.get("max_new_tokens")
    if sample.response_length > 0:
        if getattr(args, "mask_offpolicy_in_partial_rollout", False):
            sample.loss_mask = [0] * sample.response_length
        if max_new is not None:
            params["max_new_tokens"] = max_new - sample.response_length
            if params["max_new_tokens"] <= 0:
                sample.status = Sample.Status.TRUNCATED
                return sample
    output = await call_generate(args, sample.tokens, params)
    ids, logprobs, text, meta = parse_generate_output(output)
    sample.append_response_tokens(ids, logprobs, trainable=True, text=text, meta_info=meta)
    set_routed_experts(sample, meta)
    if not meta.get("finish_reason"):
        sample.status = Sample.Status.COMPLETED
    return sample


def set_routed_experts(sample: Sample, meta: dict) -> None:
    """R3: decode `meta_info.routed_experts` (base64 int32) into `sample.rollout_routed_experts`.

    Shape `[len(tokens) - 1, num_layers * topk]` (one row per forwarded position; the trainer splits the
    second axis by its top-k). Each reply covers the whole sequence so far, so it replaces earlier turns'.
    """
    encoded = meta.get("routed_experts")
    if not encoded:
        return
    import base64

    import numpy as np

    flat = np.frombuffer(base64.b64decode(encoded), dtype="<i4")
    rows = len(sample.tokens) - 1
    sample.rollout_routed_experts = flat.reshape(rows, -1) if rows > 0 and flat.size % rows == 0 else flat


async def abort_all(args: Any) -> None:
    """POST `/abort_request {"abort_all": true}` to the router and to every worker it lists."""
    base = router_url(args)
    urls = [base]
    try:
        workers = await get_json(base + "/workers", timeout=10.0)
        urls += [w["url"].rstrip("/") for w in workers.get("workers", []) if w.get("url")]
    except Exception:  # router without /workers: the router's own abort must fan out
        pass
    for url in dict.fromkeys(urls):
        try:
            await post_json(url + "/abort_request", {"abort_all": True}, timeout=30.0, retries=1)
        except Exception as e:
            logger.warning("abort_request to %s failed: %s", url, e)
