"""Loop checkpoints: `<save>/iter_XXXXXXX/{trainer/, loop_state.pt}` plus a `latest` pointer.

`loop_state.pt` holds what the driver owns: the next rollout id, the data source state (cursor,
shuffle state, partial-rollout buffer), the driver RNG states and the weight version. A directory is
written under a temporary name and renamed, and `latest` is replaced last, so a kill mid-save leaves
the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def data_source_state(data_source: Any, rollout_id: int) -> Any:
    """The data source's state dict (or None when it saves itself slime-style via `save(rollout_id)`)."""
    if data_source is None:
        return None
    if hasattr(data_source, "state_dict"):
        return data_source.state_dict()
    if hasattr(data_source, "save"):
        data_source.save(rollout_id)
    return None


def restore_data_source(data_source: Any, state: Any, rollout_id: int) -> None:
    if data_source is None:
        return
    if state is not None and hasattr(data_source, "load_state_dict"):
        data_source.load_state_dict(state)
    elif hasattr(data_source, "load"):
        data_source.load(rollout_id)


def begin_save(save_dir: str, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step` (finish with `commit_save`)."""
    tmp = Path(save_dir) / f".tmp_{iter_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_save(save_dir: str, step: int, tmp: Path, loop_state: dict) -> Path:
    """Write loop_state.pt, rename the directory into place and point `latest` at it."""
    torch.save(loop_state, tmp / "loop_state.pt")
    final = Path(save_dir) / iter_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = Path(save_dir) / (LATEST + ".tmp")
    pointer.write_text(iter_name(step) + "\n")
    os.replace(pointer, Path(save_dir) / LATEST)
    return final


def latest_checkpoint(load_dir: str) -> Path:
    """The directory `latest` points at (or `load_dir` itself if it is an iter_ directory)."""
    base = Path(load_dir)
    if (base / "loop_state.pt").exists():
        return base
    pointer = base / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"--load {load_dir}: no '{LATEST}' pointer and no loop_state.pt (not a checkpoint)")
    path = base / pointer.read_text().strip()
    if not (path / "loop_state.pt").exists():
        raise FileNotFoundError(f"--load {load_dir}: {path} has no loop_state.pt (incomplete checkpoint)")
    return path


def load_loop_state(path: Path) -> dict:
    return torch.load(path / "loop_state.pt", weights_only=False)
