"""Single-rank (gloo) trainer tests: step-0 identities, packing invariance, KL/ref, custom loss, NaN skip,
HF export vs transformers, weight buckets, bad input."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist

from miles.testing import make_checkpoint
from miles.trainer.batch import BatchError
from miles.trainer.config import AlgoConfig, ConfigError, TrainerConfig
from miles.trainer.schedule import lr_at
from miles.trainer.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    created = not dist.is_initialized()
    if created:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "moe", "qwen3_moe", tie_word_embeddings=True)


def make_batch(n=8, seed=0, vocab=500, group=4, rollout_lp=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 24, (1,), generator=g))
        r = int(torch.randint(2, length - 1, (1,), generator=g))
        mask = [1] * r
        if r > 3:
            mask[1] = 0  # a tool token inside the response
        s = dict(tokens=torch.randint(0, vocab, (length,), generator=g).tolist(), response_length=r,
                 loss_mask=mask, reward=float(torch.rand((), generator=g) > 0.5) + 0.1 * i, group_index=i // group)
        if rollout_lp:
            s["rollout_log_probs"] = (-3.0 - torch.rand(r, generator=g)).tolist()
        out.append(s)
    return out


def full_grads(tr):
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in tr.model.lm.named_parameters()}


def grads_of_one_step(tr, batch):
    """Run train() but capture the accumulated gradients instead of stepping."""
    captured = {}

    def capture():
        captured.update(full_grads(tr))
        tr.optimizer.zero_grad(set_to_none=True)
        return 0.0

    tr._clip_and_step = capture
    metrics = tr.train(batch)
    return metrics, captured


def test_step0_ratio_exactly_one_and_ppo_kl_zero(ckpt):
    tr = Trainer(ckpt, AlgoConfig(eps_clip=0.2), TrainerConfig(lr=1e-2, device="cpu", use_dynamic_batch_size=True,
                                                               max_tokens_per_gpu=40))
    # one optimizer step per rollout: pi_old == pi exactly (same packing, same weights)
    m = tr.train(make_batch(8))
    assert m["ppo_kl"] == 0.0 and m["pg_clipfrac"] == 0.0
    assert m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0
    assert m["step"] == 1 and m["num_optimizer_steps"] == 1 and m["skipped_steps"] == 0
    assert m["entropy"] > 5.0  # near-uniform tiny random model over ~500 tokens: ln(500) = 6.2
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0


def test_on_policy_fast_path_equals_old_logprob_pass(ckpt):
    """One step per rollout: pi_old taken from the training forward == a separate pi_old forward, bit for bit."""
    algo = AlgoConfig(use_tis=True, use_kl_loss=True, kl_loss_coef=0.1)
    batch = make_batch(6, seed=4, rollout_lp=True)
    out = []
    for fast in (True, False):
        tr = Trainer(ckpt, algo, TrainerConfig(lr=1e-3, device="cpu", micro_batch_size=2))
        tr.fast_on_policy = fast
        out.append(grads_of_one_step(tr, batch))
    (m_fast, g_fast), (m_slow, g_slow) = out
    for k in ("loss", "pg_loss", "kl_loss", "entropy", "tis", "train_rollout_logprob_abs_diff", "ppo_kl"):
        assert m_fast[k] == m_slow[k], k
    for n in g_fast:
        assert torch.equal(g_fast[n], g_slow[n]), n


def test_second_step_of_a_rollout_is_off_policy(ckpt):
    tr = Trainer(ckpt, AlgoConfig(eps_clip=0.2), TrainerConfig(lr=5e-2, device="cpu", global_batch_size=4))
    batch = make_batch(4)
    m = tr.train(batch + batch)  # step 2 trains the same samples after step 1 moved the weights
    assert m["num_optimizer_steps"] == 2
    assert m["ratio_max"] > 1.0 or m["ratio_min"] < 1.0
    assert m["ppo_kl"] != 0.0


@pytest.mark.parametrize("reduction,estimator", [("sequence_mean", "grpo"), ("token_mean", "gspo"),
                                                  ("constant", "reinforce_plus_plus_baseline")])
def test_loss_and_grads_independent_of_packing(ckpt, reduction, estimator):
    algo = AlgoConfig(loss_reduction=reduction, loss_reduction_constant=16, entropy_coef=0.01,
                      use_tis=True, normalize_advantages=True, advantage_estimator=estimator, eps_clip_c=3.0)
    batch = make_batch(6, seed=3, rollout_lp=True)
    results = []
    for kw in (dict(micro_batch_size=1), dict(micro_batch_size=6),
               dict(use_dynamic_batch_size=True, max_tokens_per_gpu=48)):
        tr = Trainer(ckpt, algo, TrainerConfig(lr=1e-3, device="cpu", **kw))
        results.append(grads_of_one_step(tr, batch))
    (m0, g0) = results[0]
    for m, g in results[1:]:
        for k in ("loss", "pg_loss", "entropy_loss", "tis", "train_rollout_logprob_abs_diff"):
            assert m[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
        for n in g0:
            # fp32, different summation order over micro-batches/tokens: ~1e-7 relative
            torch.testing.assert_close(g[n], g0[n], rtol=1e-4, atol=1e-7)


def test_kl_loss_zero_at_start_then_positive(ckpt):
    algo = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="low_var_kl")
    tr = Trainer(ckpt, algo, TrainerConfig(lr=5e-2, device="cpu"))
    batch = make_batch(4, seed=1)
    m1 = tr.train(batch)
    assert m1["kl_loss"] == 0.0  # reference == initial weights
    m2 = tr.train(batch)
    assert m2["kl_loss"] > 0.0
    tr.update_ref()  # --ref-update-interval: reference := current policy
    assert tr.train(batch)["kl_loss"] == 0.0


def test_reinforce_plus_plus_with_kl_in_reward(ckpt):
    algo = AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1, normalize_advantages=True, gamma=0.99)
    tr = Trainer(ckpt, algo, TrainerConfig(lr=1e-2, device="cpu"))
    assert tr.ref is not None
    m = tr.train(make_batch(4, seed=2))
    assert math.isfinite(m["loss"]) and m["step"] == 1


def custom_sft_loss(args, batch, logits, sum_of_sample_mean):
    """slime signature: a custom loss computing -logp at response positions from packed logits."""
    logits = logits[0]
    per_token, offset = [], 0
    for toks, r in zip(batch["unconcat_tokens"], batch["response_lengths"]):
        n = toks.numel()
        lp = torch.log_softmax(logits[offset + n - r - 1: offset + n - 1], dim=-1)
        per_token.append(-lp.gather(1, toks[n - r:, None]).squeeze(1))
        offset += n
    loss = sum_of_sample_mean(torch.cat(per_token))
    return loss, {"sft_loss": loss.detach()}


def nan_loss(args, batch, logits, sum_of_sample_mean):
    return logits.sum() * float("nan"), {}


def test_custom_loss_matches_builtin_sft(ckpt):
    batch = make_batch(4, seed=5)
    cfg = TrainerConfig(lr=1e-3, device="cpu", micro_batch_size=2)
    m_builtin, g_builtin = grads_of_one_step(Trainer(ckpt, AlgoConfig(loss_type="sft_loss"), cfg), batch)
    custom = AlgoConfig(loss_type="custom_loss", custom_loss_function_path="test_trainer.custom_sft_loss")
    m_custom, g_custom = grads_of_one_step(Trainer(ckpt, custom, cfg), batch)
    assert m_custom["loss"] == pytest.approx(m_builtin["loss"], rel=1e-5)
    assert m_builtin["loss"] == pytest.approx(m_builtin["sft_loss"]) and m_builtin["loss"] > 5.0
    for n in g_builtin:
        torch.testing.assert_close(g_custom[n], g_builtin[n], rtol=1e-4, atol=1e-7)


def test_nan_grad_norm_skips_and_counts(ckpt):
    algo = AlgoConfig(loss_type="custom_loss", custom_loss_function_path="test_trainer.nan_loss")
    tr = Trainer(ckpt, algo, TrainerConfig(lr=1e-2, device="cpu"))
    before = {n: p.full_tensor().clone() for n, p in tr.model.lm.named_parameters()}
    m = tr.train(make_batch(4))
    assert m["skipped_steps"] == 1 and m["step"] == 0 and math.isnan(m["grad_norm"])
    for n, p in tr.model.lm.named_parameters():
        assert torch.equal(p.full_tensor(), before[n]), n


def test_hf_export_loads_in_transformers_with_identical_logits(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tr = Trainer(ckpt, AlgoConfig(), TrainerConfig(lr=1e-2, device="cpu"))
    tr.train(make_batch(4))
    out = tr.export_hf(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for n, p in tr.model.lm.named_parameters():
        assert torch.equal(hf.state_dict()[n], p.full_tensor()), n  # the trained weights, bit for bit
    ids = torch.tensor(make_batch(1, seed=9)[0]["tokens"])
    with torch.no_grad():
        ours = tr.model(ids, torch.arange(len(ids)), torch.tensor([0, len(ids)]), None, None, return_logits=True)
        theirs = hf(ids[None]).logits[0]
    # same fp32 weights, two implementations (op order differs): agreement to float rounding
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_weight_buckets_moe_tied(moe_ckpt, tmp_path):
    from safetensors.torch import load_file

    tr = Trainer(moe_ckpt, AlgoConfig(), TrainerConfig(lr=1e-2, device="cpu"))
    tr.train(make_batch(4))
    bucket_bytes = 64 * 1024
    buckets = list(tr.iter_weight_buckets(bucket_bytes))
    assert len(buckets) > 1
    for b in buckets:
        assert sum(t.numel() * t.element_size() for _, t in b) <= bucket_bytes or len(b) == 1
    got = {n: t for b in buckets for n, t in b}
    tr.export_hf(tmp_path / "hf")
    want = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(got) == set(want)
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in got and "lm_head.weight" not in got
    for n in want:
        assert torch.equal(got[n], want[n]), n
    bf = next(iter(tr.iter_weight_buckets(1 << 20, dtype=torch.bfloat16)))
    assert bf[0][1].dtype == torch.bfloat16
    tr.offload()
    with pytest.raises(RuntimeError, match="onload"):
        tr.train(make_batch(4))
    tr.onload()
    assert tr.train(make_batch(4))["step"] == 2


def test_bad_inputs_name_the_sample(ckpt):
    tr = Trainer(ckpt, AlgoConfig(use_tis=True), TrainerConfig(lr=1e-3, device="cpu"))
    good = make_batch(4, rollout_lp=True)

    def bad(i, **kw):
        b = [dict(s) for s in good]
        b[i].update(kw)
        return b

    cases = [
        (bad(2, loss_mask=[0] * good[2]["response_length"]), "sample 2: loss_mask is empty"),
        (bad(1, loss_mask=[1]), "sample 1: loss_mask has 1 entries but response_length is"),
        (bad(3, response_length=len(good[3]["tokens"])), "sample 3: response_length .* leaves no prompt"),
        (bad(0, reward=None), "sample 0: reward must be a number"),
        (bad(0, reward={"score": 1.0}), "--reward-key"),
        (bad(1, tokens=good[1]["tokens"][:-1] + [10**6]), r"sample 1: token ids must be integers in \[0, "),
        (bad(2, rollout_log_probs=None), "sample 2: rollout_log_probs missing"),
        ([], "empty training batch"),
    ]
    for batch, msg in cases:
        with pytest.raises(BatchError, match=msg):
            tr.train(batch)
    with pytest.raises(ConfigError, match="--num-steps-per-rollout 3"):
        Trainer(ckpt, AlgoConfig(), TrainerConfig(rollout_batch_size=2, n_samples_per_prompt=2,
                                                  num_steps_per_rollout=3))
    tr2 = Trainer(ckpt, AlgoConfig(), TrainerConfig(device="cpu", global_batch_size=3))
    with pytest.raises(ConfigError, match="--global-batch-size 3"):
        tr2.train(make_batch(4))


def test_lr_schedule():
    cfg = TrainerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_style="cosine", lr_decay_iters=4)
    assert [round(lr_at(s, cfg), 6) for s in range(8)] == [0.5, 1.0, 1.0, round(0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi / 4)), 6), 0.55, round(0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 6), 0.1, 0.1]
    assert lr_at(5, TrainerConfig(lr=0.3)) == 0.3


@pytest.mark.slow  # inductor compiles C++ kernels on first use (~40 s cold on 2 cores)
def test_compiled_layers_old_logprobs_match_training_forward(ckpt):
    """--compile-model: the pi_old forward runs the training graph, so the first step's ratio is exactly 1."""
    tr = Trainer(ckpt, AlgoConfig(), TrainerConfig(lr=1e-3, device="cpu", compile=True, micro_batch_size=4))
    tr.fast_on_policy = False  # force the separate pi_old forward
    m = tr.train(make_batch(4))
    assert m["ppo_kl"] == 0.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0


