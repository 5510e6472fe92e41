import json

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from miles.testing import ARCHS, make_checkpoint, make_tokenizer


def test_tokenizer_roundtrip_and_chat_template(tmp_path):
    make_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert 400 <= len(tok) <= 600
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    text = "What is 12 + 7? The answer is \\boxed{19}."
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok("<|im_start|>user")["input_ids"][0] == im_start
    # deterministic training
    assert make_tokenizer(None).get_vocab() == tok.get_vocab()


def test_checkpoints_all_archs(tmp_path):
    for arch in ARCHS:
        p = make_checkpoint(tmp_path / arch, arch, tie_word_embeddings=arch == "qwen2")
        cfg = AutoConfig.from_pretrained(p)
        tok = AutoTokenizer.from_pretrained(p)
        assert cfg.model_type == arch and cfg.vocab_size == len(tok)
        with safe_open(p / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            emb = f.get_tensor("model.embed_tokens.weight")
        assert emb.shape == (len(tok), 64) and 0.005 < emb.std() < 0.05
        assert ("lm_head.weight" in keys) == (arch != "qwen2")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"


def test_checkpoint_seed_dtype_and_shards(tmp_path):
    a = make_checkpoint(tmp_path / "a", "qwen3_moe", seed=1, dtype=torch.bfloat16, max_shard_size="40KB")
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    name = "model.layers.0.mlp.gate.weight"
    with safe_open(a / index["weight_map"][name], "pt") as f:
        t = f.get_tensor(name)
    assert t.dtype == torch.bfloat16
    b = make_checkpoint(tmp_path / "b", "qwen3", seed=2, num_hidden_layers=3)
    assert AutoConfig.from_pretrained(b).num_hidden_layers == 3
