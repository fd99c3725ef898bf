"""Synthetic teacher top-k records that imitate real LM next-token distributions (no model needed).

Used by the storage benchmark and tests. Every position's full distribution over the vocabulary is

    p = (1 - eps) * head + eps * background

* background = softmax(log_prior + id_noise * z + topic_boost * [id in topic]), with
  - log_prior: a Zipf(zipf_exponent) unigram prior over the id, offset zipf_offset, on an id rank
    jittered by a log-normal factor (BPE ids are only roughly frequency-ordered);
  - z ~ N(0, 1) per position and id: the context-specific part of the logits;
  - topic: topic_size ids drawn from the prior once per rollout (burstiness of content words).
* head = a few "context" tokens (1 with probability single_head_prob, else 2..max_head_tokens,
  weights ~ Dirichlet(head_concentration)), drawn from the prior or from the rollout's topic.
* eps (mass off the head): log10 eps ~ Normal(eps_log10_mean, eps_log10_sd), clipped to [-9, -0.05].

The defaults are calibrated to the entropy profile reported for Qwen3-8B chain-of-thought tokens
(Wang et al. 2025, arXiv 2506.01939: over 50% of tokens below 0.01 nats, about 20% above 0.672):
the generator reports its own entropy quantiles so the calibration can be checked. How concentrated
the top-k ids are on small ids (id_noise) is NOT calibrated on real data; the benchmark sweeps it.

The sampled response token is drawn from p itself (top-k entries with their probabilities, the rest
approximately by the prior), so the teacher's top-k holds it about as often as in consistent
teacher/student pairs; behaviour log-probs are the teacher's plus N(0, behavior_noise), capped at 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from storage.records import TeacherRecord, compute_tail_logprob


@dataclass(frozen=True)
class SyntheticConfig:
    vocab_size: int = 151_936
    k: int = 128
    num_rollouts: int = 16
    response_len: int = 128
    prompt_len: int = 16
    zipf_exponent: float = 1.0
    zipf_offset: float = 20.0
    id_jitter: float = 0.5  # sd of the log-normal factor on the id rank
    id_noise: float = 2.5  # sd of the per-position logit noise: larger = top-k ids less concentrated
    topic_size: int = 200
    topic_boost: float = 3.0
    eps_log10_mean: float = -3.5
    eps_log10_sd: float = 1.5
    single_head_prob: float = 0.8
    max_head_tokens: int = 6
    head_concentration: float = 0.7
    behavior_noise: float = 0.3
    seed: int = 0
    chunk: int = 64  # positions generated at once (memory: chunk * vocab_size * 4 bytes)

    def to_dict(self) -> dict:
        return asdict(self)


def _log_prior(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    rank = np.arange(cfg.vocab_size, dtype=np.float64) * np.exp(cfg.id_jitter * rng.standard_normal(cfg.vocab_size))
    lp = -cfg.zipf_exponent * np.log(rank + cfg.zipf_offset)
    return lp - np.logaddexp.reduce(lp)


def _position_logprobs(cfg: SyntheticConfig, rng: np.random.Generator, log_prior: np.ndarray, prior: np.ndarray,
                       topics: list[np.ndarray]) -> np.ndarray:
    """Full log-distributions, float32 [len(topics), V]; topics[i] is position i's rollout topic."""
    m, v = len(topics), cfg.vocab_size
    z = rng.standard_normal((m, v), dtype=np.float32)
    z *= np.float32(cfg.id_noise)
    z += log_prior.astype(np.float32)
    for i, topic in enumerate(topics):
        z[i, topic] += np.float32(cfg.topic_boost)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    eps = 10.0 ** np.clip(rng.normal(cfg.eps_log10_mean, cfg.eps_log10_sd, m), -9.0, -0.05)
    for i, topic in enumerate(topics):
        n_head = 1 if rng.random() < cfg.single_head_prob else int(rng.integers(2, cfg.max_head_tokens + 1))
        n_head = min(n_head, v)
        if rng.random() < 0.5 or len(topic) < n_head:
            head = rng.choice(v, size=n_head, replace=False, p=prior)
        else:
            head = rng.choice(np.unique(topic), size=min(n_head, len(np.unique(topic))), replace=False)
        w = rng.dirichlet(np.full(len(head), cfg.head_concentration))
        z[i] += np.float32(np.log(eps[i]))
        z[i, head] = np.logaddexp(z[i, head], np.log((1.0 - eps[i]) * w + 1e-300)).astype(np.float32)
    return z


