"""`miles plot RUN_DIR`: PNG plots of a run's metrics.jsonl (reward, eval accuracy, response length, timings).

Writes `<RUN_DIR>/plots/{reward,eval,response_length,timings}.png` (those with data), using matplotlib's
Agg backend (no display needed). Train records are plotted against their step (rollout id), eval records
against the number of weight updates done when they were measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl, sorted by step; a bad line is an error naming file and
    line. A step logged twice (a run resumed from an earlier checkpoint into the same directory) keeps its last
    record."""
    latest: dict[tuple[str, int], dict] = {}
    with open(path) as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError(f"{path}:{i}: expected an object with an integer 'step'")
            latest[(rec.get("kind", "train"), rec["step"])] = rec
    records = [latest[k] for k in sorted(latest, key=lambda k: k[1])]
    return [r for r in records if r.get("kind", "train") != "eval"], [r for r in records if r.get("kind") == "eval"]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _plot(out: Path, title: str, xlabel: str, curves: list[tuple[str, list[float], list[float]]],
          band: tuple[list[float], list[float], list[float]] | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if band is not None and band[0]:
        ax.fill_between(band[0], band[1], band[2], alpha=0.2)
    for label, xs, ys in curves:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs for `run_dir`; returns their paths."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a `miles train` run directory?)")
    train, evals = read_metrics(path)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    mean = _series(train, "rollout/reward_mean")
    std = _series(train, "rollout/reward_std")
    band = None
    if std[0] and len(std[0]) == len(mean[0]):
        band = (mean[0], [m - s for m, s in zip(mean[1], std[1])], [m + s for m, s in zip(mean[1], std[1])])
    written.append(_plot(out_dir / "reward.png", "training reward (mean ± std)", "step",
                         [("reward", *mean)], band))

    # a dataset's score is `eval/<name>`, logged with `eval/<name>-truncated_ratio`
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and f"{k}-truncated_ratio" in r})
    written.append(_plot(out_dir / "eval.png", "held-out eval (mean reward)", "weight updates",
                         [(k.removeprefix("eval/"), *_series(evals, k)) for k in eval_keys]))

    written.append(_plot(out_dir / "response_length.png", "response length", "step",
                         [(k.rsplit("_", 1)[-1], *_series(train, f"rollout/response_len_{k}"))
                          for k in ("mean", "max", "min")]))

    timing_keys = sorted({k for r in train for k in r if k.startswith("perf/") and k.endswith("_seconds")})
    written.append(_plot(out_dir / "timings.png", "phase timings (s)", "step",
                         [(k.removeprefix("perf/").removesuffix("_seconds"), *_series(train, k)) for k in timing_keys]))
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="miles plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a `miles train` run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"miles plot: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
