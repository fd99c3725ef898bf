"""Engines: behaviour log-probs are the sampling distribution's, scoring is untempered, and vLLM agrees with
the transformers reference (HFEngine) on the same tiny model.

The vLLM tests share one module-scoped float32 engine (its start-up, ~15-45 s on 2 cores, is paid once);
the bfloat16 and data-parallel tests start their own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engines.base import Generation, ScoredSequence, make_engine, token_batches
from pipeline.engines.hf import HFEngine
from storage.records import compute_tail_logprob

BOS, EOS = 1, 2
FP32_TOL = 1e-4  # vLLM vs HF in float32 (measured: <= 1e-6)
HF_TOL = 1e-5  # HF generate vs HF re-score, float32
BF16_TOL = 0.05  # vLLM bf16 vs HF bf16 (measured: ~3e-2 max, ~4e-3 mean; see docs/engines.md)

PROMPTS = [[BOS, 5, 6, 14, 7, 15], [BOS, 8, 15], [BOS, 13, 12, 14, 9, 9, 15], [BOS, 8, 15]]


def random_sequences(n: int, seed: int, lo: int = 4, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[BOS] + rng.integers(3, 19, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def flat(gens: list[list[Generation]]) -> list[Generation]:
    return [g for row in gens for g in row]


def sampled_sequences(prompts: list[list[int]], gens: list[list[Generation]]) -> tuple[list[list[int]], list[int]]:
    seqs, starts = [], []
    for p, row in zip(prompts, gens):
        for g in row:
            seqs.append(p + g.response_ids)
            starts.append(len(p))
    return seqs, starts


@torch.no_grad()
def processed_logprobs(model: torch.nn.Module, seq: list[int], start: int, temperature: float,
                       top_p: float) -> np.ndarray:
    """log p(seq[t]) for t >= start under HF's sampling distribution: logits / T, then top-p (HF's rule:
    drop the smallest tokens whose cumulative mass is <= 1 - top_p, keep at least one), log_softmax."""
    logits = model(torch.tensor([seq])).logits[0, start - 1 : len(seq) - 1].float() / temperature
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, torch.tensor(seq[start:]).unsqueeze(-1)).squeeze(-1).numpy()


def check_generation_shape(gens: list[list[Generation]], n: int, max_new_tokens: int) -> None:
    for row in gens:
        assert len(row) == n
        for g in row:
            assert len(g.response_ids) == len(g.logprobs) >= 1
            assert all(np.isfinite(g.logprobs)) and all(x <= 1e-6 for x in g.logprobs)
            assert EOS not in g.response_ids[:-1]
            if g.finish_reason == "stop":
                assert g.response_ids[-1] == EOS
            else:
                assert (g.finish_reason == "length" and len(g.response_ids) == max_new_tokens
                        and g.response_ids[-1] != EOS)


def check_scored(s: ScoredSequence, R: int, K: int) -> None:
    assert s.token_logprobs.shape == (R,) and s.token_logprobs.dtype == np.float32
    assert s.topk_ids.shape == (R, K) and s.topk_ids.dtype == np.int32
    assert s.topk_logprobs.shape == (R, K) and s.topk_logprobs.dtype == np.float32
    assert s.tail_logprob.shape == (R,) and s.tail_logprob.dtype == np.float32
    assert (np.diff(s.topk_logprobs, axis=-1) <= 0).all(), "top-k must be sorted descending"
    assert (s.token_logprobs <= s.topk_logprobs[:, 0] + 1e-6).all()
    np.testing.assert_allclose(s.tail_logprob, compute_tail_logprob(s.topk_logprobs), atol=1e-6)


def full_logprobs(hf: HFEngine, seqs: list[list[int]], starts: list[int]) -> list[np.ndarray]:
    """[R, V] untempered log-probs from the HF model (V = vocab, via a full top-k)."""
    V = hf.model.config.vocab_size
    out = []
    for s in hf.score(seqs, starts, V):
        full = np.full(s.topk_ids.shape, np.nan, np.float32)
        np.put_along_axis(full, s.topk_ids.astype(np.int64), s.topk_logprobs, axis=-1)
        out.append(full)
    return out


def diff_stats(a: list[ScoredSequence], b: list[ScoredSequence]) -> dict[str, float]:
    tok = np.concatenate([np.abs(x.token_logprobs - y.token_logprobs) for x, y in zip(a, b)])
    top = np.concatenate([np.abs(x.topk_logprobs - y.topk_logprobs).ravel() for x, y in zip(a, b)])
    return {"token_max": float(tok.max()), "token_mean": float(tok.mean()), "topk_max": float(top.max()),
            "topk_mean": float(top.mean())}


# ----------------------------------------------------------------------------------------------- HF engine
@pytest.fixture(scope="module")
def hf_teacher(tiny_models) -> HFEngine:
    return HFEngine(str(tiny_models["teacher"]), EngineConfig(dtype="float32"))


def test_hf_sampled_logprobs_equal_rescore(hf_teacher):
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=24, seed=3)
    gens = hf_teacher.generate(PROMPTS, sampling)
    check_generation_shape(gens, 3, 24)
    seqs, starts = sampled_sequences(PROMPTS, gens)
    for g, s in zip(flat(gens), hf_teacher.score(seqs, starts, 4)):
        np.testing.assert_allclose(g.logprobs, s.token_logprobs, atol=HF_TOL, rtol=0)


def test_hf_tempered_top_p_logprobs_are_the_sampling_distribution(hf_teacher):
    sampling = SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_new_tokens=24, seed=4)
    gens = hf_teacher.generate(PROMPTS, sampling)
    check_generation_shape(gens, 2, 24)
    seqs, starts = sampled_sequences(PROMPTS, gens)
    untempered = hf_teacher.score(seqs, starts, 1)
    for g, seq, start, raw in zip(flat(gens), seqs, starts, untempered):
        np.testing.assert_allclose(g.logprobs, processed_logprobs(hf_teacher.model, seq, start, 0.7, 0.9),
                                   atol=HF_TOL, rtol=0)
        assert not np.allclose(g.logprobs, raw.token_logprobs, atol=1e-3), ("tempered log-probs must differ from "
                                                                             "score()'s")


def test_hf_greedy_and_scoring_shapes(hf_teacher):
    gens = hf_teacher.generate(PROMPTS, SamplingConfig(n=1, temperature=0.0, max_new_tokens=12))
    check_generation_shape(gens, 1, 12)
    assert gens[1][0].response_ids == gens[3][0].response_ids  # same prompt, greedy
    seqs, starts = sampled_sequences(PROMPTS, gens)
    scored = hf_teacher.score(seqs, starts, 5)
    for g, s, seq, st in zip(flat(gens), scored, seqs, starts):
        check_scored(s, len(seq) - st, 5)
        np.testing.assert_allclose(g.logprobs, s.token_logprobs, atol=HF_TOL, rtol=0)
        assert (s.topk_ids[:, 0] == np.asarray(g.response_ids)).all()  # greedy = top-1


def test_hf_samples_depend_only_on_the_seed_when_threads_sample_at_once(tiny_models, hf_teacher):
    """A thread-pool task runner samples several shards at once; each shard must still be what its seed gives."""
    import threading

    other = HFEngine(str(tiny_models["teacher"]), EngineConfig(dtype="float32"))
    sampling = [SamplingConfig(n=2, max_new_tokens=12, seed=s) for s in (11, 12)]
    alone = [hf_teacher.generate(PROMPTS, s) for s in sampling]

    def sample(out: list, i: int, engine: HFEngine) -> None:
        out[i] = engine.generate(PROMPTS, sampling[i])

    for _ in range(5):
        together: list = [None, None]
        threads = [threading.Thread(target=sample, args=(together, i, e)) for i, e in enumerate((hf_teacher, other))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert together == alone


def test_token_batches_bound_tokens_and_keep_order():
    lengths = [3, 3, 3, 10, 1, 1, 2]
    assert token_batches(lengths, 6) == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 7)]
    # padded: items x the longest; an item over the budget goes alone
    assert token_batches([2, 5, 1, 1], 10, padded=True) == [slice(0, 2), slice(2, 4)]
    assert token_batches([1] * 5, 100, max_items=2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert token_batches([], 5) == []


def _count_calls(monkeypatch, obj, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def assert_same_scores(a: list[ScoredSequence], b: list[ScoredSequence], atol: float = 0.0) -> None:
    """Same ids; log-probs equal (atol 0: bit for bit)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.topk_ids, y.topk_ids)
        for name in ("token_logprobs", "topk_logprobs", "tail_logprob"):
            np.testing.assert_allclose(getattr(x, name), getattr(y, name), atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("k", [5, 0])
def test_hf_sub_batched_scoring_equals_one_batch(hf_teacher, tiny_models, monkeypatch, k):
    """score_tokens_per_call bounds each forward (and the lm head runs in chunks); the scores do not change
    beyond float32 rounding (CPU matrix kernels round differently for other batch shapes: measured <= 5e-7).
    k = 0 gives the sampled tokens' log-probs alone, equal to those of a top-k scoring."""
    import pipeline.engines.hf as hf_mod

    seqs = random_sequences(12, seed=6)
    starts = [int(np.random.default_rng(i).integers(1, len(s))) for i, s in enumerate(seqs)]
    one = hf_teacher.score(seqs, starts, k)
    small = HFEngine(str(tiny_models["teacher"]), EngineConfig(dtype="float32", score_tokens_per_call=90))
    calls = _count_calls(monkeypatch, small, "_score_batch")
    monkeypatch.setattr(hf_mod, "SCORE_CHUNK_BYTES", 4 * small.vocab_size * 7)  # lm head 7 positions at a time
    sub = small.score(seqs, starts, k)
    assert len(calls) >= 6
    assert_same_scores(one, sub, atol=2e-6)
    for s, seq, st in zip(sub, seqs, starts):
        assert s.topk_ids.shape == (len(seq) - st, k) and s.token_logprobs.shape == (len(seq) - st,)
    if k == 0:
        assert_same_scores([dataclasses.replace(s, topk_ids=s.topk_ids[:, :0], topk_logprobs=s.topk_logprobs[:, :0],
                                                tail_logprob=np.zeros_like(s.tail_logprob))
                            for s in hf_teacher.score(seqs, starts, 3)], one, atol=2e-6)


# --------------------------------------------------------------------------------------------- vLLM engine
# Not vLLM's defaults, so the resolved config shows they arrived; a step budget of 200 tokens also makes vLLM
# score prompts in chunks across engine steps, which every parity test below then covers.
VLLM_KNOBS = dict(max_num_batched_tokens=200, max_num_seqs=5, enable_prefix_caching=False, enable_chunked_prefill=True)


@pytest.fixture(scope="module")
def vllm_teacher(tiny_models):
    cfg = EngineConfig(name="vllm", dtype="float32", **VLLM_KNOBS)
    engine = make_engine(str(tiny_models["teacher"]), cfg, seed=0, max_logprobs=20)
    print(f"\nvLLM float32 engine init: {engine.init_seconds:.1f} s")
    yield engine
    engine.close()


@pytest.mark.vllm
def test_vllm_score_matches_hf_fp32(vllm_teacher, hf_teacher):
    L_max = vllm_teacher.max_model_len
    seqs = random_sequences(12, seed=0)
    # Sequences exactly max_model_len long take vLLM's other path for their last position (see
    # VLLMEngine._score): one ending in the most likely token (inside any top-k), one in the least likely.
    base = random_sequences(1, seed=1, lo=L_max - 1, hi=L_max)[0]
    assert len(base) == L_max
    last = full_logprobs(hf_teacher, [base], [L_max - 1])[0][-1]
    seqs += [base[:-1] + [int(np.argmax(last))], base[:-1] + [int(np.argmin(last))]]
    starts = [1] + [int(np.random.default_rng(i).integers(1, len(s))) for i, s in enumerate(seqs[1:])]
    for k in (8, 2):
        v = vllm_teacher.score(seqs, starts, k)
        h = hf_teacher.score(seqs, starts, k)
        full = full_logprobs(hf_teacher, seqs, starts)
        for a, b, f, seq, st in zip(v, h, full, seqs, starts):
            check_scored(a, len(seq) - st, k)
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=FP32_TOL, rtol=0)
            np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=FP32_TOL, rtol=0)
            np.testing.assert_allclose(a.tail_logprob, b.tail_logprob, atol=1e-3, rtol=0)
            # ids agree up to ties: every id vLLM picked has (under HF) the log-prob vLLM reports
            np.testing.assert_allclose(np.take_along_axis(f, a.topk_ids.astype(np.int64), -1), a.topk_logprobs,
                                       atol=FP32_TOL, rtol=0)
        same = np.mean([(a.topk_ids == b.topk_ids).mean() for a, b in zip(v, h)])
        assert same > 0.99
        print(f"k={k} vLLM vs HF float32: {diff_stats(v, h)}, top-k ids equal: {same:.4f}")


