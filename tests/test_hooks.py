import asyncio
import time

import pytest

from miles.rollout.hooks import accepts_kwarg, call_maybe_async, load_function


def sample_hook(args, sample, sampling_params, evaluation=False):
    return "ok"


def test_load_function_resolves_last_dot():
    assert load_function(f"{__name__}.sample_hook") is sample_hook
    assert load_function("os.path.join") is __import__("os").path.join
    assert load_function(None) is None and load_function("") is None


def test_load_function_errors_are_clear():
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        load_function("no_such_pkg_xyz.mod.fn")
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        load_function(f"{__name__}.nope")
    with pytest.raises(ValueError, match="dotted path"):
        load_function("justaname")
    with pytest.raises(ValueError, match="file.py:function"):
        load_function("my_file.py:fn")


def test_accepts_kwarg_and_call_maybe_async():
    assert accepts_kwarg(sample_hook, "evaluation")
    assert not accepts_kwarg(lambda args, sample, params: None, "evaluation")

    async def async_fn(x):
        return x + 1

    def blocking(x):
        time.sleep(0.05)
        return x * 2

    async def main():
        # the sync function runs off the loop: the two calls overlap
        t0 = time.perf_counter()
        calls = [call_maybe_async(async_fn, 1)] + [call_maybe_async(blocking, i) for i in range(4)]
        results = await asyncio.gather(*calls)
        return results, time.perf_counter() - t0

    results, elapsed = asyncio.run(main())
    assert results == [2, 0, 2, 4, 6]
    assert elapsed < 0.15


def test_hung_sync_hook_does_not_block_loop_shutdown():
    def forever():
        time.sleep(3600)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call_maybe_async(forever), timeout=0.1)

    t0 = time.perf_counter()
    asyncio.run(main())
    assert time.perf_counter() - t0 < 2.0


def test_slime_builtin_paths_resolve_to_miles():
    from miles.rollout.data import RolloutDataSourceWithBuffer
    from miles.rollout.filters import check_reward_nonzero_std
    from miles.rollout.rollout import generate_rollout

    assert load_function("slime.rollout.sglang_rollout.generate_rollout") is generate_rollout
    assert load_function("slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std") is (
        check_reward_nonzero_std
    )
    assert load_function("miles.rollout.data_source.RolloutDataSourceWithBuffer") is RolloutDataSourceWithBuffer
    with pytest.raises(ImportError, match="slime.nope"):
        load_function("slime.nope.fn")
