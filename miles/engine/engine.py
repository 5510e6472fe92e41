"""`LLMEngine`: the offline / step-level API of the native rollout engine."""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from miles.engine.attention import KVCache
from miles.engine.block_manager import BlockManager
from miles.engine.config import EngineConfig
from miles.engine.detokenizer import IncrementalDetokenizer
from miles.engine.model_runner import ModelRunner
from miles.engine.sampler import SamplingBatch
from miles.engine.scheduler import Scheduler
from miles.engine.sequence import RequestOutput, SamplingParams, Sequence
from miles.models import CausalLM, load_hf_items, load_model, load_tokenizer


@dataclass
class EngineStats:
    """Counters a server can report (and tests assert on). `batch_sizes` keeps the last 10k steps."""

    num_steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_generated_tokens: int = 0
    num_finished: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=10000))
    busy_time_s: float = 0.0
    trace: list | None = None  # set to [] to record (seconds, num_seqs, num_tokens, decode_only, kv_tokens) per step

    def as_dict(self, engine: LLMEngine) -> dict:
        bm = engine.block_manager
        return dict(
            num_steps=self.num_steps, num_prefill_tokens=self.num_prefill_tokens,
            num_decode_tokens=self.num_decode_tokens, num_generated_tokens=self.num_generated_tokens,
            num_finished=self.num_finished, max_batch_size=max(self.batch_sizes, default=0),
            num_preemptions=engine.scheduler.num_preemptions, num_allocated_blocks=bm.num_allocated_blocks,
            num_prefix_hit_blocks=bm.num_prefix_hit_blocks, num_free_blocks=bm.num_free_blocks,
            num_kv_blocks=bm.num_blocks, num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting), weight_version=engine.weight_version,
            num_graph_replays=engine.runner.num_graph_replays, busy_time_s=self.busy_time_s,
        )


