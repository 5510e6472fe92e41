"""GPU-only checks of the CUDA fast paths (varlen flash attention, bf16 grouped-mm experts); skipped on CPU."""

import pytest
import torch

from miles.models import VarlenAttention, load_model, token_logprobs
from miles.models.attention import _sdpa_per_sequence
from miles.testing import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_varlen_kernel_matches_per_sequence_sdpa():
    torch.manual_seed(0)
    lens = [5, 130, 1, 64]
    t = sum(lens)
    q = torch.randn(t, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, 2, 64, device="cuda", dtype=torch.bfloat16)
    attn = VarlenAttention.from_lengths(lens)
    ref = _sdpa_per_sequence(q, k, v, attn.bounds)
    out = attn(0, q, k, v)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_bf16_moe_grouped_mm_matches_loop_and_trains(tmp_path):
    p = make_checkpoint(tmp_path / "moe", "qwen3_moe")
    model = load_model(p, dtype=torch.bfloat16, device="cuda")
    lens = [17, 40]
    ids = torch.randint(0, model.config.vocab_size, (57,), device="cuda")
    pos = torch.cat([torch.arange(n) for n in lens]).cuda()
    outs = []
    for grouped in (True, False):
        for layer in model.model.layers:
            layer.mlp.experts.use_grouped_mm = grouped
        h = model(ids, pos, VarlenAttention.from_lengths(lens))
        logp, _ = token_logprobs(h[:-1], model.lm_head_weight, ids[1:])
        logp.sum().backward()
        outs.append((logp.detach(), model.model.layers[0].mlp.experts.gate_up_proj.grad.float().clone()))
        model.zero_grad()
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=5e-2, rtol=5e-2)
    assert outs[0][1].abs().sum() > 0