@pytest.mark.vllm
def test_vllm_knobs_reach_the_engine(vllm_teacher):
    """EngineConfig's scheduler knobs are what vLLM runs with (its resolved config), not its defaults."""
    config = vllm_teacher.llm.llm_engine.vllm_config
    assert config.scheduler_config.max_num_batched_tokens == VLLM_KNOBS["max_num_batched_tokens"]
    assert config.scheduler_config.max_num_seqs == VLLM_KNOBS["max_num_seqs"]
    assert config.scheduler_config.enable_chunked_prefill is True
    assert config.cache_config.enable_prefix_caching is False


@pytest.mark.vllm
@pytest.mark.parametrize("k", [8, 0])
def test_vllm_sub_batched_scoring_equals_one_batch(vllm_teacher, monkeypatch, k):
    """score_tokens_per_call splits a call into several vLLM requests; the scores do not change. k = 0
    (Lightning-only) gives the sampled tokens' log-probs alone, equal to those of a top-k scoring."""
    seqs = random_sequences(10, seed=5)
    seqs.append(random_sequences(1, seed=1, lo=vllm_teacher.max_model_len - 1, hi=vllm_teacher.max_model_len)[0])
    starts = [2] * len(seqs)
    one = vllm_teacher.score(seqs, starts, k)
    monkeypatch.setattr(vllm_teacher, "cfg", vllm_teacher.cfg.model_copy(update={"score_tokens_per_call": 100}))
    calls = _count_calls(monkeypatch, vllm_teacher.llm, "generate")
    sub = vllm_teacher.score(seqs, starts, k)
    assert len(calls) >= 4
    assert_same_scores(one, sub)
    if k == 0:
        assert all(s.topk_ids.shape == (len(q) - 2, 0) for s, q in zip(sub, seqs))
        with_topk = vllm_teacher.score(seqs, starts, 4)
        for a, b in zip(sub, with_topk):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-6, rtol=0)


