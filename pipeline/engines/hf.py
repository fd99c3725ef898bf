"""transformers engine: batched KV-cached sampling and chunked scoring. The fast default for tiny models on
CPU, the reference the vLLM engine is checked against, and a usable fallback (and online baseline) on a GPU.

Memory stays bounded at real sizes (vocab 151,936, 4,096-token rollouts):

* ``score`` runs the model over sub-batches of at most ``EngineConfig.score_tokens_per_call`` padded tokens,
  keeps only the last hidden states [B, L, H], and applies the lm head to the scored positions a chunk at a
  time (``SCORE_CHUNK_BYTES`` of float32 logits), never to the whole [B, L, V] batch. The logits are
  ``lm_head(final hidden state)``, as in the Llama/Qwen/Mistral families; ``k = 0`` skips the top-k.
* ``generate`` keeps the log-probs of one step only (see ``_DrawnLogprobs``), not every step's scores.
* The model runs on the GPU when one is present, in the configured dtype (``bfloat16`` for real models).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engines.base import Generation, ScoredSequence, token_batches
from pipeline.models import load_model, load_tokenizer
from storage.records import compute_tail_logprob

# transformers samples from torch's process-wide RNG. Two threads sampling at once (a thread-pool task runner
# spreading shards) would interleave their draws, and a shard would no longer be a function of its seed.
_SAMPLING_LOCK = threading.Lock()
SCORE_CHUNK_BYTES = 1 << 28  # float32 logits of one lm-head chunk (256 MiB: ~440 positions at vocab 151,936)


class _DrawnLogprobs(LogitsProcessor):
    """Last processor of the chain: the log-probs of the distribution each token is drawn from (temperature
    and top-p applied). It keeps one step's [B, V] log-probs and takes the drawn token's entry when the next
    step shows it (``input_ids[:, -1]``), or at the end (``finish``): O(B x V) memory whatever the length."""

    def __init__(self) -> None:
        self.last_B_V: torch.Tensor | None = None
        self.drawn: list[torch.Tensor] = []  # per step, [B]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last_B_V is not None:
            self._take(input_ids[:, -1])
        self.last_B_V = torch.log_softmax(scores.float(), -1)
        return scores

    def _take(self, tokens_B: torch.Tensor) -> None:
        self.drawn.append(self.last_B_V.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1))

    def finish(self, last_tokens_B: torch.Tensor) -> torch.Tensor:
        """[B, T]: the drawn tokens' log-probs, given the last step's tokens."""
        self._take(last_tokens_B)
        self.last_B_V = None
        return torch.stack(self.drawn, 1)


class HFEngine:
    def __init__(self, model_dir: str, cfg: EngineConfig, model: torch.nn.Module | None = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_dir)
        if model is None:
            model = load_model(model_dir, cfg.dtype, device="cuda" if torch.cuda.is_available() else "cpu")
        self.model = model
        self.model.eval()
        self.device = next(self.model.parameters()).device
        # the output size (lm-head rows) can exceed len(tokenizer): padded rows are ids too
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.eos_id = self.tokenizer.eos_token_id
        # Stop where vLLM stops: the tokenizer's EOS and every end token of generation_config.json (chat models
        # have several), and at the model's position limit counting the prompt.
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_ids = sorted({self.eos_id, *gen_eos} - {None})
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)
        self.pad_id = self.tokenizer.pad_token_id

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        per_batch = max(1, self.cfg.batch_size // sampling.n)
        with _SAMPLING_LOCK:
            torch.manual_seed(sampling.seed)
            for i in range(0, len(prompts), per_batch):
                out.extend(self._generate_batch(prompts[i : i + per_batch], sampling))
        return out

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        width = max(len(p) for p in prompts)
        # Left padding keeps every prompt's last token at the same position for batched decoding.
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # a prompt's room before the position limit; rows with less are cut below, as vLLM does
        room = [sampling.max_new_tokens if self.max_len is None else min(sampling.max_new_tokens, self.max_len - len(p))
                for p in prompts]
        if min(room) < 1:
            longest = max(len(p) for p in prompts)
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's {self.max_len} positions; "
                             "shorten the prompts or use a model with a longer context")
        greedy = sampling.temperature == 0
        # Temperature and top-p are passed as our own processors, followed by the one that records the drawn
        # tokens' log-probs (transformers places caller processors before its own warpers, which the 1.0
        # settings below switch off).
        drawn = _DrawnLogprobs()
        processors = []
        if not greedy and sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if not greedy and sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        res = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=not greedy,
            temperature=None if greedy else 1.0,
            top_p=None if greedy else 1.0,
            top_k=None,
            max_new_tokens=max(room),
            num_return_sequences=sampling.n,
            logits_processor=LogitsProcessorList([*processors, drawn]),
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        new_B_T = res.sequences[:, width:]
        chosen_B_T = drawn.finish(new_B_T[:, -1]).cpu()
        new_B_T = new_B_T.cpu()
        eos = set(self.eos_ids)
        gens: list[list[Generation]] = []
        for b in range(len(prompts)):
            row = []
            for j in range(sampling.n):
                r = b * sampling.n + j
                ids = new_B_T[r].tolist()[: room[b]]
                stop = next((t for t, tok in enumerate(ids) if tok in eos), None)
                end = len(ids) if stop is None else stop + 1
                row.append(Generation(ids[:end], chosen_B_T[r, :end].tolist(), "length" if stop is None else "stop"))
            gens.append(row)
        return gens

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        """Untempered log-probs of each sequence's tokens from ``start`` on, with the top-k (k capped at the
        vocabulary; k = 0: the sampled tokens' log-probs only, topk arrays of shape [R, 0])."""
        out: list[ScoredSequence] = []
        for part in token_batches([len(s) for s in sequences], self.cfg.score_tokens_per_call,
                                  max_items=self.cfg.batch_size, padded=True):
            out.extend(self._score_batch(sequences[part], starts[part], k))
        return out

    def _score_batch(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        width = max(len(s) for s in sequences)
        ids_B_L = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in sequences], device=self.device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=self.device)
        hidden_B_L_H = self.model.get_decoder()(input_ids=ids_B_L, attention_mask=attention).last_hidden_state
        # position t-1 predicts token t: gather the scored positions of all rows, N in total
        rows_N = torch.cat([torch.full((len(s) - st,), b)
                            for b, (s, st) in enumerate(zip(sequences, starts))]).to(self.device)
        cols_N = torch.cat([torch.arange(st - 1, len(s) - 1) for s, st in zip(sequences, starts)]).to(self.device)
        hidden_N_H, target_N = hidden_B_L_H[rows_N, cols_N], ids_B_L[rows_N, cols_N + 1]
        del hidden_B_L_H
        head = self.model.get_output_embeddings()
        K = min(k, self.vocab_size)
        n = hidden_N_H.shape[0]
        token_N = np.empty(n, np.float32)
        top_lp_N_K, top_ids_N_K = np.empty((n, K), np.float32), np.empty((n, K), np.int32)
        chunk = max(1, SCORE_CHUNK_BYTES // (4 * self.vocab_size))
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            logp_C_V = torch.log_softmax(head(hidden_N_H[a:b]).float(), -1)
            token_N[a:b] = logp_C_V.gather(-1, target_N[a:b].unsqueeze(-1)).squeeze(-1).cpu().numpy()
            if K:
                vals_C_K, ids_C_K = logp_C_V.topk(K, -1)
                top_lp_N_K[a:b], top_ids_N_K[a:b] = vals_C_K.cpu().numpy(), ids_C_K.cpu().numpy()
        out, at = [], 0
        for s, st in zip(sequences, starts):
            r = slice(at, at + len(s) - st)
            at = r.stop
            out.append(ScoredSequence(token_logprobs=token_N[r], topk_ids=top_ids_N_K[r], topk_logprobs=top_lp_N_K[r],
                                      tail_logprob=compute_tail_logprob(top_lp_N_K[r])))
        return out

    # --------------------------------------------------------------- teardown
    def close(self) -> None:
        self.model = None

    def __enter__(self) -> HFEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
