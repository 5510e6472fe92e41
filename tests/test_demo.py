"""The embedded default (`miles demo` on examples/addition): data, tokenizer, committed checkpoint, and a short
end-to-end run through `miles train` + `miles plot` (the full learning claim is measured by the run itself and
recorded in examples/addition/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "addition"
sys.path.insert(0, str(EX))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def test_data_regenerates_identically(tmp_path):
    from make_data import main

    main(["--out", str(tmp_path)])
    for name in ("data/train.jsonl", "data/eval.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (EX / name).read_bytes(), name


def test_splits_are_disjoint_and_labels_correct():
    from make_data import splits

    s = splits(n_sft=2000)
    sets = {k: set(v) for k, v in s.items()}
    assert [len(sets[k]) for k in ("eval", "train", "dev", "sft")] == [500, 4096, 200, 2000]
    for a in sets:
        for b in sets:
            assert a == b or not sets[a] & sets[b], (a, b)
    rows = [json.loads(line) for line in (EX / "data" / "eval.jsonl").read_text().splitlines()]
    for r in rows:
        x, y = r["prompt"].rstrip("=").split("+")
        assert r["prompt"].endswith("=") and int(x) + int(y) == int(r["label"]) and 10 <= int(x) <= 999


def test_character_tokenizer_roundtrip():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(EX / "checkpoint"))
    ids = tok.encode("12+345=", add_special_tokens=False)
    assert len(ids) == 7 and tok.decode(ids) == "12+345="
    answer = tok.encode("357", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(answer, skip_special_tokens=True) == "357" and tok.decode(answer) == "357<eos>"
    chat = tok.apply_chat_template([{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}],
                                   tokenize=False)
    assert chat == "1+2=3<eos>"


def test_committed_checkpoint_is_small_and_partly_right():
    from evaluate import accuracy, load_rows

    size = sum(f.stat().st_size for f in (EX / "checkpoint").iterdir())
    assert size <= 3_000_000
    rows = load_rows(EX / "data" / "eval.jsonl")[:200]
    exact, value = accuracy(EX / "checkpoint", rows, 0.0, with_value=True)
    # knows many sums, but often writes them in the zero-padded style the exact-match reward rejects
    assert 0.2 <= exact <= 0.7 and value >= exact + 0.15, (exact, value)


@pytest.mark.slow
def test_make_checkpoint_is_deterministic(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"ck{i}"
        subprocess.run([sys.executable, str(EX / "make_checkpoint.py"), "--out", str(out), "--steps", "3",
                        "--batch-size", "16", "--check-every", "3"], check=True, env=_env(), timeout=300,
                       capture_output=True)
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_demo_short_run(tmp_path):
    """`miles demo` for 3 GRPO steps on fewer prompts: metrics, plots, sane reward statistics, summary."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "miles.cli", "demo", "--run-dir", str(run), "--",
           "--num-rollout", "3", "--rollout-batch-size", "8", "--eval-interval", "3", "--no-progress",
           "--phase-timeout", "240", "--engine-startup-timeout", "240"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), timeout=540, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out exact match" in proc.stdout

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [0, 1, 2] and [r["step"] for r in evals] == [0, 3]
    for r in train:
        assert r["rollout/num_samples"] == 64
        assert 0.0 <= r["rollout/reward_min"] <= r["rollout/reward_mean"] <= r["rollout/reward_max"] <= 1.0
        assert r["rollout/response_len_max"] <= 6 and r["weight_sync/version"] == r["step"] + 1
        assert r["train/train_rollout_logprob_abs_diff"] < 1e-3
    # the starting checkpoint is partly right: rewards vary inside groups, so GRPO has signal
    assert any(r["rollout/reward_std"] > 0.1 for r in train)
    assert 0.05 < sum(r["rollout/reward_mean"] for r in train) / 3 < 0.95
    assert all(0.0 <= r["eval/heldout"] <= 1.0 for r in evals)
    assert 0.2 <= evals[0]["eval/heldout"] <= 0.7

    plots = {p.name for p in (run / "plots").glob("*.png")}
    assert {"reward.png", "eval.png", "response_length.png", "timings.png"} <= plots
    assert all((run / "plots" / p).stat().st_size > 5000 for p in plots)
    summary = json.loads((run / "demo_summary.json").read_text())
    assert summary["steps"] == 3 and summary["heldout_before"] == evals[0]["eval/heldout"]
