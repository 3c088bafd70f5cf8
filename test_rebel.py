"""Tests for rebel.py, generate.py, score.py and eval_gsm8k.py, on CPU with tiny models built offline.

    pytest -q test_rebel.py                                   # the suite (a few minutes on 2 cores)
    RUN_BENCH=1 pytest -q test_rebel.py -k bench -s           # the performance benchmark (prints a table)

Every model here is a tiny Llama built from a config, with a byte-level BPE tokenizer trained offline and a
Llama-3-style chat template, saved with save_pretrained so that the scripts' real from_pretrained path is used.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
sys.path.insert(0, HERE)

import rebel  # noqa: E402

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. Answer the question with care and show your work.",
          "Question: Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
          "Answer: She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in all. #### 72",
          "Write a short poem about the sea, the sky and the wind. Explain why the sky is blue."] * 5


def make_tokenizer(path, vocab_size=384, chat_template=LLAMA3_CHAT_TEMPLATE):
    """Byte-level BPE (every byte string is encodable) with Llama-3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        chat_template=chat_template)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_model(path, hidden=64, layers=2, heads=4, kv_heads=2, seed=0, vocab_size=384):
    """A tiny random Llama with the tokenizer above, saved like a Hub checkpoint (config, safetensors, tokenizer,
    generation config with Llama-3's two stop tokens)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    tokenizer = make_tokenizer(path, vocab_size=vocab_size)
    eot, end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=[end, eot], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[end, eot])
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_llama")))
