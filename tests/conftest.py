"""Shared fixtures: tiny in-process models (seconds on CPU) and the real demo teacher (cached)."""

from __future__ import annotations

import functools

import pytest
import torch


def tiny_config(family: str = "llama", **overrides):
    """A tiny random decoder config: hidden 64, 2 layers, 4 query heads in 2 KV groups, head_dim 16."""
    from transformers import AutoConfig

    base = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=256,
                tie_word_embeddings=False, attn_implementation="eager")
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in fp32 eval mode, deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 512-token byte-level BPE trained on the pydoc train split (about a second), with an EOS; cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from whelp.data import read_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(read_documents("pydoc:train")[:80], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def demo_dir():
    """Directory of the converted demo teacher (fetched and converted once per $WHELP_HOME)."""
    from whelp.models import registered_dir

    return registered_dir("smollm2-135m")


@pytest.fixture(scope="session")
def demo(demo_dir):
    """(model, tokenizer) of the demo teacher, fp32 on CPU."""
    from whelp.models import load_model

    return load_model(str(demo_dir))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_dir))