@pytest.mark.vllm
def test_vllm_sampled_logprobs_equal_hf_rescore(vllm_teacher, hf_teacher):
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=24, seed=5)
    gens = vllm_teacher.generate(PROMPTS, sampling)
    check_generation_shape(gens, 3, 24)
    assert {g.finish_reason for g in flat(gens)} == {"stop", "length"}  # both kinds exercised
    seqs, starts = sampled_sequences(PROMPTS, gens)
    diffs = [np.abs(np.asarray(g.logprobs) - s.token_logprobs).max()
             for g, s in zip(flat(gens), hf_teacher.score(seqs, starts, 1))]
    print(f"vLLM sampled vs HF re-score (T=1): max {max(diffs):.2e}")
    assert max(diffs) <= FP32_TOL


@pytest.mark.vllm
def test_vllm_behaviour_logprobs_are_processed(vllm_teacher, hf_teacher):
    """temperature/top-p applied, like HFEngine: vLLM's logprobs_mode="processed_logprobs"."""
    gens = vllm_teacher.generate(PROMPTS, SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_new_tokens=24, seed=6))
    check_generation_shape(gens, 2, 24)
    seqs, starts = sampled_sequences(PROMPTS, gens)
    worst = 0.0
    for g, seq, st in zip(flat(gens), seqs, starts):
        ref = processed_logprobs(hf_teacher.model, seq, st, 0.7, 0.9)
        np.testing.assert_allclose(g.logprobs, ref, atol=FP32_TOL, rtol=0)
        worst = max(worst, float(np.abs(np.asarray(g.logprobs) - ref).max()))
    print(f"vLLM sampled (T=0.7, top_p=0.9) vs manual processed log-probs: max {worst:.2e}")