class LLMEngine:
    """Continuous-batching engine over the unified `miles.models.CausalLM` (see package docs).

    Step-level API: `add_request` / `step` / `abort` / `has_unfinished`; offline API: `generate`.
    """

    def __init__(self, config: EngineConfig, model: CausalLM | None = None, tokenizer=None):
        self.config = config
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype = device, config.torch_dtype
        self.model = model if model is not None else load_model(config.model, dtype=self.dtype, device=device)
        self.model.eval()
        mc = self.model.config
        self.tokenizer = tokenizer
        if tokenizer is None and config.load_tokenizer:
            self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        use_graphs = device.type == "cuda" and not config.enforce_eager
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.max_model_len,
                                  config.max_num_seqs, use_graphs, config.cuda_graph_max_bs, config.compile)
        self.scheduler.on_release = self.runner.release
        self.weight_version = 0
        self.stats = EngineStats()
        self.paused = False
        self.asleep = False
        self._requests: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)

    # ---- setup ---------------------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        eos = self.model.config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _num_kv_blocks(self) -> int:
        c, mc = self.config, self.model.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        per_block = KVCache.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                                            self.dtype) * c.block_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            reserve = 2 * 2**30 + c.max_num_batched_tokens * mc.hidden_size * 64 + c.max_num_seqs * mc.vocab_size * 16
            return max(1, int((free * c.kv_memory_fraction - reserve) // per_block))
        return max(1, math.ceil(c.kv_cache_tokens / c.block_size))

    def capture_cuda_graphs(self) -> None:
        """Capture the decode graphs now (otherwise done at the first pure-decode step)."""
        self.runner.capture_graphs()

    # ---- requests ------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for requests that can never be served."""
        params = params or SamplingParams()
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError(f"request {rid}: empty prompt")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {rid}: token id out of range [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"request {rid}: prompt has {len(prompt)} tokens; the context is {self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {rid}: stop strings need a tokenizer")
        max_new = min(params.max_new_tokens, self.max_model_len - len(prompt))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seq = Sequence(rid, prompt, params, seed=int(seed), max_new_tokens=max_new)
        if params.stop:
            seq.detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                               params.no_stop_trim)
        self.scheduler.add(seq)
        self._requests[rid] = seq
        return rid

    def abort(self, request_id: str) -> bool:
        """Abort a request; its output (finish_reason "abort") comes with the next `step`. False if unknown."""
        seq = self._requests.get(str(request_id))
        if seq is None or seq.finished:
            return False
        self.scheduler.finish(seq, "abort")
        self._pending.append(self._output(seq))
        return True

    def abort_all(self) -> int:
        return sum(self.abort(rid) for rid in list(self._requests))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- stepping ------------------------------------------------------------------------------------------
    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        dev = self.device
        temps = [s.params.temperature for s in seqs]
        banned = []
        for s in seqs:
            ban: list[int] = []
            if s.num_output < s.params.min_new_tokens:
                ban = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else sorted(self.eos_ids))
            banned.append(ban)
        return SamplingBatch(
            temperatures=torch.tensor(temps, dtype=torch.float32).to(dev, non_blocking=True),
            top_ps=torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32).to(dev, non_blocking=True),
            top_ks=torch.tensor([s.params.top_k for s in seqs], dtype=torch.long).to(dev, non_blocking=True),
            seeds=torch.tensor([s.seed for s in seqs], dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.tensor([len(s) for s in seqs], dtype=torch.long).to(dev, non_blocking=True),
            banned=banned,
            all_greedy=all(t == 0 for t in temps),
            any_truncation=any(s.params.top_p < 1 or s.params.top_k > 0 for s in seqs),
        )

    def step(self, stream: bool = True) -> list[RequestOutput]:
        """Run one scheduling step; return outputs for requests that got tokens, finished or were aborted.

        `stream=False` reports finished requests only (less per-step work for offline generation)."""
        outputs, self._pending = self._pending, []
        if self.paused or self.asleep:
            return outputs
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running:  # never expected: fail loudly, never hang
                seq = self.scheduler.waiting[0]
                raise RuntimeError(f"scheduler cannot admit request {seq.request_id} ({len(seq)} tokens) into an "
                                   f"idle engine ({self.block_manager.num_free_blocks} free KV blocks)")
            return outputs
        samplers = [s for s, n in batch if s.num_computed + n == len(s)]
        sb = self._sampling_batch(samplers) if samplers else None
        want_routing = any(s.params.return_routed_experts for s, _ in batch)
        tokens, logprobs, routed = self.runner.run(batch, sb, want_routing)
        st = self.stats
        st.num_steps += 1
        st.batch_sizes.append(len(batch))
        for seq, n in batch:
            if n == 1 and seq.num_computed + 1 == len(seq) and seq.num_output > 0:
                st.num_decode_tokens += 1
            else:
                st.num_prefill_tokens += n
        offset = 0
        for seq, n in batch:
            if routed is not None and seq.params.return_routed_experts:
                seq.routed_experts.append(routed[offset : offset + n])
            offset += n
            seq.num_computed += n
            self.block_manager.mark_computed(seq)
        for seq, tok, lp in zip(samplers, tokens, logprobs):
            self._append(seq, tok, lp)
            if stream or seq.finished:
                outputs.append(self._output(seq))
        st.num_generated_tokens += len(tokens)
        dt = time.perf_counter() - t0
        st.busy_time_s += dt
        if st.trace is not None:
            decode_only = all(n == 1 for _, n in batch) and len(samplers) == len(batch)
            kv = sum(s.num_computed for s, _ in batch)
            st.trace.append((dt, len(batch), sum(n for _, n in batch), decode_only, kv))
        return outputs

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.append(token, logprob)
        p = seq.params
        stop_str = seq.detok.append(token) if seq.detok is not None else None
        can_stop = seq.num_output > p.min_new_tokens  # tokens before min_new_tokens were banned from stopping
        if can_stop and (token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos)):
            self.scheduler.finish(seq, "stop", token)
        elif can_stop and stop_str is not None:
            self.scheduler.finish(seq, "stop", stop_str)
        elif seq.num_output >= seq.max_new_tokens:
            self.scheduler.finish(seq, "length")
        if seq.finished:
            self.stats.num_finished += 1

    def _output(self, seq: Sequence) -> RequestOutput:
        new = seq.num_output - seq.num_reported
        seq.num_reported = seq.num_output
        text = None
        if seq.finished:
            self._requests.pop(seq.request_id, None)
            if seq.detok is not None and seq.finish_reason == "stop" and isinstance(seq.matched_stop, str):
                text = seq.detok.text
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
        routed = None
        if seq.finished and seq.params.return_routed_experts and seq.routed_experts:
            routed = torch.cat(seq.routed_experts).tolist()
        return RequestOutput(
            request_id=seq.request_id, prompt_ids=seq.prompt_ids, output_ids=seq.out_ids,
            logprobs=seq.logprobs, finish_reason=seq.finish_reason, finished=seq.finished,
            weight_version=self.weight_version, routed_experts=routed, new_token_count=new, text=text,
            matched_stop=seq.matched_stop, cached_tokens=seq.num_cached_prompt, num_preemptions=seq.num_preemptions,
        )

    # ---- offline API ---------------------------------------------------------------------------------------
    def generate(self, prompts: Seq[str] | Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in input order."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        for prompt, p in zip(prompts, params):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("generate: text prompts need a tokenizer")
                prompt = self.tokenizer.encode(prompt, add_special_tokens=False)
            ids.append(self.add_request(prompt, p))
        return self.run_until_done(ids, progress)

    def run_until_done(self, request_ids: list[str], progress: bool = False) -> list[RequestOutput]:
        """Step until the given requests finish; returns their final outputs in order."""
        want = set(request_ids)
        done: dict[str, RequestOutput] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(want), file=sys.stderr, desc="generate", unit="req", dynamic_ncols=True)
        while len(done) < len(want):
            if self.paused or self.asleep:
                raise RuntimeError("run_until_done: the engine is paused or asleep")
            for out in self.step(stream=False):
                if out.finished and out.request_id in want:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[r] for r in request_ids]

    # ---- weights -------------------------------------------------------------------------------------------
    def update_weights(self, items: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Copy HF-named tensors into the model in place (one bucket per call; unknown names raise).

        `version`: the new weight version (pass the same value for every bucket of one update); None bumps it.
        The prefix cache is flushed: KV computed with the old weights is not reused for new requests.
        """
        load_hf_items(self.model, items, source="update_weights")
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        self.block_manager.reset_prefix_cache()
        return self.weight_version

    def update_weights_from_disk(self, path: str | Path, version: int | None = None) -> int:
        """Load every tensor of the HF safetensors checkpoint in `path` (validated like `load_model`)."""
        from safetensors import safe_open

        from miles.models.hf_io import checkpoint_files

        files = checkpoint_files(path)
        for file in files:
            with safe_open(file, framework="pt") as f:
                load_hf_items(self.model, ((n, f.get_tensor(n)) for n in f.keys()), source=str(file))
        self.weight_version = self.weight_version + 1 if version is None else int(version)
        self.block_manager.reset_prefix_cache()
        return self.weight_version

    def pause(self) -> None:
        """Stop scheduling (in-flight requests keep their KV); `step` only returns pending abort outputs."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def flush_cache(self) -> bool:
        """Drop the prefix cache. False (nothing done) while requests are running or waiting, like SGLang."""
        if self.scheduler.has_unfinished():
            return False
        self.block_manager.reset_prefix_cache()
        return True

    # ---- memory --------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the KV cache and move the weights to CPU. Running requests are retracted (recomputed later)."""
        if self.asleep:
            return
        self.scheduler.retract_all()
        self.block_manager.reset_prefix_cache()
        self.runner.free_cache()
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the weights' memory back to the driver, not just to torch's cache
        self.asleep = True

    def wake_up(self) -> None:
        """Move the weights back to the engine device and re-allocate the KV cache."""
        if not self.asleep:
            return
        self.model.to(self.device)
        self.runner.allocate_cache()
        self.asleep = False
