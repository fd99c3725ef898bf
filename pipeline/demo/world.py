"""The built-in demo world: a character tokenizer and tiny Llama models, created locally and saved
as ordinary Hugging Face directories so that they load with ``AutoModelForCausalLM.from_pretrained``
like any real model (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.shapes import ModelShape
from pipeline.tasks.arithmetic import ALPHABET

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
# The demo tokenizer's chat template: BOS + the user's text (a "base model" style prompt),
# so that prompts go through apply_chat_template exactly like a chat model's.
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    import torch

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model_dir(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    """Write model + tokenizer as a standard HF directory (safetensors), atomically via a temp dir."""
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_models(out: Path, teacher: ModelShape, student: ModelShape, seed: int = 0) -> dict[str, Path]:
    """Untrained teacher and student directories (``teacher_init``, ``student_init``) sharing one tokenizer."""
    tokenizer = build_tokenizer()
    out = Path(out)
    return {
        "teacher": save_model_dir(build_model(tokenizer, teacher, seed), tokenizer, out / "teacher_init"),
        "student": save_model_dir(build_model(tokenizer, student, seed + 1), tokenizer, out / "student_init"),
    }
