"""Weight sync: bucket (un)flattening, the torch.distributed broadcast path, disk transport into a real
`miles serve`, and (Ray) trainer → engine sync where the engine's tensors equal the trainer's and its
outputs change."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from miles.cluster import weight_sync as ws
from miles.cluster.actors import free_port
from miles.trainer.weights import bucketize


def test_flatten_roundtrip_mixed_dtypes():
    bucket = [("a", torch.randn(3, 4)), ("b", torch.arange(5)), ("c", torch.randn(2, dtype=torch.bfloat16)),
              ("d", torch.randn(7)), ("e", torch.zeros(0, 3))]
    metas, flats = ws.flatten_bucket(bucket)
    assert set(flats) == {"float32", "int64", "bfloat16"} and flats["float32"].numel() == 19
    out = ws.unflatten_bucket(metas, flats)
    assert [n for n, _ in out] == list("abcde")
    for (_, x), (_, y) in zip(bucket, out):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_iter_buckets_respects_size():
    items = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # fp32: 4 bytes each
    buckets = list(bucketize(items, max_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]


def test_broadcast_group_three_ranks():
    """Rank 0 broadcasts a flattened bucket; ranks 1, 2 (as engines would) receive identical tensors."""
    port = free_port()
    bucket = [("w", torch.randn(4, 3)), ("b", torch.randn(3).to(torch.bfloat16)), ("i", torch.arange(6))]
    got: dict[int, list] = {}
    errors = []

    def run(rank: int) -> None:
        try:
            group = ws.create_weight_group("127.0.0.1", port, rank, 3, "gloo", timeout_s=30)
            metas, flats = ws.flatten_bucket(bucket)
            if rank == 0:
                for dtype in ws.dtype_sizes(metas):
                    ws.broadcast(group, flats[dtype])
            else:
                got[rank] = ws.receive_bucket(group, metas, "cpu")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for rank in (1, 2):
        assert [(n, t.dtype) for n, t in got[rank]] == [(n, t.dtype) for n, t in bucket]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got[rank], bucket))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from miles.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ws") / "ckpt", "qwen3", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def _greedy(url: str, ids: list[int]) -> dict:
    r = httpx.post(url + "/generate", json={"input_ids": ids, "return_logprob": True,
                                             "sampling_params": {"temperature": 0, "max_new_tokens": 4}}, timeout=60)
    r.raise_for_status()
    return r.json()


def test_disk_transport_updates_a_real_server(tiny_ckpt, tmp_path):
    from miles.engine import EngineConfig, LLMEngine
    from miles.models import hf_items, load_model
    from miles.serve.launch import serve_engine

    engine = LLMEngine(EngineConfig(model=str(tiny_ckpt), kv_cache_tokens=1024, max_num_seqs=4))
    server = serve_engine(engine, model_path=str(tiny_ckpt))
    try:
        before = _greedy(server.url, [5, 6, 7])
        model = load_model(tiny_ckpt, dtype=torch.float32, device="cpu")
        new = {n: t.detach() * 1.5 + 0.01 for n, t in hf_items(model)}
        transport = ws.DiskTransport(str(tmp_path / "sync"), [server.url], str(tiny_ckpt))
        stats = ws.push_weights(bucketize(new.items(), 64 * 1024), transport, version=7)
        assert stats["weight_sync/buckets"] > 1 and stats["weight_sync/tensors"] == len(new)
        assert httpx.get(server.url + "/get_weight_version").json()["weight_version"] == "7"
        got = server.async_engine.call_sync(lambda e: {n: t.detach().clone() for n, t in hf_items(e.model)})
        assert set(got) == set(new) and all(torch.equal(got[n], new[n]) for n in new)
        after = _greedy(server.url, [5, 6, 7])
        assert after["meta_info"]["output_token_logprobs"] != before["meta_info"]["output_token_logprobs"]
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["collective", "ipc"])
def test_trainer_to_engine_sync_through_ray(tiny_ckpt, tmp_path, transport, ray_cluster):
    """Train one step, sync: the engine's tensors equal the trainer's name by name, its outputs change."""
    from miles.cluster.cluster import Cluster
    from miles.cluster.loop import prepare_run_dir
    from miles.config import parse_config

    args = parse_config([
        "--hf-checkpoint", str(tiny_ckpt), "--prompt-data", "unused.jsonl", "--rollout-batch-size", "1",
        "--n-samples-per-prompt", "2", "--num-rollout", "1", "--lr", "5e-2", "--engine-kv-cache-tokens", "1024",
        "--update-weight-transport", transport, "--update-weight-buffer-size", "65536", "--run-dir", str(tmp_path),
        "--phase-timeout", "120", "--engine-startup-timeout", "180",
    ]).args
    prepare_run_dir(args)
    cluster = Cluster.start(args)
    try:
        url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
        before = _greedy(url, [5, 6, 7])
        initial = cluster.trainer_weights()
        batch = [{"tokens": [5, 6, 7, 8, 9], "response_length": 2, "reward": 1.0, "group_index": 0},
                 {"tokens": [5, 6, 7, 10, 11], "response_length": 2, "reward": 0.0, "group_index": 0}]
        cluster.train(0, batch)
        stats = cluster.sync_weights(1)
        assert stats["weight_sync/buckets"] > 1 and stats["weight_sync/version"] == 1
        assert cluster.engine_versions() == ["1"]
        trained, served = cluster.trainer_weights(), cluster.engine_weights(0)
        assert set(trained) == set(served) == set(initial)
        for name, t in trained.items():
            assert torch.equal(served[name], t), name
        assert any(not torch.equal(trained[n], initial[n]) for n in trained)  # the update really moved weights
        after = _greedy(url, [5, 6, 7])
        assert after["meta_info"]["weight_version"] == "1"
        assert after["meta_info"]["output_token_logprobs"] != before["meta_info"]["output_token_logprobs"]
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
