"""Loading models and tokenizers (always from a directory, exactly like a hub model) and building prompt ids."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from storage.errors import LopdUserError

# from_pretrained switches process-wide init contexts (meta device); two threads loading at once (e.g. stage
# parts on Prefect's thread-pool task runner) break each other, so loads are serialised.
_LOAD_LOCK = threading.Lock()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str | None = None) -> torch.nn.Module:
    """A causal LM from an HF model directory; ``attn_implementation`` (e.g. "flash_attention_2") overrides the
    model's default (sdpa)."""
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json); run `lopd make-models` or point to "
                                "an HF model dir")
    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype],
                                                     attn_implementation=attn_implementation)
    return model.to(device)


def model_skeleton(path: str | Path, attn_implementation: str | None = None) -> torch.nn.Module:
    """The model of ``path`` built on the meta device: its structure, parameter shapes and dtypes, but no
    storage and no weights read (the FSDP2 ranks other than 0 start from this; see ``training.load_student``)."""
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json); run `lopd make-models` or point "
                                "to an HF model dir")
    config = AutoConfig.from_pretrained(str(path))
    with _LOAD_LOCK, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, use_chat_template: bool = True,
                  messages: tuple[tuple[str, str], ...] | None = None) -> list[int]:
    """Token ids of a prompt, rendered by the tokenizer's own chat template when it has one. ``messages`` (a prompt
    record's chat turns, ``(role, content)``) are rendered instead of ``text``, with the chat template only."""
    if messages is not None:
        if not (use_chat_template and tokenizer.chat_template):
            why = "use_chat_template is false" if not use_chat_template else "this tokenizer has none"
            raise LopdUserError(f"prompts with chat messages need the tokenizer's chat template ({why}); give plain "
                                "prompts, or a tokenizer with a chat template")
        turns = [{"role": role, "content": content} for role, content in messages]
    else:
        turns = [{"role": "user", "content": text}]
    if use_chat_template and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=True)["input_ids"]