def _sample_tokens(cfg: SyntheticConfig, rng: np.random.Generator, z: np.ndarray, top_ids: np.ndarray,
                   top_lp: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """One sampled token per position: from the top-k by probability, else (the tail) by the prior."""
    p_top = np.exp(top_lp.astype(np.float64))
    u = rng.random(len(z)) * np.maximum(p_top.sum(axis=1), 1.0)
    cum = np.cumsum(p_top, axis=1)
    pick = np.minimum((cum < u[:, None]).sum(axis=1), cfg.k - 1)
    tokens = top_ids[np.arange(len(z)), pick]
    in_tail = u > cum[:, -1]
    for i in np.flatnonzero(in_tail):
        while True:
            t = int(rng.choice(cfg.vocab_size, p=prior))
            if t not in top_ids[i]:
                break
        tokens[i] = t
    return tokens


def generate(cfg: SyntheticConfig) -> tuple[list[TeacherRecord], dict]:
    """Records and a summary of the distributions (entropy quantiles, id concentration)."""
    rng = np.random.default_rng(cfg.seed)
    log_prior = _log_prior(cfg, rng)
    prior = np.exp(log_prior)
    prior /= prior.sum()
    n_pos = cfg.num_rollouts * cfg.response_len
    topic_of_rollout = [rng.choice(cfg.vocab_size, size=min(cfg.topic_size, cfg.vocab_size), p=prior)
                        for _ in range(cfg.num_rollouts)]
    ids_T_K = np.empty((n_pos, cfg.k), np.int32)
    lp_T_K = np.empty((n_pos, cfg.k), np.float32)
    sampled_T = np.empty(n_pos, np.int64)
    teacher_T = np.empty(n_pos, np.float32)
    entropy_T = np.empty(n_pos)
    for a in range(0, n_pos, cfg.chunk):
        b = min(n_pos, a + cfg.chunk)
        z = _position_logprobs(cfg, rng, log_prior, prior,
                               [topic_of_rollout[i // cfg.response_len] for i in range(a, b)])
        entropy_T[a:b] = -(np.exp(z.astype(np.float64)) * z).sum(axis=1)
        part = (np.argpartition(-z, cfg.k - 1, axis=1)[:, : cfg.k] if cfg.k < cfg.vocab_size
                else np.tile(np.arange(cfg.k), (b - a, 1)))
        vals = np.take_along_axis(z, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        ids_T_K[a:b] = np.take_along_axis(part, order, axis=1)
        lp_T_K[a:b] = np.take_along_axis(vals, order, axis=1)
        sampled_T[a:b] = _sample_tokens(cfg, rng, z, ids_T_K[a:b], lp_T_K[a:b], prior)
        teacher_T[a:b] = z[np.arange(b - a), sampled_T[a:b]]
    records = _records(cfg, rng, prior, ids_T_K, lp_T_K, sampled_T, teacher_T)
    return records, _summary(cfg, ids_T_K, lp_T_K, sampled_T, entropy_T)


def _records(cfg, rng, prior, ids_T_K, lp_T_K, sampled_T, teacher_T) -> list[TeacherRecord]:
    records = []
    r = cfg.response_len
    tail_T = compute_tail_logprob(lp_T_K)
    for i in range(cfg.num_rollouts):
        sl = slice(i * r, (i + 1) * r)
        prompt = rng.choice(cfg.vocab_size, size=cfg.prompt_len, p=prior).astype(np.int32)
        behavior = np.minimum(teacher_T[sl] + rng.normal(0, cfg.behavior_noise, r).astype(np.float32),
                              0).astype(np.float32)
        records.append(
            TeacherRecord(
                prompt_id=f"p{i:05d}",
                sample_index=i % 4,
                token_ids=np.concatenate([prompt, sampled_T[sl].astype(np.int32)]),
                prompt_len=cfg.prompt_len,
                teacher_logprobs=teacher_T[sl].copy(),
                behavior_logprobs=behavior,
                topk_ids=ids_T_K[sl].copy(),
                topk_logprobs=lp_T_K[sl].copy(),
                tail_logprob=tail_T[sl].copy(),
                reward=float(rng.random() < 0.5),
            )
        )
    return records


def _summary(cfg, ids_T_K, lp_T_K, sampled_T, entropy_T) -> dict:
    in_topk = (ids_T_K == sampled_T[:, None]).any(axis=1)
    q = np.quantile(entropy_T, [0.5, 0.8, 0.9])
    return {
        "positions": int(len(entropy_T)),
        "entropy_nats": {"mean": float(entropy_T.mean()), "median": float(q[0]), "p80": float(q[1]),
                         "p90": float(q[2])},
        "frac_entropy_below_0.01": float((entropy_T < 0.01).mean()),
        "frac_entropy_above_0.672": float((entropy_T > 0.672).mean()),
        "top1_prob_median": float(np.median(np.exp(lp_T_K[:, 0]))),
        "topk_mass_median": float(np.median(np.exp(lp_T_K.astype(np.float64)).sum(axis=1))),
        "entries_with_p_ge_1e-3_per_position": float((lp_T_K >= np.log(1e-3)).sum(axis=1).mean()),
        "frac_topk_ids_below_2000": float((ids_T_K < 2000).mean()),
        "frac_sampled_in_topk": float(in_topk.mean()),
    }


def make_records(vocab_size: int, k: int, num_rollouts: int = 8, response_len: int = 32, prompt_len: int = 4,
                 seed: int = 0, **overrides) -> list[TeacherRecord]:
    """Small records for tests; topic and head sizes shrink with the vocabulary."""
    topic = max(1, min(200, vocab_size // 4))
    cfg = SyntheticConfig(
        vocab_size=vocab_size, k=k, num_rollouts=num_rollouts, response_len=response_len, prompt_len=prompt_len,
        seed=seed, topic_size=topic, max_head_tokens=min(6, vocab_size), **overrides,
    )
    return generate(cfg)[0]
