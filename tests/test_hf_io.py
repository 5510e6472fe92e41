import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from miles.models import (
    CheckpointError,
    ConfigError,
    ModelConfig,
    VarlenAttention,
    hf_items,
    hf_items_from_state_dict,
    load_hf_items,
    load_model,
    load_tokenizer,
    save_model,
)
from miles.testing import ARCHS, make_checkpoint


def _all_tensors(path):
    idx = path / "model.safetensors.index.json"
    files = set(json.loads(idx.read_text())["weight_map"].values()) if idx.exists() else {"model.safetensors"}
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", seed=4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_bitwise_and_transformers_loads_it(tmp_path, arch):
    src = make_checkpoint(tmp_path / "src", arch, tie_word_embeddings=arch == "llama")
    model = load_model(src)
    out = save_model(model, tmp_path / "out", tokenizer_from=src)
    a, b = _all_tensors(src), _all_tensors(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = load_model(out)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_sd = {k: v for k, v in hf.state_dict().items()}
    ours = dict(hf_items(model))
    for name, t in ours.items():  # per-expert HF names -> transformers' internal stacked params
        if ".experts." in name:
            continue
        assert torch.equal(hf_sd[name], t), name
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            pre = f"model.layers.{i}.mlp.experts"
            assert torch.equal(hf_sd[f"{pre}.gate_up_proj"], layer.mlp.experts.gate_up_proj)
            assert torch.equal(hf_sd[f"{pre}.down_proj"], layer.mlp.experts.down_proj)
    assert load_tokenizer(out).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")


def test_sharded_checkpoint_loads_and_saves(tmp_path, moe):
    sharded = make_checkpoint(tmp_path / "sh", "qwen3_moe", seed=4, max_shard_size="30KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    a, b = load_model(moe), load_model(sharded)
    for (n1, t1), (_, t2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(t1, t2), n1
    out = save_model(b, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert index["weight_map"].keys() == _all_tensors(moe).keys()
    c = load_model(out)
    assert all(torch.equal(t1, t2) for t1, t2 in zip(b.state_dict().values(), c.state_dict().values()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(hf.state_dict()["model.layers.1.mlp.experts.down_proj"], c.model.layers[1].mlp.experts.down_proj)


def test_fused_expert_layout_accepted(tmp_path, moe):
    model = load_model(moe)
    tensors = _all_tensors(moe)
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(2):
        pre = f"model.layers.{i}.mlp.experts"
        gate_up = [[tensors[f"{pre}.{e}.{k}_proj.weight"] for k in ("gate", "up")] for e in range(8)]
        fused[f"{pre}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in gate_up])
        fused[f"{pre}.down_proj"] = torch.stack([tensors[f"{pre}.{e}.down_proj.weight"] for e in range(8)])
    d = tmp_path / "fused"
    d.mkdir()
    (d / "config.json").write_text((moe / "config.json").read_text())
    save_file(fused, str(d / "model.safetensors"))
    other = load_model(d)
    assert all(torch.equal(t1, t2) for t1, t2 in zip(model.state_dict().values(), other.state_dict().values()))


def test_dtype_and_state_dict_mapping(tmp_path, moe):
    model = load_model(moe, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    h = model(torch.tensor([3, 4, 5]), torch.arange(3), VarlenAttention([0, 3]))
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()
    # the trainer's path: full tensors under Miles names -> HF names, no module needed
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    via_sd = dict(hf_items_from_state_dict(model.config, sd))
    via_model = dict(hf_items(model))
    assert via_sd.keys() == via_model.keys()
    assert all(torch.equal(via_sd[k], via_model[k]) for k in via_sd)
    assert via_sd["model.layers.0.mlp.experts.3.up_proj.weight"].shape == (32, 64)
    out = save_model(sd, tmp_path / "from_sd", config=model.config)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.7.down_proj.weight").dtype == torch.bfloat16


def test_load_hf_items_partial_and_strict(moe):
    src, dst = load_model(moe), load_model(make_checkpoint_like(moe))
    items = list(hf_items(src))
    first, rest = items[:10], items[10:]
    loaded = load_hf_items(dst, first)  # a weight-sync bucket
    assert loaded == {n for n, _ in first}
    with pytest.raises(KeyError, match="missing tensors"):
        load_hf_items(dst, first, strict=True)
    load_hf_items(dst, rest)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts.8.up_proj.weight"):
        load_hf_items(dst, [("model.layers.0.mlp.experts.8.up_proj.weight", torch.zeros(32, 64))])
    with pytest.raises(ValueError, match=r"model.norm.weight.*\[63\].*\[64\]"):
        load_hf_items(dst, [("model.norm.weight", torch.zeros(63))])
    with pytest.raises(ValueError, match="more than once|duplicates"):
        load_hf_items(dst, [items[0], items[0]])


def make_checkpoint_like(path):
    return make_checkpoint(path.parent / (path.name + "_other"), "qwen3_moe", seed=99)


# ---- bad input ----------------------------------------------------------------------------------------------------


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_arch_and_missing_field(tmp_path):
    p = make_checkpoint(tmp_path / "a", "qwen3")
    _edit_config(p, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config.json.*unsupported model_type 'gpt2'"):
        load_model(p)
    _edit_config(p, model_type="qwen3", architectures=["Qwen3ForSequenceClassification"])
    with pytest.raises(ConfigError, match=r"config.json.*unsupported architectures.*Qwen3ForSequenceClassification"):
        load_model(p)
    _edit_config(p, architectures=["Qwen3ForCausalLM"], hidden_size=None)
    with pytest.raises(ConfigError, match=r"config.json: missing required field 'hidden_size'"):
        load_model(p)
    m = make_checkpoint(tmp_path / "m", "qwen3_moe")
    _edit_config(m, num_local_experts=None, num_experts=None)
    with pytest.raises(ConfigError, match=r"missing required field 'num_experts'"):
        load_model(m)
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_pretrained(tmp_path / "nowhere")


def test_missing_and_truncated_shard(tmp_path):
    p = make_checkpoint(tmp_path / "s", "qwen3", max_shard_size="30KB")
    shards = sorted(p.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shards[1].name + ".*truncated"):
        load_model(p)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[1].name} is missing"):
        load_model(p)


def test_wrong_shape_missing_and_unexpected_tensor(tmp_path):
    p = make_checkpoint(tmp_path / "w", "qwen3_moe")
    tensors = load_file(p / "model.safetensors")
    bad = dict(tensors)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(bad, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_model(p)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.0.mlp.experts.5.gate_proj.weight"}
    save_file(missing, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.0.mlp.experts.5.gate_proj.weight'\]"):
        load_model(p)
    extra = dict(tensors, **{"model.layers.9.mlp.gate.weight": torch.zeros(8, 64)})
    save_file(extra, str(p / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.9.mlp.gate.weight'"):
        load_model(p)
    (p / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(p)