def drgrpo_reducer(total_lengths, response_lengths, loss_masks, calculate_per_token_loss=False):
    """slime reducer factory: sum over samples of masked token sums / 16 (Dr.GRPO constant)."""
    def reduce(x):
        return sum((p * m).sum() for p, m in zip(x.split(response_lengths), loss_masks)) / 16
    return reduce


def test_custom_pg_reducer_equals_builtin_constant(ckpt):
    batch = make_batch(6, seed=6)
    cfg = TrainerConfig(lr=1e-3, device="cpu", micro_batch_size=4)
    builtin = AlgoConfig(loss_reduction="constant", loss_reduction_constant=16)
    custom = AlgoConfig(custom_pg_loss_reducer_function_path="test_trainer.drgrpo_reducer")
    (m1, g1), (m2, g2) = (grads_of_one_step(Trainer(ckpt, a, cfg), batch) for a in (builtin, custom))
    assert m2["pg_loss"] == pytest.approx(m1["pg_loss"], rel=1e-6)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-8)


def test_checkpoint_latest_pointer_and_other_model_rejected(ckpt, moe_ckpt, tmp_path):
    from miles.trainer.checkpoint import CheckpointMismatchError

    tr = Trainer(ckpt, AlgoConfig(), TrainerConfig(lr=1e-2, device="cpu"))
    tr.train(make_batch(4))
    tr.save(tmp_path / "ck")
    tr.train(make_batch(4, seed=1))
    tr.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000002"
    (tmp_path / "ck" / ".tmp-step_00000003").mkdir()  # debris of a save killed midway: ignored
    fresh = Trainer(ckpt, AlgoConfig(), TrainerConfig(lr=1e-2, device="cpu"))
    assert fresh.load(tmp_path / "ck") == 2
    assert fresh.load(tmp_path / "ck" / "step_00000001") == 1
    other = Trainer(moe_ckpt, AlgoConfig(), TrainerConfig(lr=1e-2, device="cpu"))
    with pytest.raises(CheckpointMismatchError, match="another model: model_type = 'qwen3' there"):
        other.load(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="not a Miles trainer checkpoint"):
        other.load(tmp_path)


