"""`miles plot RUN_DIR` writes PNGs from metrics.jsonl."""

from __future__ import annotations

import json

from miles.cli import main as miles_main
from miles.plot import plot_run, read_metrics


def _write_run(run_dir):
    run_dir.mkdir()
    lines = [{"step": 0, "kind": "eval", "eval/gsm": 0.1, "eval/gsm-truncated_ratio": 0.0, "eval/gsm/pass@1": 0.1}]
    for s in range(5):
        lines.append({"step": s, "kind": "train", "rollout/reward_mean": 0.1 * s, "rollout/reward_std": 0.05,
                      "rollout/response_len_mean": 10 + s, "rollout/response_len_max": 20 + s,
                      "rollout/response_len_min": 5, "perf/rollout_seconds": 1.0, "perf/train_seconds": 2.0,
                      "perf/weight_sync_seconds": 0.1, "rollout/weight_versions": [str(s)]})
        if s % 2 == 1:
            lines.append({"step": s + 1, "kind": "eval", "eval/gsm": 0.1 + 0.1 * s, "eval/gsm-truncated_ratio": 0.0,
                          "eval/reward_errors": 0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")


def test_plot_writes_pngs(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    with open(run / "metrics.jsonl", "a") as fh:  # a resumed run re-logs step 3: the last record wins
        fh.write(json.dumps({"step": 3, "kind": "train", "rollout/reward_mean": 9.0}) + "\n")
    train, evals = read_metrics(run / "metrics.jsonl")
    assert len(train) == 5 and len(evals) == 3
    assert [r["step"] for r in train] == [0, 1, 2, 3, 4] and train[3]["rollout/reward_mean"] == 9.0
    paths = plot_run(run)
    names = sorted(p.name for p in paths)
    assert names == ["eval.png", "response_length.png", "reward.png", "timings.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plot_cli_and_errors(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run)
    assert miles_main(["plot", str(run)]) == 0
    assert "reward.png" in capsys.readouterr().out
    assert miles_main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    assert miles_main(["plot", str(run)]) == 2
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"kind": "train"}\n')
    assert miles_main(["plot", str(run)]) == 2
    assert "metrics.jsonl:2: expected an object with an integer 'step'" in capsys.readouterr().err
