"""Multi-process (gloo) FSDP2 trainer tests: 2 ranks == 1 rank, and checkpoint resume (same / other rank count)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from miles.testing import make_checkpoint
from miles.trainer.config import AlgoConfig, TrainerConfig

K, M = 2, 1  # rollouts before the checkpoint, rollouts after it
ALGO = dict(use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type="k3", entropy_coef=0.01, use_tis=True,
            normalize_advantages=True, eps_clip_high=0.28)
CFG = dict(lr=2e-3, lr_warmup_iters=2, device="cpu", num_steps_per_rollout=2, use_dynamic_batch_size=True,
           max_tokens_per_gpu=40, n_samples_per_prompt=4, clip_grad=1.0, weight_decay=0.01)


def _batches():
    from test_trainer import make_batch

    return [make_batch(8, seed=100 + r, rollout_lp=True) for r in range(K + M)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, name, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[name](rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(world, fn, *args):
    mp.spawn(_entry, args=(world, _free_port(), fn.__name__, args), nprocs=world, join=True)


def _params(tr):
    return {n: p.full_tensor().clone() for n, p in tr.model.lm.named_parameters()}


def _train_save_resume(rank, ckpt, out):
    """Train K rollouts, save, train M more; then a fresh trainer loads the checkpoint and trains the M again."""
    from miles.trainer.trainer import Trainer

    batches = _batches()
    tr = Trainer(ckpt, AlgoConfig(**ALGO), TrainerConfig(**CFG))
    before = [tr.train(b) for b in batches[:K]]
    tr.save(out / "ckpt")
    after = [tr.train(b) for b in batches[K:]]
    final = _params(tr)
    buckets = {n: t.clone() for b in tr.iter_weight_buckets(1 << 16) for n, t in b}  # collective on both ranks
    tr.export_hf(out / "hf")
    if rank == 0:
        assert set(buckets) == set(final)  # dense, untied: HF names == Miles names
        for n, t in final.items():
            assert torch.equal(buckets[n], t), n
    del tr
    tr2 = Trainer(ckpt, AlgoConfig(**ALGO), TrainerConfig(**CFG))
    assert tr2.load(out / "ckpt") == 2 * K
    resumed = [tr2.train(b) for b in batches[K:]]
    resumed_final = _params(tr2)  # collective: every rank gathers
    if rank == 0:
        torch.save({"before": before, "after": after, "resumed": resumed, "final": final,
                    "resumed_final": resumed_final}, out / "two_ranks.pt")


def _one_rank(rank, ckpt, out):
    """Same data on one rank from scratch, and resuming the 2-rank checkpoint on 1 rank."""
    from miles.trainer.trainer import Trainer

    batches = _batches()
    tr = Trainer(ckpt, AlgoConfig(**ALGO), TrainerConfig(**CFG))
    metrics = [tr.train(b) for b in batches]
    final = _params(tr)
    tr2 = Trainer(ckpt, AlgoConfig(**ALGO), TrainerConfig(**CFG))
    tr2.load(out / "ckpt")
    resumed = [tr2.train(b) for b in batches[K:]]
    torch.save({"metrics": metrics, "final": final, "resumed": resumed, "resumed_final": _params(tr2)},
               out / "one_rank.pt")


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_resume(tmp_path):
    ckpt = make_checkpoint(tmp_path / "model", "qwen3")
    _spawn(2, _train_save_resume, ckpt, tmp_path)
    _spawn(1, _one_rank, ckpt, tmp_path)
    two = torch.load(tmp_path / "two_ranks.pt", weights_only=False)
    one = torch.load(tmp_path / "one_rank.pt", weights_only=False)

    # resume on the same rank count: bitwise identical losses and weights (CPU, deterministic kernels)
    for a, b in zip(two["after"], two["resumed"]):
        for k in ("loss", "pg_loss", "kl_loss", "grad_norm", "ppo_kl"):
            assert a[k] == b[k], k
    for n, t in two["final"].items():
        assert torch.equal(t, two["resumed_final"][n]), n
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(exported) == set(two["final"])
    for n, t in two["final"].items():
        assert torch.equal(exported[n], t), n
    assert two["after"][0]["step"] == 2 * (K + M)

    # 2 ranks vs 1 rank. The only difference is fp32 summation order: the gradient of a parameter is a sum
    # over tokens split into different micro-batches/ranks and reduced in a different order (relative
    # error ~1e-7 per op). Over 6 AdamW steps, Adam's g/sqrt(v) normalisation keeps the update size bounded
    # by lr, so weights agree to ~1e-6 of lr-sized updates; losses agree to ~1e-6 relative.
    two_metrics = two["before"] + two["after"]
    assert two_metrics[-1]["kl_loss"] > 0 and two_metrics[-1]["ppo_kl"] != 0
    for a, b in zip(two_metrics, one["metrics"]):
        for k in ("loss", "pg_loss", "kl_loss", "entropy", "tis", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for n, t in two["final"].items():
        torch.testing.assert_close(one["final"][n], t, rtol=0, atol=2e-6)
    # resume a 2-rank checkpoint on 1 rank: same state, so same losses up to the same summation-order noise
    for a, b in zip(two["after"], one["resumed"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    for n, t in two["final"].items():
        torch.testing.assert_close(one["resumed_final"][n], t, rtol=0, atol=2e-6)
