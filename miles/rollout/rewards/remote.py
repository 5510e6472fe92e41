"""`--rm-type remote`: POST `{prompt, response, label}` to `--rm-url`; the JSON reply is the reward."""

from __future__ import annotations

from typing import Any

from miles.rollout.http import post_json
from miles.rollout.sample import Sample


async def remote_rm(args: Any, sample: Sample) -> Any:
    if not getattr(args, "rm_url", None):
        raise ValueError("--rm-type remote needs --rm-url")
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    return await post_json(
        args.rm_url,
        payload,
        timeout=getattr(args, "rm_timeout", 60.0),
        retries=getattr(args, "rm_max_retries", 10),
        backoff=getattr(args, "rm_retry_backoff", 0.5),
        max_backoff=10.0,
        trust_env=True,
    )