def test_use_rollout_logprobs_as_pi_old(ckpt):
    """--use-rollout-logprobs: pi_old = engine log-probs (here ~-3.5 while the model gives ~-6.2 = ln 1/500)."""
    tr = Trainer(ckpt, AlgoConfig(use_rollout_logprobs=True), TrainerConfig(lr=1e-3, device="cpu",
                                                                            num_steps_per_rollout=2))
    m = tr.train(make_batch(8, rollout_lp=True))
    assert 2.0 < m["ppo_kl"] < 3.5  # mean(log pi_rollout - log pi_theta)
    assert m["ratio_max"] < 0.2 and m["pg_clipfrac"] > 0  # ratio ~ e^-2.7: clipped for A < 0 tokens
    assert m["train_rollout_logprob_abs_diff"] == 0.0  # pi_old *is* the rollout policy
    assert 5.0 < m["entropy"] < 6.3 and m["num_optimizer_steps"] == 2


def test_remove_sample_keeps_group_statistics_but_trains_nothing(ckpt):
    batch = make_batch(4, seed=8)
    batch[1].update(remove_sample=True, loss_mask=[0] * batch[1]["response_length"])
    other = [dict(s) for s in batch]
    other[1]["tokens"] = [7] * len(batch[1]["tokens"])  # a removed sample's tokens must not matter
    dropped = [dict(s) for s in batch]
    dropped[1]["reward"] = 100.0  # ... but its reward does (GRPO group mean/std)
    cfg = TrainerConfig(lr=1e-3, device="cpu", micro_batch_size=2)
    (m1, g1), (m2, g2), (m3, g3) = (grads_of_one_step(Trainer(ckpt, AlgoConfig(), cfg), b)
                                    for b in (batch, other, dropped))
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
    assert any(not torch.equal(g1[n], g3[n]) for n in g1)
    assert m1["train_tokens"] == sum(sum(s["loss_mask"]) for i, s in enumerate(batch) if i != 1)
    with pytest.raises(BatchError, match="nothing to train"):
        Trainer(ckpt, AlgoConfig(), cfg).train([dict(s, remove_sample=True) for s in batch])


def test_separate_log_prob_token_budget(ckpt):
    """--log-probs-max-tokens-per-gpu packs the pi_old forward differently from training; results agree."""
    out = []
    for lp_budget in (None, 200):
        cfg = TrainerConfig(lr=1e-3, device="cpu", use_dynamic_batch_size=True, max_tokens_per_gpu=30,
                            log_probs_max_tokens_per_gpu=lp_budget, num_steps_per_rollout=2)
        out.append(Trainer(ckpt, AlgoConfig(), cfg).train(make_batch(8)))
    for k in ("loss", "ppo_kl", "entropy", "grad_norm"):
        assert out[1][k] == pytest.approx(out[0][k], rel=1e-4, abs=1e-7), k
    assert out[0]["ppo_kl"] != 0.0  # step 2 is off-policy
