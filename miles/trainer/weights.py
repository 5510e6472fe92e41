"""Full-weight access for weight sync and export, and device offload for colocation.

`iter_weight_buckets` is THE iterator every weight-sync transport consumes: it all-gathers one FSDP
parameter at a time (collective: every rank must iterate it to the end), maps it to HF names with the
models' one name mapping, and yields buckets of about `bucket_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from miles.models import hf_items_from_state_dict, save_model

if TYPE_CHECKING:
    from miles.trainer.trainer import Trainer


def full_parameters(trainer: Trainer, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """(miles_name, full tensor on the trainer device) per parameter, gathered one at a time (collective)."""
    for name, p in trainer.model.lm.named_parameters():
        if isinstance(p, DTensor):
            if p.device != trainer.device:  # CPU-offloaded shards: gather through the device
                p = p.to(trainer.device)
            t = p.full_tensor()
        else:
            t = p.to(trainer.device)
        yield name, t.detach().to(dtype) if dtype is not None else t.detach()


def iter_weight_buckets(trainer: Trainer, bucket_bytes: int, dtype: torch.dtype | None = None
                        ) -> Iterator[list[tuple[str, Tensor]]]:
    """Buckets of (hf_name, full tensor), each about bucket_bytes (a bigger tensor gets its own bucket)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    items = (item for name, full in full_parameters(trainer, dtype)
             for item in hf_items_from_state_dict(trainer.model_config, [(name, full)]))
    return bucketize(items, bucket_bytes)


def bucketize(items: Iterable[tuple[str, Tensor]], max_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Group (name, tensor) pairs into buckets of at most `max_bytes` (a larger tensor gets its own bucket)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def export_hf(trainer: Trainer, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Collective: gather full weights; rank 0 writes HF safetensors + config.json + tokenizer files."""
    out = Path(directory)
    rank0 = dist.get_rank() == 0
    state = {}
    for name, full in full_parameters(trainer, dtype):
        if rank0:
            state[name] = full.to("cpu", copy=True)
    if rank0:
        save_model(state, out, config=trainer.model_config, tokenizer_from=trainer.model_path)
    dist.barrier()
    return out


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, Tensor) and k != "step":
                state[k] = v.to(device, non_blocking=True)


def offload(trainer: Trainer) -> None:
    """Params and optimizer state to CPU, free cached device memory (a no-op move on CPU)."""
    if trainer.offloaded:
        return
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.device.type == "cuda" and not trainer.cfg.optimizer_cpu_offload:
        for m in (trainer.model, trainer.ref):
            if m is not None:
                m.to("cpu")
        _optimizer_to(trainer.optimizer, "cpu")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    trainer.offloaded = True


def onload(trainer: Trainer) -> None:
    """Undo `offload`."""
    if not trainer.offloaded:
        return
    if trainer.device.type == "cuda" and not trainer.cfg.optimizer_cpu_offload:
        trainer.model.to(trainer.device)
        if trainer.ref is not None and not trainer.cfg.ref_cpu_offload:
            trainer.ref.to(trainer.device)
        _optimizer_to(trainer.optimizer, trainer.device)
        torch.cuda.synchronize()
    trainer.offloaded = False