@pytest.mark.vllm
def test_vllm_greedy_matches_hf(vllm_teacher, hf_teacher):
    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=16)
    v, h = vllm_teacher.generate(PROMPTS, sampling), hf_teacher.generate(PROMPTS, sampling)
    for a, b in zip(flat(v), flat(h)):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=FP32_TOL, rtol=0)


@pytest.mark.vllm
def test_vllm_sampling_seeds(vllm_teacher):
    """Samples depend on (seed, prompt, occurrence) only: not on batching; repeated prompts differ."""
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=16, seed=7)
    all_ = vllm_teacher.generate(PROMPTS, sampling)
    alone = vllm_teacher.generate([PROMPTS[2]], sampling)
    assert [g.response_ids for g in alone[0]] == [g.response_ids for g in all_[2]]
    np.testing.assert_allclose(alone[0][0].logprobs, all_[2][0].logprobs, atol=1e-5)
    assert [g.response_ids for g in all_[1]] != [g.response_ids for g in all_[3]]  # same prompt twice
    other = vllm_teacher.generate(PROMPTS, sampling.model_copy(update={"seed": 8}))
    assert [g.response_ids for g in flat(other)] != [g.response_ids for g in flat(all_)]


@pytest.mark.vllm
def test_vllm_edge_cases(vllm_teacher):
    # generation stops at max_model_len (prompt + response), reported as "length"
    long = vllm_teacher.generate([PROMPTS[0]], SamplingConfig(n=1, temperature=0.0, max_new_tokens=500))[0][0]
    assert len(PROMPTS[0]) + len(long.response_ids) <= vllm_teacher.max_model_len
    assert long.finish_reason == "length" or long.response_ids[-1] == EOS
    assert len(long.logprobs) == len(long.response_ids)
    with pytest.raises(ValueError, match="max_logprobs"):
        vllm_teacher.score([[BOS, 5, 6]], [1], 21)
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_teacher.score([[BOS] + [5] * vllm_teacher.max_model_len], [1], 2)
    assert vllm_teacher.generate([], SamplingConfig()) == [] and vllm_teacher.score([], [], 3) == []


