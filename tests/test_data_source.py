import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miles.rollout.config import default_args
from miles.rollout.data import BadRowError, RolloutDataSourceWithBuffer
from miles.rollout.sample import Sample
from miles.testing import make_tokenizer

ROWS = [{"input": f"What is {i} plus {i}?", "label": str(2 * i), "metadata": {"i": i}} for i in range(10)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def args_for(path, **kw):
    base = dict(prompt_data=path, label_key="label", rollout_batch_size=2, n_samples_per_prompt=3)
    base.update(kw)
    return default_args(**base)


def test_jsonl_keys_groups_and_indices(tmp_path):
    src = RolloutDataSourceWithBuffer(args_for(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert len(src) == 10
    groups = src.get_samples(2)
    assert [len(g) for g in groups] == [3, 3]
    assert [s.index for g in groups for s in g] == [0, 1, 2, 3, 4, 5]
    assert [g[0].group_index for g in groups] == [0, 1]
    s = groups[1][2]
    assert s.prompt == "What is 1 plus 1?" and s.label == "2" and s.metadata["i"] == 1
    assert s.status is Sample.Status.PENDING
    groups[0][0].metadata["i"] = 99  # samples are deep copies, not shared
    assert groups[0][1].metadata["i"] == 0


def test_parquet_same_as_jsonl(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [{"q": r["input"], "a": int(r["label"])} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = RolloutDataSourceWithBuffer(args_for(str(path), input_key="q", label_key="a", n_samples_per_prompt=1))
    got = [(g[0].prompt, g[0].label) for g in src.get_samples(10)]
    assert got == [(r["input"], r["label"]) for r in ROWS]


def test_chat_template_with_tools_and_prompt_len_filter(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t['name'] }};{% endfor %}<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rows = [
        {"messages": [{"role": "user", "content": "add 2 and 3"}], "tools": [{"name": "calc"}]},
        {"messages": json.dumps([{"role": "user", "content": "hi"}])},  # JSON-encoded list (parquet style)
        {"messages": [{"role": "user", "content": "the quick brown fox " * 30}]},  # too long
    ]
    args = args_for(write_jsonl(tmp_path / "c.jsonl", rows), input_key="messages", label_key=None,
                    apply_chat_template=True, rollout_max_prompt_len=80, n_samples_per_prompt=1)
    src = RolloutDataSourceWithBuffer(args, tokenizer=tok)
    assert len(src) == 2 and src.counts["too_long"] == 1
    first, second = (g[0] for g in src.get_samples(2))
    assert first.prompt == (
        "<|im_start|>system\nTOOLS:calc;<|im_end|>\n<|im_start|>user\nadd 2 and 3<|im_end|>\n<|im_start|>assistant\n"
    )
    assert second.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert first.tokens == tok(first.prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(first.tokens) == first.prompt
    # the same via --hf-checkpoint (tokenizer loaded from the path)
    src2 = RolloutDataSourceWithBuffer(default_args(**{**vars(args), "hf_checkpoint": tok_dir}))
    assert src2.get_samples(1)[0][0].prompt.startswith("<|im_start|>user\nadd 2 and 3")  # default template: no tools


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)

    def order(seed, n):
        args = args_for(path, rollout_shuffle=True, rollout_seed=seed, n_samples_per_prompt=1)
        src = RolloutDataSourceWithBuffer(args)
        return [g[0].metadata["i"] for g in src.get_samples(n)]

    a, b, c = order(1, 20), order(1, 20), order(2, 20)
    assert a == b and a != c
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:]) == list(range(10))  # each epoch is a permutation
    assert a[:10] != a[10:]  # a new shuffle each epoch
    assert a[:10] != list(range(10))


def test_state_dict_resume_is_exact(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = args_for(path, rollout_shuffle=True, rollout_seed=7, n_samples_per_prompt=2)

    def key(groups):
        return [(s.index, s.group_index, s.prompt, s.response, s.status) for g in groups for s in g]

    ref = RolloutDataSourceWithBuffer(args)
    ref.get_samples(4)
    partial = ref.get_samples(1)
    partial[0][0].append_response_tokens([5, 6], [-0.1, -0.2], text="xy")
    partial[0][0].status = Sample.Status.ABORTED
    ref.add_samples(partial)
    state = ref.state_dict()
    expected = key(ref.get_samples(9))  # buffer first, then fresh prompts across the epoch boundary

    resumed = RolloutDataSourceWithBuffer(args)
    resumed.load_state_dict(json.loads(json.dumps(state, default=str)) | {"buffer": state["buffer"]})
    got = resumed.get_samples(9)
    assert key(got) == expected
    assert got[0][0].response == "xy" and got[0][0].rollout_log_probs == [-0.1, -0.2]
    assert resumed.epoch == 1


def test_save_load_hooks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = args_for(path, save=str(tmp_path / "ckpt"), load=str(tmp_path / "ckpt"))
    src = RolloutDataSourceWithBuffer(args)
    src.get_samples(3)
    src.save(5)
    assert (tmp_path / "ckpt" / "rollout" / "global_dataset_state_dict_5.pt").exists()
    other = RolloutDataSourceWithBuffer(args)
    other.load()  # newest
    assert (other.offset, other.sample_index) == (3, 9)
    assert other.get_samples(1)[0][0].prompt == src.get_samples(1)[0][0].prompt


def test_bad_rows_error_names_file_and_line(tmp_path):
    rows = [ROWS[0], "{not json", ROWS[1], {"label": "1"}, "", {"input": 5, "label": "1"}, ROWS[2]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadRowError, match=rf"{tmp_path}/bad.jsonl:2: bad prompt row: invalid JSON"):
        RolloutDataSourceWithBuffer(args_for(path))
    path2 = write_jsonl(tmp_path / "bad2.jsonl", [ROWS[0], {"label": "1"}])
    with pytest.raises(BadRowError, match=r"bad2.jsonl:2: .*missing --input-key field 'input'"):
        RolloutDataSourceWithBuffer(args_for(path2))
    path3 = write_jsonl(tmp_path / "bad3.jsonl", [ROWS[0], {"input": "x"}])
    with pytest.raises(BadRowError, match=r"bad3.jsonl:2: .*missing --label-key field 'label'"):
        RolloutDataSourceWithBuffer(args_for(path3))


def test_skip_bad_rows_counts(tmp_path):
    rows = [ROWS[0], "{not json", ROWS[1], {"label": "1"}, "", {"input": 5, "label": "1"}, "[1, 2]", ROWS[2]]
    src = RolloutDataSourceWithBuffer(args_for(write_jsonl(tmp_path / "bad.jsonl", rows), skip_bad_rows=True))
    assert src.counts["bad_rows"] == 4
    assert len(src) == 3
    assert [s.metadata["source_line"] for g in src.get_samples(3) for s in g[:1]] == [1, 3, 8]


def test_buffer_first_and_group_size_check(tmp_path):
    src = RolloutDataSourceWithBuffer(args_for(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    first = src.get_samples(2)
    src.add_samples([first[1]])
    src.add_samples([])  # empty lists are accepted
    assert src.get_buffer_length() == 1
    nxt = src.get_samples(2)
    assert nxt[0] is first[1] and nxt[1][0].group_index == 2
    assert src.get_buffer_length() == 0
    with pytest.raises(ValueError, match="expected --n-samples-per-prompt 3"):
        src.add_samples([first[0][:2]])
