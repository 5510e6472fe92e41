"""`miles generate` end to end on CPU: happy path with all row kinds, and bad rows failing before generation."""

from __future__ import annotations

import json

import pytest

from miles.cli import main as miles_main
from miles.engine import EngineConfig, LLMEngine, SamplingParams
from miles.testing import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "m", "qwen3")


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_generate_happy_path(ckpt, tmp_path, capsys):
    rows = [json.dumps({"prompt": "The quick brown fox"}),
            "",
            json.dumps({"messages": [{"role": "user", "content": "What is 2 + 3?"}]}),
            json.dumps({"input_ids": [5, 6, 7, 8, 9]})]
    inp, out = write(tmp_path / "in.jsonl", rows), tmp_path / "out" / "out.jsonl"
    args = ["generate", "--model", str(ckpt), "--prompts", str(inp), "--output", str(out), "--n", "2",
            "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3", "--ignore-eos"]
    assert miles_main(args) == 0
    res = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in res] == [(i, j) for i in range(3) for j in range(2)]
    for r in res:
        assert set(r) == {"index", "sample", "output_ids", "text", "logprobs", "finish_reason"}
        assert len(r["output_ids"]) == len(r["logprobs"]) == 6 and r["finish_reason"] == "length"
        assert all(lp <= 0 for lp in r["logprobs"]) and isinstance(r["text"], str)
    assert "generate" in capsys.readouterr().err  # progress bar on stderr
    # the same run again is identical (seeded), and --apply-chat-template matches the engine's own result
    out2 = tmp_path / "out2.jsonl"
    assert miles_main(args[:6] + [str(out2)] + args[7:]) == 0
    assert out2.read_text() == out.read_text()
    engine = LLMEngine(EngineConfig(str(ckpt), block_size=16))
    tok = engine.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    want = engine.generate([list(chat)], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))[0]
    inp3, out3 = write(tmp_path / "chat.jsonl", [json.dumps({"prompt": "Hi there"})]), tmp_path / "o3.jsonl"
    assert miles_main(["generate", "--model", str(ckpt), "--prompts", str(inp3), "--output", str(out3),
                       "--apply-chat-template", "--temperature", "0", "--max-new-tokens", "5", "--ignore-eos",
                       "--no-progress"]) == 0
    assert json.loads(out3.read_text())["output_ids"] == want.output_ids


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"text": "hi"}), "no usable field"),
        (json.dumps({"input_ids": [1, "a"]}), "'input_ids' must be a non-empty list of integers"),
        (json.dumps({"input_ids": [1, 10**6]}), "outside the vocabulary"),
        (json.dumps({"messages": [{"role": "user"}]}), "'messages' must be"),
        (json.dumps({"prompt": "hello " * 600}), "longer than the context"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_generate_bad_row_fails_with_file_and_line(ckpt, tmp_path, capsys, bad, msg):
    inp = write(tmp_path / "in.jsonl", [json.dumps({"prompt": "fine"}), bad, json.dumps({"prompt": "also fine"})])
    out = tmp_path / "out.jsonl"
    rc = miles_main(["generate", "--model", str(ckpt), "--prompts", str(inp), "--output", str(out),
                     "--max-model-len", "256"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{inp}:2:" in err and msg in err
    assert not out.exists()  # nothing generated