@pytest.mark.vllm
def test_vllm_bf16_close_to_hf(tiny_models, vllm_teacher):
    """bfloat16 engines agree only loosely: the stated bound is BF16_TOL on log-probs (both engines bf16)."""
    from pipeline.engines.vllm_engine import VLLMEngine

    seqs = random_sequences(16, seed=2)
    starts = [1] * len(seqs)
    hf16 = HFEngine(str(tiny_models["teacher"]), EngineConfig(dtype="bfloat16"))
    hf32 = HFEngine(str(tiny_models["teacher"]), EngineConfig(dtype="float32"))
    with VLLMEngine(str(tiny_models["teacher"]), EngineConfig(name="vllm", dtype="bfloat16"), seed=0) as v16:
        print(f"\nvLLM bfloat16 engine init: {v16.init_seconds:.1f} s")
        a = v16.score(seqs, starts, 8)
    b, ref = hf16.score(seqs, starts, 8), hf32.score(seqs, starts, 8)
    v32 = vllm_teacher.score(seqs, starts, 8)
    stats = {"vllm_bf16_vs_hf_bf16": diff_stats(a, b), "vllm_bf16_vs_hf_fp32": diff_stats(a, ref),
             "hf_bf16_vs_hf_fp32": diff_stats(b, ref), "vllm_fp32_vs_hf_fp32": diff_stats(v32, ref)}
    for name, s in stats.items():
        print(name, {k: f"{x:.2e}" for k, x in s.items()})
    assert stats["vllm_bf16_vs_hf_bf16"]["token_max"] <= BF16_TOL
    assert stats["vllm_bf16_vs_hf_bf16"]["topk_max"] <= BF16_TOL
    assert stats["vllm_fp32_vs_hf_fp32"]["token_max"] <= FP32_TOL


