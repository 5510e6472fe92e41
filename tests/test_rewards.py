import asyncio
import threading
import time

import pytest
from aiohttp import web

from miles.rollout.config import default_args
from miles.rollout.rewards import (
    RewardStats,
    boxed_reward,
    exact_reward,
    f1_reward,
    get_rule,
    last_boxed,
    math_reward,
    score_group,
    score_samples,
)
from miles.rollout.sample import Sample
from miles.rollout.scripted_server import free_port


def S(response, label=None, **kw):
    return Sample(prompt="p", response=response, label=label, status=Sample.Status.COMPLETED, **kw)


def test_rule_values():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert math_reward(r"so the answer is \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert math_reward(r"the answer is \boxed{3}", "0.5") == 0.0
    assert math_reward("x = 84", "84") == 1.0
    assert boxed_reward(r"\boxed{42}", "42") == 1.0
    assert boxed_reward(r"\boxed{41} no wait \boxed{42}", r"\boxed{42}") == 1.0
    assert boxed_reward(r"\boxed{\frac{1}{2}}", "0.5") == 1.0
    assert boxed_reward("42", "42") == 0.0  # no \boxed{} → 0
    assert boxed_reward(r"\boxed{43}", "42") == 0.0
    assert exact_reward("  hello   world\n", "hello world") == 1.0
    assert exact_reward("hello", "Hello") == 0.0
    assert f1_reward("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert f1_reward("dog", "cat") == 0.0
    assert f1_reward("Yes.", "yes") == 1.0 and f1_reward("yes it is", "yes") == 0.0
    assert get_rule("boxed_exact")(r"so \boxed{abc}", "abc") == 1.0
    assert get_rule("boxed_f1")("no box", "abc") == 0.0
    with pytest.raises(ValueError, match="unknown --rm-type 'nope'"):
        get_rule("nope")


def test_builtin_rm_type_and_metadata_override():
    args = default_args(rm_type="exact")
    samples = [S("42", "42"), S("41", "42"), S(r"\boxed{42}", "42", metadata={"rm_type": "boxed"})]
    stats = asyncio.run(score_samples(args, samples))
    assert [s.reward for s in samples] == [1.0, 0.0, 1.0]
    assert (stats.errors, stats.timeouts) == (0, 0)


class RewardServer:
    """A real HTTP reward server on 127.0.0.1: fails the first `fail_first` calls with 500."""

    def __init__(self, fail_first=1):
        self.fail_first, self.calls, self.bodies = fail_first, 0, []
        self.port = free_port()
        self.ready = threading.Event()

    async def handle(self, request):
        self.calls += 1
        body = await request.json()
        self.bodies.append(body)
        if self.calls <= self.fail_first:
            return web.Response(status=500, text="transient")
        return web.json_response(1.0 if body["response"] == body["label"] else 0.0)

    def run(self):
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/rm", self.handle)
        self.runner = runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        threading.Thread(target=self.run, daemon=True).start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        async def shutdown():
            await self.runner.cleanup()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)


def test_remote_rm_retries_after_500():
    with RewardServer(fail_first=1) as server:
        args = default_args(rm_type="remote", rm_url=f"http://127.0.0.1:{server.port}/rm", rm_retry_backoff=0.05)
        samples = [S("yes", "yes")]
        stats = asyncio.run(score_samples(args, samples))
        assert samples[0].reward == 1.0
        assert server.calls == 2 and stats.errors == 0
        assert server.bodies[-1] == {"prompt": "p", "response": "yes", "label": "yes"}
        # a server that keeps failing: default reward, counted, no exception
        server.fail_first = 100
        args.rm_max_retries, args.rm_default_reward = 1, -1.0
        samples = [S("yes", "yes")]
        stats = asyncio.run(score_samples(args, samples))
        assert samples[0].reward == -1.0 and stats.errors == 1
        assert "HTTP 500" in stats.first_error


# ---- custom reward functions, written exactly as for slime -------------------------------------
async def custom_rm(args, sample, **kwargs):
    return {"score": float(sample.response == sample.label), "len": len(sample.response)}


async def group_rm(args, samples, **kwargs):
    best = max(len(s.response) for s in samples)
    return [1.0 if len(s.response) == best else 0.0 for s in samples]


async def raising_rm(args, sample, **kwargs):
    if sample.response == "boom":
        raise RuntimeError("reward exploded")
    return 1.0


async def sleepy_rm(args, sample, **kwargs):
    if sample.response == "hang":
        await asyncio.sleep(3600)
    return 1.0


def blocking_rm(args, sample, **kwargs):  # a sync rm that never returns
    time.sleep(3600)


async def bad_group_rm(args, samples, **kwargs):
    return [1.0]


def test_custom_rm_dict_with_reward_key():
    args = default_args(custom_rm_path=f"{__name__}.custom_rm", reward_key="score", rm_type="exact")
    samples = [S("a", "a"), S("bb", "a")]
    asyncio.run(score_samples(args, samples))
    assert samples[0].reward == {"score": 1.0, "len": 1}
    assert [s.get_reward_value(args) for s in samples] == [1.0, 0.0]
    # per-sample override (eval dataset config) wins over the flag
    s = S("x", "x", custom_rm_path=f"{__name__}.raising_rm")
    asyncio.run(score_samples(args, [s]))
    assert s.reward == 1.0


def test_group_rm():
    args = default_args(custom_rm_path=f"{__name__}.group_rm", group_rm=True)
    samples = [S("a"), S("abc"), S("ab")]
    stats = asyncio.run(score_group(args, samples, RewardStats()))
    assert [s.reward for s in samples] == [0.0, 1.0, 0.0] and stats.calls == 1
    args.custom_rm_path = f"{__name__}.bad_group_rm"
    samples = [S("a"), S("abc")]
    stats = asyncio.run(score_group(args, samples, RewardStats()))
    assert [s.reward for s in samples] == [0.0, 0.0] and stats.errors == 2
    assert "returned 1 values for 2 samples" in stats.first_error


@pytest.mark.parametrize("path", ["raising_rm", "sleepy_rm", "blocking_rm"])
def test_failing_rm_gives_default_within_timeout(path):
    args = default_args(custom_rm_path=f"{__name__}.{path}", rm_timeout=0.5, rm_default_reward=-0.5)
    bad = "hang" if path != "raising_rm" else "boom"
    samples = [S("ok"), S(bad), S("ok"), S(bad)]
    if path == "blocking_rm":
        samples = [S(bad), S(bad)]
    t0 = time.perf_counter()
    stats = asyncio.run(score_samples(args, samples))
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0  # concurrent: one timeout period, not one per sample
    expected = {"raising_rm": [1.0, -0.5, 1.0, -0.5], "sleepy_rm": [1.0, -0.5, 1.0, -0.5], "blocking_rm": [-0.5, -0.5]}
    assert [s.reward for s in samples] == expected[path]
    m = stats.metrics()
    if path == "raising_rm":
        assert m["rollout/reward_errors"] == 2 and m["rollout/reward_timeouts"] == 0
        assert m["rollout/reward_first_error"] == "raising_rm: RuntimeError: reward exploded"
    else:
        assert m["rollout/reward_timeouts"] == 2 and m["rollout/reward_errors"] == 0
        assert "timed out after 0.5s" in m["rollout/reward_first_error"]


def test_no_reward_configured_is_a_config_error():
    with pytest.raises(ValueError, match="no reward function"):
        asyncio.run(score_samples(default_args(), [S("a")]))


def test_aborted_or_prescored_samples_are_skipped():
    args = default_args(custom_rm_path=f"{__name__}.raising_rm")
    a, b = S("boom"), S("boom", reward=0.25)
    a.status = Sample.Status.ABORTED
    stats = asyncio.run(score_samples(args, [a, b]))
    assert a.reward is None and b.reward == 0.25 and stats.calls == 0


def test_reward_seconds_is_wall_clock_not_sum_of_concurrent_calls():
    import asyncio as _asyncio
    import time as _time

    from miles.rollout.rewards.executor import RewardStats, _guarded

    async def slow(args, sample):
        await _asyncio.sleep(0.2)
        return 1.0

    args = default_args(rm_timeout=5.0)
    stats = RewardStats()

    async def main():
        await _asyncio.gather(*[_guarded(slow, (args, None), args, stats) for _ in range(10)])

    t0 = _time.perf_counter()
    _asyncio.run(main())
    wall = _time.perf_counter() - t0
    assert stats.calls == 10
    assert 0.19 <= stats.seconds <= wall + 1e-3  # ten overlapping 0.2 s calls take ~0.2 s, not 2 s
