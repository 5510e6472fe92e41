"""Metrics sinks (`<run dir>/metrics.jsonl`, tensorboard, wandb) and the console progress display."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if hasattr(v, "item"):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            return v.tolist()
    return str(v)


class MetricsLogger:
    """One JSON line per step in metrics.jsonl (`{"step": rollout_id, ...}`), mirrored to tensorboard/wandb."""

    def __init__(self, args: Any):
        self.run_dir = Path(args.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if getattr(args, "use_tensorboard", False):
            from torch.utils.tensorboard import SummaryWriter

            sub = [p for p in (args.tb_project_name, args.tb_experiment_name) if p]
            self.tb = SummaryWriter(str(self.run_dir.joinpath("tensorboard", *sub)))
        if getattr(args, "use_wandb", False):
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--use-wandb needs `pip install wandb`") from e
            self.wandb = wandb.init(
                project=args.wandb_project, group=args.wandb_group, entity=args.wandb_team, dir=args.wandb_dir,
                id=args.wandb_run_id, mode=args.wandb_mode, resume="allow", config=vars(args),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """Per-phase console progress (rich) for the steps of a run; plain log lines without a terminal."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self._progress = None
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting", total=total, completed=start)

    @contextmanager
    def phase(self, name: str, step: int):
        t0 = time.perf_counter()
        if self._progress is not None:
            self._progress.update(self._task, description=f"step {step}: {name}")
        else:
            logger.info("step %d/%d: %s ...", step, self.total, name)
        yield
        if self._progress is None:
            logger.info("step %d/%d: %s done in %.2fs", step, self.total, name, time.perf_counter() - t0)

    def advance(self, summary: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1)
            if summary:
                self._progress.console.log(summary)
        elif summary:
            logger.info("%s", summary)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
