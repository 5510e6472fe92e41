import pytest
import torch

from miles.models import token_logprobs


def _naive(h, w, t, temperature):
    logp_all = torch.log_softmax((h @ w.T).float() / temperature, -1)
    logp = logp_all.gather(1, t[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk_size,temperature", [(7, 1.0), (1024, 0.7), (1, 1.3)])
def test_chunked_matches_naive_values_and_grads(chunk_size, temperature):
    torch.manual_seed(0)
    n, hdim, v = 37, 16, 300
    h = torch.randn(n, hdim, dtype=torch.float64) * 2
    w = torch.randn(v, hdim, dtype=torch.float64) * 0.5
    t = torch.randint(0, v, (n,))
    ga, gb = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = token_logprobs(h1, w1, t, temperature, chunk_size, with_entropy=True)
    (logp * ga + ent * gb).sum().backward()

    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref_logp, ref_ent = _naive(h2, w2, t, temperature)
    (ref_logp * ga + ref_ent * gb).sum().backward()

    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(w1.grad, w2.grad, atol=5e-5, rtol=1e-4)
    assert ref_ent.mean() > 0.5 and h1.grad.abs().max() > 1e-2


def test_logprob_only_and_fp32_inputs():
    torch.manual_seed(1)
    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(64, 8, requires_grad=True)
    t = torch.randint(0, 64, (50,))
    logp, ent = token_logprobs(h, w, t, chunk_size=16)
    assert ent is None
    logp.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.log_softmax(h2 @ w2.T, -1).gather(1, t[:, None]).squeeze(1)
    ref.sum().backward()
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)
    assert (logp <= 0).all()


def test_bf16_inputs_fp32_outputs_and_no_grad():
    torch.manual_seed(2)
    h = torch.randn(20, 32).bfloat16()
    w = (torch.randn(100, 32) * 0.3).bfloat16()
    t = torch.randint(0, 100, (20,))
    with torch.no_grad():
        logp, ent = token_logprobs(h, w, t, temperature=0.8, chunk_size=6, with_entropy=True)
    ref, ref_ent = _naive(h.float(), w.float(), t, 0.8)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, atol=0.05, rtol=0.02)  # bf16 logits, fp32 softmax
    torch.testing.assert_close(ent, ref_ent, atol=0.05, rtol=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected hidden"):
        token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), temperature=0)


def test_bf16_gradients_match_autograd():
    torch.manual_seed(3)
    h = torch.randn(24, 32).bfloat16().requires_grad_()
    w = (torch.randn(80, 32) * 0.3).bfloat16().requires_grad_()
    t = torch.randint(0, 80, (24,))
    logp, _ = token_logprobs(h, w, t, chunk_size=5)
    logp.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.log_softmax((h2 @ w2.T).float(), -1).gather(1, t[:, None]).squeeze(1)
    ref.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), atol=2e-2, rtol=2e-2)


def test_never_more_than_chunk_rows_of_logits(monkeypatch):
    import miles.models.logprobs as lp

    rows = []
    real = lp.F.linear

    def spy(x, w, *a):
        rows.append(x.shape[0])
        return real(x, w, *a)

    monkeypatch.setattr(lp.F, "linear", spy)
    h = torch.randn(100, 8, requires_grad=True)
    logp, ent = token_logprobs(h, torch.randn(50, 8), torch.randint(0, 50, (100,)), chunk_size=16, with_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert len(rows) == 14 and max(rows) == 16  # 7 chunks forward + 7 recomputed in backward