@pytest.mark.vllm
def test_vllm_data_parallel_reproduces_single_engine(tiny_models, vllm_teacher):
    """data_parallel_size=2: two worker processes, each with its own LLM; same samples and scores."""
    from pipeline.engines.vllm_engine import VLLMEngine

    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=16, seed=9)
    prompts = PROMPTS + PROMPTS[:1]  # 5 prompts: uneven split
    seqs = random_sequences(5, seed=3)
    starts = [2] * len(seqs)
    with VLLMEngine(str(tiny_models["teacher"]), EngineConfig(name="vllm", dtype="float32", data_parallel_size=2),
                    seed=0) as dp:
        print(f"\nvLLM data_parallel_size=2 init: {dp.init_seconds:.1f} s")
        assert (dp.vocab_size, dp.max_model_len) == (vllm_teacher.vocab_size, vllm_teacher.max_model_len)
        g_dp, s_dp = dp.generate(prompts, sampling), dp.score(seqs, starts, 4)
    g_one, s_one = vllm_teacher.generate(prompts, sampling), vllm_teacher.score(seqs, starts, 4)
    assert [[g.response_ids for g in r] for r in g_dp] == [[g.response_ids for g in r] for r in g_one]
    for a, b in zip(flat(g_dp), flat(g_one)):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    for a, b in zip(s_dp, s_one):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)
        assert (a.topk_ids == b.topk_ids).all()


@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_gpu_matches_hf(tiny_models):
    """On a CUDA machine (plain ``vllm``): the same parity, fp32, on the GPU."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pipeline.engines.vllm_engine import VLLMEngine

    seqs = random_sequences(8, seed=4)
    starts = [1] * len(seqs)
    hf = HFEngine(str(tiny_models["teacher"]), EngineConfig(dtype="float32"))
    cfg = EngineConfig(name="vllm", dtype="float32", gpu_memory_utilization=0.3)
    with VLLMEngine(str(tiny_models["teacher"]), cfg, seed=0) as v:
        a = v.score(seqs, starts, 8)
        gens = v.generate(PROMPTS, SamplingConfig(n=2, max_new_tokens=16, seed=1))
    b = hf.score(seqs, starts, 8)
    assert diff_stats(a, b)["token_max"] <= 1e-3  # TF32/kernels on GPU: looser than CPU
    s2, st2 = sampled_sequences(PROMPTS, gens)
    for g, s in zip(flat(gens), hf.score(s2, st2, 1)):
        np.testing.assert_allclose(g.logprobs, s.token_logprobs, atol=1e-3, rtol=0)


def test_hf_stops_on_generation_config_end_tokens_and_the_position_limit(tiny_models, tmp_path):
    """Like vLLM: every eos_token_id of generation_config.json ends a response, and prompt + response never
    exceed max_position_embeddings (finish reason "length")."""
    import shutil

    from transformers import GenerationConfig

    base = HFEngine(str(tiny_models["teacher"]), EngineConfig(dtype="float32"))
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
    first = base.generate(PROMPTS[:1], greedy)[0][0].response_ids
    assert len(first) > 3 and EOS not in first[:4], first
    stop_token = first[3]  # a token greedy decoding emits; the response must now end at its first occurrence
    model_dir = tmp_path / "two_eos"
    shutil.copytree(tiny_models["teacher"], model_dir)
    GenerationConfig(eos_token_id=[EOS, stop_token], bos_token_id=BOS, pad_token_id=0).save_pretrained(model_dir)
    two_eos = HFEngine(str(model_dir), EngineConfig(dtype="float32"))
    assert two_eos.eos_ids == sorted({EOS, stop_token})
    got = two_eos.generate(PROMPTS[:1], greedy)[0][0]
    assert got.response_ids == first[: first.index(stop_token) + 1] and got.finish_reason == "stop"

    limit = base.model.config.max_position_embeddings
    for prompt, row in zip(PROMPTS, base.generate(PROMPTS, SamplingConfig(n=2, max_new_tokens=limit + 50, seed=1))):
        for g in row:
            assert len(prompt) + len(g.response_ids) <= limit
            assert g.finish_reason == "stop" or len(prompt) + len(g.response_ids) == limit
