import pytest
import torch
import transformers

from miles.models import CausalLM, ModelConfig, RoutingCapture, VarlenAttention, load_model
from miles.testing import ARCHS, make_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    out = {arch: make_checkpoint(root / arch, arch, seed=1) for arch in ARCHS}
    out["qwen3_tied"] = make_checkpoint(root / "qwen3_tied", "qwen3", tie_word_embeddings=True, seed=2)
    out["moe_mixed"] = make_checkpoint(
        root / "moe_mixed", "qwen3_moe", seed=3, num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=False
    )
    return out


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def _packed(lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens])
    return seqs, torch.cat(seqs), pos


@pytest.mark.parametrize("name", [*ARCHS, "qwen3_tied", "moe_mixed"])
def test_logits_parity_with_transformers(ckpts, name):
    ours, ref = load_model(ckpts[name]).eval(), _hf(ckpts[name]).eval()
    lens = [5, 17, 40]
    seqs, ids, pos = _packed(lens, ours.config.vocab_size)
    with torch.no_grad():
        got = ours.compute_logits(ours(ids, pos, VarlenAttention.from_lengths(lens)))
        # HF: a padded-free batch of the two equal-length sequences + the rest one by one
        a, b = torch.randint(0, ours.config.vocab_size, (2, 11)).unbind(0)
        got_ab = ours.compute_logits(ours(torch.cat([a, b]), torch.arange(11).repeat(2), VarlenAttention([0, 11, 22])))
        want_ab = ref(torch.stack([a, b])).logits.reshape(22, -1)
        want = torch.cat([ref(s[None]).logits[0] for s in seqs])
    assert got.shape == want.shape == (sum(lens), ours.config.vocab_size)
    assert want.std() > 0.05  # logits are not degenerate
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_ab - want_ab).abs().max().item() <= 1e-4


def test_packed_equals_each_alone(ckpts):
    model = load_model(ckpts["qwen3_moe"])
    lens = [9, 1, 23, 4]
    seqs, ids, pos = _packed(lens, model.config.vocab_size, seed=5)
    with torch.no_grad():
        packed = model(ids, pos, VarlenAttention.from_lengths(lens))
        alone = torch.cat([model(s, torch.arange(len(s)), VarlenAttention([0, len(s)])) for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # attention really is confined: changing sequence 0 does not change sequence 2's states
    ids2 = ids.clone()
    ids2[:9] = (ids2[:9] + 1) % model.config.vocab_size
    with torch.no_grad():
        packed2 = model(ids2, pos, VarlenAttention.from_lengths(lens))
    assert not torch.allclose(packed2[:9], packed[:9])
    torch.testing.assert_close(packed2[10:], packed[10:], atol=1e-6, rtol=1e-6)


def test_tied_embeddings(ckpts):
    model = load_model(ckpts["qwen3_tied"])
    assert model.lm_head is None and model.lm_head_weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    untied = load_model(ckpts["qwen3"])
    assert untied.lm_head_weight is untied.lm_head.weight
    assert not torch.equal(untied.lm_head_weight, untied.model.embed_tokens.weight)


@pytest.mark.parametrize("name", ["qwen3_moe", "moe_mixed"])
def test_routing_capture_matches_transformers_router(ckpts, name):
    ours, ref = load_model(ckpts[name]), _hf(ckpts[name])
    seqs, ids, pos = _packed([12, 20], ours.config.vocab_size, seed=7)
    captured = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o, idx=idx: captured.setdefault(idx, []).append(o[2]))
        for idx, layer in enumerate(ref.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    rc = RoutingCapture()
    with torch.no_grad():
        ours(ids, pos, VarlenAttention.from_lengths([12, 20]), rc)
        for s in seqs:
            ref(s[None])
    for h in hooks:
        h.remove()
    moe_layers = [i for i in range(ours.config.num_hidden_layers) if ours.config.is_moe_layer(i)]
    assert rc.layers == sorted(captured) == moe_layers
    for i in moe_layers:
        want = torch.cat(captured[i])
        assert rc.ids[i].shape == (32, ours.config.num_experts_per_tok)
        assert torch.equal(rc.ids[i], want)
    assert len(torch.unique(rc.ids[moe_layers[0]])) > 2  # the router actually spreads tokens
    assert rc.stacked().shape == (32, len(moe_layers), 2)


def test_routing_replay(ckpts):
    model = load_model(ckpts["qwen3_moe"])
    _, ids, pos = _packed([16], model.config.vocab_size, seed=9)
    attn = VarlenAttention([0, 16])
    rec = RoutingCapture()
    with torch.no_grad():
        h = model(ids, pos, attn, rec)
        same = model(ids, pos, attn, RoutingCapture.from_stacked(rec.stacked(), rec.layers))
        flipped = {i: (t + 1) % model.config.num_experts for i, t in rec.ids.items()}
        rc2 = RoutingCapture(replay=flipped)
        other = model(ids, pos, attn, rc2)
    torch.testing.assert_close(same, h, atol=0, rtol=0)
    assert torch.equal(rc2.ids[0], flipped[0])
    assert (other - h).abs().max() > 1e-3


def test_grouped_mm_and_loop_paths_agree(ckpts):
    model = load_model(ckpts["qwen3_moe"])
    _, ids, pos = _packed([30], model.config.vocab_size, seed=11)
    attn = VarlenAttention([0, 30])
    outs = []
    for grouped in (True, False):
        for layer in model.model.layers:
            layer.mlp.experts.use_grouped_mm = grouped
        out = model(ids, pos, attn)
        out.pow(2).sum().backward()
        g = model.model.layers[1].mlp.experts.gate_up_proj.grad.clone()
        model.zero_grad()
        outs.append((out.detach(), g))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    assert outs[0][1].abs().sum() > 0


def test_expert_parallel_slices_sum_to_full(ckpts):
    from miles.models import Experts

    full = load_model(ckpts["qwen3_moe"]).model.layers[0].mlp
    x = torch.randn(25, 64)
    ids, w = full.gate(x)
    want = full.experts(x, ids, w)
    total = torch.zeros_like(want)
    for start in (0, 3, 6):
        n = min(3, 8 - start)
        part = Experts(8, 64, 32, expert_start=start, num_local_experts=n)
        with torch.no_grad():
            part.gate_up_proj.copy_(full.experts.gate_up_proj[start : start + n])
            part.down_proj.copy_(full.experts.down_proj[start : start + n])
        ys = []
        for grouped in (True, False):
            part.use_grouped_mm = grouped
            ys.append(part(x, ids, w))
        torch.testing.assert_close(ys[0], ys[1], atol=1e-6, rtol=1e-5)
        assert ys[0].abs().sum() > 0
        total += ys[0]
    torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-5)


def test_deepseek_style_router_hooks():
    from miles.models import Router

    r = Router(16, 8, 2, norm_topk_prob=True, score_func="sigmoid", use_bias=True, n_group=4, topk_group=1)
    x = torch.randn(10, 16)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0]))
    ids, w = r(x)
    assert (ids >= 6).all()  # bias steers selection into the last group only
    assert torch.allclose(w.sum(-1), torch.ones(10))
    scores = torch.sigmoid(x @ r.weight.T)
    torch.testing.assert_close(w, scores.gather(1, ids) / scores.gather(1, ids).sum(-1, keepdim=True))


