"""transformers engine: batched KV-cached sampling and single-forward-pass scoring. The fast default for
tiny models on CPU, and the reference the vLLM engine is checked against."""

from __future__ import annotations

import threading

import numpy as np
import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.engines.base import Generation, ScoredSequence
from pipeline.models import load_model, load_tokenizer
from storage.records import compute_tail_logprob

# transformers samples from torch's process-wide RNG. Two threads sampling at once (a thread-pool task runner
# spreading shards) would interleave their draws, and a shard would no longer be a function of its seed.
_SAMPLING_LOCK = threading.Lock()


class HFEngine:
    def __init__(self, model_dir: str, cfg: EngineConfig, model: torch.nn.Module | None = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_dir)
        self.model = model if model is not None else load_model(model_dir, cfg.dtype)
        self.model.eval()
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
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        # a prompt's room before the position limit; rows with less are cut below, as vLLM does
        room = [sampling.max_new_tokens if self.max_len is None else min(sampling.max_new_tokens, self.max_len - len(p))
                for p in prompts]
        if min(room) < 1:
            longest = max(len(p) for p in prompts)
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's {self.max_len} positions; "
                             "shorten the prompts or use a model with a longer context")
        greedy = sampling.temperature == 0
        res = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            max_new_tokens=max(room),
            num_return_sequences=sampling.n,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        new_B_T = res.sequences[:, width:]
        # scores are the processed logits the tokens were drawn from (temperature/top-p applied).
        logprobs_B_T = torch.stack([torch.log_softmax(s.float(), -1) for s in res.scores], 1)
        chosen_B_T = logprobs_B_T.gather(-1, new_B_T.unsqueeze(-1)).squeeze(-1)
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

    @torch.no_grad()
    def score(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        out: list[ScoredSequence] = []
        for i in range(0, len(sequences), self.cfg.batch_size):
            out.extend(self._score_batch(sequences[i : i + self.cfg.batch_size], starts[i : i + self.cfg.batch_size], k))
        return out

    def _score_batch(self, sequences: list[list[int]], starts: list[int], k: int) -> list[ScoredSequence]:
        width = max(len(s) for s in sequences)
        ids_B_L = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in sequences])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        logits_B_L_V = self.model(input_ids=ids_B_L, attention_mask=attention).logits.float()
        out = []
        for b, (seq, start) in enumerate(zip(sequences, starts)):
            # logits at position t-1 predict token t
            logp_R_V = torch.log_softmax(logits_B_L_V[b, start - 1 : len(seq) - 1], -1)
            target_R = ids_B_L[b, start : len(seq)]
            top_vals_R_K, top_ids_R_K = logp_R_V.topk(min(k, logp_R_V.shape[-1]), -1)
            top_lp = top_vals_R_K.numpy().astype(np.float32)
            out.append(
                ScoredSequence(
                    token_logprobs=logp_R_V.gather(-1, target_R.unsqueeze(-1)).squeeze(-1).numpy().astype(np.float32),
                    topk_ids=top_ids_R_K.numpy().astype(np.int32),
                    topk_logprobs=top_lp,
                    tail_logprob=compute_tail_logprob(top_lp),
                )
            )
        return out

    def close(self) -> None:
        self.model = None
