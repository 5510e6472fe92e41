"""Resumable trainer checkpoints with torch.distributed.checkpoint (DCP).

Layout under the save directory:
    latest                  name of the newest complete checkpoint (replaced atomically)
    step_00000012/          DCP shards of {"model", "optim"} + meta.json + trainer_state.pt
A save first writes `.tmp-step_N/`, then renames it and rewrites `latest`, so a crash mid-save leaves
the previous checkpoint loadable. DCP stores FQN-keyed (DTensor) shards, so a checkpoint written by
N ranks loads on M ranks. `meta.json` records the model shape; loading another model's checkpoint fails.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

if TYPE_CHECKING:
    from miles.trainer.trainer import Trainer

LATEST = "latest"
META = "meta.json"
STATE = "trainer_state.pt"
_MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size",
               "tie_word_embeddings")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this trainer's model."""


def model_signature(trainer: Trainer) -> dict:
    """Model identity stored in meta.json: config fields and every parameter's global shape."""
    c = trainer.model_config
    return {"config": {k: getattr(c, k) for k in _MODEL_KEYS},
            "params": {n: list(p.shape) for n, p in trainer.model.lm.named_parameters()}}


def save_checkpoint(trainer: Trainer, directory: str | Path) -> Path:
    """Collective: every rank writes its shards; rank 0 commits (rename + `latest`). Returns the step dir."""
    root = Path(directory)
    name = f"step_{trainer.step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank0:
        state = {"scheduler": trainer.scheduler.state_dict(), "step": trainer.step,
                 "skipped_steps": trainer.skipped_steps, "world_size": trainer.world_size,
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state() if trainer.device.type == "cuda" else None}
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps(model_signature(trainer), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / LATEST)
    dist.barrier()
    return final


def resolve_checkpoint(directory: str | Path) -> Path:
    """A step dir, or the one named by `<directory>/latest`."""
    p = Path(directory)
    if (p / LATEST).is_file():
        p = p / (p / LATEST).read_text().strip()
    if not (p / META).is_file() or not (p / STATE).is_file():
        raise FileNotFoundError(f"{p}: not a Miles trainer checkpoint (no {META}/{STATE}; "
                                f"pass the save directory holding `{LATEST}` or a step_* directory)")
    return p


def check_signature(trainer: Trainer, path: Path) -> None:
    """Raise CheckpointMismatchError naming the first differing config field or parameter."""
    saved = json.loads((path / META).read_text())
    mine = model_signature(trainer)
    for k, v in mine["config"].items():
        if saved["config"].get(k) != v:
            raise CheckpointMismatchError(f"{path} is a checkpoint of another model: {k} = {saved['config'].get(k)!r}"
                                          f" there, {v!r} in {trainer.model_path}")
    for n, shape in mine["params"].items():
        if saved["params"].get(n) != shape:
            raise CheckpointMismatchError(f"{path} is a checkpoint of another model: parameter {n} has shape "
                                          f"{saved['params'].get(n)} there, {shape} here")


def load_checkpoint(trainer: Trainer, directory: str | Path) -> int:
    """Collective: restore model, optimizer, scheduler, RNG and step (any number of ranks). Returns the step."""
    path = resolve_checkpoint(directory)
    check_signature(trainer, path)
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra = torch.load(path / STATE, weights_only=False)
    trainer.scheduler.load_state_dict(extra["scheduler"])
    trainer.step = int(extra["step"])
    trainer.skipped_steps = int(extra["skipped_steps"])
    torch.set_rng_state(extra["rng_cpu"])
    if extra.get("rng_cuda") is not None and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(extra["rng_cuda"])
    dist.barrier()
    return trainer.step