def test_random_init_model_and_bad_forward_inputs():
    cfg = ModelConfig.from_hf(
        dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=50, hidden_size=32,
             intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    )
    model = CausalLM(cfg)
    h = model(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), VarlenAttention([0, 3]))
    assert h.shape == (3, 32) and torch.isfinite(h).all()
    with pytest.raises(ValueError, match="flat input_ids"):
        model(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), VarlenAttention([0, 3]))
    with pytest.raises(ValueError, match="cu_seqlens covers 4"):
        model(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), VarlenAttention([0, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        VarlenAttention([0, 3, 2])


def test_legacy_rope_config_fields_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from miles.models.layers import rope_inv_freq

    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    legacy = dict(model_type="llama", vocab_size=10, hidden_size=256, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling)
    cfg = ModelConfig.from_hf(legacy)
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 2 and cfg.rope_theta == 500000.0
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**{k: v for k, v in legacy.items() if k != "model_type"}))
    assert torch.equal(rope_inv_freq(cfg), want)
    assert not torch.equal(rope_inv_freq(ModelConfig.from_hf({**legacy, "rope_scaling": None})), want)


def test_expert_parallel_names_and_loading(ckpts):
    from miles.models import Experts, hf_items, load_hf_items

    full = load_model(ckpts["qwen3_moe"])
    part = load_model(ckpts["qwen3_moe"])
    for layer in part.model.layers:
        layer.mlp.experts = Experts(8, 64, 32, expert_start=4, num_local_experts=4)
    names = {n for n, _ in hf_items(part) if ".experts." in n}
    assert names == {f"model.layers.{i}.mlp.experts.{e}.{k}.weight" for i in range(2) for e in range(4, 8)
                     for k in ("gate_proj", "up_proj", "down_proj")}
    load_hf_items(part, hf_items(full), strict=True)  # other ranks' experts are skipped, ours all filled
    for a, b in zip(full.model.layers, part.model.layers):
        assert torch.equal(a.mlp.experts.gate_up_proj[4:], b.mlp.experts.gate_up_proj)
        assert torch.equal(a.mlp.experts.down_proj[4:], b.mlp.experts.down_proj)


def test_shared_experts_hook():
    from miles.models import Experts, Router, SparseMoeBlock
    from miles.models.layers import MLP

    torch.manual_seed(0)
    block = SparseMoeBlock(Router(16, 4, 2, True), Experts(4, 16, 8), shared_experts=MLP(16, 8))
    x = torch.randn(6, 16)
    ids, w = block.gate(x)
    torch.testing.assert_close(block(x, 0), block.experts(x, ids, w) + block.shared_experts(x))
