"""`miles demo`: the embedded default -- GRPO on 2-3 digit addition, on CPU, in a few minutes.

Runs exactly what a user runs: ``miles train --config examples/addition/config.yaml`` (1 trainer process +
1 engine process on local Ray; the final policy is exported to ``<run dir>/final_hf``), then ``miles plot`` on
the run directory, and prints the held-out accuracy before and after training -- the run's own greedy eval,
plus a breakdown (exact match vs. right value in any style, e.g. "0357") of the start and final checkpoints.
Extra arguments after ``--`` go to ``miles train`` (e.g. ``--num-rollout 10``, ``--device cuda``).

    miles demo                          # full run, runs/demo-<time>/
    miles demo --run-dir DIR -- --num-rollout 5 --eval-interval 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "addition"


def _paths_argv(example: Path) -> list[str]:
    """The config's repo-relative paths, made absolute so the demo runs from any working directory."""
    return ["--hf-checkpoint", str(example / "checkpoint"), "--prompt-data", str(example / "data" / "train.jsonl"),
            "--eval-prompt-data", "heldout", str(example / "data" / "eval.jsonl")]


def summarize(run_dir: Path) -> dict:
    """Held-out accuracy of the first and last eval, reward of the first and last step, and step count."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("kind") == "eval" and "eval/heldout" in r]
    train = [r for r in records if r.get("kind", "train") == "train"]
    if not evals or not train:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no eval or train records")
    return {
        "steps": len(train),
        "heldout_before": evals[0]["eval/heldout"],
        "heldout_after": evals[-1]["eval/heldout"],
        "heldout_best": max(r["eval/heldout"] for r in evals),
        "updates_at_last_eval": evals[-1]["step"],
        "reward_first": train[0].get("rollout/reward_mean"),
        "reward_last": train[-1].get("rollout/reward_mean"),
    }


def breakdown(example: Path, checkpoints: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Greedy exact / value match on the held-out set for each checkpoint (example's evaluate.py, in-process)."""
    spec = importlib.util.spec_from_file_location("miles_example_evaluate", example / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.load_rows(example / "data" / "eval.jsonl")
    out = {}
    for name, path in checkpoints.items():
        exact, value = mod.accuracy(path, rows, 0.0, with_value=True)
        out[name] = {"exact": exact, "value": value}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="miles demo", description=__doc__.splitlines()[0],
                                 epilog="arguments after `--` go to `miles train`")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo-<time>")
    ap.add_argument("--example-dir", type=Path, default=EXAMPLE,
                    help="task directory (config.yaml, data/, checkpoint/)")
    args = ap.parse_args(argv)

    example = args.example_dir.resolve()
    config = example / "config.yaml"
    if not config.is_file() or not (example / "checkpoint" / "config.json").is_file():
        print(f"miles demo: {example} lacks config.yaml or checkpoint/ (run from a source checkout of Miles)",
              file=sys.stderr)
        return 2
    run_dir = (args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()

    from miles.cluster.cli import main as train_main
    from miles.plot import main as plot_main

    train_argv = ["--config", str(config), *_paths_argv(example), "--run-dir", str(run_dir),
                  "--save", str(run_dir / "checkpoints"), "--save-hf", str(run_dir / "final_hf"), *extra]
    print("miles demo: miles train " + " ".join(train_argv), flush=True)
    t0 = time.perf_counter()
    rc = train_main(train_argv)
    wall = time.perf_counter() - t0
    if rc:
        return rc
    rc = plot_main([str(run_dir)])
    if rc:
        return rc
    s = summarize(run_dir)
    b = breakdown(example, {"before": example / "checkpoint", "after": run_dir / "final_hf"})
    (run_dir / "demo_summary.json").write_text(json.dumps({**s, "wall_seconds": wall, "greedy": b}, indent=2) + "\n")
    print(f"\nmiles demo: {s['steps']} GRPO steps in {wall:.0f}s; held-out exact match (greedy, 500 unseen prompts): "
          f"{s['heldout_before']:.1%} -> {s['heldout_after']:.1%} (after {s['updates_at_last_eval']} updates); "
          f"train reward {s['reward_first']:.2f} -> {s['reward_last']:.2f}")
    print(f"miles demo: right value in any style (e.g. 0357): {b['before']['value']:.1%} -> {b['after']['value']:.1%}; "
          f"exact (canonical style): {b['before']['exact']:.1%} -> {b['after']['exact']:.1%}")
    print(f"miles demo: metrics {run_dir / 'metrics.jsonl'}, plots {run_dir / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
