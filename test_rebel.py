"""Tests for rebel.py, generate.py, score.py and eval_gsm8k.py, on CPU with tiny models built offline.

    pytest -q test_rebel.py                                   # the suite (a few minutes on 2 cores)
    pytest -q test_rebel.py -k TestScore                      # one component's tests (the classes below)
    RUN_BENCH=1 pytest -q test_rebel.py -k bench -s           # the performance benchmarks (print tables)
    python test_rebel.py demo [folder]                        # the whole REBEL loop on a tiny model, CPU only
    python test_rebel.py online_bench [folder]                # one online update: gathered once vs plain generate
    python test_rebel.py gpu [folder] [--smoke]               # the GPU check (--smoke: at tiny sizes, on any machine)

Every model here is tiny, built from a config (Llama mostly; Granite, Gemma-2/3, Cohere, Falcon-H1, Phi, GPT-2, Mistral
and the reward models' layouts where their quirks are tested), with a tokenizer trained offline in one of nine chat
template families (byte-level BPE, or SentencePiece-style for Llama-2), saved with save_pretrained so that the scripts'
real from_pretrained path is used.

The file reads in this order: chat templates and model families; builders, files and runs, fixtures and reference
computations; the tests, one class per component (TestLoss, TestLogprobs, TestTraining, TestOnline, TestRecipes,
TestInputs, TestCLI, TestGenerate, TestScore, TestArmoRM, TestResumableState, TestTokenExactness, TestHeads, ...,
TestRewardModels, TestModelCardInputs, TestGSM8K, TestDemo, TestBench, TestGPUCheck, TestLayout); then the programs:
the demo, the benchmarks and the GPU check.
"""
import contextlib
import dataclasses
import datetime
import gc
import errno
import glob
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from types import ModuleType, SimpleNamespace

import pytest
import yaml
import torch
import torch.distributed as dist
import transformers
import transformers.dynamic_module_utils
from huggingface_hub import constants, dataset_info
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel,
                          PreTrainedTokenizerFast)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")  # GSM8K and AlpacaEval; else the tests download them
sys.path.insert(0, HERE)

import eval_gsm8k  # noqa: E402
import generate  # noqa: E402
import rebel  # noqa: E402
import score  # noqa: E402

# ----------------------------------------------------------------------------- chat templates and model families


SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


# Llama-3.2's: a system header with today's date (strftime_now), like Mistral Small's, Granite's and SmolLM3's templates
LLAMA32_TEMPLATE = (
    "{{ bos_token }}{% if not date_string is defined %}{% if strftime_now is defined %}"
    "{% set date_string = strftime_now('%d %b %Y') %}{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}"
    "{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: '"
    " + date_string + '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")


CORPUS = ["The quick brown fox jumps over the lazy dog. Answer the question with care and show your work.",
          "Question: Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
          "Answer: She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in all. #### 72",
          "Write a short poem about the sea, the sky and the wind. Explain why the sky is blue."] * 5


CHATML_TEMPLATE = (  # Qwen2.5-Instruct's: a default system prompt, and "\n" after every <|im_end|>
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


GEMMA_TEMPLATE = (  # Gemma-2-it's: no system turn, "model" role, "\n" after every <end_of_turn>
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct's: [INST] ... [/INST], the response ends with </s>
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


# DeepSeek-R1 style on ChatML: the generation prompt opens <think>, assistant turns lose their reasoning
THINKING_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\n') %}"
    "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}")


PLAIN_TEMPLATE = (  # no end-of-turn token at all: turns are separated by blank lines
    "{%- for message in messages %}{{- message.role + ': ' + message.content + '\n\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")


CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# family: chat template, special tokens, tokenizer bos and eos, end tokens of the model's configs, added (not special)
# tokens, GPT-2's byte-level pre-tokenizer instead of Llama-3's split pattern (with "\n\n" learnt as one token, as
# real vocabularies have it), the checkpoint's sampling defaults
FAMILIES = {
    "llama3": dict(
        template=LLAMA3_CHAT_TEMPLATE,
        special=SPECIAL_TOKENS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        ends=["<|end_of_text|>", "<|eot_id|>"],
    ),
    "chatml": dict(
        template=CHATML_TEMPLATE,
        special=CHATML_TOKENS,
        bos=None,
        eos="<|im_end|>",
        ends=["<|im_end|>", "<|endoftext|>"],
        sampling=dict(repetition_penalty=1.05, top_k=20, top_p=0.8, temperature=0.7, do_sample=True),
    ),
    "gemma": dict(
        template=GEMMA_TEMPLATE,
        special=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        ends=["<eos>", "<end_of_turn>"],
    ),
    "mistral": dict(
        template=MISTRAL_TEMPLATE,
        special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
        ends=["</s>"],
    ),
    "thinking": dict(
        template=THINKING_TEMPLATE,
        special=CHATML_TOKENS,
        added=["<think>", "</think>"],
        bos=None,
        eos="<|im_end|>",
        ends=["<|im_end|>", "<|endoftext|>"],
    ),
    "no_end_token": dict(
        template=PLAIN_TEMPLATE, special=["<|endoftext|>"], bos=None, eos="<|endoftext|>", ends=["<|endoftext|>"]
    ),
    "llama3_dated": dict(
        template=LLAMA32_TEMPLATE,
        special=SPECIAL_TOKENS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        ends=["<|end_of_text|>", "<|eot_id|>"],
    ),
    "gpt2_bytes": dict(
        template=LLAMA3_CHAT_TEMPLATE,
        special=SPECIAL_TOKENS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        ends=["<|end_of_text|>", "<|eot_id|>"],
        gpt2_bytes=True,
        corpus=["Paragraphs\n\nand paragraphs\n\n"] * 20,
    ),
}


WORDS = "the quick brown fox jumps over a lazy dog while sea and sky and wind are blue answer question".split()
TRAIN_SETTINGS = dict(
    total_episodes=32,
    batch_size=8,
    micro_batch_size=2,
    eval_micro_batch_size=4,
    eval_size=8,
    eta=1.0,
    lr=1e-3,
    warmup_ratio=0.25,
    eval_every=2,
    save_every=2,
    activation_checkpointing=False,
    seed=1,
)


REWARD_FN = '''
import math, os

def count_x(prompt, response):
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write("call\\n")
    return response.count("x")

def fails_on_row_1(prompt, response):
    return 1 / 0 if prompt == "p1" else 1.0

def nan_on_row_2(prompt, response):
    return math.nan if prompt == "p2" and response == "b" else 1.0
'''


FAILS_ON_ROW_4 = "def reward(prompt, response):\n    return 1 / 0 if prompt == 'p4' else float(len(response))\n"
LENGTH_REWARD = "def length(prompt, response):\n    return float(len(response))\n"
MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the sea"},
              {"role": "assistant", "content": "blue"}, {"role": "user", "content": "and the sky"}]
ARMO_HEADER = (  # the end of a user turn, as ArmoRM's code looks for it
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)
EOT = eval_gsm8k.STOP + ("<|eot_id|>",)


BENCH_MAX_PROMPT, BENCH_MAX_RESPONSE = 1024, 2048  # the authors' fixed maxima (the baseline pads every pair to them)
# AlpacaEval's own copies of the two models' answers (the files in ../shared/data/alpaca_eval, byte for byte)
ALPACA_EVAL_OUTPUTS = (
    "https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/e0135ed026d772eed40e8d22e38975b0f00e1545/"
    "results/{}/model_outputs.json"
)


# ----------------------------------------------------------------------------- builders: tiny tokenizers and models

# Llama-2-chat's template: [INST] ... [/INST], the response between spaces, then </s>; a system turn in <<SYS>>
LLAMA2_SP_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message ="
    " messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif"
    " %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{"
    " raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if"
    " loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message +"
    " '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if"
    " message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] =="
    " 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# sentencepiece: Llama-2's tokenizer.json (legacy): "▁" before every text between special tokens, spaces -> "▁"
FAMILIES["llama2_sp"] = dict(
    template=LLAMA2_SP_TEMPLATE, special=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", ends=["</s>"],
    sentencepiece=True,
    corpus=["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n" + " ".join(WORDS) + " [/INST] " + " ".join(WORDS)] * 5)


def make_tokenizer(path, vocab_size=384, corpus=CORPUS, family="llama3"):
    """Byte-level BPE (every byte string is encodable) with a chat-model family's special tokens and chat template
    (Llama-3's by default), saved to `path`."""
    spec = FAMILIES[family]
    if spec.get("sentencepiece"):
        return make_sentencepiece_tokenizer(path, vocab_size, corpus, spec)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if spec.get("gpt2_bytes")
        else pre_tokenizers.Sequence(
            [  # Llama-3's split pattern (keeps newlines together), then bytes -> characters
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus + spec.get("corpus", []),
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=spec["special"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], chat_template=spec["template"]
    )
    tokenizer.add_tokens(spec.get("added", []))
    tokenizer.save_pretrained(path)
    return tokenizer


def make_sentencepiece_tokenizer(path, vocab_size, corpus, spec):
    """A SentencePiece-style "legacy" BPE (Llama-2, Mistral v0.1, OpenChat): Prepend("▁") + Replace(" ", "▁")
    normalizer, split at "▁", Llama-2's decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(
        corpus + spec.get("corpus", []), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        unk_token="<unk>",
        chat_template=spec["template"],
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def make_model(
    path,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    seed=0,
    vocab_size=384,
    corpus=CORPUS,
    family="llama3",
    ends_often=False,
):
    """A tiny random Llama with a family's tokenizer, saved like a Hub checkpoint (config, safetensors, tokenizer,
    generation config with the family's end tokens and sampling defaults). ends_often: the output row of the chat
    template's end-of-turn token points along the embeddings of every 10th token, so that the end of turn often
    follows one of them and short samples end both ways, stopped and cut."""
    spec = FAMILIES[family]
    tokenizer = make_tokenizer(path, vocab_size=vocab_size, corpus=corpus, family=family)
    ends = tokenizer.convert_tokens_to_ids(spec["ends"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=ends,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    eot = rebel.end_of_turn(tokenizer)
    if ends_often and eot is not None:
        with torch.no_grad():
            e = model.model.embed_tokens.weight[::10]
            model.lm_head.weight[eot] = 0.08 * e.sum(0) / e.norm(dim=-1).mean() ** 2
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=ends, **spec.get("sampling", {})
    )
    model.save_pretrained(path)
    return path


def make_armo(path, drop=(), shards=1):
    """A tiny checkpoint laid out as RLHFlow/ArmoRM-Llama3-8B-v0.1: its config fields (architectures, auto_map to its
    remote class, num_objectives, gating_*), pad_token_id = a [PAD] token after the vocabulary, random weights named
    model.* + regression_layer.weight [19, hidden] + reward_transform_matrix [19, 19] + gating.layers.N.weight/bias +
    gating.logit_scale (minus `drop`), in 1 or 2 safetensors shards; and a modeling_custom.py that raises if imported.
    """
    tokenizer = make_tokenizer(path)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForRewardModelWithGating"],
        auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
        num_objectives=19,
        gating_temperature=2,
        gating_hidden_dim=16,
        gating_n_hidden=2,
    )  # the real: 19, 10, 1024, 3
    config.save_pretrained(path)
    torch.manual_seed(2)
    weights = {f"model.{k}": v for k, v in LlamaModel(config).state_dict().items()}
    weights["regression_layer.weight"] = torch.randn(19, 64) / 8  # scores of order 1, as the real model's
    weights["reward_transform_matrix"] = torch.randn(19, 19) / 19 ** 0.5  # not the identity: its orientation matters
    dims = [64, 16, 16, 19]
    for n in range(3):
        weights[f"gating.layers.{n}.weight"] = torch.randn(dims[n + 1], dims[n]) / dims[n] ** 0.5
        weights[f"gating.layers.{n}.bias"] = torch.randn(dims[n + 1])
    weights["gating.logit_scale"] = torch.tensor([1.7])
    weights = {k: v.contiguous() for k, v in weights.items() if k not in drop}
    names = sorted(weights)  # two shards split in the middle: backbone and head tensors in both
    files = (
        [f"model-{n + 1:05d}-of-{shards:05d}.safetensors" for n in range(shards)]
        if shards > 1
        else ["model.safetensors"]
    )
    weight_map = {k: files[n * shards // len(names)] for n, k in enumerate(names)}
    for file in files:
        save_file(
            {k: weights[k] for k in names if weight_map[k] == file}, os.path.join(path, file), metadata={"format": "pt"}
        )
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(
                {"metadata": {"total_size": sum(v.numel() * 4 for v in weights.values())}, "weight_map": weight_map}, f
            )
    with open(os.path.join(path, "modeling_custom.py"), "w") as f:
        f.write("raise RuntimeError('the remote code of this checkpoint was run')\n")
    return path


# ----------------------------------------------------------------------------- files and runs

def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_parquet(path, rows):
    from datasets import Dataset  # datasets stays a lazy import: the GPU image of `python test_rebel.py gpu` lacks it
    Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def json_column_folder(path, rows, column="prompt", split="train_prefs"):
    """A save_to_disk folder whose `column` has the Json feature, as `datasets` reads a column mixing strings and
    lists: it decodes every string that looks like JSON."""
    import datasets
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    features = datasets.Dataset.from_dict({k: v for k, v in columns.items() if k != column}).features
    features[column] = datasets.Json()
    datasets.DatasetDict({split: datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(path))
    return str(path)


def write_pairs(path, n=40, seed=0, schema="common", message_prompts=False):
    """Preference pairs of random words in the common schema (rejected, rejected_reward) or Cornell-AGI's
    (reject...)."""
    rng = random.Random(seed)
    rejected, rejected_reward = ("rejected", "rejected_reward") if schema == "common" else ("reject", "reject_reward")
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
        rows.append({"prompt": [{"role": "user", "content": prompt}] if message_prompts else prompt,
                     "chosen": " ".join(rng.choices(WORDS, k=rng.randint(1, 24))),
                     rejected: " ".join(rng.choices(WORDS, k=rng.randint(1, 24))),
                     "chosen_reward": rng.uniform(0.5, 1.0), rejected_reward: rng.uniform(0.0, 0.5), "extra": i})
    return write_jsonl(path, rows)


def write_prompts(path, n, seed=0, ids=False, messages=False):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))
        rows.append(
            {
                "prompt": [{"role": "user", "content": text}] if messages else text,
                **({"prompt_id": f"p{i}"} if ids else {}),
            }
        )
    return write_jsonl(path, rows)


def generations(n, k=3, seed=0, long_every=0):
    """generate.py-like rows of random words; every `long_every`-th response is long (past a small max_length)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        responses = [
            " ".join(rng.choices(WORDS, k=40 if long_every and (i * k + j) % long_every == 0 else rng.randint(1, 12)))
            for j in range(k)
        ]
        rows.append(dict(prompt_id=i, prompt=" ".join(rng.choices(WORDS, k=rng.randint(1, 8))), responses=responses,
                         truncated=[False] * k, num_tokens=[len(r) for r in responses], source=f"s{i}"))
    return rows


def multi_turn(rows):
    """The same rows as message lists, every other one with a user and an assistant turn before the last user turn
    (ArmoRM gates on the end of the last)."""
    return [
        {
            **row,
            "prompt": (
                (
                    [{"role": "user", "content": "why is the sky blue"}, {"role": "assistant", "content": "the sea"}]
                    if i % 2
                    else []
                )
                + [{"role": "user", "content": row["prompt"]}]
            ),
        }
        for i, row in enumerate(rows)
    ]


def bad_prompt_rows(path):
    """24 pairs with message prompts, 4 of which no chat template can take, as generate.py writes them (temperature
    1)."""
    rows = read_jsonl(write_pairs(path, n=24, message_prompts=True))
    rows[3]["prompt"] = []
    rows[5]["prompt"] = [{"role": "human", "content": "hi"}]
    rows[7]["prompt"] = rows[7]["prompt"] + [{"role": "assistant", "content": "ok"}]
    rows[9]["prompt"] = [{"role": "user", "content": " \n"}]
    return [dict(r, temperature=1.0) for r in rows]  # as generate.py writes it: sampled at 1.0, scored at 0.8


def torchrun(script, args, check=True):
    """`script` under torchrun with 2 processes (one thread each: 2 cores), flags from a dict."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    command += [x for k, v in args.items() for x in (f"--{k}", str(v))]
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)  # a hang (e.g. processes waiting on each other) fails the test, not CI
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def train(model, dataset, output_dir, **overrides):
    """rebel.main in this process (a 1-process gloo group), small and fast settings."""
    settings = dict(model=model, dataset=dataset, output_dir=str(output_dir), **TRAIN_SETTINGS)
    settings.update(overrides)
    rebel.main(rebel.Config(**settings))
    return str(output_dir)


def gen(model, prompts, output, **overrides):
    """generate.main in this process (a 1-process gloo group), small and fast settings."""
    settings = dict(
        model=model, prompts=prompts, output=str(output), num_samples=3, max_new_tokens=8, batch_size=2, seed=0
    )
    settings.update(overrides)
    generate.main(generate.Config(**settings))
    return str(output)


def run_score(data, output, **overrides):
    settings = dict(input=data, output=str(output), batch_size=4, block_size=3)
    settings.update(overrides)
    score.main(score.Config(**settings))
    return str(output)


def run_eval(model, data, output, **overrides):
    settings = dict(model=model, data=data, output=str(output), limit=8, num_fewshot=1, batch_size=3, max_new_tokens=12)
    settings.update(overrides)
    eval_gsm8k.main(eval_gsm8k.Config(**settings))
    return read_json(os.path.join(output, "summary.json")), read_jsonl(os.path.join(output, "samples.jsonl"))


def load_rows(path):
    from datasets import load_dataset
    return load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train").to_list()


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def fake_trackers(monkeypatch):
    """Stand-ins for wandb and torch.utils.tensorboard that record what they are given."""
    calls = {"wandb_init": [], "wandb_log": [], "tb_init": [], "tb_scalars": [], "tb_text": []}
    wandb = ModuleType("wandb")

    def init(**kwargs):  # like wandb: a new id unless given one
        calls["wandb_init"].append(kwargs)
        return SimpleNamespace(
            id=kwargs["id"] or f"run{len(calls['wandb_init'])}",
            log=lambda record, step: calls["wandb_log"].append((dict(record), step)),
            finish=lambda: None,
        )
    wandb.init = init
    tensorboard = ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            calls["tb_init"].append((log_dir, purge_step))
        add_scalar = lambda self, key, value, step: calls["tb_scalars"].append((key, value, step))  # noqa: E731
        add_text = lambda self, key, text: calls["tb_text"].append((key, text))  # noqa: E731
        flush = close = lambda self: None  # noqa: E731
    tensorboard.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    return calls


def gsm8k_bad_input(tmp_path):
    """eval_gsm8k.py's bad-input cases: 10 GSM8K-like questions in a folder, a folder without a model, and error(),
    which runs eval_gsm8k.main and returns its one-line error."""
    not_a_model = tmp_path / "empty"  # a folder without a model: loading it would raise something else
    not_a_model.mkdir()
    docs = [
        {"question": f"Tom has {i} apples and buys 2 more. How many now?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
        for i in range(10)
    ]
    gsm8k_dir = tmp_path / "gsm8k"
    gsm8k_dir.mkdir()
    for split in ("train", "test"):
        write_jsonl(gsm8k_dir / f"{split}.jsonl", docs)

    def error(data, **overrides):
        settings = dict(model=str(not_a_model), data=str(data), output=str(tmp_path / "out"))
        settings.update(overrides)
        with pytest.raises(SystemExit) as e:
            eval_gsm8k.main(eval_gsm8k.Config(**settings))
        return str(e.value)

    def data_folder(name, test_lines, train=True):
        folder = tmp_path / name
        folder.mkdir()
        if train:
            (folder / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:10]))
        (folder / "test.jsonl").write_text("".join(line + "\n" for line in test_lines))
        return folder
    return SimpleNamespace(tmp=tmp_path, gsm8k_dir=gsm8k_dir, good=[json.dumps(d) for d in docs[:3]], error=error,
                           data_folder=data_folder)


def no_data(reason):
    """A test without its data is skipped, saying what to do; in CI (CI=true), where ../shared/data is expected, it
    fails instead, so that the real data cannot silently stop being used."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory):
    """A tiny random LlamaForSequenceClassification (one output) with the test tokenizer; pads with <|end_of_text|>,
    which the chat template never produces."""
    path = str(tmp_path_factory.mktemp("tiny_rm"))
    tokenizer = make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def armo_model(tmp_path_factory):
    return make_armo(str(tmp_path_factory.mktemp("armo_rm")), shards=2)


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    return {family: make_tokenizer(str(tmp_path_factory.mktemp(family)), family=family) for family in FAMILIES}


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory):
    """A folder with GSM8K's train.jsonl and test.jsonl, as eval_gsm8k.py --data takes it: ../shared/data/gsm8k, else
    openai/gsm8k (config main) from the Hub or the HF cache, written out in the same order."""
    shared = os.path.join(SHARED_DATA, "gsm8k")
    if all(os.path.exists(os.path.join(shared, f"{split}.jsonl")) for split in ("train", "test")):
        return shared
    import datasets
    # look first, 5 s at most: load_dataset retries an unreachable Hub for ~25 s (HF_HUB_OFFLINE=1: the cache only)
    try:
        if not constants.HF_HUB_OFFLINE:
            dataset_info("openai/gsm8k", timeout=5)
        hub = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # offline, unreachable or not cached: every way of not having the data
        offline = ("HF_HUB_OFFLINE=1 is set and openai/gsm8k is not in your HF cache: unset it and connect to the Hub"
                   if constants.HF_HUB_OFFLINE else "connect to the Hub (openai/gsm8k is then cached), or set "
                   "HF_HUB_OFFLINE=1 if it is in your HF cache")
        no_data(
            f"no ../shared/data/gsm8k and the Hub is unreachable ({type(e).__name__}:"
            f" {' '.join(str(e).split())[:160]}): {offline}, or put GSM8K's train.jsonl and test.jsonl in"
            f" {os.path.normpath(shared)}"
        )
    folder = tmp_path_factory.mktemp("gsm8k")
    for split in ("train", "test"):
        write_jsonl(folder / f"{split}.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in hub[split]])
    return str(folder)


@pytest.fixture(scope="module")
def gsm8k(gsm8k_dir):
    return read_jsonl(os.path.join(gsm8k_dir, "train.jsonl")), read_jsonl(os.path.join(gsm8k_dir, "test.jsonl"))


@pytest.fixture(scope="session")
def alpaca_eval():
    """AlpacaEval's 805 instructions with Meta-Llama-3-8B-Instruct's and REBEL-Llama-3-8B-Instruct-Armo's real answers
    (`instruction`, `output`): ../shared/data/alpaca_eval, else the same files downloaded from the AlpacaEval
    repository.
    """
    outputs = []
    for name in ("Meta-Llama-3-8B-Instruct", "REBEL-Llama-3-8B-Instruct-Armo"):
        path = os.path.join(SHARED_DATA, "alpaca_eval", f"{name}.json")
        if os.path.exists(path):
            outputs.append(read_json(path))
            continue
        try:
            with urllib.request.urlopen(ALPACA_EVAL_OUTPUTS.format(name), timeout=10) as f:
                outputs.append(json.load(f))
        except OSError as e:  # offline or unreachable (URLError, timeouts)
            no_data(
                f"no ../shared/data/alpaca_eval and {ALPACA_EVAL_OUTPUTS.format(name)} is unreachable ({e}): connect to"
                f" the Internet, or save that file as {os.path.normpath(path)}"
            )
    return outputs


@pytest.fixture(scope="class")
def bad_input_files(tiny_model, tmp_path_factory):
    """The files of rebel.py's bad-input cases, made once: good pairs, a model without a chat template, one without
    weights, an empty and a cut JSONL file, and an output folder that holds a checkpoint of an earlier run."""
    folder = tmp_path_factory.mktemp("bad_input")
    good = read_jsonl(write_pairs(folder / "good.jsonl", n=12))
    no_template = str(folder / "no_template")
    shutil.copytree(tiny_model, no_template)
    config = json.load(open(os.path.join(no_template, "tokenizer_config.json")))
    config.pop("chat_template", None)
    json.dump(config, open(os.path.join(no_template, "tokenizer_config.json"), "w"))
    for name in os.listdir(no_template):
        if name.startswith("chat_template"):
            os.remove(os.path.join(no_template, name))
    empty, cut, no_weights = folder / "empty.jsonl", folder / "cut.jsonl", folder / "no_weights"
    empty.write_text("")
    cut.write_text("".join(json.dumps(r) + "\n" for r in good[:2]) + json.dumps(good[2])[:30] + "\n")
    shutil.copytree(tiny_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    os.makedirs(folder / "earlier" / "checkpoints" / "update_000002")
    (folder / "earlier" / "checkpoints" / "update_000002" / "train_state.json").write_text('{"update": 2}')
    return SimpleNamespace(folder=folder, good=good, no_template=no_template, empty=empty, cut=cut,
                           no_weights=no_weights)


@pytest.fixture(scope="class")
def generate_bad_input_files(tiny_model, tmp_path_factory):
    """Prompts, a folder named like an output file and a model folder without weights, made once."""
    folder = tmp_path_factory.mktemp("generate_bad_input")
    prompts = write_prompts(folder / "prompts.jsonl", n=4)
    (folder / "folder.jsonl").mkdir()
    shutil.copytree(tiny_model, folder / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    return SimpleNamespace(folder=folder, prompts=prompts, no_weights=folder / "no_weights")


@pytest.fixture(scope="class")
def broken_files(tiny_model, tmp_path_factory):
    """What a new user broke by hand, made once: a model with cut weights, one with an unreadable
    generation_config.json, a file where a folder belongs, a reward function with a syntax error, and the inputs."""
    folder = tmp_path_factory.mktemp("broken_files")
    truncated = str(folder / "truncated")
    shutil.copytree(tiny_model, truncated)
    weights = os.path.join(truncated, "model.safetensors")
    open(weights, "r+b").truncate(os.path.getsize(weights) // 2)
    pairs, prompts = write_pairs(folder / "p.jsonl", n=24), write_prompts(folder / "prompts.jsonl", n=4)
    a_file = folder / "a_file"
    a_file.write_text("mine\n")
    questions = folder / "gsm8k"  # a few GSM8K-like questions: enough to reach the model
    questions.mkdir()
    for split in ("train", "test"):
        write_jsonl(questions / f"{split}.jsonl", [{"question": f"What is {i} + 1?",
                                                    "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)])
    broken = str(folder / "broken_generation_config")
    shutil.copytree(tiny_model, broken)
    open(os.path.join(broken, "generation_config.json"), "w").write("{not json")
    (folder / "syntax.py").write_text("def f(prompt, response)\n    return 1.0\n")
    generations_file = write_jsonl(folder / "g.jsonl", generations(4))
    (folder / "rewards.py").write_text(LENGTH_REWARD)
    return SimpleNamespace(folder=folder, truncated=truncated, pairs=pairs, prompts=prompts, a_file=a_file,
                           questions=str(questions), broken=broken, generations=generations_file)


@pytest.fixture(scope="class")
def broken_reward_models(armo_model, tiny_model, tmp_path_factory):
    """Reward models that would score with random or missing heads, made once, by name."""
    folder = tmp_path_factory.mktemp("broken_reward_models")
    no_head = make_armo(str(folder / "no_head"), drop=("regression_layer.weight", "gating.layers.2.bias",
                                                       "gating.logit_scale"))
    two_labels = str(folder / "two_labels")
    shutil.copytree(tiny_model, two_labels)
    config = LlamaConfig.from_pretrained(tiny_model, num_labels=2, pad_token_id=1)
    LlamaForSequenceClassification(config).save_pretrained(two_labels)
    resized = str(folder / "resized")  # the config says a narrower gating network than the weights have
    shutil.copytree(armo_model, resized)
    with open(os.path.join(resized, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(resized, "config.json"), "w") as f:
        json.dump({**config, "gating_hidden_dim": 8}, f)
    no_weights = str(folder / "no_weights")
    shutil.copytree(armo_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors*"))
    return dict(no_head=no_head, resized=resized, causal_lm=tiny_model, two_labels=two_labels, no_weights=no_weights)


@pytest.fixture(scope="class")
def stopped_run(tiny_model, tmp_path_factory):
    """A rebel.py run stopped after update 1 (with its checkpoint), made once; tests damage copies of it."""
    folder = tmp_path_factory.mktemp("stopped_run")
    data = write_pairs(folder / "p.jsonl", n=24)
    run = train(tiny_model, data, folder / "run", total_episodes=24, eval_size=0, stop_after=1)
    return SimpleNamespace(data=data, run=run)


# ----------------------------------------------------------------------------- reference computations

def naive_logprob(model, prompt_ids, response_ids, temperature):
    """The textbook computation, one sequence, full-vocabulary logits everywhere."""
    ids = torch.tensor([prompt_ids + response_ids])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].float() / temperature, dim=-1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum()


def armo_by_hand(path, sequences, gate_on_first=False):
    """ArmoRM's score of each token list, alone (no padding), from its description: plain torch on the checkpoint's
    tensors after a LlamaModel forward. Reward at the last token; gate at the last (or first) user turn's end."""
    weights = {
        k: v
        for f in os.listdir(path)
        if f.endswith(".safetensors")
        for k, v in load_file(os.path.join(path, f)).items()
    }
    config = json.load(open(os.path.join(path, "config.json")))
    header = AutoTokenizer.from_pretrained(path).encode(ARMO_HEADER, add_special_tokens=False)
    backbone = LlamaModel.from_pretrained(path).eval()
    scores = []
    for ids in sequences:
        with torch.no_grad():
            h = backbone(torch.tensor([ids])).last_hidden_state[0]
        starts = [j for j in range(len(ids)) if ids[j:j + len(header)] == header]
        rewards = weights["regression_layer.weight"] @ h[-1]
        x = h[starts[0] if gate_on_first else starts[-1]]
        for n in range(config["gating_n_hidden"] + 1):
            x = weights[f"gating.layers.{n}.weight"] @ x + weights[f"gating.layers.{n}.bias"]
            x = x.relu() if n < config["gating_n_hidden"] else x
        gate = torch.softmax(x / config["gating_temperature"], 0) * weights["gating.logit_scale"][0]
        scores.append(float(gate @ (rewards @ weights["reward_transform_matrix"])))
    return scores


def reward_inputs(path, rows):
    tokenizer = rebel.load_tokenizer(path)
    return [
        tokenizer(
            tokenizer.apply_chat_template(
                rebel.chat_messages(row["prompt"]) + [{"role": "assistant", "content": r}], tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for row in rows
        for r in row["responses"]
    ]


def family_pipeline(family, tmp_path, n=8, **generate_settings):
    """generate.py (3 samples of ≤ 12 tokens) → score.py (reward = length) on a family's tiny model; the rows of
    both."""
    model = make_model(str(tmp_path / family), family=family, ends_often=True)
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": [{"role": "user", "content": " ".join(WORDS[i : i + 3 + i % 5])}]} for i in range(n - 1)]
        + [{"prompt": MULTI_TURN}],
    )  # Gemma and Mistral raise on its system turn
    (tmp_path / "rewards.py").write_text(LENGTH_REWARD)
    generated = gen(
        model, prompts, tmp_path / "gen.jsonl", num_samples=3, max_new_tokens=12, batch_size=4, **generate_settings
    )
    pairs = run_score(
        generated, tmp_path / "pairs.jsonl", reward_fn=f"{tmp_path / 'rewards.py'}:length", drop_truncated=False
    )
    return model, read_jsonl(generated), pairs


def text_ids(tok, family, response, prompt="the sea"):
    """rebel.text_ids of one response in a family's template, with the template's end of turn."""
    return rebel.text_ids(prompt, [response], tok[family], rebel.end_of_turn(tok[family]))


# ----------------------------------------------------------------------------- builders and fixtures of single classes

ONLINE_REWARD = (
    "def length(prompt, response):\n"
    "    return len(response) / 10.0\n\n"
    "def needs_gold(prompt, response, gold):\n"
    "    return float(gold in response)\n\n"
    "def raises(prompt, response):\n"
    "    raise ValueError('no reward for ' + response[:10])\n\n"
    "def infinite(prompt, response):\n"
    "    return float('inf')\n"
)


ONLINE_SETTINGS = dict(batch_size=4, total_episodes=8, max_new_tokens=6, rollout_block=2, micro_batch_size=2,
                       eval_micro_batch_size=2, activation_checkpointing=False, lr=1e-3, num_layers_unfrozen=1,
                       save_every=1, seed=3, kl_coef=0.5, missing_eos_penalty=-1.0, reward_scale=2.0)


def online_flags(model, prompts, output_dir, **overrides):
    """rebel.py --online true flags of a tiny run (the online defaults for everything else)."""
    settings = dict(model=model, dataset=prompts, output_dir=str(output_dir), **ONLINE_SETTINGS)
    settings.update(overrides)
    return ["--online", "true"] + [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def train_online(model, prompts, output_dir, **overrides):
    """rebel.main --online in this process, as the command line makes its settings."""
    rebel.main(rebel.parse_config(rebel.Config, online_flags(model, prompts, output_dir, **overrides)))
    return str(output_dir)


@pytest.fixture(scope="class")
def online_case(tmp_path_factory):
    """A 3-layer tiny Llama whose responses often stop within 6 tokens (and often do not), prompts, a reward file."""
    folder = tmp_path_factory.mktemp("online")
    model = make_model(str(folder / "model"), layers=3, ends_often=True)
    prompts = write_prompts(folder / "prompts.jsonl", 12, ids=True)
    (folder / "rewards.py").write_text(ONLINE_REWARD)
    return SimpleNamespace(folder=folder, model=model, prompts=prompts, reward=f"{folder / 'rewards.py'}:length")


@pytest.fixture(scope="class")
def online_run(online_case):
    """Two online updates, uninterrupted."""
    return train_online(online_case.model, online_case.prompts, online_case.folder / "full",
                        reward_fn=online_case.reward)


RECIPES = os.path.join(HERE, "recipes")


RECIPE_SCRIPTS = {"generate": generate, "score": score, "rebel": rebel}


LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"


def offline(k, model):
    run = f"runs/rebel-llama-3-armo-iter_{k}"
    return {
        "generate": dict(model=model, prompts="allenai/ultrafeedback_binarized_cleaned_train", split="train",
                         prompt_column="prompt", num_samples=5, temperature=0.8, top_p=0.9, max_new_tokens=2048,
                         max_prompt_len=1024, output=f"{run}/generations.parquet", engine="hf"),
        "score": dict(input=f"{run}/generations.parquet", output=f"{run}/pairs",
                      reward_model="RLHFlow/ArmoRM-Llama3-8B-v0.1", max_length=4096, drop_truncated=True,
                      test_size=1000, trust_remote_code=False),
        "rebel": dict(online=False, model=model, dataset=f"{run}/pairs", train_split="train_prefs",
                      eval_split="test_prefs", output_dir=run, eta=1e6, lr=3e-7, warmup_ratio=0.1,
                      lr_schedule="cosine", temperature=0.8, total_episodes=60000, batch_size=128,
                      max_prompt_len=1024, max_response_len=2048, epochs_per_batch=1, num_layers_unfrozen=0,
                      beta1=0.9, beta2=0.95, adam_eps=1e-8, weight_decay=1e-6, max_grad_norm=0.0),
    }


ONLINE = dict(online=True, num_samples=2, max_new_tokens=1024, max_prompt_len=1024, temperature=0.5, kl_coef=0.05,
              missing_eos_penalty=-4.0, epochs_per_batch=4, eta=1.0, lr=1e-7, lr_schedule="linear", warmup_ratio=0.0,
              num_layers_unfrozen=4, batch_size=32, train_split="train", prompt_column="prompt", reward_fn="",
              beta1=0.9, beta2=0.95, adam_eps=1e-8, weight_decay=1e-6)


UF = dict(model=LLAMA, dataset="allenai/ultrafeedback_binarized_cleaned_train",
          reward_model="sfairXC/FsfairX-LLaMA3-RM-v0.1", reward_scale=1.0, trust_remote_code=False)


# what each recipe claims (its comments cite the authors' file:line or the model card for every value)
EXPECTED = {
    "rebel-llama-3-armo-iter_1": offline(1, LLAMA),
    "rebel-llama-3-armo-iter_2": offline(2, "runs/rebel-llama-3-armo-iter_1/final"),
    "rebel-llama-3-armo-iter_3": offline(3, "runs/rebel-llama-3-armo-iter_2/final"),
    "rebel-llama-3": {"rebel": {**ONLINE, **UF, "output_dir": "runs/rebel-llama-3", "total_episodes": 60829}},
    "rebel-llama-3-epoch_2": {"rebel": {**ONLINE, **UF, "output_dir": "runs/rebel-llama-3-epoch_2",
                                        "total_episodes": 2 * 60829}},
    "rebel-openchat-3.5": {"rebel": {**ONLINE, "model": "openchat/openchat_3.5", "dataset": "berkeley-nest/Nectar",
                                     "reward_model": "berkeley-nest/Starling-RM-7B-alpha",
                                     "reward_base": "meta-llama/Llama-2-7b-chat-hf", "reward_scale": 1.0,
                                     "output_dir": "runs/rebel-openchat-3.5", "total_episodes": 182954}},
}


def recipe_path(row):
    return os.path.join(RECIPES, f"{row}.yaml")


def parse_section(path, section, tmp_path):
    """`python <section>.py --config path`: the script reads its own section of the recipe."""
    return rebel.parse_config(RECIPE_SCRIPTS[section].Config, ["--config", path])


HH = "\n\nHuman: the sea is blue\n\nAssistant: and the sky\n\nHuman: why is the sky blue\n\nAssistant:"


def alpaca_instructions(tmp_path, n=5):
    """AlpacaEval's model_outputs (../shared/data/alpaca_eval), else a tiny file like it."""
    path = os.path.join(SHARED_DATA, "alpaca_eval", "Meta-Llama-3-8B-Instruct.json")
    if os.path.exists(path):
        return path, read_json(path)[:n]
    rows = [dict(instruction=" ".join(WORDS[i:i + 4]) + "?", output="x", generator="m", dataset="d") for i in range(n)]
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump(rows, f)
    return str(tmp_path / "alpaca.json"), rows


def small(tokenizer, **fields):
    """The fields of a tiny decoder config on the test tokenizer."""
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), bos_token_id=tokenizer.bos_token_id,
                tie_word_embeddings=False, **fields)


def make_arch(path, kind, **fields):
    """A tiny random model of another architecture with the test tokenizer, saved like a Hub checkpoint. Its head's
    output is scaled ×4, so that a scaling or a soft cap changes the log-probs a lot."""
    tokenizer, t = make_tokenizer(path), transformers
    if kind == "granite":
        config, cls = t.GraniteConfig(**small(tokenizer, logits_scaling=8.0)), t.GraniteForCausalLM
    elif kind == "gemma2":
        config, cls = t.Gemma2Config(**small(tokenizer, head_dim=16, final_logit_softcapping=0.5)), t.Gemma2ForCausalLM
    elif kind == "cohere":
        config, cls = t.CohereConfig(**small(tokenizer, logit_scale=0.25)), t.CohereForCausalLM
    elif kind == "phi":  # its head has a bias
        config, cls = t.PhiConfig(**small(tokenizer)), t.PhiForCausalLM
    elif kind == "falcon_h1":
        config = t.FalconH1Config(**small(tokenizer, lm_head_multiplier=0.5, mamba_d_ssm=64, mamba_n_heads=4,
                                          mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16))
        cls = t.FalconH1ForCausalLM
    elif kind == "gpt2":
        config = t.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512)
        cls = t.GPT2LMHeadModel
    elif kind == "gemma3":  # multimodal: no top-level vocab_size or eos_token_id
        config = t.Gemma3Config(text_config=small(tokenizer, head_dim=16, **fields), mm_tokens_per_image=4,
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=16))
        cls = t.Gemma3ForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4)
        if model.get_output_embeddings().bias is not None:  # initialised to 0
            model.get_output_embeddings().bias.normal_()
    model.save_pretrained(path)
    return str(path)


def logprobs_and_naive(path, tmp_path, temperature=0.7):
    from datasets import Dataset
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = rebel.load_tokenizer(path)
    pairs = rebel.tokenize_pairs(Dataset.from_list(read_jsonl(write_pairs(tmp_path / "p.jsonl", n=3))), tokenizer,
                                 "t", len(tokenizer))
    got = rebel.response_logprobs(model, *rebel.collate(rebel.pair_sequences(pairs)), temperature, 5)
    naive = torch.stack([naive_logprob(model, p["prompt_ids"], p[k], temperature)
                         for k in ("chosen_ids", "rejected_ids") for p in pairs])
    return got.detach(), naive.detach()


SHORT_RUN = dict(total_episodes=8, batch_size=8, eval_size=0, save_final=False)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    data = write_pairs(folder / "p.jsonl", n=16)
    run = train(tiny_model, data, folder / "run", total_episodes=8, batch_size=8, eval_size=0)
    return data, run


GSM8K_REWARD = '''
import sys

def correct(prompt, response, answer):
    """A verifiable reward: 1 when the response ends with the gold answer's final number."""
    return float(response.strip().endswith(answer.split("#### ")[-1]))

def exits(prompt, response):
    if prompt[0]["content"] == "p1":
        sys.exit(3)
    return 1.0

def edits(prompt, response):
    prompt[0]["content"] = "edited"
    return float(len(response))

def everything(prompt, response, **columns):
    return float(len(columns) + len(response))
'''


UINT64_MAX = 18446744073709551615  # a uint64 hash: past int64, not a float


def pair_rows(tmp_path, n=12, name="good.jsonl"):
    return read_jsonl(write_pairs(tmp_path / name, n=n))


def trained_rows(out):
    return sorted(r["index"] for r in read_jsonl(os.path.join(out, "ref_logprobs.jsonl")))


def plain_parquet(path, rows):
    """A parquet file whose size depends on the bytes of its values, not on their order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path), compression="none", use_dictionary=False)
    return str(path)


# openbmb/Eurus-RM-7b's remote code (modeling_eurus_rm.py), retyped: its class, attribute names and forward. The
# import appends to $EURUS_MARKER, so that a test sees whether this file ran.
EURUS_REMOTE_CODE = '''
import os
from typing import List, Optional

import torch
import torch.nn as nn
from transformers import MistralConfig, MistralModel, PreTrainedModel

if os.environ.get("EURUS_MARKER"):
    with open(os.environ["EURUS_MARKER"], "a") as f:
        f.write("modeling_eurus_rm.py ran\\n")


class EurusRewardModel(PreTrainedModel):
    config_class = MistralConfig
    _supports_flash_attn_2 = True

    def __init__(self, config):
        super().__init__(config)
        self.model = MistralModel(config)
        self.regression_head = nn.Linear(self.config.hidden_size, 1, bias=False)
        self.post_init()  # transformers 5 wants it; the original predates that

    def forward(self, input_ids: torch.LongTensor = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                past_key_values: Optional[List[torch.FloatTensor]] = None,
                inputs_embeds: Optional[torch.FloatTensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None):
        transformer_outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         past_key_values=past_key_values, inputs_embeds=inputs_embeds)
        hidden_states = transformer_outputs[0]
        rewards = self.regression_head(hidden_states).squeeze(-1)
        ends = attention_mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
        rewards = torch.gather(rewards, 1, ends)
        return rewards
'''


class GPTRewardModel(torch.nn.Module):
    """Starling-RM-7B-alpha's model card class, as REBEL's src/nectar/rebel.py has it: given the causal LM and tokenizer
    that the card loads from meta-llama/Llama-2-7b-chat-hf. PAD_ID = the last id of tokenizer(unk) (REBEL's [-1]; the
    card's [0] is the same id for a tokenizer that adds no BOS, as this one)."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.config = model.config
        self.config.n_embd = self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.n_embd
        self.model = model
        self.transformer = model.model
        self.v_head = torch.nn.Linear(self.config.n_embd, 1, bias=False)
        self.tokenizer = tokenizer
        self.tokenizer.pad_token = self.tokenizer.unk_token
        self.PAD_ID = self.tokenizer(self.tokenizer.pad_token)["input_ids"][-1]

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None):
        bs = input_ids.shape[0]
        transformer_outputs = self.transformer(input_ids, past_key_values=past_key_values,
                                               attention_mask=attention_mask, position_ids=position_ids)
        hidden_states = transformer_outputs[0]
        scores = []
        rewards = self.v_head(hidden_states).squeeze(-1)
        for i in range(bs):
            c_inds = (input_ids[i] == self.PAD_ID).nonzero()
            c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
            scores.append(rewards[i, c_ind - 1])
        return scores


def make_llama2_base(path):
    """A tiny stand-in of meta-llama/Llama-2-7b-chat-hf as Starling-RM's --reward_base: tokenizer (<unk>, <s>, </s>,
    Llama-2's chat template) and config; no weights (the reward model brings them)."""
    from transformers import LlamaConfig
    tokenizer = make_tokenizer(path, family="llama2_sp")
    tokenizer.unk_token = "<unk>"
    tokenizer.save_pretrained(path)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def make_starling(path, base, layout="both", drop=()):
    """A folder laid out as berkeley-nest/Starling-RM-7B-alpha: README.md and pytorch_model.bin, the state dict of the
    card's GPTRewardModel on `base` with random weights (v_head of scale 1), no config and no tokenizer. layout: which
    names the backbone is saved under: both (as state_dict() gives), model (model.model.*) or transformer
    (transformer.*); model.lm_head.weight is saved in all three. `drop`: names left out."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(3)
    rm = GPTRewardModel(LlamaForCausalLM(LlamaConfig.from_pretrained(base)), AutoTokenizer.from_pretrained(base))
    torch.nn.init.normal_(rm.v_head.weight, std=1 / 8)
    skip = {"both": (), "model": ("transformer.",), "transformer": ("model.model.",)}[layout]
    state_dict = {k: v for k, v in rm.state_dict().items() if not k.startswith(skip) and k not in drop}
    torch.save(state_dict, os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("# Starling-RM-7B-alpha (tiny stand-in)\n")
    return path


def make_eurus(path, drop=(), head_rows=1):
    """A folder laid out as openbmb/Eurus-RM-7b: a MistralConfig with architectures ["EurusRewardModel"] and an
    auto_map to modeling_eurus_rm.py (EURUS_REMOTE_CODE), weights model.* + regression_head.weight [head_rows, hidden]
    (minus `drop`) in model.safetensors, and a Mistral-instruct tokenizer."""
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralModel
    tokenizer = make_tokenizer(path, family="mistral")
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           architectures=["EurusRewardModel"],
                           auto_map={"AutoModel": "modeling_eurus_rm.EurusRewardModel"})
    config.save_pretrained(path)
    torch.manual_seed(4)
    weights = {f"model.{k}": v for k, v in MistralModel(config).state_dict().items()}
    weights["regression_head.weight"] = torch.randn(head_rows, 64) / 8
    save_file({k: v.contiguous() for k, v in weights.items() if k not in drop}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "modeling_eurus_rm.py"), "w") as f:
        f.write(EURUS_REMOTE_CODE)
    return path


@pytest.fixture(scope="module")
def llama2_base(tmp_path_factory):
    return make_llama2_base(str(tmp_path_factory.mktemp("llama2_base")))


@pytest.fixture(scope="module")
def eurus_model(tmp_path_factory):
    return make_eurus(str(tmp_path_factory.mktemp("eurus_rm")))


@pytest.fixture
def remote_modules(tmp_path, monkeypatch):
    """Remote code copied under tmp_path (not ~/.cache), and $EURUS_MARKER: the file its import writes to."""
    import transformers.dynamic_module_utils
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "remote_code_ran.txt"
    monkeypatch.setenv("EURUS_MARKER", str(marker))
    return marker


def starling_by_the_authors(rm_path, base, rows, max_length):
    """Each response's reward as REBEL's src/nectar/rebel.py computes it: GPTRewardModel on the base, its state dict
    loaded with load_state_dict(..., strict=False); text = " ".join([prompt, response + " </s>"]) with the prompt in
    Llama-2 chat format (no " </s>" for a response cut at the token limit, which had no end of turn), tokenized without
    special tokens, cut from the left and padded with unk to max_length, attention mask = ids != pad."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(99)  # other random weights than the checkpoint's: every one must come from it
    tokenizer = AutoTokenizer.from_pretrained(base)
    rm = GPTRewardModel(LlamaForCausalLM(LlamaConfig.from_pretrained(base)), tokenizer)
    rm.load_state_dict(torch.load(os.path.join(rm_path, "pytorch_model.bin"), weights_only=True), strict=False)
    rm.eval()
    tokenizer.truncation_side = "left"
    texts = [" ".join([f"<s>[INST] {row['prompt']} [/INST]", response + ("" if cut else " </s>")])
             for row in rows for response, cut in zip(row["responses"], row["truncated"])]
    encoded = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=False,
                        return_tensors="pt")
    input_ids = encoded["input_ids"]
    with torch.no_grad():
        return [float(r) for r in rm(input_ids=input_ids, attention_mask=input_ids != tokenizer.pad_token_id)]


def eurus_by_its_remote_code(path, sequences):
    """EurusRewardModel (EURUS_REMOTE_CODE, run) on each token list alone, and on all of them right-padded, batched."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        alone = [float(model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)))
                 for s in sequences]
        batched = model(input_ids=ids, attention_mask=mask)[:, 0].tolist()
    return alone, batched


def max_difference(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def code_pickle(path, marker):
    """A pytorch_model.bin whose unpickling would run code (it would create `marker`)."""
    class Payload:
        def __reduce__(self):
            return (open, (marker, "w"))
    torch.save({"v_head.weight": Payload()}, path)


NO_TOKENIZER = r"no tokenizer files \(tokenizer\.json / tokenizer\.model / tokenizer_config\.json\) in the folder; "


REFUSED = r"not in its checkpoint, where {} expects them; refusing to score with random values in their place$"


def base_without_tokenizer(t, base):
    folder = shutil.copytree(base, str(t / "config_only"), ignore=shutil.ignore_patterns("tok*", "spec*", "chat*"))
    return dict(reward_base=folder)


def starling_without(t, base, name, layout="both"):
    return dict(reward_model=make_starling(str(t / "starling_part"), base, layout=layout, drop=(name,)))


def starling_pickle_with_code(t, base):
    code_pickle(str(t / "starling" / "pytorch_model.bin"), str(t / "pwned"))
    return {}


# (settings over a good Starling-RM folder `starling` and its --reward_base, the one-line error expected)
BAD_INPUTS = [
    pytest.param(lambda t, base: dict(reward_base="/nonexistent/Llama-2-7b-chat-hf"),
                 r"^error: reward model .*starling: " + NO_TOKENIZER + r"a Starling-RM state dict \(no config\.json\) "
                 r"takes its config and tokenizer from --reward_base, and '/nonexistent/Llama-2-7b-chat-hf' could not "
                 r"be read: ", id="starling_base_missing"),
    pytest.param(lambda t, base: dict(reward_base="meta-llama/Llama-2-7b-chat-hf"),
                 r"^error: reward model .*starling: " + NO_TOKENIZER + r".* from --reward_base, and "
                 r"'meta-llama/Llama-2-7b-chat-hf' could not be read: OSError: ", id="starling_base_offline"),
    pytest.param(base_without_tokenizer, r"^error: reward model .*starling: " + NO_TOKENIZER + r".* from "
                 r"--reward_base, and the folder .*config_only has none either$", id="starling_base_without_tokenizer"),
    pytest.param(lambda t, base: starling_without(t, base, "v_head.weight"),
                 r"^error: reward model .*starling_part: v_head\.weight " + REFUSED.format("StarlingRM"),
                 id="starling_no_v_head"),
    pytest.param(lambda t, base: starling_without(t, base, "model.model.norm.weight", layout="model"),
                 r"^error: reward model .*starling_part: norm\.weight " + REFUSED.format("StarlingRM"),
                 id="starling_backbone_incomplete"),
    pytest.param(starling_pickle_with_code, r"^error: could not load the reward model .*starling.*: UnpicklingError: ",
                 id="starling_pickle_with_code"),
    pytest.param(lambda t, base: dict(reward_model=make_eurus(str(t / "eurus"), drop=("regression_head.weight",))),
                 r"^error: reward model .*eurus: regression_head\.weight " + REFUSED.format("EurusRM"),
                 id="eurus_no_head"),
    pytest.param(lambda t, base: dict(reward_model=make_eurus(str(t / "eurus"), head_rows=2)),
                 r"^error: reward model .*eurus: regression_head\.weight \(checkpoint \[2, 64\], model \[1, 64\]\) "
                 + REFUSED.format("EurusRM"), id="eurus_head_resized"),
]


LAYOUT_FILES = ("rebel.py", "generate.py", "score.py", "eval_gsm8k.py", "test_rebel.py")


def source_lines(name):
    with open(os.path.join(HERE, name)) as f:
        return f.read().splitlines()


# ----------------------------------------------------------------------------- the tests, one class per component

class TestLoss:
    """rebel_loss and the loss of an update."""

    def test_rebel_loss_by_hand(self):
        # pair 1: log-ratio diff (−1 − −2) − (−3 − −1) = 3; target 2·(0.9 − 0.4) = 1; (3 − 1)² = 4
        # pair 2: (0 − 0) − (−1 − 0) = 1; target 2·(0.1 − 0.6) = −1; (1 + 1)² = 4, plus pair 3 with a zero error
        t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        loss = rebel.rebel_loss(t(-1.0, 0.0, -5.0), t(-3.0, -1.0, -2.0), t(-2.0, 0.0, -5.0), t(-1.0, 0.0, -2.0),
                                t(0.9, 0.1, 0.3), t(0.4, 0.6, 0.3), eta=2.0)
        assert loss.tolist() == pytest.approx([4.0, 4.0, 0.0])

    def test_first_update_loss_is_mean_squared_scaled_reward_gap(self, tiny_model, tmp_path):
        data = write_pairs(tmp_path / "p.jsonl", n=24)
        out = train(
            tiny_model, data, tmp_path / "run", eta=3.0, total_episodes=8, batch_size=8, eval_size=0, save_final=False
        )
        first = read_jsonl(os.path.join(out, "metrics.jsonl"))[0]
        positions = rebel.global_batch(24, 8, 0, seed=1)
        rows = read_jsonl(data)
        expected = sum((3.0 * (rows[i]["chosen_reward"] - rows[i]["rejected_reward"])) ** 2 for i in positions) / 8
        assert first["update"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)
        assert abs(first["logratio_chosen"]) < 1e-5 and abs(first["logratio_rejected"]) < 1e-5
        ref = read_jsonl(os.path.join(out, "ref_logprobs.jsonl"))
        assert sorted(r["index"] for r in ref) == list(range(24)) and {r["split"] for r in ref} == {"train"}

    def test_non_finite_loss_stops_without_touching_the_checkpoint(self, tiny_model, tmp_path, monkeypatch):
        monkeypatch.setattr(rebel, "check_reward_gaps", lambda *a: None)  # (else the pair is refused up front)
        rows = read_jsonl(write_pairs(tmp_path / "p.jsonl", n=40))
        first, second = rebel.global_batch(40, 8, 0, seed=1), rebel.global_batch(40, 8, 1, seed=1)
        row = next(i for i in second if i not in first)  # η·Δr overflows to inf in update 2 only
        rows[row]["chosen_reward"], rows[row]["rejected_reward"] = 1e308, -1e308
        data = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(SystemExit, match=r"non-finite loss .* at update 2; .*update_000001"):
            train(tiny_model, data, tmp_path / "run", eval_size=0, save_every=1, save_final=False)
        assert os.listdir(tmp_path / "run" / "checkpoints") == ["update_000001"]


class TestLogprobs:
    """rebel.py's tokenisation, log-probs and batches."""

    def test_tokenize_pairs_schema_and_end_of_turn(self, tiny_model, tmp_path):
        from datasets import Dataset
        tokenizer = rebel.load_tokenizer(tiny_model)
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        for schema, messages in (("common", False), ("cornell", True)):
            rows = Dataset.from_list(
                read_jsonl(write_pairs(tmp_path / f"{schema}.jsonl", n=5, schema=schema, message_prompts=messages))
            )
            pairs = rebel.tokenize_pairs(rows, tokenizer, schema, len(tokenizer))
            for row, pair in zip(rows, pairs):
                prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][0]["content"]
                assert tokenizer.decode(pair["prompt_ids"]).endswith(
                    f"{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                )
                assert pair["chosen_ids"][-1] == eot and pair["rejected_ids"][-1] == eot
                assert tokenizer.decode(pair["chosen_ids"]) == row["chosen"] + "<|eot_id|>"
                assert pair["rejected_reward"] == (row.get("rejected_reward") or row.get("reject_reward"))

    def test_logprobs_match_naive_and_ignore_padding_and_batching(self, tiny_model, tmp_path):
        from datasets import Dataset
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        tokenizer = rebel.load_tokenizer(tiny_model)
        pairs = rebel.tokenize_pairs(
            Dataset.from_list(read_jsonl(write_pairs(tmp_path / "p.jsonl", n=6))), tokenizer, "t", len(tokenizer)
        )
        temperature = 0.7
        naive = torch.stack(
            [
                torch.stack(
                    [naive_logprob(model, p["prompt_ids"], p[k], temperature) for k in ("chosen_ids", "rejected_ids")]
                )
                for p in pairs
            ]
        )

        def batched(group, chunk):
            out = rebel.response_logprobs(model, *rebel.collate(rebel.pair_sequences(group)), temperature,
                                          chunk)
            return out.view(2, len(group)).T

        together = batched(pairs, chunk=7)  # all six padded to the longest, 7-token chunks
        alone = torch.cat([batched([p], chunk=1024) for p in pairs])        # each pair on its own, no padding
        torch.testing.assert_close(together, naive, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(alone, naive, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(batched(pairs, 7), rebel.response_logprobs(  # the temperature does change the result
            model, *rebel.collate(rebel.pair_sequences(pairs)), 1.0, 7).view(2, -1).T)

        # gradients of the chunked, recomputed path equal the naive ones
        model.zero_grad()
        batched(pairs[:3], chunk=5).sum().backward()
        chunked_grad = model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()
        model.zero_grad()
        sum(
            naive_logprob(model, p["prompt_ids"], p[k], temperature)
            for p in pairs[:3]
            for k in ("chosen_ids", "rejected_ids")
        ).backward()
        torch.testing.assert_close(chunked_grad[0], model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(chunked_grad[1], model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5, rtol=1e-4)

    def test_global_batches_depend_only_on_the_seed(self):
        stream = [rebel.global_batch(10, 4, u, seed=3) for u in range(6)]   # 24 pairs drawn from 10: crosses two epochs
        flat = sum(stream, [])
        assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
        assert (
            stream
            == [rebel.global_batch(10, 4, u, seed=3) for u in range(6)]
            != [rebel.global_batch(10, 4, u, seed=4) for u in range(6)]
        )
        batches = rebel.micro_batches(
            [{"prompt_ids": [0] * i, "chosen_ids": [0], "rejected_ids": [0]} for i in range(10)], stream[0], 1
        )
        dealt = [rebel.for_rank(batches, r, 3) for r in range(3)]   # 4 micro-batches over 3 ranks: same count each
        assert [len(d) for d in dealt] == [2, 2, 2] and sum(b is None for d in dealt for b in d) == 2
        assert sorted(id(b) for d in dealt for b in d if b) == sorted(map(id, batches))


class TestTraining:
    """rebel.py's runs: processes, resume, the final model, trackers, config files, generated pairs."""

    def test_two_processes_equal_one_and_final_model_reloads(self, tiny_model, tmp_path, capsys):
        rows = read_jsonl(write_pairs(tmp_path / "p.jsonl", n=41, message_prompts=True))
        rows[17]["prompt"] = [
            {"role": "human", "content": "hi"}
        ]  # dropped and counted by every process alike, not a hang
        data = write_jsonl(tmp_path / "p.jsonl", rows)
        one = train(tiny_model, data, tmp_path / "one")
        two = str(tmp_path / "two")  # the same settings, but 2 processes and activation checkpointing on
        done = torchrun(
            "rebel.py",
            dict(TRAIN_SETTINGS, model=tiny_model, dataset=data, output_dir=two, activation_checkpointing="true"),
        )
        for printed in (capsys.readouterr().out, done.stdout):
            assert "dropped 1 of 41 rows | 1 × each message must be" in printed and "(first: row 17)" in printed
        m1, m2 = read_jsonl(os.path.join(one, "metrics.jsonl")), read_jsonl(os.path.join(two, "metrics.jsonl"))
        assert [r["update"] for r in m1] == [r["update"] for r in m2] == [0, 1, 2, 2, 3, 4, 4]
        for r1, r2 in zip(m1, m2):  # losses square differences of fp32 sums of ~50 log-probs: equal to ~1e-5 relative
            for key in ("loss", "val_loss", "sign_align"):
                if key in r1:
                    assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6)
        w1, w2 = final_weights(one), final_weights(two)
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
        first = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert max((w1[k] - first.state_dict()[k]).abs().max().item() for k in w1) > 1e-3   # it did train

        # the consolidated model reloads and reproduces the last evaluation
        from datasets import Dataset
        model = AutoModelForCausalLM.from_pretrained(os.path.join(one, "final"))
        tokenizer = rebel.load_tokenizer(os.path.join(one, "final"))
        ref = {
            r["index"]: (r["chosen_logprob"], r["rejected_logprob"])
            for r in read_jsonl(os.path.join(one, "ref_logprobs.jsonl"))
            if r["split"] == "eval"
        }
        rows = Dataset.from_list(read_jsonl(data))
        pairs = [p for p in rebel.tokenize_pairs(rows, tokenizer, "t", len(tokenizer)) if p["index"] in ref]
        with torch.no_grad():
            logps = rebel.response_logprobs(model, *rebel.collate(rebel.pair_sequences(pairs)), 0.8, 1024)
            logps = logps.view(2, -1)
        diff = (logps[0] - torch.tensor([ref[p["index"]][0] for p in pairs])) - (
            logps[1] - torch.tensor([ref[p["index"]][1] for p in pairs])
        )
        gap = torch.tensor([p["chosen_reward"] - p["rejected_reward"] for p in pairs])
        assert len(pairs) == 8 and ((diff - gap) ** 2).mean().item() == pytest.approx(m1[-1]["val_loss"], rel=1e-4)

    def test_resume_equals_uninterrupted(self, tiny_model, tmp_path, capsys):
        data = write_pairs(tmp_path / "p.jsonl", n=40)
        full = train(tiny_model, data, tmp_path / "full", total_episodes=48)
        part = train(tiny_model, data, tmp_path / "part", total_episodes=48, stop_after=3)
        checkpoints = os.path.join(part, "checkpoints")
        assert sorted(os.listdir(checkpoints)) == ["update_000003"] and not os.path.exists(os.path.join(part, "final"))
        # a crash while writing the next checkpoint, and records logged after the checkpoint, must not matter
        os.makedirs(os.path.join(checkpoints, "update_000004.partial"))
        rebel.append_jsonl(os.path.join(part, "metrics.jsonl"), {"update": 4, "loss": -1.0})
        with open(os.path.join(part, "metrics.jsonl"), "a") as f:
            f.write('{"update": 4, "lo')  # and a line cut by a full disk
        capsys.readouterr()
        train(tiny_model, data, part, total_episodes=48, resume=True)
        printed = capsys.readouterr().out
        assert "note: 1 unreadable line(s) of" in printed and "reference log-probs: reusing" in printed
        w1, w2 = final_weights(full), final_weights(part)
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
        m_full, m_part = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(
            os.path.join(part, "metrics.jsonl")
        )
        assert [r["update"] for r in m_part] == [r["update"] for r in m_full] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]
        assert [r.get("loss", r.get("val_loss")) for r in m_part] == pytest.approx(
            [r.get("loss", r.get("val_loss")) for r in m_full], rel=1e-5
        )
        # a finished run is not redone, and a resume may not change what the run is
        stamp = os.path.getmtime(os.path.join(part, "final", "model.safetensors"))
        train(tiny_model, data, part, total_episodes=48, resume=True)
        assert "this run is finished" in capsys.readouterr().out
        assert os.path.getmtime(os.path.join(part, "final", "model.safetensors")) == stamp
        with pytest.raises(SystemExit, match=r"made with other settings \(--eta 1.0 -> 2.0; --seed 1 -> 3\)"):
            train(tiny_model, data, part, total_episodes=48, resume=True, eta=2.0, seed=3)

    def test_final_model_keeps_the_starting_dtype_tokenizer_and_no_dropout(self, tiny_model, tmp_path):
        """A bf16 checkpoint with attention dropout: training turns dropout off (update 1's log-ratios are exactly 0, as
        policy = reference), and final/ is bf16 in its config and tensors, with the tokenizer as it was (no pad token).
        """
        start = str(tmp_path / "bf16")
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attention_dropout=0.5).to(torch.bfloat16)
        model.save_pretrained(start)
        AutoTokenizer.from_pretrained(tiny_model).save_pretrained(start)
        out = train(start, write_pairs(tmp_path / "p.jsonl", n=24), tmp_path / "run", total_episodes=8, eval_size=0)
        first = read_jsonl(os.path.join(out, "metrics.jsonl"))[0]
        assert first["logratio_chosen"] == 0.0 and first["logratio_rejected"] == 0.0
        final = os.path.join(out, "final")
        assert json.load(open(os.path.join(final, "config.json")))["dtype"] == "bfloat16"
        assert AutoModelForCausalLM.from_pretrained(final, dtype="auto").dtype == torch.bfloat16
        assert AutoTokenizer.from_pretrained(final).pad_token is None
        assert (
            GenerationConfig.from_pretrained(final).eos_token_id
            == GenerationConfig.from_pretrained(tiny_model).eos_token_id
        )

    def test_report_to_wandb_and_tensorboard_log_every_record_and_continue_on_resume(
        self, tiny_model, tmp_path, monkeypatch
    ):
        data = write_pairs(tmp_path / "p.jsonl", n=40)
        calls = fake_trackers(monkeypatch)
        for tracker in ("wandb", "tensorboard"):
            out = train(tiny_model, data, tmp_path / tracker, report_to=tracker, stop_after=2, save_every=1)
            train(tiny_model, data, out, report_to=tracker, resume=True, save_every=1)
            metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
            if tracker == "wandb":  # one run: the same id again on resume; every record under its metrics.jsonl names
                first, again = calls["wandb_init"]
                assert first["id"] is None and again["id"] == open(os.path.join(out, "wandb_run_id")).read() == "run1"
                assert again["resume"] == "allow"
                assert first["config"]["eta"] == 1.0 and first["config"]["report_to"] == "wandb"
                assert [({k: v for k, v in r.items() if k != "update"}, r["update"]) for r in metrics] == calls[
                    "wandb_log"
                ]
            else:  # the resume purges what was logged after its checkpoint, so no step is there twice
                assert calls["tb_init"] == [
                    (os.path.join(out, "tensorboard"), None),
                    (os.path.join(out, "tensorboard"), 3),
                ]
                assert len(calls["tb_text"]) == 1 and '"eta": 1.0' in calls["tb_text"][0][1]
                assert calls["tb_scalars"] == [
                    (k, v, r["update"]) for r in metrics for k, v in r.items() if k != "update"
                ]
        # generate.py and score.py send their summaries
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=4)
        gen(tiny_model, prompts, tmp_path / "gen.jsonl", report_to="wandb")
        assert (
            calls["wandb_log"][-1][0]["generate/prompts"] == 4 and calls["wandb_log"][-1][0]["generate/responses"] == 12
        )
        # a tracker that is not installed: one line, before any work
        monkeypatch.setitem(sys.modules, "wandb", None)
        with pytest.raises(SystemExit, match=r"--report_to wandb: the package is not installed \(pip install wandb\)"):
            rebel.Config(report_to="wandb")

    def test_config_files_and_flags_give_the_same_run(self, tiny_model, tmp_path):
        """`script.py run.yaml` (HF's convention), `--config run.json`, and flags: the same config; flags override the
        file."""
        data = write_pairs(tmp_path / "p.jsonl", n=24)
        flags = [
            "--model",
            tiny_model,
            "--dataset",
            data,
            "--lr",
            "3e-7",
            "--total_episodes",
            "16",
            "--batch_size",
            "8",
            "--activation_checkpointing",
            "false",
            "--eval_size",
            "8",
            "--eta",
            "2.5",
            "--dtype",
            "float32",
        ]
        settings = dict(
            model=tiny_model,
            dataset=data,
            lr="3e-7",
            total_episodes=16,
            batch_size=8,  # YAML reads 3e-7 as a string
            activation_checkpointing=False,
            eval_size=8,
            eta=2.5,
            dtype="float32",
            micro_batch_size=4,
        )
        (tmp_path / "run.yaml").write_text(
            "".join(f"{k}: {v}\n" for k, v in settings.items()).replace("False", "false")
        )
        (tmp_path / "run.json").write_text(json.dumps(settings))
        expected = rebel.parse_config(rebel.Config, flags)
        assert expected.lr == 3e-7 and expected.activation_checkpointing is False and expected.micro_batch_size == 2
        for argv in (
            [str(tmp_path / "run.yaml")],
            ["--config", str(tmp_path / "run.json")],
            [str(tmp_path / "run.json")],
        ):
            assert rebel.parse_config(rebel.Config, argv + ["--micro_batch_size", "2"]) == expected  # the flag wins
            assert rebel.parse_config(rebel.Config, argv).micro_batch_size == 4
        for module, argv in (
            (generate, ["--temperature", "1.0", "--engine", "hf", "--num_samples", "3"]),
            (score, ["--drop_truncated", "false", "--max_length", "77"]),
            (eval_gsm8k, ["--chat_template", "--limit", "5"]),
        ):
            keys = [a[2:] for a in argv if a.startswith("--")]
            file = tmp_path / f"{module.__name__}.yaml"
            flat = rebel.parse_config(module.Config, argv)
            file.write_text("".join(f"{k}: {json.dumps(getattr(flat, k))}\n" for k in keys))
            assert rebel.parse_config(module.Config, [str(file)]) == flat
        # argparse's usage error, exit 2
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            rebel.parse_config(rebel.Config, ["--lr", "1e-6", str(tmp_path / "run.yaml")])
        assert "a settings file goes first or after --config: --config " in err.getvalue()
        # and the run itself: from the YAML file, the same metrics as from the flags
        for argv, name in ((flags, "flags"), ([str(tmp_path / "run.yaml"), "--micro_batch_size", "2"], "yaml")):
            rebel.main(
                rebel.parse_config(rebel.Config, argv + ["--output_dir", str(tmp_path / name), "--save_final", "false"])
            )
        strip = lambda name: [  # noqa: E731
            {k: v for k, v in r.items() if not k.endswith("_per_s")}
            for r in read_jsonl(tmp_path / name / "metrics.jsonl")
        ]
        assert len(strip("flags")) == 4 and strip("yaml") == strip("flags")  # eval, update 1, update 2, eval

    @pytest.mark.parametrize(
        "name, text, message",
        [
            pytest.param(
                "typo.yaml",
                "learning_rate: 1e-6\n",
                r"--config .*typo\.yaml: unknown settings learning_rate",
                id="unknown-setting",
            ),
            pytest.param("bad.yaml", "lr: [1\n", r"--config .*bad\.yaml: ", id="not-yaml"),
            pytest.param(
                "types.yaml",
                "lr: fast\n",
                r"^error: --config .*types\.yaml: lr must be a number, got 'fast'",
                id="text-for-a-number",
            ),
            pytest.param(
                "types.yaml",
                "activation_checkpointing: maybe\n",
                r"^error: --config .*types\.yaml: activation_checkpointing must be true or false",
                id="not-a-boolean",
            ),
            pytest.param(
                "types.yaml",
                "total_episodes: 1.5\n",
                r"^error: --config .*types\.yaml: total_episodes must be an integer, got 1.5",
                id="not-an-integer",
            ),
            pytest.param(
                "types.yaml",
                "dtype: bf16\n",
                r"^error: --config .*types\.yaml: dtype must be one of auto, bfloat16",
                id="unknown-choice",
            ),
            pytest.param(
                "types.yaml",
                "eta: .inf\n",
                r"^error: --config .*types\.yaml: eta must be a finite number, got inf",
                id="infinite-number",
            ),
        ],
    )
    def test_config_file_errors_name_the_file(self, name, text, message, tmp_path):
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=message):
            rebel.parse_config(rebel.Config, [str(tmp_path / name)])

    def test_readme_yaml_is_the_papers_run(self, tmp_path):
        """The README's YAML file for the paper's run parses, and holds the defaults (but for paths and the tracker)."""
        readme = open(os.path.join(HERE, "README.md")).read()
        (tmp_path / "run.yaml").write_text(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
        cfg = rebel.parse_config(rebel.Config, [str(tmp_path / "run.yaml"), "--report_to", "none"])
        assert (
            dataclasses.replace(cfg, dataset=rebel.Config.dataset, output_dir=rebel.Config.output_dir) == rebel.Config()
        )
        assert cfg.eta == 1e6 and cfg.lr == 3e-7 and cfg.dataset == "runs/iter_1/pairs"

    def test_generated_and_scored_pairs_train_with_rebel(self, tiny_model, tmp_path):
        fn = tmp_path / "rewards.py"
        fn.write_text("def length(prompt, response):\n    return len(response)\n")
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=16)
        generated = gen(tiny_model, prompts, tmp_path / "gen.jsonl", num_samples=3, max_new_tokens=8, batch_size=4)
        pairs = run_score(generated, tmp_path / "pairs", reward_fn=f"{fn}:length", drop_truncated=False, test_size=4)
        n_train = len(rebel.load_split(pairs, "train_prefs"))
        assert n_train >= 8
        # ids that are not the tokens of the texts that were scored (edited after sampling) are dropped, with the reason
        from datasets import Dataset
        rows = rebel.load_split(pairs, "train_prefs").to_list()
        rows[1]["chosen_ids"] = rows[1]["rejected_ids"]
        tokenizer = rebel.load_tokenizer(tiny_model)
        kept = rebel.tokenize_pairs(Dataset.from_list(rows), tokenizer, "edited", len(tokenizer))
        assert [p["index"] for p in kept] == [
            i for i in range(len(rows)) if i != 1 or rows[1]["chosen"] == rows[1]["rejected"]
        ]
        rows[1]["chosen_ids"], rows[1]["chosen"] = rows[1]["rejected_ids"], rows[1]["rejected"] + " and more"
        with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as printed:
            rebel.tokenize_pairs(Dataset.from_list(rows[1:2]), tokenizer, "edited", len(tokenizer))
        assert (
            "1 × chosen_ids do not decode to the chosen text (edited after sampling, or decoded another way?)"
            in printed.getvalue()
        )
        out = tmp_path / "run"
        rebel.main(
            rebel.Config(
                model=tiny_model,
                dataset=pairs,
                output_dir=str(out),
                total_episodes=8,
                batch_size=4,
                micro_batch_size=2,
                eval_micro_batch_size=4,
                eta=1.0,
                lr=1e-3,
                warmup_ratio=0.25,
                eval_every=1,
                save_every=0,
                activation_checkpointing=False,
                seed=1,
            )
        )
        metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        assert [m["update"] for m in metrics if "val_loss" in m] == [0, 1, 2]
        assert os.path.exists(os.path.join(out, "final", "model.safetensors"))


class TestOnline:
    def test_online_defaults_are_the_authors_unless_set(self, tmp_path):
        (tmp_path / "run.yaml").write_text("online: true\neta: 2.0\n")
        cfg = rebel.parse_config(rebel.Config, ["--online", "true", "--lr", "1e-6"])
        assert (cfg.eta, cfg.lr, cfg.temperature, cfg.batch_size, cfg.epochs_per_batch, cfg.lr_schedule,
                cfg.num_layers_unfrozen, cfg.warmup_ratio) == (1.0, 1e-6, 0.5, 32, 4, "linear", 4, 0.0)
        assert rebel.parse_config(rebel.Config, ["--config", str(tmp_path / "run.yaml")]).eta == 2.0
        offline = rebel.parse_config(rebel.Config, [])
        assert (offline.eta, offline.epochs_per_batch, offline.lr_schedule) == (1e6, 1, "cosine")

    def test_rollouts_rewards_kl_and_the_first_pass(self, online_case, online_run):
        """KL is exactly 0 at update 1; the reward is (score·scale or the penalty) − kl_coef·KL, both branches seen;
        the scores are the reward function of the decoded ids; the first pass of every update regresses on π_t = πθ,
        so its loss is mean (η·Δr)²; four passes per update, lr constant within it, linear across updates."""
        tokenizer = rebel.load_tokenizer(online_case.model)
        stop_ids = set(generate.stop_token_ids(tokenizer, online_case.model,
                                               rebel.load_model_config(online_case.model)))
        rows = read_jsonl(os.path.join(online_run, "rollouts.jsonl"))
        metrics = read_jsonl(os.path.join(online_run, "metrics.jsonl"))
        assert [r["update"] for r in rows] == [1] * 4 + [2] * 4
        prompts = {r["prompt_id"]: r["prompt"] for r in read_jsonl(online_case.prompts)}
        branches = set()
        for r in rows:
            for side in ("chosen", "rejected"):
                ids = r[f"{side}_ids"]
                stopped = ids[-1] in stop_ids
                text = tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
                assert r[f"{side}_score"] == pytest.approx(len(text) / 10.0)
                score = 2.0 * r[f"{side}_score"] if stopped else -1.0
                assert r[f"{side}_reward"] == pytest.approx(score - 0.5 * r[f"{side}_kl"], abs=1e-6)
                branches.add(stopped)
                assert r["prompt_ids"] == rebel.prompt_tokens(tokenizer, prompts[r["prompt_id"]])[1]
            assert r["chosen_reward"] >= r["rejected_reward"]
            if r["update"] == 1:
                assert r["chosen_kl"] == 0.0 and r["rejected_kl"] == 0.0
        assert branches == {True, False}
        assert any(r["chosen_kl"] != 0.0 for r in rows if r["update"] == 2)
        for update in (1, 2):
            gaps = [r["chosen_reward"] - r["rejected_reward"] for r in rows if r["update"] == update]
            steps = [m for m in metrics if m["update"] == update and "loss" in m]
            assert [m["pass"] for m in steps] == [1, 2, 3, 4] and len({m["lr"] for m in steps}) == 1
            assert steps[0]["loss"] == pytest.approx(sum(g * g for g in gaps) / len(gaps), rel=1e-5, abs=1e-6)
            assert abs(steps[0]["logratio_chosen"]) < 1e-5
        stats = [m for m in metrics if "score" in m]
        assert [m["update"] for m in stats] == [1, 2] and stats[0]["kl"] == 0.0 and 0 < stats[0]["stopped"] < 1
        assert [m["lr"] for m in metrics if m.get("pass") == 1] == [1e-3, 5e-4]

    def test_kl_at_update_2_is_the_naive_log_ratio_and_frozen_layers_stay(self, online_case, online_run, tmp_path):
        """A run of one update ends at π_1 (the same computation); update 2's KL is Σ log π_1 − log π_0 of the
        sampled ids, computed the textbook way. Only the last layer, the final norm and the head trained."""
        from transformers import AutoModelForCausalLM
        one = train_online(online_case.model, online_case.prompts, tmp_path / "one", reward_fn=online_case.reward,
                           total_episodes=4)
        pi_1 = AutoModelForCausalLM.from_pretrained(os.path.join(one, "final")).eval()
        pi_0 = AutoModelForCausalLM.from_pretrained(online_case.model).eval()
        rows = [r for r in read_jsonl(os.path.join(online_run, "rollouts.jsonl")) if r["update"] == 2]
        with torch.no_grad():
            for r in rows:
                for side in ("chosen", "rejected"):
                    kl = (naive_logprob(pi_1, r["prompt_ids"], r[f"{side}_ids"], 0.5)
                          - naive_logprob(pi_0, r["prompt_ids"], r[f"{side}_ids"], 0.5)).item()
                    assert r[f"{side}_kl"] == pytest.approx(kl, abs=1e-4)
        start, end = pi_0.state_dict(), final_weights(online_run)
        moved = {k for k in end if (end[k] - start[k]).abs().max().item() > 0}
        assert moved and all(k.startswith(("model.layers.2.", "model.norm.", "lm_head.")) for k in moved)

    def test_resume_and_two_processes_give_the_same_rollouts_and_weights(self, online_case, online_run, tmp_path):
        part = train_online(online_case.model, online_case.prompts, tmp_path / "part", reward_fn=online_case.reward,
                            stop_after=1)
        rebel.append_jsonl(os.path.join(part, "rollouts.jsonl"), {"update": 2, "stale": True})  # after the checkpoint
        train_online(online_case.model, online_case.prompts, part, reward_fn=online_case.reward, resume=True)
        two = str(tmp_path / "two")
        flags = online_flags(online_case.model, online_case.prompts, two, reward_fn=online_case.reward)
        torchrun("rebel.py", dict(zip([f[2:] for f in flags[::2]], flags[1::2])))
        full = read_jsonl(os.path.join(online_run, "rollouts.jsonl"))
        for other in (part, two):
            rows = read_jsonl(os.path.join(other, "rollouts.jsonl"))
            assert [(r["prompt_id"], r["chosen_ids"], r["rejected_ids"]) for r in rows] == [
                (r["prompt_id"], r["chosen_ids"], r["rejected_ids"]) for r in full]
            assert [r["chosen_reward"] for r in rows] == pytest.approx([r["chosen_reward"] for r in full], abs=1e-4)
            w1, w2 = final_weights(online_run), final_weights(other)
            assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4

    def test_a_reward_model_scores_the_decoded_responses(self, online_case, reward_model, tmp_path):
        """--reward_model (score.py's loader and scoring): each rollout's score is the model's reward of the decoded
        response in its own chat template, as score.py computes it."""
        out = train_online(online_case.model, online_case.prompts, tmp_path / "run", reward_model=reward_model,
                           total_episodes=4, epochs_per_batch=1)
        rows = read_jsonl(os.path.join(out, "rollouts.jsonl"))
        tokenizer = rebel.load_tokenizer(online_case.model)
        prompts = {r["prompt_id"]: r["prompt"] for r in read_jsonl(online_case.prompts)}
        generated = [dict(prompt=prompts[r["prompt_id"]], truncated=[False, False], responses=[
            tokenizer.decode(r[f"{side}_ids"], skip_special_tokens=True) for side in ("chosen", "rejected")])
            for r in rows]
        scored = read_jsonl(run_score(write_jsonl(tmp_path / "gen.jsonl", generated), tmp_path / "pairs.jsonl",
                                      reward_model=reward_model, drop_truncated=False, dtype="float32"))
        by_prompt = {p["prompt"]: p["rewards"] for p in scored}
        for r in rows:
            if prompts[r["prompt_id"]] in by_prompt:
                assert [r["chosen_score"], r["rejected_score"]] == pytest.approx(by_prompt[prompts[r["prompt_id"]]],
                                                                                  abs=1e-4)
        assert by_prompt and len(rows) == 4

    def test_a_process_with_no_prompts_to_sample_does_not_hang(self, online_case, tmp_path):
        """One block of prompts for two processes: the second samples nothing and goes on to the log-probs (it hung
        in an all-reduce of generate's synced steps before); the result equals one process's."""
        settings = dict(reward_fn=online_case.reward, batch_size=2, rollout_block=2, total_episodes=2,
                        micro_batch_size=1)
        one = train_online(online_case.model, online_case.prompts, tmp_path / "one", **settings)
        flags = online_flags(online_case.model, online_case.prompts, tmp_path / "two", **settings)
        torchrun("rebel.py", dict(zip([f[2:] for f in flags[::2]], flags[1::2])))
        rows = [read_jsonl(os.path.join(out, "rollouts.jsonl")) for out in (one, str(tmp_path / "two"))]
        assert [(r["chosen_ids"], r["rejected_ids"]) for r in rows[0]] == [(r["chosen_ids"], r["rejected_ids"])
                                                                           for r in rows[1]]

    @pytest.mark.parametrize("overrides, message", [
        pytest.param(dict(), r"--online: give one of --reward_model and --reward_fn", id="no-reward"),
        pytest.param(dict(reward_fn="REWARD", reward_model="x/y"), r"give one of", id="two-rewards"),
        pytest.param(dict(reward_fn="FOLDER/nope.py:f"), r"--reward_fn .*: no file", id="reward-fn-missing"),
        pytest.param(dict(reward_fn="FOLDER/rewards.py:nope"), r"has no function 'nope'", id="reward-fn-unknown"),
        pytest.param(dict(reward_fn="FOLDER/rewards.py:needs_gold"),
                     r"takes 'gold', which .*prompts\.jsonl has no column", id="reward-fn-column-missing"),
        pytest.param(dict(reward_fn="FOLDER/rewards.py:raises"), r"raised on row \d+, response 0: ValueError",
                     id="reward-fn-raises"),
        pytest.param(dict(reward_fn="FOLDER/rewards.py:infinite"), r"the reward must be a finite number",
                     id="reward-fn-infinite"),
        pytest.param(dict(reward_fn="REWARD", num_samples=1), r"--num_samples must be >= 2, got 1",
                     id="one-sample"),
        pytest.param(dict(reward_fn="REWARD", kl_coef="nan"), r"--kl_coef must be a finite number", id="kl-nan"),
        pytest.param(dict(reward_fn="REWARD", missing_eos_penalty="inf"), r"--missing_eos_penalty must be a finite",
                     id="penalty-inf"),
        pytest.param(dict(reward_fn="REWARD", dataset="PAIRS"), r"is a file of scored pairs", id="pairs-file"),
        pytest.param(dict(reward_fn="REWARD", prompt_column="question"), r"missing column 'question'",
                     id="no-prompt-column"),
        pytest.param(dict(reward_fn="REWARD", dataset="EMPTY"), r"no prompt to sample from", id="no-prompts"),
    ])
    def test_bad_input_fails_in_one_line(self, online_case, tmp_path, monkeypatch, overrides, message):
        from transformers import AutoModelForCausalLM
        pairs = write_pairs(tmp_path / "pairs.jsonl", n=4)
        empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": " "}])
        names = dict(REWARD=online_case.reward, FOLDER=str(online_case.folder), PAIRS=pairs, EMPTY=empty)
        settings = {k: names.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
        settings = {k: v.replace("FOLDER", str(online_case.folder)) if isinstance(v, str) else v
                    for k, v in settings.items()}
        policy_loads = []
        if "raise" not in settings.get("reward_fn", "") and "infinite" not in settings.get("reward_fn", ""):
            monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: policy_loads.append(a))
        with pytest.raises(SystemExit, match="error: " + ".*" + message):
            train_online(online_case.model, online_case.prompts, tmp_path / "run", **settings)
        assert not policy_loads


class TestRecipes:
    """The model card's recipes (recipes/*.yaml): each section parses with its script's parser into the settings
    it claims."""

    def test_every_recipe_is_in_the_table(self):
        assert sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".yaml")) == sorted(EXPECTED)


    @pytest.mark.parametrize("row", sorted(EXPECTED))
    def test_recipe_parses_to_its_claimed_settings(self, row, tmp_path):
        path = recipe_path(row)
        with open(path) as f:
            text = f.read()
        assert text.startswith(f"# {row.replace('rebel', 'REBEL').replace('llama', 'Llama').replace('armo', 'Armo')}"
                               .replace("openchat", "OpenChat") + " — model card row: AlpacaEval 2 LC ")
        recipe = yaml.safe_load(text)
        assert sorted(recipe) == sorted(EXPECTED[row]), "sections"
        for section, claimed in EXPECTED[row].items():
            assert set(recipe[section]) <= set(claimed), f"{section}: a setting the table does not check"
            cfg = parse_section(path, section, tmp_path)
            assert {k: getattr(cfg, k) for k in claimed} == claimed, section


    @pytest.mark.parametrize("k", [2, 3])
    def test_iteration_starts_from_the_previous_final(self, k):
        with open(recipe_path(f"rebel-llama-3-armo-iter_{k - 1}")) as f:
            previous = yaml.safe_load(f)
        with open(recipe_path(f"rebel-llama-3-armo-iter_{k}")) as f:
            this = yaml.safe_load(f)
        final = os.path.join(previous["rebel"]["output_dir"], "final")
        assert this["generate"]["model"] == this["rebel"]["model"] == final
        assert this["score"]["input"] == this["generate"]["output"]
        assert this["rebel"]["dataset"] == this["score"]["output"]


    def test_epoch_2_is_two_passes_of_the_same_run(self):
        with open(recipe_path("rebel-llama-3")) as f:
            one = yaml.safe_load(f)["rebel"]
        with open(recipe_path("rebel-llama-3-epoch_2")) as f:
            two = yaml.safe_load(f)["rebel"]
        assert two["total_episodes"] == 2 * one["total_episodes"]
        assert {k: v for k, v in one.items() if k not in ("total_episodes", "output_dir")} == \
            {k: v for k, v in two.items() if k not in ("total_episodes", "output_dir")}


    @pytest.mark.parametrize("section", sorted(RECIPE_SCRIPTS))
    def test_a_recipe_naming_an_unknown_setting_fails_in_one_line(self, section, tmp_path):
        with open(recipe_path("rebel-llama-3-armo-iter_1")) as f:
            recipe = yaml.safe_load(f)
        recipe[section]["learning_rate"] = 1e-6  # not a setting of any script
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(recipe))
        with pytest.raises(SystemExit, match="unknown settings learning_rate"):
            parse_section(str(path), section, tmp_path)


class TestInputs:
    """rebel.py's bad input, broken files and dropped rows (and generate.py's dropped prompts)."""

    @pytest.mark.parametrize(
        "case, message",
        [
            pytest.param(
                lambda f: dict(dataset=str(f.tmp / "missing.jsonl")), r"missing\.jsonl.*no such file", id="missing-file"
            ),
            pytest.param(
                lambda f: dict(
                    dataset=f.data("no_col", [{k: v for k, v in r.items() if k != "chosen_reward"} for r in f.good])
                ),
                r"missing column 'chosen_reward'",
                id="missing-column",
            ),
            pytest.param(
                lambda f: dict(dataset=f.data("text_reward", [{**r, "rejected_reward": "low"} for r in f.good])),
                r"row 0: column 'rejected_reward' must be a finite number, got 'low'",
                id="text-reward",
            ),
            pytest.param(
                lambda f: dict(
                    dataset=f.data(
                        "nan_reward",
                        [
                            {**r, "chosen_reward": float("nan") if i == 5 else r["chosen_reward"]}
                            for i, r in enumerate(f.good)
                        ],
                    )
                ),
                r"row 5: column 'chosen_reward' must be a finite number, got nan",
                id="nan-reward",
            ),
            pytest.param(
                lambda f: dict(max_response_len=1),
                r"train: no pair left after the length filter",
                id="nothing-left-after-length-filter",
            ),
            pytest.param(lambda f: dict(model=f.no_template), r"has no chat template", id="no-chat-template"),
            pytest.param(
                lambda f: dict(model=str(f.tmp / "no_model")),
                r"model '.*no_model': no such folder, and not a Hub id",
                id="missing-model",
            ),
            pytest.param(
                lambda f: dict(micro_batch_size=3),
                r"--batch_size 8 must be a multiple of --micro_batch_size × processes = 3 × 1",
                id="batch-not-a-multiple",
            ),
            pytest.param(lambda f: dict(total_episodes=4), r"less than one batch", id="less-than-one-batch"),
            pytest.param(lambda f: dict(dtype="fp8"), r"--dtype must be", id="unknown-dtype"),
            pytest.param(
                lambda f: dict(output_dir=str(f.folder / "earlier")),
                r"holds a checkpoint of an earlier run: add --resume",
                id="earlier-run-without-resume",
            ),
            # settings that trained the wrong thing, or failed late, are refused before any data is read
            pytest.param(
                lambda f: dict(micro_batch_size=-2),
                r"--micro_batch_size must be >= 1, got -2",
                id="negative-micro-batch",
            ),
            pytest.param(
                lambda f: dict(micro_batch_size=0), r"--micro_batch_size must be >= 1, got 0", id="zero-micro-batch"
            ),
            pytest.param(lambda f: dict(eta=-1.0), r"--eta must be > 0, got -1.0", id="negative-eta"),
            pytest.param(lambda f: dict(eta=0.0), r"--eta must be > 0, got 0.0", id="zero-eta"),
            pytest.param(
                lambda f: dict(temperature=-0.8), r"--temperature must be > 0, got -0.8", id="negative-temperature"
            ),
            pytest.param(lambda f: dict(temperature=0), r"--temperature must be > 0, got 0", id="zero-temperature"),
            pytest.param(
                lambda f: dict(warmup_ratio=2.0),
                r"--warmup_ratio must be in \[0, 1\], got 2.0",
                id="warmup-ratio-over-1",
            ),
            pytest.param(lambda f: dict(lr=-1e-3), r"--lr must be > 0, got -0.001", id="negative-lr"),
            pytest.param(lambda f: dict(beta1=1.5), r"--beta1 must be in \[0, 1\), got 1.5", id="beta1-over-1"),
            pytest.param(
                lambda f: dict(eval_micro_batch_size=0),
                r"--eval_micro_batch_size must be >= 1, got 0",
                id="zero-eval-micro-batch",
            ),
            pytest.param(
                lambda f: dict(logprob_chunk=-1), r"--logprob_chunk must be >= 1, got -1", id="negative-logprob-chunk"
            ),
            pytest.param(
                lambda f: dict(batch_size="eight"),
                r"--batch_size must be an integer, got 'eight'",
                id="batch-size-text",
            ),
            pytest.param(
                lambda f: dict(batch_size=8.0), r"--batch_size must be an integer, got 8.0", id="batch-size-float"
            ),
            pytest.param(
                lambda f: dict(report_to="mlflow"),
                r"--report_to must be one of none, wandb, tensorboard, got 'mlflow'",
                id="unknown-tracker",
            ),
            # files that gave tracebacks
            pytest.param(lambda f: dict(dataset=str(f.empty)), r"empty\.jsonl: the file is empty", id="empty-file"),
            pytest.param(lambda f: dict(dataset=str(f.cut)), r"cut\.jsonl: line 3: not valid JSON", id="cut-file"),
            pytest.param(
                lambda f: dict(output_dir=str(f.empty)),
                r"--output_dir .*empty\.jsonl is a file, not a folder",
                id="output-dir-is-a-file",
            ),
            pytest.param(
                lambda f: dict(output_dir=str(f.empty / "run")),
                r"--output_dir .*empty\.jsonl/run: cannot write there",
                id="output-dir-under-a-file",
            ),
            pytest.param(
                lambda f: dict(model=str(f.no_weights)),
                r"model folder .*no_weights has no weights",
                id="model-without-weights",
            ),
            pytest.param(
                lambda f: dict(dataset=f.data("two_ids", [dict(r, chosen_ids=[5], rejected_ids=[6]) for r in f.good])),
                r"two_ids\.parquet\[train\]: has chosen_ids, rejected_ids but not all of prompt_ids",
                id="partial-id-columns",
            ),
            pytest.param(  # a data file is read as written: only data that `datasets` decodes as JSON is refused
                lambda f: dict(
                    dataset=json_column_folder(
                        f.tmp / "mixed",
                        [
                            dict(r, prompt=[{"role": "user", "content": "hi"}]) if i == 1 else r
                            for i, r in enumerate(f.good)
                        ],
                    )
                ),
                r"column 'prompt' mixes strings and lists",
                id="mixed-prompt-column",
            ),
            pytest.param(
                lambda f: dict(dataset="runs/no_such_pairs.jsonl"),
                r"runs/no_such_pairs\.jsonl: no such file",
                id="missing-relative-file",
            ),
            # a mistyped data path is said before any model or tokenizer is looked for (a Hub id would be fetched first)
            pytest.param(
                lambda f: dict(dataset="runs/no_such_pairs.jsonl", model="no-such-owner/no-such-model"),
                r"runs/no_such_pairs\.jsonl: no such file",
                id="missing-file-before-hub-model",
            ),
            pytest.param(
                lambda f: dict(model=str(f.tmp / "no" / "model")),
                r"model '.*no/model': no such folder, and not a Hub id",
                id="missing-nested-model",
            ),
            pytest.param(
                lambda f: dict(
                    dataset=write_jsonl(f.tmp / "both.jsonl", [dict(r, reject=r["chosen"]) for r in f.good])
                ),
                r"both\.jsonl\[train\]: has both columns 'rejected' and 'reject', which mean the same: keep one",
                id="rejected-and-reject-columns",
            ),
            pytest.param(
                lambda f: dict(output_dir=f.model),
                r"--model .* is inside --output_dir .*, where this run writes final/",
                id="model-inside-output-dir",
            ),
            pytest.param(lambda f: dict(adam_eps=0.0), r"--adam_eps must be > 0, got 0.0", id="zero-adam-eps"),
            pytest.param(
                lambda f: dict(eta=float("inf")), r"--eta must be a finite number, got inf", id="infinite-eta"
            ),
            pytest.param(lambda f: dict(lr=float("nan")), r"--lr must be a finite number, got nan", id="nan-lr"),
        ],
    )
    def test_bad_input_fails_clearly_before_loading_the_model(
        self, case, message, bad_input_files, tiny_model, tmp_path, monkeypatch
    ):
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the input was checked")
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        files = SimpleNamespace(**vars(bad_input_files), tmp=tmp_path, model=tiny_model,
                                data=lambda name, rows: write_parquet(tmp_path / f"{name}.parquet", rows))
        settings = {"dataset": str(bad_input_files.folder / "good.jsonl"), **case(files)}
        with pytest.raises(SystemExit, match=message):
            train(
                settings.pop("model", tiny_model),
                settings.pop("dataset"),
                settings.pop("output_dir", tmp_path / "run"),
                **settings,
            )

    def test_bad_rows_are_dropped_and_counted_and_the_run_goes_on(self, tiny_model, tmp_path, capsys):
        rows = bad_prompt_rows(tmp_path / "p.jsonl")
        out = train(
            tiny_model,
            write_jsonl(tmp_path / "p.jsonl", rows),
            tmp_path / "run",
            total_episodes=8,
            eval_size=0,
            save_final=False,
        )
        printed = capsys.readouterr().out
        assert "warning: the pairs were sampled at temperature 1.0, but the log-probs use --temperature 0.8" in printed
        assert "dropped 4 of 24 rows" in printed and all(f"(first: row {i})" in printed for i in (3, 5, 7, 9))
        assert "1 × the last user turn is empty (first: row 9)" in printed
        assert sorted(r["index"] for r in read_jsonl(os.path.join(out, "ref_logprobs.jsonl"))) == [
            i for i in range(24) if i not in (3, 5, 7, 9)]

    def test_boolean_token_ids_are_a_bad_row(self):
        with pytest.raises(rebel.BadRow, match="must be non-empty lists of integers"):  # JSON true is not token 1
            rebel.sampled_ids(
                {"prompt": "hi", "prompt_ids": [True, 5], "chosen_ids": [5], "rejected_ids": [6]}, ["", ""], None, 100
            )

    def test_generate_drops_and_counts_bad_prompts(self, tiny_model, tmp_path, capsys):
        # generate.py: the same prompts as rebel.py drops are skipped and counted, and so are prompts over
        # --max_prompt_len
        rows = bad_prompt_rows(tmp_path / "p.jsonl")
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows[:10]]
                              + [{"prompt": [{"role": "user", "content": " ".join(WORDS * 3)}]}])
        kept = read_jsonl(gen(tiny_model, prompts, tmp_path / "gen.jsonl", max_prompt_len=64))
        printed = capsys.readouterr().out
        assert (
            "dropped 5 of 11 rows" in printed
            and "1 × longer than --max_prompt_len 64 tokens (first: row 10)" in printed
        )
        assert [r["prompt_id"] for r in kept] == [0, 1, 2, 4, 6, 8]

    @pytest.mark.parametrize(
        "case, message",
        [
            pytest.param(
                lambda f: train(f.truncated, f.pairs, f.tmp / "run", total_episodes=8, eval_size=0),
                r"could not load the model .*truncated.*: SafetensorError",
                id="cut-weights-rebel",
            ),
            pytest.param(
                lambda f: gen(f.truncated, f.prompts, f.tmp / "gen.jsonl"),
                r"could not load the model .*truncated.*: SafetensorError",
                id="cut-weights-generate",
            ),
            pytest.param(
                lambda f: run_eval(f.truncated, f.questions, f.tmp / "eval"),
                r"could not load the model .*truncated.*: SafetensorError",
                id="cut-weights-gsm8k",
            ),
            pytest.param(
                lambda f: run_eval(f.model, f.questions, f.a_file),
                r"--output .*a_file is a file, not a folder",
                id="gsm8k-output-is-a-file",
            ),
            pytest.param(
                lambda f: gen(f.broken, f.prompts, f.tmp / "gen2.jsonl"),
                r"generation_config\.json cannot be read",
                id="unreadable-generation-config",
            ),
            pytest.param(
                lambda f: run_score(f.generations, f.tmp / "s.jsonl", reward_fn=f"{f.folder / 'syntax.py'}:f"),
                r"--reward_fn .*syntax\.py:f: .*syntax\.py could not be imported: SyntaxError",
                id="reward-fn-syntax-error",
            ),
            # --test_size replaces the folder: never a file or a folder score.py did not write
            pytest.param(
                lambda f: run_score(
                    f.generations, f.a_file, reward_fn=f"{f.folder / 'rewards.py'}:length", test_size=1
                ),
                r"exists and is not a datasets folder that score\.py wrote",
                id="test-size-output-is-a-file",
            ),
            pytest.param(
                lambda f: run_score(
                    f.generations, f.folder, reward_fn=f"{f.folder / 'rewards.py'}:length", test_size=1
                ),
                r"exists and is not a datasets folder that score\.py wrote",
                id="test-size-output-is-another-folder",
            ),
            pytest.param(
                lambda f: rebel.Config(seed=10**21),
                r"--seed must be in \[0, 4294967296\), got 1000000000000000000000",
                id="seed-out-of-range",
            ),
        ],
    )
    def test_broken_files_and_paths_fail_in_one_line(self, case, message, broken_files, tiny_model, tmp_path):
        """What a new user broke by hand (each gave a traceback, or worse, before): one line each, before the long
        work."""
        with pytest.raises(SystemExit, match=message):
            case(SimpleNamespace(**vars(broken_files), tmp=tmp_path, model=tiny_model))
        assert broken_files.a_file.read_text() == "mine\n"

    def test_a_column_of_temperatures_with_gaps_is_read(self, tiny_model, broken_files, tmp_path, capsys):
        rows = [dict(r, temperature=None if i % 2 else 0.7) for i, r in enumerate(read_jsonl(broken_files.pairs))]
        train(tiny_model, write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "run_t", total_episodes=8, eval_size=0,
              save_final=False)
        assert "sampled at temperature 0.7, but the log-probs use --temperature 0.8" in capsys.readouterr().out


class TestCLI:
    """The command lines: help, flags, Ctrl-C."""

    @pytest.mark.parametrize("argv", [["a.yaml", "--config", "b.yaml"], ["--config", "a.yaml", "--config", "b.yaml"]],
                             ids=["file-then-config", "config-twice"])
    def test_two_settings_files_are_refused(self, tmp_path, argv):
        for name in ("a.yaml", "b.yaml"):
            (tmp_path / name).write_text("lr: 1.0e-6\n")
        argv = [str(tmp_path / a) if a.endswith(".yaml") else a for a in argv]
        with pytest.raises(SystemExit, match=r"error: --config given 2 times .*give one settings file"):
            rebel.parse_config(rebel.Config, argv)

    def test_ctrl_c_ends_in_one_line_saying_how_to_continue(self, capsys):
        def interrupted(cfg):
            raise KeyboardInterrupt
        with pytest.raises(SystemExit) as stop:
            rebel.run_script(interrupted, rebel.Config, "continue with the same command and --resume", argv=[])
        assert (
            stop.value.code == 130
            and capsys.readouterr().out == "\ninterrupted: continue with the same command and --resume\n"
        )

    def test_help_documents_every_flag(self, capsys):
        """Every script's --help lists each flag with its one-line doc (rebel.py's as a real command line)."""
        helps = {
            rebel: (
                subprocess.run(
                    [sys.executable, "rebel.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True
                ).stdout
            )
        }
        for module in (generate, score, eval_gsm8k):
            with pytest.raises(SystemExit) as done:
                rebel.parse_config(module.Config, ["--help"])
            assert done.value.code == 0
            helps[module] = capsys.readouterr().out
        for module, out in helps.items():
            assert out.startswith("usage:")
            for field in rebel.dataclasses.fields(module.Config):
                assert f"--{field.name}" in out and field.metadata["help"].split()[0] in out
        cfg = rebel.parse_config(
            score.Config,
            ["--drop_truncated", "false", "--test_size", "3", "--reward_fn", "f.py:g", "--output", "pairs"],
        )
        assert (cfg.drop_truncated, cfg.test_size, cfg.reward_fn) == (False, 3, "f.py:g")

    def test_an_unknown_flag_is_a_usage_error(self, capsys):
        with pytest.raises(SystemExit) as done:
            rebel.parse_config(rebel.Config, ["--etaa", "1"])
        err = capsys.readouterr().err
        assert done.value.code == 2 and "unrecognized arguments: --etaa 1" in err and len(err.splitlines()) == 1

    def test_sigterm_ends_in_one_line_saying_how_to_continue(self, capsys):
        """A job's end (SLURM's SIGTERM) is said as Ctrl-C is."""
        def killed(cfg):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            with pytest.raises(SystemExit) as stop:
                rebel.run_script(killed, rebel.Config, "continue with the same command and --resume", argv=[])
        finally:
            signal.signal(signal.SIGTERM, before)
        assert stop.value.code == 130 and "interrupted: continue with the same command and --resume" in (
            capsys.readouterr().out)


class TestGenerate:
    """generate.py."""

    @pytest.mark.parametrize("script", ["generate", "score"])
    def test_two_runs_into_one_output_are_refused(self, tiny_model, tmp_path, script):
        """Another process holds OUTPUT.shards/.lock (a run in progress): a second run refuses in one line."""
        output = tmp_path / ("gen.jsonl" if script == "generate" else "pairs.jsonl")
        os.makedirs(f"{output}.shards")
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                                   "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                                   f"{output}.shards/.lock"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(SystemExit, match=r"--output .* is in use by another run \(it holds .*\.lock\)"):
                if script == "generate":
                    gen(tiny_model, write_prompts(tmp_path / "prompts.jsonl", 2), output)
                else:
                    (tmp_path / "r.py").write_text(LENGTH_REWARD)
                    run_score(write_jsonl(tmp_path / "g.jsonl", generations(2)), output,
                              reward_fn=f"{tmp_path / 'r.py'}:length", drop_truncated=False)
        finally:
            holder.kill()
            holder.wait()

    def test_alpaca_eval_with_several_samples_is_warned_about(self, tiny_model, tmp_path, capsys):
        gen(tiny_model, write_jsonl(tmp_path / "a.jsonl", [{"instruction": "why"}]), tmp_path / "out.json",
            prompt_column="instruction", format="alpaca_eval", num_samples=2, max_new_tokens=2)
        assert "warning: --format alpaca_eval keeps the first of --num_samples 2" in capsys.readouterr().out

    def test_one_sample_per_prompt_is_warned_about_at_start(self, tiny_model, tmp_path, capsys):
        gen(tiny_model, write_prompts(tmp_path / "prompts.jsonl", 2), tmp_path / "gen.jsonl", num_samples=1)
        assert "warning: --num_samples 1: score.py needs 2 or more responses per prompt" in capsys.readouterr().out

    def test_cut_at_stop_and_the_models_stop_tokens(self, tiny_model):
        tokenizer = rebel.load_tokenizer(tiny_model)
        end, eot = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
        stop_ids = generate.stop_token_ids(tokenizer, tiny_model, rebel.load_model_config(tiny_model))
        assert stop_ids == sorted([end, eot])
        assert generate.cut_at_stop([7, 8, eot, eot, eot], set(stop_ids)) == (
            [7, 8, eot],
            False,
        )  # padding after the stop
        assert generate.cut_at_stop([7, end, 9, eot], set(stop_ids)) == ([7, end], False)  # the first of either stop
        assert generate.cut_at_stop([eot, 7], set(stop_ids)) == ([eot], False)
        assert generate.cut_at_stop([7, 8, 9], set(stop_ids)) == ([7, 8, 9], True)

    def test_generate_rows_stops_and_truncation(self, tiny_model, tmp_path):
        # a copy of the model that also stops at 60 more tokens, so both natural stops and truncations happen
        model = str(tmp_path / "stoppy")
        shutil.copytree(tiny_model, model)
        config = json.load(open(os.path.join(model, "generation_config.json")))
        config["eos_token_id"] = config["eos_token_id"] + list(range(100, 160))
        json.dump(config, open(os.path.join(model, "generation_config.json"), "w"))
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=5, messages=True)
        rows = read_jsonl(gen(model, prompts, tmp_path / "gen.jsonl", num_samples=4, max_new_tokens=6))
        assert [r["prompt_id"] for r in rows] == list(range(5))
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in read_jsonl(prompts)]
        samples = [(text, t, n) for r in rows for text, t, n in zip(r["responses"], r["truncated"], r["num_tokens"])]
        assert all(len(r["responses"]) == len(r["truncated"]) == len(r["num_tokens"]) == 4 for r in rows)
        assert all(isinstance(text, str) and isinstance(t, bool) and 1 <= n <= 6 for text, t, n in samples)
        assert all(n == 6 for _, t, n in samples if t)               # truncated: ran to max_new_tokens
        assert {t for _, t, _ in samples} == {True, False}          # both kinds occur
        assert any(n < 6 for _, t, n in samples if not t)           # stopped early at a stop token

    def test_generate_samples_without_top_k(self, tiny_model, tmp_path):
        # transformers' default top_k=50 would allow at most 50 distinct first tokens for one prompt
        prompts = write_prompts(tmp_path / "one.jsonl", n=1)
        (row,) = read_jsonl(
            gen(
                tiny_model,
                prompts,
                tmp_path / "gen.jsonl",
                num_samples=150,
                max_new_tokens=1,
                temperature=1.0,
                top_p=1.0,
            )
        )
        assert len(set(row["responses"])) > 60

    def test_generate_is_seeded_and_independent_of_the_number_of_processes(self, tiny_model, tmp_path):
        prompts = write_prompts(
            tmp_path / "prompts.jsonl", n=9, ids=True
        )  # 5 blocks of 2: 3 on one process, 2 on the other
        one = read_jsonl(gen(tiny_model, prompts, tmp_path / "one.jsonl"))
        again = read_jsonl(gen(tiny_model, prompts, tmp_path / "again.jsonl"))
        other_seed = read_jsonl(gen(tiny_model, prompts, tmp_path / "seed1.jsonl", seed=1))
        assert one == again and [r["prompt_id"] for r in one] == [f"p{i}" for i in range(9)]
        assert [r["responses"] for r in one] != [r["responses"] for r in other_seed]
        torchrun("generate.py", dict(model=tiny_model, prompts=prompts, output=tmp_path / "two.parquet", num_samples=3,
                                     max_new_tokens=8, batch_size=2, seed=0))
        assert load_rows(str(tmp_path / "two.parquet")) == one

    def test_generate_resumes_after_an_interruption(self, tiny_model, tmp_path, capsys):
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=9)
        out = gen(tiny_model, prompts, tmp_path / "part.jsonl")
        full, shards = read_jsonl(out), out + ".shards"
        # a kill leaves saved blocks, no output, maybe a half-written temporary file; a saved block is never redone
        os.remove(out)
        for b in (3, 4):
            os.remove(os.path.join(shards, f"block_{b:06d}.jsonl"))
        with open(os.path.join(shards, "block_000003.jsonl.tmp999"), "w") as f:
            f.write('{"index": 0, "respo')
        first = read_jsonl(os.path.join(shards, "block_000000.jsonl"))[:-1]  # the last line is the rows' checksum
        rebel.atomic_write(
            os.path.join(shards, "block_000000.jsonl"),
            generate.block_text([{**r, "responses": ["SAVED"] * 3} for r in first]),
        )
        capsys.readouterr()
        resumed = read_jsonl(gen(tiny_model, prompts, out))
        assert "3 of 5 blocks already saved" in capsys.readouterr().out
        saved = {r["index"] for r in first}
        assert [r["responses"] == ["SAVED"] * 3 for r in resumed] == [i in saved for i in range(9)]
        assert [r for i, r in enumerate(resumed) if i not in saved] == [r for i, r in enumerate(full) if i not in saved]
        # damaged blocks (a bad disk or copy, never a kill: writes are atomic) are named and sampled again, never
        # merged short
        os.remove(out)
        lines = open(os.path.join(shards, "block_000001.jsonl")).readlines()
        open(os.path.join(shards, "block_000001.jsonl"), "w").writelines(lines[:1])
        open(os.path.join(shards, "block_000002.jsonl"), "w").close()
        open(os.path.join(shards, "block_000003.jsonl"), "w").write(lines[0][:40])
        capsys.readouterr()
        assert read_jsonl(gen(tiny_model, prompts, out)) == resumed
        printed = capsys.readouterr().out
        assert (
            all(f"block_00000{b}.jsonl is damaged" in printed for b in (1, 2, 3))
            and "2 of 5 blocks already saved" in printed
        )
        with pytest.raises(
            SystemExit,
            match=r"part\.jsonl\.shards holds blocks made with other settings \(--temperature 0\.8 -> 1\.5\)"
        ):
            gen(tiny_model, prompts, out, temperature=1.5)
        write_prompts(tmp_path / "prompts.jsonl", n=9, seed=1)  # other prompts under the same file name
        with pytest.raises(SystemExit, match=r"other settings \(prompts_sha256"):
            gen(tiny_model, prompts, out)

    @pytest.mark.parametrize(
        "case, message",
        [
            pytest.param(
                lambda f: dict(prompts=str(f.tmp / "missing.jsonl")),
                r"missing\.jsonl.*no such file",
                id="missing-prompts",
            ),
            pytest.param(
                lambda f: dict(prompt_column="question"),
                r"prompts\.jsonl: missing column 'question' \(columns: prompt\)",
                id="missing-column",
            ),
            pytest.param(lambda f: dict(split="test"), r"has no split 'test'", id="missing-split"),
            pytest.param(
                lambda f: dict(output=str(f.tmp / "gen.csv")),
                r"expected a \.jsonl or \.parquet file",
                id="output-not-jsonl-or-parquet",
            ),
            pytest.param(
                lambda f: dict(output=f.prompts),
                r"--output .* is the --prompts file: it would be replaced",
                id="output-is-the-prompts",
            ),
            pytest.param(
                lambda f: dict(output=os.path.join(f.model, "gen.jsonl")),
                r"--output .*gen\.jsonl is in the model folder",
                id="output-in-the-model-folder",
            ),
            pytest.param(
                lambda f: dict(engine="vllm"), r"vLLM is not installed \(pip install vllm\)", id="vllm-not-installed"
            ),
            pytest.param(
                lambda f: dict(engine="tgi"), r"--engine must be one of hf, vllm, got .tgi.", id="unknown-engine"
            ),
            pytest.param(lambda f: dict(num_samples=0), r"--num_samples must be >= 1, got 0", id="zero-samples"),
            pytest.param(lambda f: dict(top_p=0.0), r"--top_p must be in \(0, 1\], got 0.0", id="zero-top-p"),
            pytest.param(lambda f: dict(temperature=0.0), r"--temperature must be > 0, got 0.0", id="zero-temperature"),
            pytest.param(
                lambda f: dict(max_prompt_len=0), r"--max_prompt_len must be >= 1, got 0", id="zero-max-prompt-len"
            ),
            pytest.param(
                lambda f: dict(prompts=write_jsonl(f.tmp / "empty.jsonl", [])),
                r"empty\.jsonl: the file is empty",
                id="empty-prompts",
            ),
            pytest.param(
                lambda f: dict(output=str(f.folder / "folder.jsonl")),
                r"--output .*folder\.jsonl is a folder, not a file",
                id="output-is-a-folder",
            ),
            pytest.param(
                lambda f: dict(model=str(f.no_weights)),
                r"model folder .*no_weights has no weights",
                id="model-without-weights",
            ),
            pytest.param(lambda f: dict(dtype="fp8"), r"--dtype must be", id="unknown-dtype"),
        ],
    )
    def test_generate_bad_input_fails_before_loading_the_model(
        self, case, message, generate_bad_input_files, tiny_model, tmp_path, monkeypatch
    ):
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the input was checked")
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        overrides = case(SimpleNamespace(**vars(generate_bad_input_files), tmp=tmp_path, model=tiny_model))
        if overrides.get("engine") == "vllm" and generate.importlib.util.find_spec("vllm"):
            pytest.skip("vLLM is installed here")
        settings = {"prompts": generate_bad_input_files.prompts, "output": str(tmp_path / "gen.jsonl"), **overrides}
        with pytest.raises(SystemExit, match=message):
            gen(settings.pop("model", tiny_model), settings.pop("prompts"), settings.pop("output"), **settings)


class TestScore:
    """score.py with a reward model or a reward function."""

    def test_select_pair_and_reward_of(self):
        responses = ["a", "b", "c", "d", "e"]
        assert score.select_pair([0.1, 0.9, 0.5, 0.9, 0.1], responses, [False] * 5, True) == (
            1,
            0,
            None,
        )  # first of equals
        assert (
            score.select_pair([0.1, 0.9, 0.5, 0.2, 0.0], responses, [False, False, True, False, False], True)[2]
            == "a response hit the token limit"
        )
        assert score.select_pair([0.1, 0.9, 0.5, 0.2, 0.0], responses, [False, False, True, False, False], False) == (
            1,
            4,
            None,
        )
        assert score.select_pair([0.3] * 5, responses, [False] * 5, True)[2] == "all rewards equal"
        assert (
            score.select_pair([0.9, 0.5, 0.1], ["same", "b", "same"], [False] * 3, True)[2]
            == "chosen and rejected are the same text"
        )
        armo = SimpleNamespace(score=torch.tensor([1.5, -2.0]), logits=torch.tensor([1.5, -2.0]))
        ordinary = SimpleNamespace(logits=torch.tensor([[0.5], [0.25]]))
        assert score.reward_of(armo, 2).tolist() == [1.5, -2.0] and score.reward_of(ordinary, 2).tolist() == [0.5, 0.25]
        for output in (
            SimpleNamespace(logits=torch.zeros(2, 2)),
            SimpleNamespace(score=torch.zeros(2, 19)),
            SimpleNamespace(hidden=1),
        ):
            with pytest.raises(SystemExit, match="neither `score` nor one logit per sequence"):
                score.reward_of(output, 2)

    def test_score_with_a_reward_model_matches_scoring_one_at_a_time(self, reward_model, tmp_path, capsys):
        rows = generations(7, long_every=4)
        rows[2]["responses"][
            1
        ] += " <|end_of_text|> and"  # the pad token inside: transformers' classes read the last non-pad token
        data = write_jsonl(tmp_path / "gen.jsonl", rows)
        out = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_model=reward_model, max_length=48))
        # the reference: each (prompt, response) alone, no padding, through the same chat template and cut
        tokenizer = rebel.load_tokenizer(reward_model)
        model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
        expected, cut = [], 0
        for row in rows:
            rewards = []
            for response in row["responses"]:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": response}],
                    tokenize=False,
                )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                cut += len(ids) > 48
                with torch.no_grad():
                    rewards.append(model(torch.tensor([ids[:48]])).logits[0, 0].item())
            expected.append(rewards)
        assert (
            cut >= 3 and f"{cut} of 21 reward-model inputs were cut to max_length=48 tokens" in capsys.readouterr().out
        )
        assert (
            len(out) == 7
            and [r["prompt_id"] for r in out] == list(range(7))
            and [r["source"] for r in out] == [f"s{i}" for i in range(7)]
        )
        for row, rewards in zip(out, expected):
            assert row["rewards"] == pytest.approx(rewards, abs=1e-5)
            best, worst = max(range(3), key=lambda j: rewards[j]), min(range(3), key=lambda j: rewards[j])
            assert (row["chosen"], row["rejected"]) == (row["responses"][best], row["responses"][worst])
            assert (row["chosen_reward"], row["rejected_reward"]) == (row["rewards"][best], row["rewards"][worst])

    def test_score_with_a_reward_function_drops_splits_and_resumes(self, tmp_path, capsys, monkeypatch):
        fn = tmp_path / "rewards.py"
        fn.write_text(REWARD_FN)
        calls = tmp_path / "calls"
        monkeypatch.setenv("CALLS_FILE", str(calls))
        rows = [
            dict(prompt=f"p{i}", responses=["x" * (1 + i % 3), "x" * (2 + i % 4), "y" * i], truncated=[False] * 3)
            for i in range(12)
        ]
        rows[1]["responses"] = ["a", "b", "c"]                           # all rewards 0: a tie
        rows[4]["truncated"] = [False, True, False]                       # dropped unless --drop_truncated false
        data = write_jsonl(tmp_path / "gen.jsonl", rows)
        capsys.readouterr()
        out = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:count_x"))
        printed = capsys.readouterr().out
        assert (
            "dropped 2 of 12 prompts | 1 a response hit the token limit | 1 all rewards equal | 10 pairs kept"
            in printed
        )
        assert "mean gap chosen − rejected" in printed
        assert [r["prompt"] for r in out] == [f"p{i}" for i in range(12) if i not in (1, 4)]
        for r in out:
            assert r["rewards"] == [float(s.count("x")) for s in r["responses"]]
            assert r["chosen_reward"] == max(r["rewards"]) and r["rejected_reward"] == min(r["rewards"]) == 0.0
            assert r["chosen"].count("x") == r["chosen_reward"] and "x" not in r["rejected"]
        assert len(open(calls).readlines()) == 36

        # resume: only the missing block is scored again, and the output is the same
        os.remove(tmp_path / "pairs.jsonl")
        os.remove(tmp_path / "pairs.jsonl.shards" / "block_000002.jsonl")
        assert read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:count_x")) == out
        assert len(open(calls).readlines()) == 36 + 9

        kept = read_jsonl(run_score(data, tmp_path / "all.jsonl", reward_fn=f"{fn}:count_x", drop_truncated=False))
        assert [r["prompt"] for r in kept] == [f"p{i}" for i in range(12) if i != 1]

        # a seeded train/test split in one folder, with the split names rebel.py reads by default
        folder = run_score(data, tmp_path / "split", reward_fn=f"{fn}:count_x", test_size=3, seed=5)
        train, test = (
            rebel.load_split(folder, "train_prefs").to_list(),
            rebel.load_split(folder, "test_prefs").to_list(),
        )
        assert len(train) == 7 and len(test) == 3
        assert sorted(r["prompt"] for r in train + test) == sorted(r["prompt"] for r in out)
        other = run_score(data, tmp_path / "split2", reward_fn=f"{fn}:count_x", test_size=3, seed=6)
        assert rebel.load_split(other, "test_prefs").to_list() != test

    @pytest.mark.parametrize(
        "case, message",
        [
            pytest.param(
                lambda f: dict(input=f.data("no_responses", [{"prompt": r["prompt"]} for r in f.good])),
                r"no_responses\.jsonl: missing column 'responses'",
                id="missing-responses",
            ),
            pytest.param(
                lambda f: dict(
                    input=f.data("no_truncated", [{k: v for k, v in r.items() if k != "truncated"} for r in f.good])
                ),
                r"missing column 'truncated'.*--drop_truncated false",
                id="missing-truncated",
            ),
            pytest.param(
                lambda f: dict(
                    input=f.data(
                        "empty",
                        [{**r, "responses": [], "truncated": []} if i == 2 else r for i, r in enumerate(f.good)],
                    )
                ),
                r"empty\.jsonl row 2: 'responses' must be a non-empty list of strings",
                id="empty-responses",
            ),
            pytest.param(
                lambda f: dict(
                    input=f.data(
                        "unequal",
                        [
                            {**r, "responses": ["a", "b"], "truncated": [False] * 2} if i == 3 else r
                            for i, r in enumerate(f.good)
                        ],
                    )
                ),
                r"unequal\.jsonl row 3: 2 responses where row 0 has 3",
                id="unequal-responses",
            ),
            pytest.param(
                lambda f: dict(input=f.data("one", [{**r, "responses": ["a"], "truncated": [False]} for r in f.good])),
                r"1 response per prompt; a pair needs at least 2",
                id="one-response",
            ),
            pytest.param(
                lambda f: dict(input=f.data("text_flags", [{**r, "truncated": ["no"] * 3} for r in f.good])),
                r"text_flags\.jsonl row 0: 'truncated' must be a list of 3 booleans",
                id="text-truncated-flags",
            ),
            pytest.param(
                lambda f: dict(
                    input=f.data(
                        "bad_role",
                        [
                            {**r, "prompt": [{"role": "human" if i == 1 else "user", "content": "hi"}]}
                            for i, r in enumerate(f.good)
                        ],
                    )
                ),
                r"bad_role\.jsonl row 1: each message must be",
                id="bad-role",
            ),
            pytest.param(
                lambda f: dict(input=write_jsonl(f.tmp / "no_rows.jsonl", [])),
                r"no_rows\.jsonl: the file is empty",
                id="empty-file",
            ),
            pytest.param(lambda f: dict(batch_size=0), r"--batch_size must be >= 1, got 0", id="zero-batch-size"),
            pytest.param(
                lambda f: dict(reward_fn=f"{f.fn}:fails_on_row_1"),
                r"raised on row 1, response 0: ZeroDivisionError",
                id="reward-fn-raises",
            ),
            pytest.param(
                lambda f: dict(reward_fn=f"{f.fn}:nan_on_row_2"),
                r"on row 2, response 1: the reward must be a finite number, got nan",
                id="reward-fn-nan",
            ),
            pytest.param(
                lambda f: dict(reward_fn=f"{f.tmp}/nowhere.py:f"), r"no file .*nowhere\.py", id="reward-fn-missing-file"
            ),
            pytest.param(
                lambda f: dict(reward_fn=f"{f.fn}:missing"),
                r"rewards\.py has no function 'missing'",
                id="reward-fn-missing-function",
            ),
            pytest.param(
                lambda f: dict(reward_fn=str(f.fn)),
                r"--reward_fn must be path/to/file\.py:function_name",
                id="reward-fn-without-function",
            ),
            pytest.param(
                lambda f: dict(test_size=2), r"--test_size writes a datasets folder", id="test-size-to-a-file"
            ),
            pytest.param(
                lambda f: dict(output=str(f.tmp / "pairs.csv")),
                r"expected a \.jsonl or \.parquet file",
                id="output-not-jsonl-or-parquet",
            ),
            pytest.param(
                lambda f: dict(input=f.data("same", f.good), output=str(f.tmp / "same.jsonl")),
                r"--output .*same\.jsonl is the --input file",
                id="output-is-the-input",
            ),
        ],
    )
    def test_score_bad_input_names_the_row(self, case, message, reward_model, tmp_path, monkeypatch):
        def no_model(*args, **kwargs):
            raise AssertionError("the reward model was loaded before the input was checked")
        monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_model)
        fn = tmp_path / "rewards.py"
        fn.write_text(REWARD_FN)
        good = [dict(prompt=f"p{i}", responses=["a", "b", "c"], truncated=[False] * 3) for i in range(5)]

        def data(name, rows):
            return write_jsonl(tmp_path / f"{name}.jsonl", rows)
        overrides = case(SimpleNamespace(tmp=tmp_path, fn=fn, good=good, data=data))
        settings = {"input": data("good", good), "output": str(tmp_path / "out.jsonl"), "reward_model": reward_model,
                    **overrides}
        with pytest.raises(SystemExit, match=message):
            run_score(settings.pop("input"), settings.pop("output"), **settings)

    def test_score_two_processes_equal_one(self, reward_model, tmp_path):
        data = write_jsonl(tmp_path / "gen.jsonl", generations(7, long_every=5))
        one = read_jsonl(run_score(data, tmp_path / "one.jsonl", reward_model=reward_model, max_length=48))
        torchrun(
            "score.py",
            dict(
                input=data,
                output=tmp_path / "two.jsonl",
                reward_model=reward_model,
                max_length=48,
                batch_size=4,
                block_size=3,
            ),
        )
        two = read_jsonl(str(tmp_path / "two.jsonl"))
        assert [{k: v for k, v in r.items() if "reward" not in k} for r in two] == [
            {k: v for k, v in r.items() if "reward" not in k} for r in one
        ]
        assert [x for r in two for x in r["rewards"]] == pytest.approx([x for r in one for x in r["rewards"]], abs=1e-6)


class TestArmoRM:
    """score.py's native ArmoRM, and reward models it refuses."""

    def test_armo_is_scored_natively_as_its_definition_batched_and_alone(self, armo_model, tmp_path, capsys):
        assert score.Config().trust_remote_code is False
        rows = multi_turn(generations(7, seed=3))
        data = write_jsonl(tmp_path / "gen.jsonl", rows)
        out = read_jsonl(
            run_score(data, tmp_path / "pairs.jsonl", reward_model=armo_model)
        )  # batches of 4, padded with [PAD]
        assert (
            "dropped 0 of 7 prompts" in capsys.readouterr().out
        )  # and modeling_custom.py, which raises, was never imported
        expected = armo_by_hand(armo_model, reward_inputs(armo_model, rows))
        got = [r for row in out for r in row["rewards"]]
        print(
            f"ArmoRM native vs by hand, fp32: max abs difference {max(abs(a - b) for a, b in zip(got, expected)):.2e}, "
            f"max |score| {max(map(abs, got)):.2f}"
        )
        assert got == pytest.approx(expected, abs=1e-5, rel=0)
        assert len({round(r, 6) for r in got}) == len(
            got
        )  # rewards differ between responses: a wrong reading would show
        for row in out:
            assert row["chosen_reward"] == max(row["rewards"]) and row["rejected_reward"] == min(row["rewards"])
        ones = read_jsonl(run_score(data, tmp_path / "ones.jsonl", reward_model=armo_model, batch_size=1))
        assert [r for row in ones for r in row["rewards"]] == pytest.approx(got, abs=1e-5, rel=0)

    def test_armo_gates_on_the_last_user_turn(self, armo_model, tmp_path):
        rows = multi_turn(generations(4, seed=4))[1::2]  # two prompts, each with three user turns
        out = read_jsonl(
            run_score(write_jsonl(tmp_path / "gen.jsonl", rows), tmp_path / "pairs.jsonl", reward_model=armo_model)
        )
        inputs = reward_inputs(armo_model, rows)
        got = [r for row in out for r in row["rewards"]]
        assert got == pytest.approx(armo_by_hand(armo_model, inputs), abs=1e-5, rel=0)
        on_first = armo_by_hand(armo_model, inputs, gate_on_first=True)
        assert min(abs(a - b) for a, b in zip(got, on_first)) > 1e-4  # gating on the first user turn gives other scores

    def test_armo_runs_no_remote_code_unless_asked(self, armo_model, tmp_path, monkeypatch):
        data = write_jsonl(tmp_path / "gen.jsonl", generations(3))
        model = score.load_reward_model(
            score.Config(reward_model=armo_model), torch.float32, rebel.load_tokenizer(armo_model)
        )
        assert type(model) is score.ArmoRM and isinstance(
            model.model, transformers.LlamaModel
        )  # its backbone: transformers' own class
        # asked for, the folder's modeling_custom.py runs (and raises): one line (its module copy goes to tmp_path, not
        # ~/.cache)
        monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
        with pytest.raises(
            SystemExit,
            match=(
                r"^error: could not load the reward model .*RuntimeError: the remote code of this checkpoint was run$"
            ),
        ):
            run_score(data, tmp_path / "pairs.jsonl", reward_model=armo_model, trust_remote_code=True)

    @pytest.mark.parametrize(
        "name, message",
        [
            pytest.param(
                "no_head",
                r"no_head: gating\.layers\.2\.bias, gating\.logit_scale, regression_layer\.weight not in "
                r"its checkpoint, where ArmoRM expects them; refusing to score with random values",
                id="armo-without-its-head",
            ),
            pytest.param(
                "resized",
                r"resized: gating\.layers\.0\.bias \(checkpoint \[16\], model \[8\]\), "
                r"gating\.layers\.0\.weight \(checkpoint \[16, 64\], model \[8, 64\]\), .* not in its checkpoint",
                id="armo-gating-of-another-size",
            ),
            pytest.param(
                "causal_lm",
                r": score\.weight not in its checkpoint, where LlamaForSequenceClassification expects them",
                id="causal-lm-is-no-reward-model",
            ),
            pytest.param(
                "two_labels",
                r"LlamaForSequenceClassification with 2 outputs \(num_labels\); a reward model has 1",
                id="two-labels",
            ),
            pytest.param(
                "no_weights",
                r"could not load the reward model .*no_weights.*: OSError: .*no file named " r".*model\.safetensors",
                id="no-weights",
            ),
        ],
    )
    def test_reward_models_with_random_or_missing_heads_are_refused(
        self, name, message, broken_reward_models, tmp_path
    ):
        data = write_jsonl(tmp_path / "gen.jsonl", generations(3))
        with pytest.raises(SystemExit, match=message) as failed:
            run_score(data, tmp_path / "out.jsonl", reward_model=broken_reward_models[name])
        assert "\n" not in str(failed.value)
        assert not list(tmp_path.glob("out.jsonl.shards/block_*"))  # nothing scored

    def test_armo_rows_that_cannot_be_scored_are_dropped_and_counted(self, armo_model, tmp_path, capsys):
        rows = generations(6, seed=5)
        rows[1]["prompt"] = " ".join(
            ["the quick brown fox jumps over the lazy dog"] * 6
        )  # cut before its end by --max_length
        rows[3]["responses"][2] = "sky [PAD] blue"  # the pad token inside: ArmoRM reads the reward before the first pad
        rows = [
            dict(row, prompt=[{"role": "user", "content": row["prompt"]}]) for row in rows
        ]  # message lists, all of them
        rows[4]["prompt"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky"}]
        folder = str(tmp_path / "armo_no_system")  # a template that raises on a system turn, as Gemma's does
        shutil.copytree(armo_model, folder)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(
                "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                + LLAMA3_CHAT_TEMPLATE
            )
        data = write_jsonl(tmp_path / "gen.jsonl", rows)
        capsys.readouterr()
        out = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_model=folder, max_length=40, block_size=6))
        printed = capsys.readouterr().out
        assert (
            "dropped 3 of 6 prompts | 1 ArmoRM's gating tokens (end of the last user turn) cut off by --max_length | 1"
            " the reward model's chat template raised TemplateError: System role not supported | 1 the text holds the"
            " reward model's pad token (the reward would be read before it) | 3 pairs kept"
            in printed
        )
        kept = [rows[i] for i in (0, 2, 5)]
        assert [row["prompt"] for row in out] == [row["prompt"] for row in kept]
        expected = armo_by_hand(armo_model, [ids[:40] for ids in reward_inputs(armo_model, kept)])
        assert [r for row in out for r in row["rewards"]] == pytest.approx(expected, abs=1e-5, rel=0)


class TestResumableState:
    """What generate.py, score.py and rebel.py resume from: recognised by content; damaged, missing or
    shared state refused or redone."""

    def test_resumable_state_is_recognised_by_content_not_by_name(self, tiny_model, tmp_path):
        """What was made with an older model, data or reward function at the same path is refused, never mixed in."""
        model = str(tmp_path / "model")
        shutil.copytree(tiny_model, model)
        # what from_pretrained does not read (subfolders, e.g. a run's output; hidden files) is not part of the model
        before = rebel.files_fingerprint(model)
        os.makedirs(os.path.join(model, "runs"))
        write_jsonl(os.path.join(model, "runs", "gen.jsonl"), [{}])
        open(os.path.join(model, ".lock"), "w").close()
        assert rebel.files_fingerprint(model) == before
        # generate.py: the model folder is replaced at the same path (same file names and sizes) after a kill
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=6)
        out = gen(model, prompts, tmp_path / "gen.jsonl")
        os.remove(out)
        os.remove(out + ".shards/block_000001.jsonl")
        assert (
            gen(os.path.relpath(model) + "/", os.path.relpath(prompts), out) == out
        )  # other names of the same files resume
        shutil.rmtree(model)
        make_model(model, seed=1)
        for finished in (
            True,
            False,
        ):  # all blocks saved (the model is not loaded, its files are still checked), or not
            if not finished:
                os.remove(out + ".shards/block_000001.jsonl")
            with pytest.raises(SystemExit, match=r"gen\.jsonl\.shards holds blocks made with other model files"):
                gen(model, prompts, out)
        # score.py: the reward function raised on row 4 (block 1); the user fixes it and runs the same command again
        fn = tmp_path / "rewards.py"
        fn.write_text(FAILS_ON_ROW_4)
        data = write_jsonl(
            tmp_path / "gen2.jsonl",
            [dict(prompt=f"p{i}", responses=["a", "bb", "c"], truncated=[False] * 3) for i in range(9)],
        )
        with pytest.raises(SystemExit, match="raised on row 4"):
            run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:reward")
        assert os.listdir(tmp_path / "pairs.jsonl.shards") != ["manifest.json"]  # block 0 was saved
        with pytest.raises(SystemExit, match="raised on row 4"):  # the same file by another path: resumed, not refused
            run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{os.path.relpath(fn)}:reward")
        fn.write_text(FAILS_ON_ROW_4.replace("1 / 0", "2.0"))
        with pytest.raises(SystemExit, match=r"other settings \(reward_fn_sha256"):
            run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:reward")
        # rebel.py --resume: rewards changed in place, then the starting model replaced
        pairs = write_pairs(tmp_path / "p.jsonl", n=24)
        run = train(model, pairs, tmp_path / "run", total_episodes=24, eval_size=0, stop_after=1)
        rows = read_jsonl(pairs)
        write_jsonl(pairs, [dict(r, chosen_reward=r["chosen_reward"] + (i == 3)) for i, r in enumerate(rows)])
        with pytest.raises(SystemExit, match=r"--resume: the pairs \(their tokens or rewards\) differ"):
            train(model, pairs, run, total_episodes=24, eval_size=0, resume=True)
        write_jsonl(pairs, rows)
        # the same data named by another path (a job requeued in another working directory) resumes: content is compared
        train(model, os.path.relpath(pairs), run, total_episodes=24, eval_size=0, resume=True, stop_after=1)
        shutil.rmtree(model)
        make_model(model, seed=2)
        with pytest.raises(
            SystemExit, match=r"--resume: the files of --model .* differ from those .*update_000002 started from"
        ):
            train(model, pairs, run, total_episodes=24, eval_size=0, resume=True)

    def test_generate_redoes_damaged_blocks_and_refuses_a_lost_manifest(self, tiny_model, tmp_path, capsys):
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=6)
        out = gen(tiny_model, prompts, tmp_path / "gen.jsonl")
        shards, rows = out + ".shards", read_jsonl(out)
        open(os.path.join(shards, "block_000001.jsonl"), "w").write("null\n")  # parseable, but not a row
        lines = open(os.path.join(shards, "block_000002.jsonl")).readlines()  # a row changed into another valid row
        open(os.path.join(shards, "block_000002.jsonl"), "w").writelines(
            [lines[0].replace('"responses": ["', '"responses": ["EDITED')] + lines[1:])
        os.remove(out)
        assert read_jsonl(gen(tiny_model, prompts, out)) == rows
        printed = capsys.readouterr().out
        assert "block_000001.jsonl is damaged" in printed
        assert "block_000002.jsonl is damaged (its checksum does not match its rows)" in printed
        open(os.path.join(shards, "manifest.json"), "w").write('{"model": ')  # what made the blocks is no longer known
        with pytest.raises(SystemExit, match=r"gen\.jsonl\.shards holds blocks but an unreadable manifest\.json"):
            gen(tiny_model, prompts, out)
        os.remove(os.path.join(shards, "manifest.json"))
        with pytest.raises(SystemExit, match=r"gen\.jsonl\.shards holds blocks but no manifest\.json"):
            gen(tiny_model, prompts, out)

    @pytest.mark.parametrize("finished", [True, False], ids=["all-blocks-saved", "a-block-missing"])
    def test_score_refuses_blocks_of_a_replaced_reward_model(self, finished, reward_model, tmp_path):
        # score.py: the reward model replaced at the same path
        rm = str(tmp_path / "rm")
        shutil.copytree(reward_model, rm)
        data = write_jsonl(tmp_path / "g.jsonl", generations(6))
        pairs = run_score(data, tmp_path / "pairs.jsonl", reward_model=rm)
        other = AutoModelForSequenceClassification.from_pretrained(rm)
        with torch.no_grad():
            other.score.weight.mul_(-1)
        other.save_pretrained(rm)
        if not finished:
            os.remove(pairs + ".shards/block_000001.jsonl")
        with pytest.raises(SystemExit, match=r"pairs\.jsonl\.shards holds blocks made with other model files than the "
                                             r"model has now"):
            run_score(data, pairs, reward_model=rm)

    def test_edited_reference_cache_is_redone_and_a_damaged_checkpoint_is_one_line(
        self, tiny_model, stopped_run, tmp_path, capsys
    ):
        # rebel.py: an edited reference cache is computed again; a damaged checkpoint is one line
        data, run = stopped_run.data, shutil.copytree(stopped_run.run, tmp_path / "run")
        ref = read_jsonl(os.path.join(run, "ref_logprobs.jsonl"))
        write_jsonl(os.path.join(run, "ref_logprobs.jsonl"), [dict(r, chosen_logprob=r["chosen_logprob"] + 5 * (i == 0))
                                                              for i, r in enumerate(ref)])
        capsys.readouterr()
        with pytest.raises(SystemExit, match=r"update_000001 cannot be read .*: delete it to start afresh"):
            shard = next(f for f in glob.glob(os.path.join(run, "checkpoints", "update_000001", "*.distcp")))
            open(shard, "r+b").truncate(os.path.getsize(shard) // 2)
            train(tiny_model, data, run, total_episodes=24, eval_size=0, resume=True)
        assert "ref_logprobs.jsonl is incomplete or damaged; computing them again" in capsys.readouterr().out
        assert read_jsonl(os.path.join(run, "ref_logprobs.jsonl")) == ref

    def test_a_checkpoint_without_its_rng_state_is_one_line(self, tiny_model, stopped_run, tmp_path):
        run = shutil.copytree(stopped_run.run, tmp_path / "run")
        os.remove(os.path.join(run, "checkpoints", "update_000001", "rng.pt"))
        with pytest.raises(
            SystemExit, match=r"update_000001 cannot be read \(FileNotFoundError: .*: delete it to start " r"afresh"
        ):
            train(tiny_model, stopped_run.data, run, total_episodes=24, eval_size=0, resume=True)

    @pytest.mark.parametrize("damage", ["{", None], ids=["cut", "missing"])
    def test_a_damaged_train_state_is_one_line(self, damage, tiny_model, stopped_run, tmp_path):
        # train_state.json cut, or gone: one line, never a traceback or a silent fresh start
        run = shutil.copytree(stopped_run.run, tmp_path / "run")
        os.remove(os.path.join(run, "checkpoints", "update_000001", "rng.pt"))
        state = os.path.join(run, "checkpoints", "update_000001", "train_state.json")
        open(state, "w").write(damage) if damage else os.remove(state)
        with pytest.raises(
            SystemExit, match=r"update_000001/train_state\.json is missing or damaged: delete .* to start " r"afresh"
        ):
            train(tiny_model, stopped_run.data, run, total_episodes=24, eval_size=0, resume=True)

    def test_a_model_rank_0_cannot_load_stops_every_process(self, tiny_model, stopped_run, tmp_path):
        # a model that rank 0 cannot load stops every process with its one line (not the others with a gloo error)
        broken = str(tmp_path / "broken")
        shutil.copytree(tiny_model, broken)
        weights = os.path.join(broken, "model.safetensors")
        open(weights, "r+b").truncate(os.path.getsize(weights) // 2)
        done = torchrun("rebel.py", dict(model=broken, dataset=stopped_run.data, output_dir=tmp_path / "run3",
                                         total_episodes=8, batch_size=4, eval_size=0), check=False)
        assert (
            done.returncode != 0
            and (done.stdout + done.stderr).count(f"error: could not load the model '{broken}'") == 2
        )
        assert "Connection closed" not in done.stderr and "[rank1]: Traceback" not in done.stderr

    def test_one_output_folder_holds_one_run(self, tiny_model, stopped_run, tmp_path):
        os.makedirs(tmp_path / "busy")  # another run holds the folder's lock
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                                   "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                                   str(tmp_path / "busy" / ".lock")], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(SystemExit, match=r"--output_dir .*busy is in use by another rebel\.py run"):
                train(tiny_model, stopped_run.data, tmp_path / "busy", total_episodes=8, eval_size=0)
        finally:
            holder.kill()


class TestTokenExactness:
    """The tokens sampled are the tokens trained, in every template family: the family pipelines, text
    pairs, the chat date, sampling flags."""

    @pytest.mark.parametrize("family", list(FAMILIES))
    def test_sampled_tokens_are_the_trained_tokens(self, family, tmp_path, capsys):
        """generate → score → rebel in each template family: the reference log-probs that rebel.py caches are the naive
        full-logits log-probs of exactly the sampled prompt ids + sampled response ids (stop token included, nothing
        after).
        """
        model, generated, pairs = family_pipeline(family, tmp_path)
        printed = capsys.readouterr().out
        tokenizer = rebel.load_tokenizer(model)
        stop_ids = set(generate.stop_token_ids(tokenizer, model, rebel.load_model_config(model)))
        assert len(generated) == (
            7 if family in ("gemma", "mistral") else 8
        )  # the system-turn prompt is skipped and counted there
        if family in ("gemma", "mistral"):
            assert (
                "dropped 1 of 8 rows | 1 × the chat template raised TemplateError" in printed
                and "(first: row 7)" in printed
            )
        for row in generated:
            assert row["prompt_ids"] == rebel.prompt_tokens(tokenizer, row["prompt"])[1]
            for ids, truncated, text, n in zip(
                row["response_ids"], row["truncated"], row["responses"], row["num_tokens"]
            ):
                assert truncated == (ids[-1] not in stop_ids) and not stop_ids & set(ids[:-1]) and n == len(ids)
                assert text == tokenizer.decode(ids if truncated else ids[:-1], skip_special_tokens=True)
        ends = [t for row in generated for t in row["truncated"]]
        assert True in ends and False in ends  # both stopped and cut samples

        if family == "no_end_token":
            assert "writes no end-of-turn token after an assistant message" in printed
        out = train(model, pairs, tmp_path / "run", total_episodes=4, batch_size=4, eval_size=0, save_final=False)
        printed = capsys.readouterr().out
        assert "tokens: the sampled token ids" in printed
        assert ("writes no end-of-turn token after an assistant message" in printed) == (family == "no_end_token")
        ref = {r["index"]: r for r in read_jsonl(os.path.join(out, "ref_logprobs.jsonl"))}
        rows = read_jsonl(pairs)
        assert sorted(ref) == list(range(len(rows)))
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        for i, row in enumerate(rows):
            best, worst = row["rewards"].index(max(row["rewards"])), row["rewards"].index(min(row["rewards"]))
            assert (row["chosen_ids"], row["rejected_ids"]) == (row["response_ids"][best], row["response_ids"][worst])
            with torch.no_grad():
                for key, column in (("chosen_logprob", "chosen_ids"), ("rejected_logprob", "rejected_ids")):
                    assert ref[i][key] == pytest.approx(
                        naive_logprob(policy, row["prompt_ids"], row[column], 0.8).item(), abs=1e-4
                    )

        # the same pairs as text only (the authors' released data has no ids): tokenised like sampling, or dropped with
        # a reason
        from datasets import Dataset
        texts = Dataset.from_list([{k: v for k, v in row.items() if not k.endswith("_ids")} for row in rows])
        eot = rebel.end_of_turn(tokenizer)
        if family == "thinking":  # the history rewrites <think>: no row can be split, and the message says why
            with pytest.raises(SystemExit, match=r"every row was dropped \(the templated prompt is not a prefix"):
                rebel.tokenize_pairs(texts, tokenizer, "t", len(tokenizer))
            return
        for pair in rebel.tokenize_pairs(texts, tokenizer, "t", len(tokenizer)):
            row = rows[pair["index"]]
            assert pair["prompt_ids"] == row["prompt_ids"]  # the prompt alone, never merged with the response
            for ids, text in ((pair["chosen_ids"], row["chosen"]), (pair["rejected_ids"], row["rejected"])):
                assert (
                    (ids[-1] == eot) if eot is not None else (eot not in ids)
                )  # the end of turn, never the "\n" after it
                assert tokenizer.decode(ids[:-1] if eot is not None else ids).strip() == text.strip()

    def test_chat_template_that_writes_todays_date(self, tmp_path, monkeypatch, capsys):
        """Llama-3.2's template writes today's date: generate.py renders every prompt at the day its output was begun
        (chat_date), also when it resumes the next day, and rebel.py checks the sampled prompt ids at that date. Rows
        without chat_date sampled on another day are dropped, with the reason said."""
        from datasets import Dataset

        class Clock(datetime.datetime):
            today_is = datetime.datetime(2025, 1, 1, 23, 59)

            @classmethod
            def now(cls, tz=None):
                return cls.today_is
        for module in (rebel, generate):
            monkeypatch.setattr(module, "datetime", SimpleNamespace(datetime=Clock))
        model = make_model(str(tmp_path / "model"), family="llama3_dated", ends_often=True)
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": " ".join(WORDS[i:i + 4])} for i in range(6)])
        generated = gen(model, prompts, tmp_path / "gen.jsonl", num_samples=3, max_new_tokens=12)
        rows = read_jsonl(generated)
        tokenizer = rebel.load_tokenizer(model)
        assert {row["chat_date"] for row in rows} == {"2025-01-01T23:59:00"}
        assert all("Today Date: 01 Jan 2025" in tokenizer.decode(row["prompt_ids"]) for row in rows)

        Clock.today_is = datetime.datetime(
            2025, 1, 2, 0, 1
        )  # midnight passed: a resume after a lost block, then training
        os.remove(sorted(glob.glob(str(tmp_path / "gen.jsonl.shards" / "block_*.jsonl")))[0])
        assert read_jsonl(gen(model, prompts, tmp_path / "gen.jsonl", num_samples=3, max_new_tokens=12)) == rows
        pairs = load_rows(
            run_score(generated, tmp_path / "pairs.jsonl", reward_fn="test_rebel.py:demo_reward", drop_truncated=False)
        )
        kept = rebel.tokenize_pairs(Dataset.from_list(pairs), tokenizer, "pairs", len(tokenizer))
        assert [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in kept] == [
            (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in pairs]
        capsys.readouterr()
        with pytest.raises(SystemExit, match="every row was dropped"):
            rebel.tokenize_pairs(
                Dataset.from_list([{k: v for k, v in r.items() if k != "chat_date"} for r in pairs]),
                tokenizer,
                "pairs",
                len(tokenizer),
            )
        assert "the template writes today's date, and the row has no chat_date" in capsys.readouterr().out
        manifest = tmp_path / "gen.jsonl.shards" / "manifest.json"
        manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), chat_date="garbage")))
        with pytest.raises(
            SystemExit, match=r"manifest\.json: chat_date 'garbage' is not a date and time; delete .* to start afresh"
        ):
            gen(model, prompts, tmp_path / "gen.jsonl", num_samples=3, max_new_tokens=12)

    def test_text_pairs_end_of_turn_comes_from_each_template(self, family_tokenizers):
        """Text-only pairs: the end-of-turn token comes from each template; the prompt is tokenised alone and the
        response from the text the template adds after it, up to its end-of-turn token; a row that cannot be split is
        a BadRow."""
        tok = family_tokenizers
        ends = {f: rebel.end_of_turn(t) for f, t in tok.items()}
        assert {f: e if e is None else tok[f].convert_ids_to_tokens(e) for f, e in ends.items()} == {
            "llama3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>", "mistral": "</s>",
            "thinking": "<|im_end|>", "no_end_token": None, "llama3_dated": "<|eot_id|>", "gpt2_bytes": "<|eot_id|>",
            "llama2_sp": "</s>"}

    def test_text_pairs_keep_a_leading_newline_as_sampled(self, family_tokenizers):
        # 1. ChatML: a response that starts with "\n" (which merged with the template's own "\n" before) is kept as
        # sampled
        tok = family_tokenizers
        prompt_ids, response = text_ids(tok, "chatml", "\nsea and sky")
        assert tok["chatml"].decode(response) == "\nsea and sky<|im_end|>"
        assert prompt_ids == rebel.prompt_tokens(tok["chatml"], "the sea")[1]

    @pytest.mark.parametrize("family", ["chatml", "gemma"])
    def test_text_pairs_leave_out_the_newline_after_the_end_of_turn(self, family, family_tokenizers):
        # 2. ChatML and Gemma write "\n" after their end of turn: it is not part of the response
        assert text_ids(family_tokenizers, family, "blue")[1][-1] == rebel.end_of_turn(family_tokenizers[family])

    def test_text_pairs_tokenise_prompt_and_response_apart(self, family_tokenizers):
        # 9. GPT-2's byte-level pre-tokenizer splits "\n\n" + word as "\n", "\n" + word: tokenised together, the
        # templated
        #    prompt would not be a prefix; tokenised apart, as sampling sees it, it is
        tok = family_tokenizers
        prompt_text, prompt_ids = rebel.prompt_tokens(tok["gpt2_bytes"], "the sea")
        together = tok["gpt2_bytes"](prompt_text + "blue sky<|eot_id|>", add_special_tokens=False)["input_ids"]
        assert together[:len(prompt_ids)] != prompt_ids
        assert text_ids(tok, "gpt2_bytes", "blue sky") == [
            prompt_ids, tok["gpt2_bytes"]("blue sky", add_special_tokens=False)["input_ids"]
            + [rebel.end_of_turn(tok["gpt2_bytes"])]]

    def test_text_pairs_without_an_end_of_turn_token(self, family_tokenizers):
        # 5. no end-of-turn token: the response is its text, without the template's blank line after it
        assert family_tokenizers["no_end_token"].decode(text_ids(family_tokenizers, "no_end_token", "blue sky")[1]) == \
            "blue sky"

    def test_text_pairs_of_thinking_templates_are_bad_rows(self, family_tokenizers):
        # 3. and 4. thinking templates: one that opens <think> in the generation prompt cannot be split at all; one that
        #    strips the reasoning from assistant turns would train on text that was never sampled
        tok = family_tokenizers
        with pytest.raises(rebel.BadRow, match="not a prefix"):
            text_ids(tok, "thinking", "the sea is deep</think>blue")
        tok["thinking"].chat_template = THINKING_TEMPLATE.replace("<think>\n", "")
        try:
            assert "<think>" not in rebel.prompt_tokens(tok["thinking"], "the sea")[0]
            with pytest.raises(rebel.BadRow, match="changes the response text"):
                text_ids(tok, "thinking", "<think>the sea is deep</think>blue")
        finally:
            tok["thinking"].chat_template = THINKING_TEMPLATE

    def test_text_pairs_a_template_that_raises_is_a_bad_row(self, family_tokenizers):
        # 8. a template that raises on a row: a reason, not a traceback
        with pytest.raises(rebel.BadRow, match="the chat template raised TemplateError: System role not supported"):
            text_ids(family_tokenizers, "gemma", "blue", MULTI_TURN)

    @pytest.mark.parametrize("prompt, reason", [
        pytest.param([{"role": "human", "content": "hi"}], "'role': 'system'|'user'|'assistant'", id="unknown-role"),
        pytest.param([], "non-empty list", id="no-messages"),
        pytest.param(MULTI_TURN[:3], "must end with a user turn, not 'assistant'", id="ends-with-assistant"),
        pytest.param({"text": "hi"}, "a string or a non-empty list", id="not-a-list"),
    ])
    def test_text_pairs_messages_that_are_not_a_chat_are_bad_rows(self, prompt, reason, family_tokenizers):
        # 8. messages that are not a chat: reasons, not tracebacks
        with pytest.raises(rebel.BadRow, match=re.escape(reason)):
            text_ids(family_tokenizers, "llama3", "blue", prompt)

    def test_sampling_uses_exactly_the_flags_and_the_templates_end_of_turn(self, tmp_path, capsys):
        """6. A checkpoint whose generation_config.json asks for a repetition penalty, min_new_tokens and its own top_k,
        temperature and top_p samples exactly the tokens of one without them; 7. an older Llama-3 checkpoint whose
        configs
        list only <|end_of_text|> still stops at the template's <|eot_id|> (with a warning)."""
        base = make_model(str(tmp_path / "base"), ends_often=True)
        quirky, old = str(tmp_path / "quirky"), str(tmp_path / "old_llama3")
        shutil.copytree(base, quirky)
        shutil.copytree(base, old)
        settings = json.load(open(os.path.join(base, "generation_config.json")))
        json.dump(
            dict(
                settings,
                repetition_penalty=1.5,
                min_new_tokens=8,
                no_repeat_ngram_size=2,
                top_k=5,
                temperature=0.2,
                top_p=0.5,
                do_sample=True,
            ),
            open(os.path.join(quirky, "generation_config.json"), "w"),
        )
        end = rebel.load_tokenizer(base).convert_tokens_to_ids("<|end_of_text|>")
        json.dump(dict(settings, eos_token_id=end), open(os.path.join(old, "generation_config.json"), "w"))
        config = json.load(open(os.path.join(old, "config.json")))
        json.dump(dict(config, eos_token_id=end), open(os.path.join(old, "config.json"), "w"))
        tokenizer_config = json.load(open(os.path.join(old, "tokenizer_config.json")))
        json.dump(
            dict(tokenizer_config, eos_token="<|end_of_text|>"), open(os.path.join(old, "tokenizer_config.json"), "w")
        )
        prompts = write_prompts(tmp_path / "prompts.jsonl", n=6)
        rows = {name: read_jsonl(gen(model, prompts, tmp_path / f"{name}.jsonl", num_samples=4, max_new_tokens=10))
                for name, model in (("base", base), ("quirky", quirky), ("old", old))}
        printed = capsys.readouterr().out
        assert "sampling: temperature 0.8 | top_p 0.9 | no top_k | max_new_tokens 10" in printed
        assert (
            "the chat template ends a turn with '<|eot_id|>'" in printed and "it is added to the stop tokens" in printed
        )
        eot = rebel.load_tokenizer(base).convert_tokens_to_ids("<|eot_id|>")
        assert any(ids[-1] == eot for row in rows["old"] for ids in row["response_ids"])
        assert any(n < 8 for row in rows["quirky"] for n in row["num_tokens"])  # min_new_tokens did not apply
        strip = lambda rs: [{k: v for k, v in r.items() if k != "sampled_by"} for r in rs]  # noqa: E731
        assert strip(rows["quirky"]) == strip(rows["base"]) == strip(rows["old"])


class TestModelCardInputs:
    """What the model card's rows bring: Human:/Assistant: prompts (Nectar, HH), a SentencePiece "legacy"
    tokenizer (Llama-2, OpenChat), a pad id outside the embedding (REBEL-Llama-3), AlpacaEval's output format."""

    def test_hh_prompt_strings_are_converted_to_chat_messages(self):
        user, assistant = (lambda text: {"role": "user", "content": text}), (
            lambda text: {"role": "assistant", "content": text}
        )
        assert rebel.hh_messages(HH) == [user("the sea is blue"), assistant("and the sky"), user("why is the sky blue")]
        assert rebel.hh_messages("Human: hi there \n\nAssistant:") == [
            user("hi there")
        ]  # HH without the leading newlines
        assert rebel.hh_messages("  \n\nHuman: a\nb\n\nAssistant:  ") == [user("a\nb")]
        for text in (
            "Human: hi",
            "hi\n\nHuman: x\n\nAssistant:",
            "Human: a\n\nHuman: b\n\nAssistant:",  # not the format
            "Human: a\n\nAssistant: b",
            "Human: \n\nAssistant:",
            "Human: a\n\nAssistant:\n\nHuman: c\n\nAssistant:",
            "Assistant: a\n\nHuman: b\n\nAssistant:",
            "What does Human: mean?",
        ):
            assert rebel.hh_messages(text) is None, text
            assert rebel.chat_messages(text, convert_hh=True) == [user(text)]
        assert rebel.chat_messages(HH) == [user(HH)] and len(rebel.chat_messages(HH, convert_hh=True)) == 3
        assert rebel.Config().convert_hh and generate.Config().convert_hh

    def test_hh_prompts_are_sampled_and_trained_as_their_turns(self, tmp_path, capsys):
        """generate.py templates a Human:/Assistant: prompt as its turns and says how many it converted; rebel.py checks
        the sampled prompt ids against the same conversion (with --convert_hh false they are another prompt: dropped),
        and text-only pairs are templated as the turns too."""
        model = make_model(str(tmp_path / "model"), ends_often=True)
        prompts = write_jsonl(
            tmp_path / "prompts.jsonl",
            [{"prompt": HH}, {"prompt": "Human: the quick fox\n\nAssistant:"}, {"prompt": "the lazy dog"}],
        )
        tokenizer = rebel.load_tokenizer(model)
        capsys.readouterr()
        rows = read_jsonl(gen(model, prompts, tmp_path / "gen.jsonl", max_new_tokens=6))
        assert (
            "converted 2 of 3 prompts from the Human:/Assistant: format to chat messages (--convert_hh false to keep "
            "them as one user turn)"
            in capsys.readouterr().out
        )
        assert [r["prompt"] for r in rows] == [
            HH,
            "Human: the quick fox\n\nAssistant:",
            "the lazy dog",
        ]  # as in the input
        turns = rebel.hh_messages(HH)
        assert rows[0]["prompt_ids"] == rebel.prompt_tokens(tokenizer, turns)[1]
        assert tokenizer.decode(rows[0]["prompt_ids"]).count("<|start_header_id|>user") == 2
        one_turn = read_jsonl(gen(model, prompts, tmp_path / "one.jsonl", max_new_tokens=6, convert_hh=False))
        assert one_turn[0]["prompt_ids"] == rebel.prompt_tokens(tokenizer, HH)[1] != rows[0]["prompt_ids"]
        assert "converted" not in capsys.readouterr().out

        (tmp_path / "rewards.py").write_text(LENGTH_REWARD)
        pairs = run_score(
            str(tmp_path / "gen.jsonl"),
            tmp_path / "pairs.jsonl",
            reward_fn=f"{tmp_path / 'rewards.py'}:length",
            drop_truncated=False,
        )
        out = train(model, pairs, tmp_path / "run", total_episodes=2, batch_size=2, eval_size=0, save_final=False)
        assert len(read_jsonl(os.path.join(out, "ref_logprobs.jsonl"))) == 3
        assert "converted 2 of 3 prompts" in capsys.readouterr().out
        train(model, pairs, tmp_path / "run_off", total_episodes=2, batch_size=2, eval_size=0, save_final=False,
              convert_hh=False)
        assert "dropped 2 of 3 rows | 2 × prompt_ids are not this tokenizer's chat template" in capsys.readouterr().out
        from datasets import Dataset
        texts = Dataset.from_list([{k: v for k, v in r.items() if not k.endswith("_ids")} for r in read_jsonl(pairs)])
        kept = rebel.tokenize_pairs(texts, tokenizer, "t", len(tokenizer), convert_hh=True)
        assert kept[0]["prompt_ids"] == rows[0]["prompt_ids"]

    def test_text_ids_of_a_sentencepiece_legacy_tokenizer_have_no_stray_space_token(self, tmp_path):
        """Llama-2's tokenizer prepends "▁" to every text it tokenises: the response alone would start with a stray "▁"
        token that no sampled response has. Tokenised in context, the response ids are the conversation's after the
        prompt's; sampled ids decoded to text come back as the same ids."""
        tokenizer = make_tokenizer(str(tmp_path), family="llama2_sp")
        eot = rebel.end_of_turn(tokenizer)
        assert tokenizer.convert_ids_to_tokens(eot) == "</s>"
        assert tokenizer.convert_ids_to_tokens(tokenizer(" blue", add_special_tokens=False)["input_ids"]) == [
            "▁",
            "▁blue",
        ]
        for prompt in ("the sea", MULTI_TURN, "Human: the sea\n\nAssistant: blue\n\nHuman: and the sky\n\nAssistant:"):
            prompt_text, prompt_ids = rebel.prompt_tokens(tokenizer, prompt, convert_hh=True)
            for response in ("blue sky", "the quick brown fox", "a"):
                ids = rebel.text_ids(prompt, [response], tokenizer, eot, convert_hh=True)
                assert ids[0] == prompt_ids
                context = tokenizer(prompt_text + " " + response + "</s>", add_special_tokens=False)["input_ids"]
                assert context[:len(prompt_ids)] == prompt_ids and ids[1] == context[len(prompt_ids):]
                assert tokenizer.convert_ids_to_tokens(ids[1][0]) != "▁" and ids[1][-1] == eot
                # a response sampled as these ids decodes (as generate.py decodes it) to text that gives them back
                text = tokenizer.decode(ids[1][:-1], skip_special_tokens=True)
                assert text == response and rebel.text_ids(prompt, [text], tokenizer, eot, convert_hh=True)[1] == ids[1]

    def test_llama2_sp_text_ids_equal_sampled_ids_of_the_same_tokens(self, tmp_path):
        """Every family: a response sampled as the in-context tokens of some text (e.g. the model's most likely
        tokens) is
        trained as the same ids from the text-only pairs."""
        for family in FAMILIES:
            if family == "thinking":  # cannot be split at all (test_text_pairs_split_where_the_template_does)
                continue
            tokenizer = make_tokenizer(str(tmp_path / family), family=family)
            eot = rebel.end_of_turn(tokenizer)
            prompt_text, prompt_ids = rebel.prompt_tokens(tokenizer, "the sea")
            for words in ("blue sky", "the quick brown fox jumps", "sea and sky and wind"):
                ids = rebel.text_ids("the sea", [words], tokenizer, eot)[1]
                sampled = (
                    tokenizer(words, add_special_tokens=False)["input_ids"]
                    if not FAMILIES[family].get("sentencepiece")
                    else tokenizer(prompt_text + " " + words, add_special_tokens=False)["input_ids"][len(prompt_ids) :]
                )
                assert ids == sampled + ([eot] if eot is not None else []), family

    def test_llama2_sp_generate_score_rebel_pipeline(self, tmp_path, capsys):
        """generate → score → rebel on the SentencePiece family: the sampled ids are trained (test_rebel's check); the
        same pairs as text only are the conversation's tokens: none starts with the stray "▁" of the response alone."""
        TestTokenExactness().test_sampled_tokens_are_the_trained_tokens("llama2_sp", tmp_path, capsys)
        from datasets import Dataset
        rows = read_jsonl(str(tmp_path / "pairs.jsonl"))
        tokenizer = rebel.load_tokenizer(str(tmp_path / "llama2_sp"))
        texts = Dataset.from_list([{k: v for k, v in row.items() if not k.endswith("_ids")} for row in rows])
        pairs = rebel.tokenize_pairs(texts, tokenizer, "t", len(tokenizer))
        assert len(pairs) == len(rows)
        for pair in pairs:
            prompt_text, prompt_ids = rebel.prompt_tokens(tokenizer, rows[pair["index"]]["prompt"])
            for ids, text in (
                (pair["chosen_ids"], rows[pair["index"]]["chosen"]),
                (pair["rejected_ids"], rows[pair["index"]]["rejected"]),
            ):
                context = tokenizer(prompt_text + " " + text.strip() + "</s>", add_special_tokens=False)["input_ids"]
                assert (
                    ids == context[len(prompt_ids) :]
                )  # one "▁" between [/INST] and the response, as in the conversation

    def test_pad_id_outside_the_embedding(self, tmp_path, gsm8k_dir, capsys):  # noqa: F811
        """REBEL-Llama-3's tokenizer pads with [PAD] = id 128256 of a 128,256-row embedding: generate.py,
        eval_gsm8k.py and
        rebel.py say so in one line and give exactly what the same weights give with an in-vocabulary pad."""
        inside = make_model(str(tmp_path / "inside"), ends_often=True)
        outside = str(tmp_path / "outside")
        shutil.copytree(inside, outside)
        tokenizer = rebel.load_tokenizer(outside)
        rows = rebel.vocab_size(rebel.load_model_config(outside))
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        tokenizer.save_pretrained(outside)
        assert rebel.load_tokenizer(outside).pad_token_id == rows  # one past the embedding, which is not resized
        prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
        capsys.readouterr()
        runs = {}
        for name, model in (("inside", inside), ("outside", outside)):
            generated = [{k: v for k, v in row.items() if k != "sampled_by"}  # the model folders differ
                         for row in read_jsonl(gen(model, prompts, tmp_path / f"{name}.jsonl", max_new_tokens=8,
                                                   batch_size=3))]
            printed = capsys.readouterr().out
            assert (
                f"note: the pad token of {model} ('[PAD]', id {rows}) is outside its {rows}-row embedding" in printed
            ) == (name == "outside")
            answers = run_eval(model, gsm8k_dir, tmp_path / f"eval_{name}", limit=4, batch_size=2, max_new_tokens=6)[1]
            out = train(model, write_pairs(tmp_path / "pairs.jsonl", n=12), tmp_path / f"run_{name}", total_episodes=4,
                        batch_size=4, eval_size=4, save_final=False)
            printed = capsys.readouterr().out
            assert ("is outside its" in printed) == (name == "outside")
            runs[name] = (
                generated,
                answers,
                read_jsonl(os.path.join(out, "ref_logprobs.jsonl")),
                [
                    {k: v for k, v in r.items() if not k.endswith("_s")}
                    for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
                    if "loss" in r or "val_loss" in r
                ],
            )
        assert runs["inside"] == runs["outside"]

    def test_generate_writes_alpaca_eval_model_outputs(self, tiny_model, tmp_path):
        data, rows = alpaca_instructions(tmp_path)
        settings = dict(
            prompt_column="instruction", limit=len(rows), num_samples=1, greedy=True, max_new_tokens=6, batch_size=2
        )
        out = gen(tiny_model, data, tmp_path / "model_outputs.json", format="alpaca_eval", **settings)
        outputs = read_json(out)
        assert isinstance(outputs, list) and len(outputs) == len(rows)
        assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]  # input order, strings as given
        assert {o["generator"] for o in outputs} == {os.path.basename(tiny_model)} and all(
            set(o) == {"instruction", "output", "generator"} for o in outputs
        )
        # output: the first sample, as the rows format has it; greedy: the same for any seed
        as_rows = read_jsonl(gen(tiny_model, data, tmp_path / "rows.jsonl", seed=7, **settings))
        assert [o["output"] for o in outputs] == [r["responses"][0] for r in as_rows]
        # resumable: a lost block is redone, the JSON list merged again; a generator name may be given
        os.remove(sorted(os.listdir(tmp_path / "model_outputs.json.shards"))[0] and
                  sorted(str(p) for p in (tmp_path / "model_outputs.json.shards").glob("block_*.jsonl"))[0])
        again = read_json(
            gen(
                tiny_model,
                data,
                tmp_path / "model_outputs.json",
                format="alpaca_eval",
                generator="REBEL-tiny",
                **settings,
            )
        )
        assert again == [dict(o, generator="REBEL-tiny") for o in outputs]
        with pytest.raises(SystemExit, match="--format alpaca_eval writes a .json file"):
            generate.Config(format="alpaca_eval", output=str(tmp_path / "x.jsonl"))


class TestHeads:
    @pytest.mark.parametrize("kind", ["granite", "gemma2", "cohere", "falcon_h1", "phi"])
    def test_head_scaling_softcap_and_bias_are_in_the_logprobs(self, kind, tmp_path):
        # Granite's logits ÷ logits_scaling, Gemma-2's soft cap, Cohere's logit_scale, Falcon-H1's lm_head_multiplier,
        # Phi's head bias: log π is the model's own forward's, and the model trains under FSDP2
        model = make_arch(tmp_path / kind, kind)
        got, naive = logprobs_and_naive(model, tmp_path)
        torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
        out = train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)
        assert read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]["update"] == 1

    def test_gemma3_multimodal_checkpoint_samples_and_trains_text_only(self, tmp_path):
        model = make_arch(tmp_path / "gemma3", "gemma3")
        rows = read_jsonl(gen(model, write_prompts(tmp_path / "prompts.jsonl", 2), tmp_path / "gen.jsonl"))
        assert len(rows) == 2 and all(len(r["responses"]) == 3 for r in rows)
        got, naive = logprobs_and_naive(model, tmp_path)
        torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
        out = train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)
        assert read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]["update"] == 1

    def test_a_head_whose_forward_differs_is_refused_in_one_line(self, tmp_path):
        # Gemma3ForConditionalGeneration does not apply its text config's soft cap: the check on the loaded weights
        # sees its own forward differ
        model = make_arch(tmp_path / "gemma3", "gemma3", final_logit_softcapping=0.5)
        with pytest.raises(SystemExit, match=r"error: .*differ from Gemma3ForConditionalGeneration's own forward"):
            train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)

    def test_a_scaling_field_of_an_unknown_model_type_is_refused(self):
        config = transformers.LlamaConfig(logit_scale=0.5)
        with pytest.raises(SystemExit, match=r"error: m: its config's logit_scale \(0.5\) scales the logits"):
            rebel.head_transform(config, "m")

    def test_a_decoder_without_layers_is_one_line(self, tmp_path):
        model = make_arch(tmp_path / "gpt2", "gpt2")
        with pytest.raises(SystemExit, match=r"error: .*GPT2LMHeadModel's decoder has no \.layers"):
            train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)


class TestResume:
    @pytest.mark.parametrize("change", ["model", "pairs"])
    def test_a_finished_run_resumed_with_other_inputs_is_refused(self, change, finished_run, tiny_model, tmp_path):
        data, run = finished_run
        run = shutil.copytree(run, tmp_path / "run")
        model = tiny_model
        if change == "model":
            model = make_model(str(tmp_path / "other"), seed=1)
        else:
            rows = read_jsonl(data)
            rows[0]["chosen_reward"] += 0.125
            data = write_jsonl(tmp_path / "other.jsonl", rows)
        with pytest.raises(SystemExit, match=r"error: --resume: the (files of --model|pairs) .*differ"):
            train(model, data, run, total_episodes=8, batch_size=8, eval_size=0, resume=True)


class TestSampledIds:
    @pytest.mark.parametrize("last", ["word", "eot"])
    def test_only_a_stop_token_may_be_left_out_of_the_text(self, last, tiny_model):
        tokenizer = rebel.load_tokenizer(tiny_model)
        text = "the quick brown fox"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        extra = tokenizer.convert_tokens_to_ids("<|eot_id|>") if last == "eot" else ids[0]
        row = dict(prompt="the sea", prompt_ids=rebel.prompt_tokens(tokenizer, "the sea")[1], chosen_ids=ids + [extra],
                   rejected_ids=ids)
        if last == "eot":
            assert rebel.sampled_ids(row, [text, text], tokenizer, len(tokenizer))[1] == ids + [extra]
        else:  # a never-sampled token appended: its text is not the scored text
            with pytest.raises(rebel.BadRow, match="chosen_ids do not decode to the chosen text"):
                rebel.sampled_ids(row, [text, text], tokenizer, len(tokenizer))

    def test_pairs_sampled_by_another_model_are_dropped(self, tiny_model, tmp_path, capsys):
        prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
        generated = gen(tiny_model, prompts, tmp_path / "gen.jsonl")
        rows = read_jsonl(generated)
        assert {r["sampled_by"] for r in rows} == {rebel.files_fingerprint(tiny_model)}
        (tmp_path / "rewards.py").write_text("def length(prompt, response):\n    return float(len(response))\n")
        pairs = run_score(generated, tmp_path / "pairs.jsonl", reward_fn=f"{tmp_path / 'rewards.py'}:length",
                          drop_truncated=False)
        assert {r["sampled_by"] for r in read_jsonl(pairs)} == {rebel.files_fingerprint(tiny_model)}
        other = make_model(str(tmp_path / "other"), seed=1)  # the same tokenizer, other weights
        with pytest.raises(SystemExit, match=r"every row was dropped \(sampled by another model: its files differ "
                                             r"from --model's"):
            train(other, pairs, tmp_path / "run", total_episodes=2, batch_size=2, eval_size=0, save_final=False)


class TestRewardFunctions:
    def rows(self, tmp_path):
        rows = [dict(prompt=[{"role": "user", "content": f"p{i}"}], responses=["a 1", f"b {i}", "c"],
                     truncated=[False] * 3, answer=f"so #### {i}") for i in range(3)]
        (tmp_path / "rewards.py").write_text(GSM8K_REWARD)
        return rows, write_jsonl(tmp_path / "gen.jsonl", rows), str(tmp_path / "rewards.py")

    def test_a_reward_function_gets_the_rows_gold_answer(self, tmp_path):
        rows, data, fn = self.rows(tmp_path)
        pairs = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:correct"))
        assert {p["prompt"][0]["content"]: p["rewards"] for p in pairs} == {
            "p0": [0.0, 1.0, 0.0], "p1": [1.0, 1.0, 0.0], "p2": [0.0, 1.0, 0.0]}
        # with **columns: every other column (responses, truncated, answer), then len(response)
        pairs = read_jsonl(run_score(data, tmp_path / "all.jsonl", reward_fn=f"{fn}:everything"))
        assert [p["rewards"] for p in pairs] == [[6.0, 6.0, 4.0]] * 3

    def test_a_reward_function_that_calls_sys_exit_names_the_row(self, tmp_path):
        _, data, fn = self.rows(tmp_path)
        with pytest.raises(SystemExit, match=r"error: --reward_fn .*:exits called sys.exit\(3\) on row 1, response 0"):
            run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:exits")

    def test_a_reward_function_that_edits_its_prompt_changes_no_row(self, tmp_path):
        rows, data, fn = self.rows(tmp_path)
        pairs = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:edits"))
        assert [p["prompt"] for p in pairs] == [r["prompt"] for r in rows]


class TestGoldAnswers:
    """A prompts file's other columns (a gold answer) reach the reward function: through generate.py and score.py,
    and online."""

    GOLD = "def gold(prompt, response, answer):\n    return float(answer) + len(response) / 100\n"

    def test_offline_generate_carries_the_column_and_score_passes_it(self, tiny_model, tmp_path):
        prompts = write_jsonl(tmp_path / "prompts.jsonl",
                              [{"prompt": f"the sea {i}", "answer": str(i)} for i in range(4)])
        rows = read_jsonl(gen(tiny_model, prompts, tmp_path / "gen.jsonl"))
        assert [r["answer"] for r in rows] == ["0", "1", "2", "3"]
        (tmp_path / "r.py").write_text(self.GOLD)
        pairs = read_jsonl(run_score(str(tmp_path / "gen.jsonl"), tmp_path / "pairs.jsonl",
                                     reward_fn=f"{tmp_path / 'r.py'}:gold", drop_truncated=False))
        assert pairs and all(p["rewards"] == [float(p["answer"]) + len(r) / 100 for r in p["responses"]] for p in pairs)

    def test_a_column_the_data_lacks_fails_before_scoring(self, tmp_path):
        (tmp_path / "r.py").write_text(self.GOLD)
        data = write_jsonl(tmp_path / "gen.jsonl", generations(2))
        with pytest.raises(SystemExit, match=r"--reward_fn .*:gold takes 'answer', which .*gen\.jsonl has no column"):
            run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{tmp_path / 'r.py'}:gold", drop_truncated=False)

    def test_rewards_whose_gap_overflows_are_refused_naming_the_row(self, tmp_path):
        (tmp_path / "r.py").write_text("def huge(prompt, response):\n"
                                       "    return 1e308 if response == 'big' else -1e308\n")
        rows = [dict(prompt=f"p{i}", responses=["big", "small"], truncated=[False, False]) for i in range(2)]
        with pytest.raises(SystemExit, match=r"row 0: its rewards 1e\+308 and -1e\+308 differ by more than a float"):
            run_score(write_jsonl(tmp_path / "gen.jsonl", rows), tmp_path / "pairs.jsonl",
                      reward_fn=f"{tmp_path / 'r.py'}:huge")

    def test_online_reward_function_gets_the_column(self, online_case, tmp_path):
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [
            {"prompt_id": f"q{i}", "prompt": f"the sea {i}", "answer": str(10 * i)} for i in range(4)])
        (tmp_path / "r.py").write_text(self.GOLD)
        out = train_online(online_case.model, prompts, tmp_path / "run", reward_fn=f"{tmp_path / 'r.py'}:gold",
                           total_episodes=4, epochs_per_batch=1)
        tokenizer = rebel.load_tokenizer(online_case.model)
        for r in read_jsonl(os.path.join(out, "rollouts.jsonl")):
            text = tokenizer.decode(r["chosen_ids"], skip_special_tokens=True)
            assert r["chosen_score"] == pytest.approx(10 * int(r["prompt_id"][1:]) + len(text) / 100)


class TestOneLineErrors:
    def test_stop_tokens_of_a_config_with_eos_in_its_text_config(self, tiny_model):
        config = transformers.Qwen2_5_VLConfig(text_config=dict(eos_token_id=7))
        assert 7 in generate.stop_token_ids(rebel.load_tokenizer(tiny_model), tiny_model, config)

    def test_sampling_that_overflows_names_the_dtype(self, tiny_model, tmp_path, monkeypatch):
        def overflow(*args, **kwargs):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        monkeypatch.setattr(LlamaForCausalLM, "generate", overflow)
        prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
        with pytest.raises(SystemExit, match=r"error: sampling in --dtype float16 .*inf or nan.*--dtype bfloat16"):
            gen(tiny_model, prompts, tmp_path / "gen.jsonl", dtype="float16")

    @pytest.mark.parametrize("wrapped", [False, True])
    def test_a_full_disk_is_one_line_saying_the_run_resumes(self, wrapped, tmp_path):
        from torch.distributed.checkpoint.api import CheckpointException
        full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard"))

        def main(cfg):
            rebel.init_distributed()
            if not wrapped:
                raise full
            try:
                raise full
            except OSError as e:
                raise CheckpointException("save failed", {0: (e, None)}) from None
        with pytest.raises(SystemExit, match=r"^error: no space left on device \(.*shard\): free some space, then "
                                             r"continue with the same command and --resume"):
            rebel.run_script(main, rebel.Config, "continue with the same command and --resume", [])
        assert not dist.is_initialized()

    def test_an_error_after_the_process_group_exists_destroys_it(self):
        def main(cfg):
            rebel.init_distributed()
            rebel.fail("bad")
        with pytest.raises(SystemExit, match="error: bad"):
            rebel.run_script(main, rebel.Config, "again", [])
        assert not dist.is_initialized()

    def test_overflowing_reward_gap_names_the_row_up_front(self, tiny_model, tmp_path, monkeypatch):
        rows = read_jsonl(write_pairs(tmp_path / "p.jsonl", n=16))
        rows[5]["chosen_reward"], rows[5]["rejected_reward"] = 1e160, -1e160  # finite; (η·Δr)² is not
        data = write_jsonl(tmp_path / "bad.jsonl", rows)
        loads = []
        monkeypatch.setattr(rebel, "build_model", lambda *a, **k: loads.append(a))
        with pytest.raises(SystemExit, match=r"error: .*bad\.jsonl\[train\] row 5: η·\(chosen_reward − "
                                             r"rejected_reward\) = .* is too large"):
            train(tiny_model, data, tmp_path / "run", eta=1.0, **SHORT_RUN)
        assert not loads

    def test_online_overflowing_reward_gap_names_the_prompt_row(self, tmp_path):
        model = make_model(str(tmp_path / "model"), layers=2, ends_often=True)
        prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
        (tmp_path / "rewards.py").write_text(ONLINE_REWARD + "\ndef huge(prompt, response):\n"
                                             "    return 1e308 if len(response) % 2 else -1e308\n")
        with pytest.raises(SystemExit, match=r"error: .*prompts\.jsonl row \d \(update 1\): η·\(chosen_reward"):
            train_online(model, prompts, tmp_path / "run", reward_fn=f"{tmp_path / 'rewards.py'}:huge",
                         reward_scale=1.0, num_samples=4, max_new_tokens=8)

    def test_a_model_folder_without_tokenizer_files(self, tiny_model, tmp_path):
        folder = shutil.copytree(tiny_model, tmp_path / "model")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(folder / name)
        with pytest.raises(SystemExit, match=r"error: model .*: no tokenizer files \(tokenizer\.json / "
                                             r"tokenizer\.model / tokenizer_config\.json\) in the folder"):
            rebel.load_tokenizer(str(folder))

    def test_train_split_of_a_single_file_is_refused(self, tiny_model, tmp_path):
        data = write_pairs(tmp_path / "p.jsonl", n=16)
        with pytest.raises(SystemExit, match=r"error: --train_split 'dev': .*p\.jsonl is one file, which has one "
                                             r"split, 'train'"):
            train(tiny_model, data, tmp_path / "run", train_split="dev", **SHORT_RUN)

    def test_gsm8k_files_with_a_bom_and_a_blank_line(self, tmp_path):
        row = '{"question": "q", "answer": "a #### 1"}\n'
        (tmp_path / "test.jsonl").write_bytes(("\ufeff" + row + row + "\n").encode())
        assert eval_gsm8k.load_docs(str(tmp_path), "test") == [{"question": "q", "answer": "a #### 1"}] * 2

    def test_no_flags_say_what_they_turn_off(self, capsys):
        with pytest.raises(SystemExit):
            rebel.parse_config(rebel.Config, ["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--no_activation_checkpointing, --no-activation-checkpointing turn --activation_checkpointing off" in out
        assert "--no_save_final, --no-save-final turn --save_final off" in out


class TestDataFiles:
    """Local .json/.jsonl/.parquet files: every value as written, read from the content, bad lines said in one line."""

    def test_strings_that_look_like_json_stay_strings_and_a_bad_prompt_is_a_dropped_row(self, tiny_model, tmp_path,
                                                                                          capsys):
        # one integer prompt made `datasets` read the whole column as JSON: '"quoted answer"' lost its quotes, '42'
        # became an integer and 'null' nothing; the run refused the file as "mixing strings and lists"
        rows = pair_rows(tmp_path)
        texts = ['"quoted answer"', "42", "null", "[1, 2]", '{"role": "user"}']
        for i, text in enumerate(texts):
            rows[i]["prompt"] = text
        rows[7]["prompt"] = 7
        path = write_jsonl(tmp_path / "p.jsonl", rows)
        assert rebel.load_split(path, "train")["prompt"] == [r["prompt"] for r in rows]
        out = train(tiny_model, path, tmp_path / "run", total_episodes=8, eval_size=0, save_final=False)
        printed = capsys.readouterr().out
        assert ("dropped 1 of 12 rows | 1 × the prompt must be a string or a non-empty list of {'role', 'content'} "
                "messages, got int (first: row 7)") in printed
        assert trained_rows(out) == [i for i in range(12) if i != 7]

    def test_a_list_response_is_a_dropped_row_saying_so(self, tiny_model, tmp_path, capsys):
        rows = pair_rows(tmp_path)
        rows[4]["chosen"] = ["a", "list"]
        train(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run", total_episodes=8, eval_size=0,
              save_final=False)
        assert "1 × the chosen and rejected responses must be strings, got list (first: row 4)" in \
            capsys.readouterr().out

    def test_a_reward_written_as_a_string_stops_the_run(self, tiny_model, tmp_path):
        rows = pair_rows(tmp_path)
        rows[1]["chosen_reward"] = "0.7"  # `datasets` decoded it to 0.7000000000000001 and trained on it
        with pytest.raises(SystemExit, match=r"row 1: column 'chosen_reward' must be a finite number, got '0\.7'"):
            train(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run", total_episodes=8,
                  eval_size=0)

    def test_a_generate_prompt_that_is_not_text_is_dropped_saying_why(self, tiny_model, tmp_path, capsys):
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the sea"}, {"prompt": 7},
                                                           {"prompt": '"the sky"'}])
        kept = read_jsonl(gen(tiny_model, prompts, tmp_path / "gen.jsonl"))
        assert ("1 × the prompt must be a string or a non-empty list of {'role', 'content'} messages, got int "
                "(first: row 1)") in capsys.readouterr().out
        assert [(r["prompt_id"], r["prompt"]) for r in kept] == [(0, "the sea"), (2, '"the sky"')]

    def test_a_score_prompt_that_is_not_text_is_named(self, tmp_path):
        rows = [dict(prompt=p, responses=["a", "bb"], truncated=[False, False]) for p in ("x", 42, "y")]
        (tmp_path / "rewards.py").write_text(LENGTH_REWARD)
        with pytest.raises(SystemExit, match=r"g\.jsonl row 1: the prompt must be a string or a non-empty list "
                                             r"of \{'role', 'content'\} messages, got int"):
            run_score(write_jsonl(tmp_path / "g.jsonl", rows), tmp_path / "s.jsonl",
                      reward_fn=f"{tmp_path / 'rewards.py'}:length")

    def test_mixed_string_and_message_prompts_in_a_data_file_are_read_as_written(self, tiny_model, tmp_path):
        rows = pair_rows(tmp_path)
        rows[1]["prompt"] = [{"role": "user", "content": rows[1]["prompt"]}]
        rows[2]["prompt"] = '[{"role": "user", "content": "a string, not messages"}]'
        path = write_jsonl(tmp_path / "p.jsonl", rows)
        assert rebel.load_split(path, "train")["prompt"] == [r["prompt"] for r in rows]
        out = train(tiny_model, path, tmp_path / "run", total_episodes=8, eval_size=0, save_final=False)
        assert trained_rows(out) == list(range(12))

    @pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
    def test_prompt_ids_past_int64_round_trip_exactly(self, tiny_model, tmp_path, suffix):
        # `datasets` read uint64 hashes back as floats: 18446744073709551615 and 18446744073709551614 became equal
        ids = [UINT64_MAX, UINT64_MAX - 1, 3]
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [dict(prompt=f"the sea {i}", prompt_id=p)
                                                           for i, p in enumerate(ids)])
        assert rebel.load_split(prompts, "train")["prompt_id"] == ids
        generated = gen(tiny_model, prompts, tmp_path / f"gen{suffix}")
        assert [type(p) for p in rebel.load_split(generated, "train")["prompt_id"]] == [int] * 3
        assert rebel.load_split(generated, "train")["prompt_id"] == ids
        (tmp_path / "rewards.py").write_text(LENGTH_REWARD)
        scored = run_score(generated, tmp_path / f"pairs{suffix}", reward_fn=f"{tmp_path / 'rewards.py'}:length",
                           drop_truncated=False)
        assert rebel.load_split(scored, "train")["prompt_id"] == ids
        folder = run_score(generated, tmp_path / "pairs_folder", reward_fn=f"{tmp_path / 'rewards.py'}:length",
                           drop_truncated=False, test_size=1)
        assert sorted(list(rebel.load_split(folder, "train_prefs")["prompt_id"])
                      + list(rebel.load_split(folder, "test_prefs")["prompt_id"])) == sorted(ids)

    def test_ids_that_parquet_cannot_keep_are_refused_before_sampling(self, tiny_model, tmp_path, monkeypatch):
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the prompt ids were checked")
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [dict(prompt="the sea", prompt_id=UINT64_MAX),
                                                           dict(prompt="the sky", prompt_id=-1)])
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        with pytest.raises(SystemExit, match=r"gen\.parquet: column 'prompt_id' holds integers that a parquet file "
                                             r"cannot keep exact .*write a \.jsonl file"):
            gen(tiny_model, prompts, tmp_path / "gen.parquet")
        mixed = write_jsonl(tmp_path / "mixed.jsonl", [dict(prompt="the sea", prompt_id=1),
                                                       dict(prompt="the sky", prompt_id="p2")])
        with pytest.raises(SystemExit, match=r"column 'prompt_id' mixes int and str values, which a parquet file "
                                             r"cannot hold: write a \.jsonl file"):
            gen(tiny_model, mixed, tmp_path / "gen.parquet")
        monkeypatch.undo()
        assert read_jsonl(gen(tiny_model, mixed, tmp_path / "gen.jsonl"))[1]["prompt_id"] == "p2"

    @pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
    def test_a_file_replaced_with_the_same_size_and_time_is_read_anew(self, tmp_path, suffix):
        # `datasets` cached a data file by path, size and modification time: `cp -p` of other pairs trained the old
        rows = pair_rows(tmp_path)
        other = rows[::-1]  # other pairs, the same bytes in another order
        write = write_jsonl if suffix == ".jsonl" else plain_parquet
        path, new = write(tmp_path / f"p{suffix}", rows), write(tmp_path / f"new{suffix}", other)
        assert os.path.getsize(path) == os.path.getsize(new)
        assert rebel.load_split(path, "train").to_list() == rows
        stat = os.stat(path)
        os.replace(new, path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert rebel.load_split(path, "train").to_list() == other

    def test_a_lone_surrogate_is_named_with_its_line(self, tiny_model, tmp_path):
        rows = pair_rows(tmp_path)
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows).replace(rows[2]["chosen"], "broken \\ud800", 1))
        with pytest.raises(SystemExit, match=r"p\.jsonl: line 3: column 'chosen' holds a lone surrogate escape"):
            train(tiny_model, str(path), tmp_path / "run", total_episodes=8, eval_size=0)

    @pytest.mark.parametrize("indent", [None, 1], ids=["one-line", "indented"])
    def test_a_column_oriented_json_file_is_its_rows(self, tiny_model, tmp_path, indent):
        rows = pair_rows(tmp_path)
        path = tmp_path / "columns.json"
        path.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}, indent=indent))
        assert rebel.load_split(str(path), "train").to_list() == rows
        out = train(tiny_model, str(path), tmp_path / "run", total_episodes=8, eval_size=0, save_final=False)
        assert trained_rows(out) == list(range(12))

    @pytest.mark.parametrize(
        "text, message",
        [
            pytest.param('{"prompt": "a"}\n\n{"prompt": "b"}\n[1, 2]\n', r"line 4: expected a JSON object, got list",
                         id="not-an-object"),
            pytest.param('{"prompt": "a"}\n{"prompt": "b",}\n', r"line 2: not valid JSON", id="not-json"),
            pytest.param('[\n {"prompt": "a"},\n {"prompt": "b",}\n]\n', r"line 3: not valid JSON",
                         id="broken-list"),
            pytest.param('[{"prompt": "a"}, 3]', r"row 1: expected a JSON object, got int", id="list-of-non-objects"),
            pytest.param('{"prompt": ["a", "b"], "chosen": ["c"]}', r"an object of columns needs lists of one length",
                         id="columns-of-two-lengths"),
            pytest.param("  \n\n", r"the file is empty", id="blank"),
        ],
    )
    def test_a_bad_json_file_is_said_in_one_line(self, tmp_path, text, message):
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(SystemExit, match=r"bad\.json: " + message):
            rebel.load_split(str(path), "train")

    def test_a_bom_blank_lines_and_missing_keys_are_accepted(self, tmp_path):
        path = tmp_path / "p.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "x": 1}\n\n{"prompt": "b\xe2\x80\xa8c"}\n')
        data = rebel.load_split(str(path), "train")
        assert data.column_names == ["prompt", "x"] and len(data) == 2
        assert data.to_list() == [{"prompt": "a", "x": 1}, {"prompt": "b\u2028c", "x": None}]
        assert data.select(range(1))[0] == {"prompt": "a", "x": 1} and data["x"] == [1, None]

    def test_a_folder_of_data_files_is_read_as_written(self, tmp_path):
        # a folder of train.jsonl and test.jsonl went through `datasets` too: cached, and a column of JSON decoded
        rows = [{"prompt": '"quoted answer"', "prompt_id": UINT64_MAX}, {"prompt": 7, "prompt_id": 1}]
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", rows)
        write_jsonl(folder / "test.jsonl", rows[:1])
        assert rebel.load_split(str(folder), "train").to_list() == rows
        assert rebel.load_split(str(folder), "test").to_list() == rows[:1]
        assert rebel.load_split(str(folder), "train_prefs") is None

    def test_a_parquet_json_column_that_datasets_wrote_is_decoded_as_datasets_does(self, tmp_path):
        # `datasets` writes a column it read as JSON as the JSON text of each value; read as it reads it, and a prompt
        # column of that kind is refused as before (its strings that looked like JSON were decoded already)
        import datasets
        features = datasets.Features({"prompt": datasets.Json(), "score": datasets.Json()})
        path = str(tmp_path / "json.parquet")
        datasets.Dataset.from_dict({"prompt": ["hi", [{"role": "user", "content": "x"}]], "score": [1, "a"]},
                                   features=features).to_parquet(path)
        data = rebel.load_split(path, "train")
        assert data.to_list() == [{"prompt": "hi", "score": 1},
                                  {"prompt": [{"role": "user", "content": "x"}], "score": "a"}]
        with pytest.raises(SystemExit, match=r"json\.parquet: column 'prompt' mixes strings and lists"):
            rebel.check_prompt_column(data, "prompt", path)

    def test_a_json_column_read_by_datasets_says_what_it_mixes(self):
        import datasets
        features = datasets.Features({"prompt": datasets.Json()})
        data = datasets.Dataset.from_dict({"prompt": ["hi", 7]}, features=features)
        with pytest.raises(SystemExit, match=r"hub: column 'prompt' mixes strings and integers, which datasets reads"):
            rebel.check_prompt_column(data, "prompt", "hub")


class TestRewardModels:
    """score.py's Starling-RM-7B-alpha and Eurus-RM-7b, scored natively, on tiny stand-ins of their Hub layouts:
    the authors' computation (Starling) and the remote code (Eurus) give the same rewards."""

    @pytest.mark.parametrize("layout", ["both", "model", "transformer"])
    def test_starling_is_scored_as_the_authors_computed_it(self, llama2_base, tmp_path, layout, capsys):
        rm = make_starling(str(tmp_path / "starling"), llama2_base, layout=layout)
        rows = generations(7, seed=6, long_every=5)
        for n, row in enumerate(rows):  # some responses hit the token limit: the authors wrote no " </s>" after those
            row["truncated"] = [(n + j) % 4 == 0 for j in range(3)]
        data = write_jsonl(tmp_path / "gen.jsonl", rows)
        out = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_model=rm, reward_base=llama2_base,
                                   dtype="float32", max_length=40, drop_truncated=False))
        printed = capsys.readouterr().out
        assert "dropped 0 of 7 prompts" in printed and "reward-model inputs were cut to max_length=40 tokens" in printed
        got = [r for row in out for r in row["rewards"]]
        expected = starling_by_the_authors(rm, llama2_base, rows, 40)
        print(f"Starling-RM ({layout}) native vs the authors' GPTRewardModel, fp32: max abs difference "
              f"{max_difference(got, expected):.2e}, max |reward| {max(map(abs, got)):.2f}")
        assert got == pytest.approx(expected, abs=1e-5, rel=0)
        assert len({round(r, 6) for r in got}) == len(
            got
        )  # rewards differ between responses: a wrong reading would show

    def test_starling_weights_are_read_with_weights_only_and_without_the_lm_head(
        self, llama2_base, tmp_path, monkeypatch
    ):
        rm = make_starling(str(tmp_path / "starling"), llama2_base)
        calls, load = [], torch.load
        monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or load(*a, **kw))
        cfg = score.Config(reward_model=rm, reward_base=llama2_base)
        assert score.reward_tokenizer_source(cfg) == llama2_base
        model = score.load_reward_model(cfg, torch.float32, rebel.load_tokenizer(llama2_base))
        assert calls and all(kw.get("weights_only") is True for kw in calls)
        assert type(model) is score.StarlingRM and not any("lm_head" in k for k in model.state_dict())
        assert model.config.pad_token_id == rebel.load_tokenizer(llama2_base).unk_token_id

    def test_starling_hub_id_resolves_its_files_through_cached_file(self, llama2_base, tmp_path, monkeypatch):
        import transformers.utils
        rm = make_starling(str(tmp_path / "starling"), llama2_base, layout="model")
        hub_id, asked = "berkeley-nest/Starling-RM-7B-alpha", []

        def cached_file(name, file, **kw):  # the Hub repository: README.md and pytorch_model.bin only
            asked.append((name, file))
            assert name == hub_id, name
            path = os.path.join(rm, file)
            return path if os.path.isfile(path) else None
        monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
        cfg = score.Config(reward_model=hub_id, reward_base=llama2_base, dtype="float32")
        tokenizer = rebel.load_tokenizer(score.reward_tokenizer_source(cfg))
        model = score.load_reward_model(cfg, torch.float32, tokenizer)
        assert (hub_id, "config.json") in asked and (hub_id, "pytorch_model.bin") in asked
        rows = [dict(r, truncated=[False] * 3) for r in generations(2, seed=7)]
        out, _ = score.model_rewards(model, tokenizer, rows, [0, 1], cfg, torch.device("cpu"))
        got = [r for row in out for r in row["rewards"]]
        assert got == pytest.approx(starling_by_the_authors(rm, llama2_base, rows, 4096), abs=1e-5, rel=0)

    def test_eurus_is_scored_natively_as_its_remote_code(self, eurus_model, tmp_path, remote_modules, capsys):
        rows = generations(7, seed=8)
        data = write_jsonl(tmp_path / "gen.jsonl", rows)
        out = read_jsonl(
            run_score(data, tmp_path / "pairs.jsonl", reward_model=eurus_model, dtype="float32")
        )  # 4 a batch
        assert "dropped 0 of 7 prompts" in capsys.readouterr().out
        assert not remote_modules.exists()  # modeling_eurus_rm.py never ran
        got = [r for row in out for r in row["rewards"]]
        alone, batched = eurus_by_its_remote_code(eurus_model, reward_inputs(eurus_model, rows))
        assert remote_modules.exists()  # ... and the check would have seen it
        print(f"Eurus-RM native vs its remote code, fp32: max abs difference {max_difference(got, alone):.2e} (alone), "
              f"{max_difference(got, batched):.2e} (batched), max |reward| {max(map(abs, got)):.2f}")
        assert got == pytest.approx(alone, abs=1e-5, rel=0) and got == pytest.approx(batched, abs=1e-5, rel=0)
        assert len({round(r, 6) for r in got}) == len(got)
        remote = read_jsonl(run_score(data, tmp_path / "remote.jsonl", reward_model=eurus_model, dtype="float32",
                                      trust_remote_code=True))  # asked for, its own class scores
        assert [r for row in remote for r in row["rewards"]] == pytest.approx(got, abs=1e-5, rel=0)

    def test_eurus_runs_no_remote_code_unless_asked(self, eurus_model, remote_modules):
        tokenizer = rebel.load_tokenizer(eurus_model)
        model = score.load_reward_model(score.Config(reward_model=eurus_model), torch.float32, tokenizer)
        assert type(model) is score.EurusRM and type(model.model).__mro__[1].__name__ == "MistralModel"
        assert not remote_modules.exists()
        model = score.load_reward_model(score.Config(reward_model=eurus_model, trust_remote_code=True), torch.float32,
                                        tokenizer)
        assert type(model).__name__ == "EurusRewardModel" and remote_modules.exists()

    @pytest.mark.parametrize("config, expected", [
        (dict(architectures=["EurusRewardModel"]), True),
        (dict(auto_map={"AutoModel": "modeling_eurus_rm.EurusRewardModel"}), True),
        (dict(architectures=["MistralForSequenceClassification"]), False),
        (dict(architectures=["LlamaForRewardModelWithGating"],
              auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}), False),
    ], ids=["architectures", "auto_map", "mistral_classifier", "armo"])
    def test_eurus_is_recognised_by_its_config(self, config, expected):
        from transformers import MistralConfig
        assert score.is_eurus(MistralConfig(**config)) is expected

    def test_a_reward_model_folder_without_tokenizer_files_says_so_in_one_line(self, eurus_model, tmp_path):
        folder = str(tmp_path / "no_tokenizer")
        shutil.copytree(eurus_model, folder, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "chat_*"))
        data = write_jsonl(tmp_path / "gen.jsonl", generations(2))
        with pytest.raises(SystemExit) as failed:
            run_score(data, tmp_path / "pairs.jsonl", reward_model=folder)
        assert (
            str(failed.value)
            == f"error: reward model {folder}: no tokenizer files (tokenizer.json / "
            "tokenizer.model / tokenizer_config.json) in the folder; copy them there from the "
            "model it was trained from"
        )

    @pytest.mark.parametrize("settings, message", BAD_INPUTS)
    def test_bad_reward_models_fail_in_one_line_before_scoring(
        self, settings, message, llama2_base, tmp_path, monkeypatch
    ):
        import huggingface_hub.constants
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the Hub unreachable, at once
        starling = make_starling(str(tmp_path / "starling"), llama2_base)
        settings = {"reward_model": starling, "reward_base": llama2_base, **settings(tmp_path, llama2_base)}
        data = write_jsonl(tmp_path / "gen.jsonl", generations(3))
        with pytest.raises(SystemExit, match=message) as failed:
            run_score(data, tmp_path / "pairs.jsonl", **settings)
        assert "\n" not in str(failed.value)
        assert not list(tmp_path.glob("pairs.jsonl.shards/block_*"))  # nothing scored
        assert not (tmp_path / "pwned").exists()  # no pickled code ran


class TestGSM8K:
    """eval_gsm8k.py."""

    def test_gsm8k_prompts_are_the_harness_prompts(self, gsm8k):
        train, test = gsm8k
        prompts = eval_gsm8k.build_prompts(test, train)
        assert len(prompts) == len(test) == 1319
        # Shots of test questions 0, 1 and 1318, worked out once from the harness's definition (ContextSampler: one
        # random.Random(1234), .sample(train, 5) per test question in test order, nothing removed since train != test):
        shots = {0: [6374, 3610, 957, 61, 742], 1: [7462, 6610, 4769, 286, 5501], 1318: [220, 4179, 6064, 5599, 5541]}
        for i, indices in shots.items():
            expected = "".join(
                "Question: " + train[j]["question"] + "\nAnswer: " + train[j]["answer"] + "\n\n" for j in indices
            )
            assert prompts[i] == expected + "Question: " + test[i]["question"] + "\nAnswer:"
        # the same facts as literal text
        assert prompts[0].startswith("Question: Jen and Tyler are gymnasts practicing flips. Jen is practicing")
        assert "\n#### 12\n\nQuestion: Four people in a law firm are planning a party." in prompts[0]
        assert prompts[0].endswith(
            "\n\nQuestion: Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes"
            " muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2"
            " per fresh duck egg. How much in dollars does she make every day at the farmers' market?\nAnswer:"
        )
        # every prompt, re-derived on indices with an independent generator
        rnd = random.Random(1234)
        for doc, prompt in zip(test, prompts):
            context = "".join(f"Question: {train[j]['question']}\nAnswer: {train[j]['answer']}\n\n"
                              for j in rnd.sample(range(len(train)), 5))
            assert prompt == f"{context}Question: {doc['question']}\nAnswer:"
        # a prompt depends on its position only: a prefix of the test set (--limit) gets the same prompts
        assert eval_gsm8k.build_prompts(test[:8], train) == prompts[:8]
        assert eval_gsm8k.build_prompts(test[:2], train, num_fewshot=0) == [
            f"Question: {d['question']}\nAnswer:" for d in test[:2]
        ]
        assert eval_gsm8k.build_prompts(test[:1], train, seed=1) != prompts[:1]

    # generation, answer field, stop strings, expected (strict, flexible) extraction, expected (strict, flexible)
    # correctness
    @pytest.mark.parametrize(
        "generation, answer, stop, extracted, correct",
        [
            (
                "16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = $18.\n#### 18",
                "9 * 2 = 18\n#### 18",
                None,
                ("18", "18"),
                (True, True),
            ),
            ("#### 1,000", "#### 1000", None, ("1,000", "1,000"), (True, True)),  # commas removed on both sides
            ("She earns 1,234, which is plenty", "#### 1234", None, ("[invalid]", "1,234,"), (False, True)),
            (
                "The answer is $18.",
                "#### 18",
                None,
                ("[invalid]", "$18."),
                (False, True),
            ),  # '$' and the final '.' removed
            ("#### 18.", "#### 18", None, ("18.", "18."), (True, True)),
            ("So she makes 18 dollars every day.", "#### 18", None, ("[invalid]", "18"), (False, True)),  # no '####'
            ("####18", "#### 18", None, ("[invalid]", "18"), (False, True)),  # '#### ' needs the space
            ("so the answer is 7.", "#### 7", None, ("[invalid]", "7."), (False, True)),
            (
                "2 + 2 = 4\n#### 4\n\nQuestion: Tom has 3 apples and gets 2 more.\nAnswer: 3 + 2 = 5\n#### 5",
                "#### 4",
                None,
                ("4", "4"),
                (True, True),
            ),  # everything after "Question:" is cut
            ("#### 7</s>#### 8", "#### 8", None, ("7", "7"), (False, False)),
            ("The answer is 12<|im_end|>\n12 + 1 = 13", "#### 12", None, ("[invalid]", "12"), (False, True)),
            (
                "#### 4<|eot_id|>#### 5",
                "#### 5",
                EOT,
                ("4", "4"),
                (False, False),
            ),  # the tokenizer's end token is a stop too
            ("#### 4<|eot_id|>#### 5", "#### 5", None, ("4", "5"), (False, True)),
            (
                "#### 5\n#### 6",
                "#### 6",
                None,
                ("5", "6"),
                (False, True),
            ),  # strict: the first '####', flexible: the last number
            ("3 + 4 = 7 apples, then 7 * 2 = 14 in total", "#### 14", None, ("[invalid]", "14"), (False, True)),
            ("I have 12 apples and ate 1", "#### 12", None, ("[invalid]", "1"), (False, False)),
            ("5-3 = 2", "#### 2", None, ("[invalid]", "2"), (False, True)),
            ("It drops to -5 degrees.\n#### -5", "#### -5", None, ("-5", "-5"), (True, True)),
            ("The loss is -$5.", "#### -5", None, ("[invalid]", "-$5."), (False, True)),
            ("Each costs 2.50, so 2.5\n#### 2.5", "#### 2.5", None, ("2.5", "2.5"), (True, True)),
            (
                "#### 18.00",
                "#### 18",
                None,
                ("18.00", "18.00"),
                (False, False),
            ),  # no numeric comparison, as in the harness
            ("The answer is 42...", "#### 42", None, ("[invalid]", "42..."), (False, False)),  # only one final '.' goes
            ("", "#### 3", None, ("[invalid]", "[invalid]"), (False, False)),
        ],
    )
    def test_gsm8k_extraction_and_scoring(self, generation, answer, stop, extracted, correct):
        stop = eval_gsm8k.STOP if stop is None else stop
        assert eval_gsm8k.extract(generation, stop) == extracted
        assert eval_gsm8k.score(generation, answer, stop) == {"strict": correct[0], "flexible": correct[1]}

    def test_gsm8k_every_gold_answer_scores_correct(self, gsm8k):
        train, test = gsm8k
        for doc in train + test:
            assert eval_gsm8k.score(doc["answer"], doc["answer"]) == {"strict": True, "flexible": True}, doc["answer"]
            assert eval_gsm8k.extract(doc["answer"])[0] == doc["answer"].split("#### ")[-1]
        assert eval_gsm8k.mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)  # sqrt((3·1/16 + 9/16) / 3) / 2
        assert eval_gsm8k.mean_stderr([1.0]) is None

    def test_gsm8k_early_stop_equals_full_generation_then_cut(self, tiny_model, gsm8k):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        ids = tokenizer([f"Question: {d['question']}\nAnswer:" for d in gsm8k[1][:4]], add_special_tokens=False)[
            "input_ids"
        ]
        full = eval_gsm8k.generate(model, tokenizer, ids, 24, (), tokenizer.eos_token_id)
        # stop strings that the generations do contain (printable ASCII: a partly decoded character shows as U+FFFD)
        stop = tuple(
            next(t[k : k + 2] for k in range(6, len(t)) if t[k : k + 2].isascii() and t[k : k + 2].isprintable())
            for t in full
        )
        early = eval_gsm8k.generate(model, tokenizer, ids, 24, stop, tokenizer.eos_token_id)
        assert [eval_gsm8k.cut(t, stop) for t in early] == [eval_gsm8k.cut(t, stop) for t in full]
        assert max(map(len, early)) < max(map(len, full))  # it did stop early

    def test_gsm8k_tiny_model_end_to_end_and_two_processes(self, tiny_model, gsm8k, gsm8k_dir, tmp_path):
        train, test = gsm8k
        summary, records = run_eval(tiny_model, gsm8k_dir, tmp_path / "one")
        prompts = eval_gsm8k.build_prompts(test, train, num_fewshot=1)
        assert [r["index"] for r in records] == list(range(8))
        for r in records:
            assert r["prompt"] == prompts[r["index"]]
            assert (r["strict_answer"], r["flexible_answer"]) == eval_gsm8k.extract(r["generation"], EOT)
            assert {"strict": r["strict_correct"], "flexible": r["flexible_correct"]} == eval_gsm8k.score(
                r["generation"], test[r["index"]]["answer"], EOT)
            assert r["gold"] == test[r["index"]]["answer"].split("#### ")[-1].replace(",", "")
        for name, key in (("strict-match", "strict_correct"), ("flexible-extract", "flexible_correct")):
            values = [float(r[key]) for r in records]
            assert summary[name]["accuracy"] == sum(values) / 8 and summary[name]["correct"] == sum(values)
            assert summary[name]["stderr"] == eval_gsm8k.mean_stderr(values)
        assert summary["questions"] == 8 and summary["settings"]["limit"] == 8 and summary["runtime"]["processes"] == 1
        # left padding is right: one question per batch generates the same text
        assert run_eval(tiny_model, gsm8k_dir, tmp_path / "unbatched", batch_size=1)[1] == records
        # two processes (each a share of the batches) write the same records and results
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(HERE, "eval_gsm8k.py"),
            "--model",
            tiny_model,
            "--data",
            gsm8k_dir,
            "--output",
            str(tmp_path / "two"),
            "--limit",
            "8",
            "--num_fewshot",
            "1",
            "--batch_size",
            "3",
            "--max_new_tokens",
            "12",
        ]
        subprocess.run(command, check=True, env=env, cwd=tmp_path, timeout=300)
        two = read_json(tmp_path / "two" / "summary.json")
        assert read_jsonl(tmp_path / "two" / "samples.jsonl") == records and two["runtime"]["processes"] == 2
        assert {k: v for k, v in two.items() if k not in ("runtime", "settings")} == {
            k: v for k, v in summary.items() if k not in ("runtime", "settings")}

    def test_gsm8k_chat_template_wraps_the_whole_prompt(self, tiny_model, gsm8k, gsm8k_dir, tmp_path):
        train, test = gsm8k
        _, records = run_eval(tiny_model, gsm8k_dir, tmp_path, limit=2, max_new_tokens=2, chat_template=True)
        for r, prompt in zip(records, eval_gsm8k.build_prompts(test, train, num_fewshot=1)):
            assert r["prompt"] == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + prompt
                                   + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    def test_gsm8k_bos_token_only_when_asked_and_never_twice(self, tiny_model):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        bos = tokenizer.bos_token_id
        # a tokenizer that adds BOS by itself, as Llama-3's does
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                                        special_tokens=[("<|begin_of_text|>", bos)])
        plain = "Question: How many?\nAnswer:"
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": plain}], tokenize=False, add_generation_prompt=True
        )
        text_ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
        assert eval_gsm8k.encode(tokenizer, [plain]) == [text_ids]  # lm-eval's old default: no BOS
        assert eval_gsm8k.encode(tokenizer, [plain], add_bos_token=True) == [[bos] + text_ids]
        for flag in (False, True):  # the template's own BOS, once
            ids = eval_gsm8k.encode(tokenizer, [templated], add_bos_token=flag)[0]
            assert ids[0] == bos and ids.count(bos) == 1

    @pytest.mark.parametrize("case, expected", [
        pytest.param(lambda g: g.error(g.data_folder("no_train", g.good, train=False)), ("train.jsonl: no such file",),
                     id="no-train-file"),
        pytest.param(lambda g: g.error(g.data_folder("not_json", g.good[:1] + ["{oops"])),
                     ("test.jsonl line 2: not valid JSON",), id="not-json"),
        pytest.param(lambda g: g.error(g.data_folder("no_hashes", ['{"question": "q", "answer": "18"}'])),
                     ("line 1: the answer has no '#### '",), id="answer-without-hashes"),
        pytest.param(lambda g: g.error(g.data_folder("few", g.good), num_fewshot=11),
                     ("--num_fewshot 11 is more than the 10 train questions",), id="more-shots-than-questions"),
        pytest.param(lambda g: g.error(g.gsm8k_dir, limit=-1), ("--limit must be >= 0, got -1",), id="negative-limit"),
        pytest.param(lambda g: g.error(g.gsm8k_dir, batch_size=0), ("--batch_size must be >= 1, got 0",),
                     id="zero-batch-size"),
        pytest.param(lambda g: g.error(g.tmp / "missing"), ("no such folder, and not a Hub id",), id="missing-data"),
        pytest.param(lambda g: g.error(g.gsm8k_dir, model=str(g.tmp / "no" / "model" / "here")),
                     ("no such folder, and not a Hub id",), id="missing-model"),
        pytest.param(lambda g: g.error(g.gsm8k_dir), ("model folder", "has no weights"),
                     id="model-folder-without-weights"),  # checked before any process group
    ])
    def test_gsm8k_bad_input_fails_clearly_before_loading_the_model(self, case, expected, tmp_path):
        """With GSM8K-like questions written here: it needs none of the real data, so it runs in any clone."""
        message = case(gsm8k_bad_input(tmp_path))
        for text in expected:
            assert text in message

    def test_gsm8k_question_without_an_answer_is_named_by_its_line(self, tmp_path):
        g = gsm8k_bad_input(tmp_path)
        path = os.path.join(
            g.data_folder("no_answer", g.good[:2] + ['{"question": "How many?"}'] + g.good), "test.jsonl"
        )
        assert g.error(os.path.dirname(path)) == f"error: {path} line 3: expected a JSON object with a string 'answer'"


class TestDemo:
    """The demo (python test_rebel.py demo), shortened."""

    def test_demo_learns(self, tmp_path):
        """A shortened demo: two iterations must raise the held-out reward clearly above the starting policy's."""
        table = run_demo(str(tmp_path / "demo"), iterations=2, num_prompts=128, num_eval_prompts=48)
        assert table[-1]["held_out_reward"] > table[0]["held_out_reward"] + 0.03
        assert all(row["chosen_reward"] > row["rejected_reward"] for row in table[1:])
        # run again in the same folder: it starts afresh; a folder of other files is not touched
        assert len(run_demo(str(tmp_path / "demo"), iterations=0, num_prompts=8, num_eval_prompts=4)) == 1
        assert not os.path.exists(tmp_path / "demo" / "iter_2")
        with pytest.raises(SystemExit, match="holds other files; give the demo an empty or new folder"):
            run_demo(str(tmp_path), iterations=0)


class TestBench:
    """The benchmark (RUN_BENCH=1 pytest -q test_rebel.py -k bench -s); skipped otherwise."""

    @pytest.mark.skipif(
        os.environ.get("RUN_BENCH") != "1", reason="benchmark: RUN_BENCH=1 pytest test_rebel.py -k bench -s"
    )
    def test_bench(self, tmp_path, alpaca_eval, gsm8k):
        torch.manual_seed(0)
        llama, rebel_answers = alpaca_eval
        corpus = [a["instruction"] for a in llama] + [a["output"] for a in llama] + [b["output"] for b in rebel_answers]
        tokenizer = make_tokenizer(str(tmp_path / "tok"), vocab_size=32000, corpus=corpus)
        pairs = alpaca_pairs(alpaca_eval, tokenizer)
        print(
            f"\n{len(pairs)} AlpacaEval pairs; mean tokens per pair (2 sequences)"
            f" {sum(map(rebel.pair_tokens, pairs)) / len(pairs):.0f}"
        )
        repeats = int(os.environ.get("BENCH_REPEATS", "3"))  # single runs on a shared 2-core machine swing up to ~2×
        print_table([bench_rows(tmp_path, tokenizer, pairs, llama, gsm8k) for _ in range(repeats)])


    @pytest.mark.skipif(
        os.environ.get("RUN_BENCH") != "1", reason="benchmark: RUN_BENCH=1 pytest test_rebel.py -k bench -s"
    )
    def test_bench_online(self, tmp_path):
        """One online update on 2 processes: the policy gathered once per rollout vs generate on the sharded policy."""
        median = online_bench(str(tmp_path), repeats=int(os.environ.get("BENCH_REPEATS", "3")))
        assert median["gather"] < median["plain"]


class TestGPUCheck:
    """The GPU check (python test_rebel.py gpu) at tiny sizes on CPU."""

    def test_gpu_check_smoke_on_cpu(self, tmp_path, capsys, monkeypatch):
        """The GPU check's own functions at tiny sizes (bf16 where the GPU computes in bf16, in-process instead of
        torchrun),
        so that the command cannot rot; without a GPU, the command itself says so and runs nothing."""
        with monkeypatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: False)
            assert gpu_check([str(tmp_path / "none")]) == 0 and "no CUDA GPU" in capsys.readouterr().out
        assert not os.path.exists(tmp_path / "none")
        report = run_gpu_check(str(tmp_path / "out"), SMOKE_SIZES, scratch=str(tmp_path / "scratch"))
        assert read_json(tmp_path / "out" / "gpu_check.json") == json.loads(json.dumps(report))
        assert [name for name, section in report["sections"].items() if "error" in section] == []
        assert [r for r in report["table"] if r["status"] == "FAIL"] == [] and report["passed"]
        assert {r["section"] for r in report["table"] if r["status"] == "pass"} == {
            "correctness",
            "llama_1b",
            "generation",
            "online",
        }
        assert len(report["sections"]["llama_1b"]["training"]) == 4 and "predicted_8b" in report["sections"]["slice_8b"]
        assert "| section | measure |" in open(tmp_path / "out" / "gpu_check.log").read()


class TestLayout:
    """The layout the scripts keep: rebel_loss near the top of rebel.py, its main above the line below which nothing is
    REBEL, and no line over 120 columns."""

    def test_rebel_loss_is_defined_in_the_first_150_lines(self):
        lines = source_lines("rebel.py")
        assert any(line.startswith("def rebel_loss") for line in lines[:150]), (
            "def rebel_loss is at line"
            f" {next((n for n, l in enumerate(lines, 1) if l.startswith('def rebel_loss')), None)}"
        )

    def test_main_is_above_the_marked_line(self):
        lines = source_lines("rebel.py")
        marks = [n for n, line in enumerate(lines, 1) if re.match(r"^# =+ nothing below this line is REBEL", line)]
        mains = [n for n, line in enumerate(lines, 1) if line.startswith("def main")]
        assert marks, "rebel.py has no line '# ===... nothing below this line is REBEL'"
        assert mains and mains[0] < marks[0], f"def main at line(s) {mains}, the marked line at {marks[0]}"

    @pytest.mark.parametrize("name", LAYOUT_FILES)
    def test_no_line_over_120_columns(self, name):
        long = [n for n, line in enumerate(source_lines(name), 1) if len(line) > 120]
        assert not long, f"{name}: {len(long)} line(s) over 120 columns: {long[:20]}"


# ------------------------------------------------------------------------- the demo: python test_rebel.py demo [folder]

def demo_reward(prompt, response):
    """The demo's rule-based reward, one a tiny random model can learn: the share of vowels among the response's
    characters."""
    return sum(c in "aeiou" for c in response) / max(1, len(response))


def run_stage(module, argv, log):
    """Run one stage's real command line in this process (its output goes to `log`), printing the command."""
    print(f"$ python {module.__name__}.py {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        module.main(rebel.parse_config(module.Config, argv))


def held_out_reward(model, prompts, out_dir, iteration, samples=4, max_new_tokens=16):
    """Mean reward of the policy's samples on prompts it never trained on."""
    output = os.path.join(out_dir, f"eval_{iteration}.jsonl")
    run_stage(generate, ["--model", model, "--prompts", prompts, "--output", output, "--num_samples", str(samples),
                         "--max_new_tokens", str(max_new_tokens), "--seed", str(1000 + iteration)], output + ".log")
    rewards = [demo_reward(row["prompt"], r) for row in read_jsonl(output) for r in row["responses"]]
    return sum(rewards) / len(rewards)


def run_demo(
    out="runs/demo", iterations=3, num_prompts=256, num_eval_prompts=64, num_samples=5, max_new_tokens=16, eta=20.0
):
    """The whole REBEL loop on a tiny Llama, CPU only: for each iteration, sample K responses per prompt from the
    current
    policy (generate.py), keep the best and worst under a rule-based reward (score.py --reward_fn), train from the
    current policy with REBEL (rebel.py), and measure the new policy's mean reward on held-out prompts."""
    start = time.time()
    marker = os.path.join(out, ".rebel_demo")
    if os.path.exists(marker):  # an earlier demo's folder: the demo starts afresh
        print(f"removing the earlier demo in {out}/", flush=True)
        shutil.rmtree(out)
    elif os.path.isdir(out) and os.listdir(out):
        raise SystemExit(
            f"error: {out} holds other files; give the demo an empty or new folder: python test_rebel.py demo FOLDER"
        )
    os.makedirs(out, exist_ok=True)
    open(marker, "w").close()
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(num_prompts + num_eval_prompts)]
    train_prompts, eval_prompts = os.path.join(out, "train_prompts.jsonl"), os.path.join(out, "eval_prompts.jsonl")
    write_jsonl(train_prompts, [{"prompt": p} for p in prompts[:num_prompts]])
    write_jsonl(eval_prompts, [{"prompt": p} for p in prompts[num_prompts:]])
    policy = make_model(os.path.join(out, "iter_0"))
    table = [
        dict(iteration=0, held_out_reward=held_out_reward(policy, eval_prompts, out, 0, max_new_tokens=max_new_tokens))
    ]
    for it in range(1, iterations + 1):
        step = os.path.join(out, f"iter_{it}")
        os.makedirs(step, exist_ok=True)
        generations, pairs = os.path.join(step, "generations.jsonl"), os.path.join(step, "pairs.jsonl")
        run_stage(
            generate,
            [
                "--model",
                policy,
                "--prompts",
                train_prompts,
                "--output",
                generations,
                "--seed",
                str(it),
                "--num_samples",
                str(num_samples),
                "--max_new_tokens",
                str(max_new_tokens),
            ],
            generations + ".log",
        )
        # a random tiny model rarely ends its turn within max_new_tokens: keep the cut responses
        run_stage(
            score,
            [
                "--input",
                generations,
                "--output",
                pairs,
                "--reward_fn",
                f"{os.path.abspath(__file__)}:demo_reward",
                "--drop_truncated",
                "false",
            ],
            pairs + ".log",
        )
        rows = read_jsonl(pairs)
        episodes = 2 * (len(rows) - 32) // 16 * 16  # two epochs of the pairs left after the eval hold-out
        run_stage(
            rebel,
            [
                "--model",
                policy,
                "--dataset",
                pairs,
                "--output_dir",
                os.path.join(step, "train"),
                "--eta",
                str(eta),
                "--lr",
                "1e-3",
                "--batch_size",
                "16",
                "--micro_batch_size",
                "8",
                "--total_episodes",
                str(episodes),
                "--eval_size",
                "32",
                "--eval_every",
                "0",
                "--save_every",
                "0",
                "--activation_checkpointing",
                "false",
                "--seed",
                str(it),
            ],
            os.path.join(step, "train.log"),
        )
        policy = os.path.join(step, "train", "final")
        metrics = read_jsonl(os.path.join(step, "train", "metrics.jsonl"))
        losses = [m["loss"] for m in metrics if "loss" in m]
        table.append(
            dict(
                iteration=it,
                held_out_reward=held_out_reward(policy, eval_prompts, out, it, max_new_tokens=max_new_tokens),
                chosen_reward=sum(r["chosen_reward"] for r in rows) / len(rows),
                rejected_reward=sum(r["rejected_reward"] for r in rows) / len(rows),
                pairs=len(rows),
                train_loss=sum(losses[-4:]) / len(losses[-4:]),
                sign_align=[m for m in metrics if "sign_align" in m][-1]["sign_align"],
            )
        )
    print(
        "\n| iteration | held-out reward | chosen reward | rejected reward | pairs | train loss (last 4) | val"
        " sign_align |\n|---|---|---|---|---|---|---|"
    )
    for row in table:
        cells = [f"{row[k]:.3f}" if k in row else "" for k in ("chosen_reward", "rejected_reward")]
        extra = [str(row.get("pairs", "")), f"{row['train_loss']:.3f}" if "train_loss" in row else "",
                 f"{row['sign_align']:.3f}" if "sign_align" in row else ""]
        print(f"| {row['iteration']} | {row['held_out_reward']:.3f} | " + " | ".join(cells + extra) + " |")
    gain = table[-1]["held_out_reward"] - table[0]["held_out_reward"]
    print(
        f"\nheld-out reward {table[0]['held_out_reward']:.3f} -> {table[-1]['held_out_reward']:.3f} ({gain:+.3f}) in"
        f" {time.time() - start:.0f}s; models, data and logs in {out}/"
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    return table


# ---------------------------------------------------------------------------- benchmark: RUN_BENCH=1 pytest -k bench -s

def alpaca_pairs(alpaca_eval, tokenizer, seed=0):
    """Real lengths: AlpacaEval instructions, chosen = Llama-3-8B-Instruct's answer, rejected = REBEL's answer."""
    rng = random.Random(seed)
    llama, rebel_answers = alpaca_eval
    from datasets import Dataset
    rows = Dataset.from_list(
        [
            dict(
                prompt=a["instruction"],
                chosen=a["output"],
                rejected=b["output"],
                chosen_reward=rng.random(),
                rejected_reward=rng.random(),
            )
            for a, b in zip(llama, rebel_answers)
        ]
    )
    pairs = rebel.tokenize_pairs(rows, tokenizer, "alpaca_eval", len(tokenizer))
    return rebel.filter_by_length(pairs, BENCH_MAX_PROMPT, BENCH_MAX_RESPONSE, "alpaca_eval")


def padded_full_logprobs(model, pair, temperature, pad_id):
    """The authors' way: prompt left-padded to the prompt maximum, response right-padded to the response maximum,
    full-vocabulary logits for every position, chosen and rejected in one forward."""
    rows, masks = [], []
    for response in (pair["chosen_ids"], pair["rejected_ids"]):
        q, r = pair["prompt_ids"], response
        rows.append([pad_id] * (BENCH_MAX_PROMPT - len(q)) + q + r + [pad_id] * (BENCH_MAX_RESPONSE - len(r)))
        masks.append([0] * (BENCH_MAX_PROMPT - len(q)) + [1] * (len(q) + len(r)) + [0] * (BENCH_MAX_RESPONSE - len(r)))
    ids, attention = torch.tensor(rows), torch.tensor(masks)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits[:, BENCH_MAX_PROMPT - 1 : -1]
        / temperature
    )
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, BENCH_MAX_PROMPT:, None]).squeeze(-1)
    return (logprobs * attention[:, BENCH_MAX_PROMPT:]).sum(-1)


def bench_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).train()


def memory_probe(method, tokenizer_dir, pairs_file):
    """Peak resident memory (MB above the start) of one micro-batch's log-prob forward + backward at Llama-3's
    vocabulary."""
    pairs = json.load(open(pairs_file))
    model = bench_model(128256)
    input_ids, positions, rows = rebel.collate(rebel.pair_sequences(pairs))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
    start = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
    if method == "chunked":
        logps = rebel.response_logprobs(model, input_ids, positions, rows, 0.8, rebel.Config.logprob_chunk)
    else:  # full-vocabulary logits at every position, as HF's forward gives them
        logits = model(input_ids=input_ids).logits / 0.8
        per_token = (
            torch.log_softmax(logits.float(), -1)
            .flatten(0, 1)[positions]
            .gather(-1, input_ids.flatten()[positions + 1, None])
        )
        logps = torch.zeros(len(input_ids)).index_add(0, rows, per_token.squeeze(-1))
    logps.sum().backward()
    peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"peak_mb": (peak - start) / 1024}))


def bench_rows(tmp_path, tokenizer, pairs, llama, gsm8k):
    """One run of every measure: [(name, baseline value, this repo's value, format)]."""
    pad_id, cfg, rows = tokenizer.eos_token_id, rebel.Config(), []
    response_tokens = lambda ps: sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in ps)  # noqa: E731

    # 1. training step: rebel.py's (length-sorted micro-batches padded to their own longest, response-only chunked
    #    logits) against the authors' (one pair per forward, padded to the maxima, full logits)
    model = bench_model(32000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    batch = list(range(32))
    start = time.time()
    for group in rebel.micro_batches(pairs, batch, cfg.micro_batch_size):
        logps = rebel.response_logprobs(model, *rebel.collate(rebel.pair_sequences(group)), 0.8,
                                        cfg.logprob_chunk)
        torch.stack([logps[:len(group)], logps[len(group):]]).sum().backward()
    optimizer.step(); optimizer.zero_grad()
    ours = time.time() - start
    start = time.time()
    for i in batch[:8]:
        padded_full_logprobs(model, pairs[i], 0.8, pad_id).sum().backward()
    optimizer.step(); optimizer.zero_grad()
    theirs = (time.time() - start) * len(batch) / 8
    rows.append(("training step", len(batch) / theirs, len(batch) / ours, "{:.2f} pairs/s"))
    rows.append(("  response tokens/s", response_tokens([pairs[i] for i in batch]) / theirs,
                 response_tokens([pairs[i] for i in batch]) / ours, "{:.0f}"))

    # 2. peak memory of one micro-batch's log-prob forward + backward at vocabulary 128,256, each in a fresh process
    middle = sorted(range(len(pairs)), key=lambda i: rebel.pair_tokens(pairs[i]))[len(pairs) // 2 :][
        : cfg.micro_batch_size
    ]
    json.dump([pairs[i] for i in middle], open(tmp_path / "mb.json", "w"))
    peak = {
        m: json.loads(
            subprocess.run(
                [sys.executable, __file__, "memory_probe", m, str(tmp_path / "tok"), str(tmp_path / "mb.json")],
                capture_output=True,
                text=True,
                check=True,
                cwd=HERE,
            )
            .stdout.strip()
            .splitlines()[-1]
        )["peak_mb"]
        for m in ("full", "chunked")
    }
    rows.append(
        (f"log-prob peak memory, {cfg.micro_batch_size} pairs, vocab 128k", peak["full"], peak["chunked"], "{:.0f} MB")
    )

    # 3. reference pass: batched, no grad, against one sequence per forward padded to the maxima (the authors')
    with torch.no_grad():
        start = time.time()
        for group in rebel.micro_batches(pairs, range(64), cfg.eval_micro_batch_size):
            rebel.response_logprobs(model, *rebel.collate(rebel.pair_sequences(group)), 0.8,
                                    cfg.logprob_chunk)
        ours = time.time() - start
        start = time.time()
        for i in range(8):
            padded_full_logprobs(model, pairs[i], 0.8, pad_id)
        theirs = (time.time() - start) * 8
    rows.append(("reference pass", 64 / theirs, 64 / ours, "{:.2f} pairs/s"))

    # 4. generation: new tokens/s of one batched call (16 prompts) against one prompt per call; the random model never
    #    stops early, so both make the same number of tokens
    model.eval()
    settings = SimpleNamespace(temperature=0.8, top_p=0.9, max_new_tokens=32, num_samples=5)
    stop_ids = [tokenizer.eos_token_id]
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token  # as generate.py loads it
    prompts = [rebel.prompt_tokens(tokenizer, a["instruction"])[1] for a in llama[:16]]
    timed = {}
    for name, groups in (("batched", [prompts]), ("one", [[p] for p in prompts[:4]])):
        start, tokens = time.time(), 0
        for group in groups:
            tokens += sum(
                len(ids)
                for samples in generate.hf_sample(
                    model, group, **generate.sampling(settings), stop_ids=stop_ids, seed=0)
                for ids, _ in samples
            )
        timed[name] = tokens / (time.time() - start)
    rows.append(("generate.py, 5 samples per prompt (new tokens/s)", timed["one"], timed["batched"], "{:.0f}"))
    gsm8k_train, gsm8k_test = gsm8k
    prompts = [eval_gsm8k.encode(tokenizer, [p])[0] for p in eval_gsm8k.build_prompts(gsm8k_test[:16], gsm8k_train)]
    for name, groups in (("batched", [prompts]), ("one", [[p] for p in prompts[:4]])):  # answers run ~100-250 tokens
        start, count = time.time(), 0
        for group in groups:
            eval_gsm8k.generate(model, tokenizer, group, 128, eval_gsm8k.STOP, tokenizer.eos_token_id)
            count += 128 * len(group)
        timed[name] = count / (time.time() - start)
    rows.append(("eval_gsm8k.py, greedy 5-shot (new tokens/s)", timed["one"], timed["batched"], "{:.0f}"))
    return rows


def print_table(runs):
    """Each measure's median over the runs, with its range (min–max); the ratio is this repo's over the baseline's."""
    spread = lambda values, fmt: (  # noqa: E731
        f"{fmt.format(statistics.median(values))} ({fmt.format(min(values)).split()[0]}–{fmt.format(max(values))})"
    )
    print(f"\nmedians of {len(runs)} runs (min–max)\n| measure | baseline | this repo | ratio |\n|---|---|---|---|")
    for k, (name, _, _, fmt) in enumerate(runs[0]):
        base, ours = [run[k][1] for run in runs], [run[k][2] for run in runs]
        print(
            f"| {name} | {spread(base, fmt)} | {spread(ours, fmt)} |"
            f" {spread([o / b for o, b in zip(ours, base)], '{:.2f}')} |"
        )


# ------------------------------------------------------------------------- GPU check: python test_rebel.py gpu [folder]
#
# One prepared command for a machine with one CUDA GPU, no internet and nothing downloaded (GPU time is rare and short):
# rebel.py end to end under torchrun (NCCL, bf16), bf16 against fp32 log-probs, training and reference-pass throughput
# and MFU of a Llama-3.2-1B-shaped model, the 8B model on 8 GPUs predicted from a measured 8B slice, generation and
# GSM8K speed. Sizes are parameters: test_gpu_check_smoke_on_cpu runs the same functions at tiny sizes, so the command
# cannot rot. FOLDER gets gpu_check.json (rewritten after every section) and gpu_check.log; models and runs go to a
# temporary folder (the team's device machine returns at most 8 files).

# Lengths (templated prompt, chosen, rejected; Llama-3 tokens, end-of-turn included) of 64 of the 805 AlpacaEval pairs
# in ../shared/data/alpaca_eval (chosen: Meta-Llama-3-8B-Instruct's answer, rejected: REBEL-Llama-3-8B-Instruct-Armo's):
# those at evenly spaced quantiles of 2·prompt + chosen + rejected, in seeded random order. Measured once with the real
# Llama-3 tokenizer (its tiktoken ranks from meta-llama/llama-models, its split pattern and chat template): 927 tokens
# per
# pair for these 64 as for all 805, longest response 1,669. GSM8K, likewise: 59 tokens per question, 100 per answer.
ALPACA_EVAL_LENGTHS = [
    (59, 490, 308), (43, 377, 431), (19, 437, 339), (19, 399, 558), (17, 450, 550), (17, 772, 809), (51, 391, 287),
    (25, 537, 529), (84, 103, 145), (56, 542, 213), (23, 719, 929), (30, 108, 41), (22, 171, 52), (34, 164, 75),
    (37, 474, 601), (26, 463, 672), (19, 299, 119), (39, 797, 698), (17, 59, 20), (36, 633, 689), (26, 74, 22),
    (17, 486, 654), (27, 516, 566), (151, 167, 53), (17, 302, 222), (32, 323, 228), (34, 576, 577), (24, 298, 345),
    (38, 1221, 831), (94, 142, 57), (58, 843, 935), (81, 538, 656), (53, 423, 524), (44, 562, 654), (32, 298, 368),
    (23, 61, 133), (22, 436, 682), (19, 651, 633), (57, 115, 134), (16, 511, 549), (21, 432, 542), (63, 713, 670),
    (18, 505, 560), (70, 73, 70), (28, 539, 603), (51, 323, 204), (20, 161, 138), (30, 742, 663), (25, 250, 187),
    (18, 532, 499), (22, 299, 415), (17, 446, 457), (20, 31, 594), (65, 670, 539), (18, 539, 705), (28, 380, 402),
    (18, 444, 480), (19, 447, 489), (26, 208, 324), (39, 45, 65), (29, 415, 379), (35, 653, 719), (39, 642, 520),
    (46, 567, 596)]
GSM8K_LENGTHS = (59, 100)
LLAMA_3_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)  # Llama-3.2-1B
LLAMA_3_8B = dict(
    LLAMA_3_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False
)
TINY = dict(vocab_size=1024, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
GPU_SIZES = dict(
    budget=dict(setup=25, correctness=125, llama_1b=100, slice_8b=85, generation=60, online=55),  # s: 450 in all
    small=dict(hidden=256, layers=4, heads=4, kv_heads=2),
    llama_1b=LLAMA_3_1B,
    llama_8b=LLAMA_3_8B,
    slice_layers=(2, 4),
    pairs=64,
    length_scale=1.0,
    update_pairs=16,
    micro_batch_sizes=(1, 2, 4),
    eval_micro_batch_size=8,
    matmul=8192,
    gen_prompts=16,
    gen_single=3,
    new_tokens=128,
    gsm8k_questions=32,
    gsm8k_new_tokens=256,
    online_prompts=8,
    torchrun=True,
)
SMOKE_SIZES = dict(
    GPU_SIZES,
    budget=dict(setup=60, correctness=120, llama_1b=60, slice_8b=60, generation=60, online=90),
    small=dict(hidden=32, layers=2),
    llama_1b=dict(LLAMA_3_1B, **TINY, intermediate_size=64, num_hidden_layers=2),
    llama_8b=dict(LLAMA_3_8B, **TINY, intermediate_size=112),
    slice_layers=(1, 2),
    pairs=8,
    length_scale=1 / 32,
    update_pairs=4,
    micro_batch_sizes=(1, 2),
    eval_micro_batch_size=4,
    matmul=64,
    gen_prompts=2,
    gen_single=1,
    new_tokens=3,
    gsm8k_questions=2,
    gsm8k_new_tokens=3,
    online_prompts=2,
    torchrun=False,
)
# dense bf16 tensor-core FLOP/s from NVIDIA's datasheets (half their with-sparsity figures); the first name found counts
SPEC_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)
PER_TOKEN_BF16 = 0.02  # nats: |log π bf16 − log π fp32| of a sequence may be at most this × its response tokens
DRIFT = 0.02  # ‖w_a − w_b‖ / ‖w_a − w_start‖ allowed between two runs that should end with the same weights
NCCL_BYTES_PER_S = 350e9  # assumed all-gather/reduce-scatter bus bandwidth of 8 × H100/H200 SXM (NVLink); not measured
NO_DATASETS = (
    "`datasets` cannot be imported here ({}); rebel.py reads its data with it, so the section 'correctness' is "
    "skipped.\n  Fix: on a machine with pip, `bash .ci/gpu fetch` downloads the wheels that this GPU image lacks "
    "(datasets, dill, multiprocess; Python 3.12) into .whl/; carry .whl and run `bash .ci/gpu`, which installs them."
)


def gpu_run(device):
    """rebel.World of one process."""
    return rebel.World(rank=0, size=1, device=device)


def measure(device, fn):
    """(seconds, bytes allocated before, peak bytes allocated during, fn()), the GPU's queued work included; memory on
    GPU only."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before, start = torch.cuda.memory_allocated(device) if cuda else 0, time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, before, torch.cuda.max_memory_allocated(device) if cuda else 0, result


def say(ctx, text):
    print(text, flush=True)
    with open(ctx.log, "a") as f:
        f.write(text + "\n")


def row(ctx, measure, value, target="", ok=None, asserted=True):
    """A line of the table: a check (asserted: a failure fails the command), a target (recorded only) or, ok=None, a
    measure."""
    status = "" if ok is None else ("pass" if ok else "FAIL") if asserted else ("met" if ok else "missed")
    ctx.report["table"].append(dict(section=ctx.section, measure=measure, value=value, target=target, status=status))
    say(ctx, f"  {measure}: {value}" + "".join(f" | {x}" for x in (target, status) if x))


def save(ctx):
    rebel.atomic_write(ctx.json, json.dumps(ctx.report, indent=1))


def run_section(ctx, name, fn):
    """fn(ctx) within its time budget (an alarm ends it; subprocesses get the time left). A failure ends this section
    only."""
    budget = ctx.sizes["budget"][name]
    ctx.section, ctx.out, ctx.deadline = name, ctx.report["sections"].setdefault(name, {}), time.time() + budget
    say(ctx, f"\n== {name} (budget {budget} s)")

    def over_budget(*_):
        raise TimeoutError(f"over its budget of {budget} s")
    previous, start = signal.signal(signal.SIGALRM, over_budget), time.time()
    signal.alarm(budget)
    try:
        fn(ctx)
    except (
        Exception
    ) as e:  # noqa: BLE001 — an out-of-memory, a crash or the budget: recorded, and the next section runs
        say(ctx, traceback.format_exc(limit=-4))
        row(ctx, "section ran to its end", ctx.out.setdefault("error", f"{type(e).__name__}: {e}"), ok=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if rebel.dist.is_initialized():
            rebel.dist.destroy_process_group()
    ctx.out["seconds"] = round(time.time() - start, 1)
    say(ctx, f"== {name}: {ctx.out['seconds']} s")
    save(ctx)
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def launch(ctx, module, argv, name):
    """A script's command line, within the section's time left: under torchrun (rebel.py) or python, in its own process
    group, killed whole at the deadline; in the CPU smoke (torchrun=False), in this process. Returns (0 or why not,
    log).
    """
    log = os.path.join(ctx.scratch, f"{name}.log")
    if not ctx.sizes["torchrun"]:
        try:
            run_stage(module, argv, log)
            code = 0
        except (Exception, SystemExit) as e:  # noqa: BLE001 — rebel.fail's SystemExit too
            code = f"{type(e).__name__}: {e}"
    else:
        runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if module is rebel else []
        env = dict(os.environ, **{"OMP_NUM_THREADS": "1"} if ctx.device.type == "cpu" else {})
        with open(log, "w") as f:
            process = subprocess.Popen(
                [sys.executable, *runner, os.path.join(HERE, f"{module.__name__}.py"), *argv],
                cwd=HERE,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = process.wait(timeout=max(1.0, ctx.deadline - time.time() - 5))
            except subprocess.TimeoutExpired:
                code = "killed at the section's deadline"
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    if code != 0:
        say(ctx, f"  {name}: {code}; the end of {log}:\n" + "".join(open(log, errors="replace").readlines()[-25:]))
    return code, log


def save_random_llama(ctx, name, shape):
    """A random Llama-3-shaped checkpoint (bf16, as Meta ships them; Llama-3's rope θ and stop tokens), initialised on
    the
    device (fast) and saved like a Hub checkpoint, so that it loads the real way. Its tokenizer is the test tokenizer
    padded to the model's vocabulary by filler tokens that no merge makes: encoding is unchanged, and every id decodes.
    """
    path = os.path.join(ctx.scratch, name)
    make_tokenizer(path)
    spec = json.load(open(os.path.join(path, "tokenizer.json")))
    ctx.base_vocab = len(spec["model"]["vocab"])
    spec["model"]["vocab"].update({f"<filler_{i}>": i for i in range(ctx.base_vocab, shape["vocab_size"])})
    json.dump(spec, open(os.path.join(path, "tokenizer.json"), "w"))
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    bos, end, eot = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(special)
    config = LlamaConfig(
        **shape, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=bos, eos_token_id=[end, eot]
    )
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(ctx.device)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=[end, eot])
    model.save_pretrained(path)
    return path


def random_pairs(ctx, lengths, vocab_size, seed=0):
    """Pairs of random token ids with these (prompt, chosen, rejected) lengths × length_scale, and random rewards."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, vocab_size, (max(1, round(n * ctx.sizes["length_scale"])),), generator=g).tolist()
    return [
        dict(
            index=i,
            prompt_ids=ids(p),
            chosen_ids=ids(c),
            rejected_ids=ids(r),
            chosen_reward=torch.rand(1, generator=g).item(),
            rejected_reward=torch.rand(1, generator=g).item(),
        )
        for i, (p, c, r) in enumerate(lengths)
    ]


def layer_params(shape):
    d, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    return 2 * d * d + 2 * d * (d // heads * kv) + 3 * d * shape["intermediate_size"] + 2 * d  # q, o; k, v; MLP; norms


def model_params(shape):
    head = shape["vocab_size"] * shape["hidden_size"] * (1 if shape["tie_word_embeddings"] else 2)
    return shape["num_hidden_layers"] * layer_params(shape) + head + shape["hidden_size"]


def forward_flops(pairs, shape, head_only=False):
    """Forward FLOPs of these pairs as rebel.py computes them: 2 per decoder-layer parameter and real token (padding is
    no
    useful work), the lm_head at response tokens only (the chunked log-probs), causal attention (QKᵀ and A·V over the
    T(T+1)/2 position pairs: 2·hidden·T(T+1) per layer). Backward costs twice the forward. head_only: the lm_head's."""
    d, layers, total = shape["hidden_size"], shape["num_hidden_layers"] * (not head_only), 0
    for p in pairs:
        for response in (p["chosen_ids"], p["rejected_ids"]):
            t = len(p["prompt_ids"]) + len(response)
            total += 2 * layers * (layer_params(shape) * t + d * t * (t + 1)) + 2 * shape["vocab_size"] * d * len(
                response
            )
    return total


def build(cfg, device):
    """rebel.py's model (fp32 master weights, FSDP, bf16 compute) and optimizer."""
    model = rebel.build_model(cfg, rebel.World(0, 1, device), torch.bfloat16)
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                    weight_decay=cfg.weight_decay)


def set_checkpointing(model, on):
    """Activation checkpointing on or off on a built model, under the name this transformers has."""
    if on:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)(
            {"use_reentrant": False}
        )
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    assert all(layer.gradient_checkpointing == on for layer in model.get_decoder().layers)


def logprobs(ctx, model, group, cfg):
    """rebel.py's log-probs of a micro-batch (model.response_logprobs, as build_model attaches it): chosen, then
    rejected."""
    return model.response_logprobs(
        *rebel.to_device(rebel.collate(rebel.pair_sequences(group)), ctx.device), cfg.temperature,
        cfg.logprob_chunk
    )


def time_training(ctx, model, optimizer, pairs, micro_batch_size, cfg):
    """rebel.main's update, timed: updates of update_pairs pairs (the paper's 128 per update over 8 GPUs = 16), sorted
    by
    length into micro-batches; per micro-batch the log-probs, the loss and its backward; the gradient norm; AdamW. One
    warm-up update first. Returns seconds (in all, in optimizer steps), updates and peak bytes allocated."""
    size = ctx.sizes["update_pairs"]

    def update(batch):
        for group in rebel.micro_batches(batch, range(len(batch)), micro_batch_size):
            logps = logprobs(ctx, model, group, cfg)
            reward_c, reward_r = rebel.to_device(
                [torch.tensor([[p["chosen_reward"], p["rejected_reward"]] for p in group], dtype=torch.float64)],
                ctx.device,
            )[0].T
            logp_c, logp_r = logps.double().view(2, len(group))
            (rebel.rebel_loss(logp_c, logp_r, 0.0, 0.0, reward_c, reward_r, cfg.eta).sum() / size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        step = measure(ctx.device, optimizer.step)[0]
        optimizer.zero_grad(set_to_none=True)
        return step
    update(pairs[:size])
    seconds, _, peak, in_steps = measure(
        ctx.device, lambda: sum(update(pairs[s : s + size]) for s in range(0, len(pairs), size))
    )
    return dict(seconds=seconds, optimizer_seconds=in_steps, updates=math.ceil(len(pairs) / size), peak_bytes=peak)


def time_reference(ctx, model, pairs, cfg):
    """Seconds of rebel.py's reference pass over the pairs (all_logprobs: no grad, eval_micro_batch_size per
    forward)."""
    rebel.all_logprobs(model, pairs[:ctx.sizes["update_pairs"]], cfg, gpu_run(ctx.device), "warm-up")
    return measure(ctx.device, lambda: rebel.all_logprobs(model, pairs, cfg, gpu_run(ctx.device), "reference pass"))[0]


def working_memory(ctx, model, group, cfg):
    """Peak bytes above the resident state (fp32 weights, gradients, Adam moments) of one micro-batch's forward and
    backward: activations, checkpoints, gathered bf16 weights, logit chunks. Measured on a second pass, when the
    gradients
    exist, as from an update's second micro-batch on."""
    def step():
        logprobs(ctx, model, group, cfg).sum().backward()
    step()
    _, before, peak, _ = measure(ctx.device, step)
    model.zero_grad(set_to_none=True)
    return peak - before


def gpu_setup(ctx):
    cuda, n = ctx.device.type == "cuda", ctx.sizes["matmul"]
    props = torch.cuda.get_device_properties(ctx.device) if cuda else None
    name = props.name if cuda else "cpu"
    ctx.out.update(
        device=name,
        memory_gb=props.total_memory / 1e9 if cuda else None,
        datasets=None,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        python=sys.version.split()[0],
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )
    try:
        import datasets
        ctx.out["datasets"] = datasets.__version__
    except Exception as e:  # noqa: BLE001 — missing, or a package it needs is missing or too old
        say(ctx, NO_DATASETS.format(f"{type(e).__name__}: {e}"))
    row(ctx, "machine", f"{name}{f', {props.total_memory / 1e9:.0f} GB' if cuda else ''}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, datasets {ctx.out['datasets']}")
    a, b, c = (torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16) for _ in range(3))
    for _ in range(3):
        torch.mm(a, b, out=c)
    ctx.peak = 10 * 2 * n ** 3 / measure(ctx.device, lambda: [torch.mm(a, b, out=c) for _ in range(10)])[0]
    ctx.spec = next((flops for key, flops in SPEC_BF16_FLOPS if key in name), None)
    ctx.out.update(peak_flops=ctx.peak, spec_flops=ctx.spec)
    row(ctx, f"bf16 matmul peak ({n}×{n}×{n}, measured)", f"{ctx.peak / 1e12:.1f} TFLOP/s",
        f"datasheet {ctx.spec / 1e12:.0f} TFLOP/s" if ctx.spec else "not in the datasheet table")


def gpu_correctness(ctx):
    """rebel.py end to end under torchrun (NCCL, --dtype auto: bf16 compute, fp32 master weights) on a small Llama."""
    if ctx.report["sections"]["setup"].get("datasets") is None:
        return row(ctx, "rebel.py end to end", "not run: `datasets` is missing (see the setup section)", ok=False)
    small = make_model(os.path.join(ctx.scratch, "small"), **ctx.sizes["small"])
    data = write_pairs(os.path.join(ctx.scratch, "pairs.jsonl"), n=40)
    settings = dict(TRAIN_SETTINGS, model=small, dataset=data, total_episodes=48, eta=1000.0, dtype="auto")
    runs = dict(
        ac_on=dict(activation_checkpointing=True),
        ac_off=dict(activation_checkpointing=False),
        stopped=dict(activation_checkpointing=True, stop_after=3),
        resumed=dict(activation_checkpointing=True, resume=True),
    )
    logs = {}
    for name, extra in runs.items():
        out = os.path.join(ctx.scratch, "stopped" if name == "resumed" else name)
        argv = [x for k, v in dict(settings, output_dir=out, **extra).items() for x in (f"--{k}", str(v))]
        code, logs[name] = launch(ctx, rebel, argv, name)
        row(ctx, f"rebel.py, {name}: runs to its end", "yes" if code == 0 else str(code), ok=code == 0)
        if code != 0:
            return
    dtype, header = rebel.compute_dtype("auto", ctx.device), open(logs["ac_on"]).read()
    row(ctx, "--dtype auto computes in", f"{dtype} on {ctx.device.type}",
        ok=f"device {ctx.device.type} | compute dtype {dtype}" in header)

    # update 1: policy = reference, so loss = mean((η·Δr)²) up to the bf16 noise δ of the log-ratios (same weights,
    # other
    # batch shapes): |mean((δ − ηΔr)²) − mean((ηΔr)²)| ≤ 2·D·mean|ηΔr| + D², with |δ| ≤ D = PER_TOKEN_BF16 × response
    # tokens
    rows, seed = read_jsonl(data), torch.Generator().manual_seed(settings["seed"])
    held = set(torch.randperm(len(rows), generator=seed)[:settings["eval_size"]].tolist())
    train_rows = [r for i, r in enumerate(rows) if i not in held]  # as rebel.load_pairs holds out the eval rows
    batch = [train_rows[i] for i in rebel.global_batch(len(train_rows), settings["batch_size"], 0, settings["seed"])]
    gaps = torch.tensor(
        [settings["eta"] * (r["chosen_reward"] - r["rejected_reward"]) for r in batch], dtype=torch.float64
    )
    tokenizer = AutoTokenizer.from_pretrained(small)
    tokens = max(
        sum(len(tokenizer(r[k], add_special_tokens=False)["input_ids"]) + 1 for k in ("chosen", "rejected"))
        for r in batch
    )
    most, expected = PER_TOKEN_BF16 * tokens, gaps.pow(2).mean().item()
    bound = 2 * most * gaps.abs().mean().item() + most ** 2
    first = next(r for r in read_jsonl(os.path.join(ctx.scratch, "ac_on", "metrics.jsonl")) if "loss" in r)
    row(
        ctx,
        "update-1 loss against mean((η·Δr)²)",
        f"relative error {abs(first['loss'] - expected) / expected:.2e}",
        f"≤ {bound / expected:.2e} ({PER_TOKEN_BF16} nats × {tokens} tokens)",
        ok=abs(first["loss"] - expected) <= bound,
    )

    final = {name: os.path.join(ctx.scratch, "stopped" if name == "resumed" else name, "final") for name in runs}
    reloaded = AutoModelForCausalLM.from_pretrained(final["ac_on"]).to(ctx.device)
    with torch.no_grad():
        finite = bool(torch.isfinite(reloaded(torch.arange(5, 37, device=ctx.device)[None]).logits).all())
    row(ctx, "final/ reloads (from_pretrained, finite logits, the starting dtype)", str(reloaded.dtype),
        ok=finite and reloaded.dtype == torch.float32)
    weights = {name: load_file(os.path.join(path, "model.safetensors")) for name, path in final.items()}
    start = load_file(os.path.join(small, "model.safetensors"))
    for b, what in (
        ("ac_off", "activation checkpointing off vs on"),
        ("resumed", "--stop_after 3 + --resume vs uninterrupted"),
    ):
        a = weights["ac_on"]
        drift = (sum((a[k].double() - weights[b][k].double()).pow(2).sum() for k in start)
                 / sum((a[k].double() - start[k].double()).pow(2).sum() for k in start)).sqrt().item()
        same = sum((a[k] == weights[b][k]).sum().item() for k in start) / sum(t.numel() for t in start.values())
        ctx.out[f"drift_{b}"] = drift
        row(
            ctx,
            f"final weights, {what}",
            f"‖Δ‖ / ‖trained‖ = {drift:.1e}, {same:.1%} bit-identical",
            f"≤ {DRIFT}",
            ok=drift <= DRIFT,
        )
    reused = "reference log-probs: reusing" in open(logs["resumed"]).read()
    row(ctx, "the resumed run reused the cached reference log-probs", "yes" if reused else "no", ok=reused)


def gpu_llama_1b(ctx):
    """Llama-3.2-1B shape, random weights, AlpacaEval-length pairs: bf16 vs fp32 log-probs, reference pass, training
    step."""
    s, device, shape = ctx.sizes, ctx.device, ctx.sizes["llama_1b"]
    ctx.llama_1b = folder = save_random_llama(ctx, "llama_1b", shape)
    rebel.init_distributed()
    cfg = dataclasses.replace(rebel.Config(), model=folder, eval_micro_batch_size=s["eval_micro_batch_size"])
    pairs, size = random_pairs(ctx, ALPACA_EVAL_LENGTHS[:s["pairs"]], shape["vocab_size"]), s["update_pairs"]
    tokens, flops = sum(map(rebel.pair_tokens, pairs)), forward_flops(pairs, shape)

    # bf16 against fp32 log-probs, same weights and pairs. bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈
    # 0.002),
    # the residual stream picks up such an error at every layer and the logits are rounded to bf16 before the fp32
    # log-softmax; the errors' signs vary, so a sequence's sum grows slower than its length. Measured on CPU (random
    # Llama, 16 layers of width 1,024, vocabulary 128,256, AlpacaEval lengths): 2e-4 to 1.1e-3 nats per response token.
    # PER_TOKEN_BF16 = 0.02 leaves ~20× for the GPU's kernels and twice the width, while a bug is beyond it: another
    # temperature moves even this random model's log-probs by ~0.1-0.2 nats per token, a token too many or missing by ≈
    # ln V ≈ 12.
    plain, fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device), {}
    plain.response_logprobs = rebel.response_logprobs.__get__(plain)
    with torch.no_grad():
        for group in rebel.micro_batches(pairs, range(len(pairs)), cfg.eval_micro_batch_size):
            fp32.update(
                {p["index"]: pair for p, pair in zip(group, logprobs(ctx, plain, group, cfg).view(2, -1).T.tolist())}
            )
    del plain
    gc.collect()  # (the method attached above makes a reference cycle): its memory must not count in the peaks below
    model, optimizer = build(cfg, device)
    bf16 = rebel.all_logprobs(model, pairs, cfg, gpu_run(device), "bf16 log-probs")
    diff = torch.tensor(
        [abs(bf16[p["index"]][k] - fp32[p["index"]][k]) for p in pairs for k in (0, 1)], dtype=torch.float64
    )
    per_token = diff / torch.tensor(
        [len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")], dtype=torch.float64
    )
    levels = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    ctx.out.update(
        bf16_fp32_abs=diff.quantile(levels).tolist(), bf16_fp32_per_token=per_token.quantile(levels).tolist()
    )
    row(
        ctx,
        "bf16 − fp32 log-prob of a sequence, abs. p50/p90/p99/max",
        " / ".join(f"{v:.3g}" for v in ctx.out["bf16_fp32_abs"]),
        "nats",
    )
    row(ctx, "  the same per response token", " / ".join(f"{v:.2g}" for v in ctx.out["bf16_fp32_per_token"]),
        f"max ≤ {PER_TOKEN_BF16}", ok=per_token.max().item() <= PER_TOKEN_BF16)
    row(
        ctx,
        "bf16 compute is on; master weights fp32",
        f"median difference {diff.median().item():.2g}",
        "> 1e-4; all parameters fp32",
        ok=diff.median().item() > 1e-4 and all(p.dtype == torch.float32 for p in model.parameters()),
    )

    seconds = time_reference(ctx, model, pairs, cfg)
    reference = ctx.out["reference_pairs_per_s"] = len(pairs) / seconds
    row(ctx, f"reference pass (no grad, {cfg.eval_micro_batch_size} pairs per forward)",
        f"{reference:.1f} pairs/s, {tokens / seconds:.0f} tokens/s, MFU {flops / seconds / ctx.peak:.0%}")
    runs = ctx.out.setdefault("training", {})
    for checkpointing in (True, False):
        set_checkpointing(model, checkpointing)
        for mb in s["micro_batch_sizes"]:
            m = time_training(ctx, model, optimizer, pairs, mb, cfg)
            # hardware FLOPs add the recomputed forwards: of the lm_head chunks always, of the decoder layers with
            # checkpointing
            hardware = 3 * flops + (flops if checkpointing else forward_flops(pairs, shape, head_only=True))
            padded = sum(rebel.collate(rebel.pair_sequences(g))[0].numel()
                         for k in range(0, len(pairs), size)
                         for g in rebel.micro_batches(pairs[k:k + size], range(len(pairs[k:k + size])), mb))
            seconds = m["seconds"]
            r = runs[f"mb{mb}_ac_{'on' if checkpointing else 'off'}"] = dict(
                m, pairs_per_s=len(pairs) / seconds, tokens_per_s=tokens / seconds, mfu=3 * flops / seconds / ctx.peak,
                hardware_mfu=hardware / seconds / ctx.peak, padding=padded / tokens - 1)
            row(ctx, f"training, micro-batch {mb}, checkpointing {'on' if checkpointing else 'off'}",
                f"{r['pairs_per_s']:.2f} pairs/s, {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.0%} (hardware "
                f"{r['hardware_mfu']:.0%}), peak {r['peak_bytes'] / 1e9:.1f} GB, padding +{r['padding']:.0%}")
            save(ctx)
    best = max(runs.values(), key=lambda r: r["mfu"])
    row(
        ctx,
        "best training MFU (of the measured bf16 peak)",
        f"{best['mfu']:.0%}" + (f"; {best['mfu'] * ctx.peak / ctx.spec:.0%} of the datasheet's" if ctx.spec else ""),
        "≥ 45%",
        ok=best["mfu"] >= 0.45,
        asserted=False,
    )
    default = runs[f"mb{cfg.micro_batch_size}_ac_on"]["pairs_per_s"]
    row(
        ctx,
        "reference pass / training (rebel.py's defaults)",
        f"{reference / default:.1f}×",
        "≥ 3×",
        ok=reference >= 3 * default,
        asserted=False,
    )


def gpu_slice_8b(ctx):
    """A few Llama-3-8B layers (its width, heads and vocabulary), timed and measured at rebel.py's defaults
    (micro-batch 2,
    checkpointing on) at two depths: per layer = the difference. The 8B model on 8 GPUs with FSDP is predicted from it.
    """
    s, device, shape = ctx.sizes, ctx.device, ctx.sizes["llama_8b"]
    rebel.init_distributed()
    cfg, (lo, hi) = dataclasses.replace(rebel.Config(), eval_micro_batch_size=s["eval_micro_batch_size"]), sorted(
        s["slice_layers"]
    )
    pairs, size = random_pairs(ctx, ALPACA_EVAL_LENGTHS[:s["pairs"]], shape["vocab_size"]), s["update_pairs"]
    longest = [(cfg.max_prompt_len, cfg.max_response_len, cfg.max_response_len)] * cfg.micro_batch_size
    longest = random_pairs(ctx, longest, shape["vocab_size"])
    measured = {}
    for layers in (lo, hi):
        folder = save_random_llama(ctx, f"slice_8b_{layers}_layers", dict(shape, num_hidden_layers=layers))
        model, optimizer = build(dataclasses.replace(cfg, model=folder), device)
        m = time_training(ctx, model, optimizer, pairs, cfg.micro_batch_size, cfg)
        reference = time_reference(ctx, model, pairs, cfg)
        typical = working_memory(
            ctx, model, rebel.micro_batches(pairs[:size], range(size), cfg.micro_batch_size)[0], cfg
        )
        try:
            worst = working_memory(ctx, model, longest, cfg)
        except torch.cuda.OutOfMemoryError:
            worst = None
        optimizer_per_param = (
            m["optimizer_seconds"] / m["updates"] / model_params(dict(shape, num_hidden_layers=layers))
        )
        measured[layers] = r = ctx.out[f"layers_{layers}"] = dict(
            train=(m["seconds"] - m["optimizer_seconds"]) / len(pairs),
            reference=reference / len(pairs),
            typical=typical,
            worst=worst,
            optimizer_per_param=optimizer_per_param,
            peak_bytes=m["peak_bytes"],
        )
        row(
            ctx,
            f"slice of {layers} layers: s per pair, training / reference pass",
            f"{r['train']:.4f} / {r['reference']:.4f}; working "
            f"memory {typical / 1e9:.2f} GB, {'OOM' if worst is None else f'{worst / 1e9:.2f} GB'} at the longest"
            " pairs",
        )
        row(
            ctx,
            f"  no out-of-memory: micro-batch 2, checkpointing, prompt {cfg.max_prompt_len} + response"
            f" {cfg.max_response_len}",
            "OOM" if worst is None else "none",
            "no OOM",
            ok=worst is not None,
            asserted=False,
        )
        del model, optimizer
        gc.collect()
    # per GPU of 8 (FSDP): compute per pair = the rest + 32 layers; AdamW over 1/8 of the parameters; fp32 weights,
    # gradients
    # and both Adam moments sharded (16 bytes × 8.03e9 / 8); working memory = the rest + 32 layers' (activations saved
    # by
    # checkpointing, gathered weights, unsharded gradients before their reduce-scatter). Communication is not measured:
    # the
    # prediction assumes FSDP overlaps it with compute, which the last row compares at an assumed bandwidth.
    gpus, n = 8, model_params(shape)
    per_layer = {
        k: max(0.0, (measured[hi][k] - measured[lo][k]) / (hi - lo))
        for k in ("train", "reference", "typical", "worst")
        if None not in (measured[lo][k], measured[hi][k])
    }
    full = {k: measured[lo][k] + (shape["num_hidden_layers"] - lo) * per_layer[k] for k in per_layer}
    train = gpus * size / (size * full["train"] + measured[hi]["optimizer_per_param"] * n / gpus)
    reference, mfu = gpus / full["reference"], 3 * forward_flops(pairs, shape) / len(pairs) * train / gpus / ctx.peak
    memory, longest_memory = 16 * n / gpus + full["typical"], 16 * n / gpus + full.get("worst", math.nan)
    ctx.out["predicted_8b"] = dict(
        train_pairs_per_s=train,
        reference_pairs_per_s=reference,
        mfu=mfu,
        memory_bytes=memory,
        longest_memory_bytes=longest_memory,
    )
    row(
        ctx,
        "8B on 8 GPUs, FSDP (extrapolated from the slice)",
        f"training {train:.1f} pairs/s (MFU {mfu:.0%}), reference {reference:.1f} pairs/s; 60,000 pairs:"
        f" {60000 / train / 60:.0f} min + {60000 / reference / 60:.0f} min reference",
    )
    row(ctx, "  memory per GPU", f"{memory / 1e9:.1f} GB typical, {longest_memory / 1e9:.1f} GB at the longest pairs",
        "≤ 80 GB (H100)", ok=longest_memory <= 80e9, asserted=False)
    # per layer and micro-batch: bf16 weights all-gathered for the forward and again for the backward, fp32 gradients
    # reduce-scattered
    comm = (2 + 2 + 4) * layer_params(shape) * (gpus - 1) / gpus / NCCL_BYTES_PER_S
    compute = per_layer["train"] * cfg.micro_batch_size
    row(
        ctx,
        "  FSDP traffic per layer and micro-batch (not measured)",
        f"{comm * 1e3:.1f} ms at an assumed {NCCL_BYTES_PER_S / 1e9:.0f} GB/s vs {compute * 1e3:.1f} ms of compute",
        "less than compute (else the prediction is optimistic)",
        ok=comm < compute,
        asserted=False,
    )


def gpu_generation(ctx):
    """generate.py's hf_sample, batched against one prompt per call, and eval_gsm8k.py's command line, on the 1B
    model."""
    s, device = ctx.sizes, ctx.device
    folder = ctx.llama_1b or save_random_llama(ctx, "llama_1b", s["llama_1b"])
    tokenizer = rebel.load_tokenizer(folder, padding_side="left")  # as generate.py loads both
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=rebel.compute_dtype("auto", device)).to(device).eval()
    settings, stop_ids = generate.Config(model=folder, max_new_tokens=s["new_tokens"]), generate.stop_token_ids(
        tokenizer, folder, rebel.load_model_config(folder)
    )
    prompts = [
        p["prompt_ids"] for p in random_pairs(ctx, ALPACA_EVAL_LENGTHS[: s["gen_prompts"]], s["llama_1b"]["vocab_size"])
    ]
    generate.hf_sample(
        model, prompts[:1], **generate.sampling(dataclasses.replace(settings, max_new_tokens=2)), stop_ids=stop_ids,
        seed=0)  # warm-up
    rates = {}
    for name, groups in (("batched", [prompts]), ("one", [[p] for p in prompts[:s["gen_single"]]])):
        seconds, _, _, made = measure(device, lambda: sum(len(ids) for g in groups for samples in generate.hf_sample(
            model, g, **generate.sampling(settings), stop_ids=stop_ids, seed=0) for ids, _ in samples))
        rates[name] = ctx.out[f"hf_sample_{name}_tokens_per_s"] = made / seconds
    row(ctx, f"generate.py hf_sample, {len(prompts)} prompts × {settings.num_samples} samples per call",
        f"{rates['batched']:.0f} new tokens/s")
    row(ctx, f"  one prompt × {settings.num_samples} samples per call",
        f"{rates['one']:.0f} new tokens/s; batched {rates['batched'] / rates['one']:.1f}×")
    model = None  # eval_gsm8k.py loads its own

    # eval_gsm8k.py's command line on GSM8K-length questions of random text (a random model's speed does not depend on
    # it):
    # random merged tokens (not the 256 single bytes, whose random sequences are broken UTF-8 that re-encodes longer);
    # their 5-shot prompts are ~940 tokens of this tokenizer, real GSM8K's ~870 of Llama-3's
    g, n = random.Random(0), s["gsm8k_questions"]

    def text(k):
        merged = range(len(SPECIAL_TOKENS) + 256, ctx.base_vocab)
        return tokenizer.decode([g.choice(merged) for _ in range(max(1, round(k * s["length_scale"])))])
    docs = [dict(question=text(GSM8K_LENGTHS[0]), answer=text(GSM8K_LENGTHS[1]) + "\n#### 7") for _ in range(16 + n)]
    data, out = os.path.join(ctx.scratch, "gsm8k"), os.path.join(ctx.scratch, "gsm8k_eval")
    os.makedirs(data, exist_ok=True)
    write_jsonl(os.path.join(data, "train.jsonl"), docs[:16])
    write_jsonl(os.path.join(data, "test.jsonl"), docs[16:])
    length = sum(map(len, eval_gsm8k.encode(tokenizer, eval_gsm8k.build_prompts(docs[16:], docs[:16])))) / n
    code, _ = launch(
        ctx,
        eval_gsm8k,
        [
            "--model",
            folder,
            "--data",
            data,
            "--output",
            out,
            "--limit",
            str(n),
            "--batch_size",
            str(n),
            "--max_new_tokens",
            str(s["gsm8k_new_tokens"]),
        ],
        "eval_gsm8k",
    )
    runtime = ctx.out["gsm8k"] = read_json(os.path.join(out, "summary.json"))["runtime"] if code == 0 else {}
    row(
        ctx,
        f"eval_gsm8k.py --limit {n} --batch_size {n} (5-shot, {length:.0f} prompt tokens, {s['gsm8k_new_tokens']} new "
        "tokens each)",
        f"{runtime['questions_per_s']:.2f} questions/s" if code == 0 else str(code),
        ok=code == 0,
    )


def gpu_online(ctx):
    """rebel.py --online: two updates on the 1B model (bf16), sampled with the policy gathered once per rollout: the
    KL is 0 at update 1, the first pass regresses on π_t (loss ≈ mean (η·Δr)² in bf16), rollout throughput."""
    s = ctx.sizes
    folder = ctx.llama_1b or save_random_llama(ctx, "llama_1b", s["llama_1b"])
    prompts = write_prompts(os.path.join(ctx.scratch, "online_prompts.jsonl"), 2 * s["online_prompts"])
    with open(os.path.join(ctx.scratch, "online_rewards.py"), "w") as f:
        f.write(ONLINE_REWARD)
    out = os.path.join(ctx.scratch, "online")
    flags = online_flags(folder, prompts, out, reward_fn=os.path.join(ctx.scratch, "online_rewards.py:length"),
                         batch_size=s["online_prompts"], total_episodes=2 * s["online_prompts"], lr=1e-6,
                         max_new_tokens=s["new_tokens"], rollout_block=s["online_prompts"], num_layers_unfrozen=2,
                         micro_batch_size=1, save_every=0, save_final="false", eval_micro_batch_size=4, kl_coef=0.05,
                         missing_eos_penalty=-4.0, reward_scale=1.0)
    code, _ = launch(ctx, rebel, flags[2:] + ["--online", "true"], "online")
    row(ctx, "rebel.py --online true, 2 updates of the 1B model", "ran" if code == 0 else str(code), ok=code == 0)
    if code != 0:
        return
    rows, metrics = read_jsonl(os.path.join(out, "rollouts.jsonl")), read_jsonl(os.path.join(out, "metrics.jsonl"))
    kl0 = max(abs(r[f"{side}_kl"]) for r in rows if r["update"] == 1 for side in ("chosen", "rejected"))
    row(ctx, "KL(π_t‖π_0) at update 1 (π_t = π_0)", f"{kl0:.2g}", "0", ok=kl0 == 0)
    gaps = [r["chosen_reward"] - r["rejected_reward"] for r in rows if r["update"] == 1]
    first = next(m for m in metrics if m.get("pass") == 1)
    target = sum(g * g for g in gaps) / len(gaps)
    row(ctx, "first pass loss vs mean (η·Δr)² (bf16 forwards of other batch shapes)", f"{first['loss']:.4g} vs "
        f"{target:.4g}", "within 5% + 0.05", ok=abs(first["loss"] - target) <= 0.05 * target + 0.05)
    stats = [m for m in metrics if "rollout_s" in m]
    ctx.out["online"] = stats
    row(ctx, f"rollout: {s['online_prompts']} prompts × 2 samples, ≤ {s['new_tokens']} new tokens, gathered once",
        f"{stats[-1]['rollout_tokens_per_s']:.0f} tokens/s ({stats[-1]['rollout_s']:.1f} s)")


def run_gpu_check(folder, sizes, scratch=None):
    """Every section in turn (each within its budget; a failure ends only its own), then the table. Returns the
    report."""
    os.makedirs(folder, exist_ok=True)
    own_scratch, start, threads = scratch is None, time.time(), torch.get_num_threads()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ctx = SimpleNamespace(
        sizes=sizes,
        device=device,
        scratch=scratch or tempfile.mkdtemp(prefix="gpu_check_"),
        llama_1b=None,
        log=os.path.join(folder, "gpu_check.log"),
        json=os.path.join(folder, "gpu_check.json"),
        report=dict(sizes="gpu" if sizes is GPU_SIZES else "smoke", sections={}, table=[]),
    )
    open(ctx.log, "w").close()
    if ctx.device.type == "cpu":  # the smoke's tiny work: on busy cores a second thread spins and makes it ~10× slower
        torch.set_num_threads(1)
    try:
        for name, fn in (("setup", gpu_setup), ("correctness", gpu_correctness), ("llama_1b", gpu_llama_1b),
                         ("slice_8b", gpu_slice_8b), ("generation", gpu_generation), ("online", gpu_online)):
            run_section(ctx, name, fn)
    finally:
        torch.set_num_threads(threads)
        if own_scratch:
            shutil.rmtree(ctx.scratch, ignore_errors=True)
    ctx.report.update(
        seconds=round(time.time() - start, 1), passed=all(r["status"] != "FAIL" for r in ctx.report["table"])
    )
    save(ctx)
    say(
        ctx,
        "\n| section | measure | value | target | status |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['section']} | {r['measure']} | {r['value']} | {r['target']} | {r['status']} |"
            for r in ctx.report["table"]
        ),
    )
    passed = "all checks passed" if ctx.report["passed"] else "SOME CHECKS FAILED"
    say(ctx, f"\n{passed} in {ctx.report['seconds']:.0f} s -> {ctx.json}")
    return ctx.report


def gpu_check(args):
    """python test_rebel.py gpu [folder] [--smoke]: the GPU check (--smoke: at tiny sizes, on any machine). Exit status
    0 if
    every check passed (targets are only recorded)."""
    folder = next((a for a in args if a != "--smoke"), "runs/gpu_check")
    if "--smoke" not in args and not torch.cuda.is_available():
        print(
            "python test_rebel.py gpu: no CUDA GPU on this machine, so nothing was run. The test suite runs the same"
            " code at tiny sizes (pytest -q test_rebel.py -k gpu_check), as does `python test_rebel.py gpu --smoke`."
        )
        return 0
    return 0 if run_gpu_check(folder, SMOKE_SIZES if "--smoke" in args else GPU_SIZES)["passed"] else 1


def online_bench_worker(mode, model, prompts, reward, output_dir):
    """One online update (under torchrun): `gather` samples as rebel.py does, the policy gathered once per rollout;
    `plain` calls generate on the sharded policy, whose FSDP hooks gather every layer at every decoding step
    (synced_gpus, so that processes which stop at different steps do not hang)."""
    if mode == "plain":
        rebel.gathered = lambda model: contextlib.nullcontext(model)
        generate_on = transformers.GenerationMixin.generate
        transformers.GenerationMixin.generate = lambda self, *a, **k: generate_on(self, *a,
                                                                                 **{**k, "synced_gpus": True})
    rebel.main(rebel.parse_config(rebel.Config, online_flags(
        model, prompts, output_dir, reward_fn=reward, total_episodes=8, batch_size=8, max_new_tokens=32,
        rollout_block=4, epochs_per_batch=1, save_every=0, save_final="false")))


def online_bench(folder="runs/bench_online", repeats=3):
    """Rollout seconds of one online update on 2 processes, gathered once vs plain generate (median of `repeats`)."""
    os.makedirs(folder, exist_ok=True)
    model = make_model(os.path.join(folder, "model"), hidden=256, layers=8, heads=8, kv_heads=4, vocab_size=2048)
    prompts = write_prompts(os.path.join(folder, "prompts.jsonl"), 16)
    with open(os.path.join(folder, "rewards.py"), "w") as f:
        f.write(ONLINE_REWARD)
    seconds = {"gather": [], "plain": []}
    for r in range(repeats):
        for mode in seconds:
            out = os.path.join(folder, f"{mode}_{r}")
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                       "online_bench_worker", mode, model, prompts, os.path.join(folder, "rewards.py:length"), out]
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            seconds[mode].append(next(m["rollout_s"] for m in read_jsonl(os.path.join(out, "metrics.jsonl"))
                                      if "rollout_s" in m))
    median = {mode: sorted(v)[len(v) // 2] for mode, v in seconds.items()}
    for mode, v in seconds.items():
        print(f"{mode:>7}: rollout {median[mode]:.2f} s (median of {len(v)}; min {min(v):.2f}, max {max(v):.2f})")
    print(f"gathered once per rollout / plain generate: {median['plain'] / median['gather']:.2f}× faster")
    return median


if __name__ == "__main__":
    if sys.argv[1:2] == ["demo"]:  # python test_rebel.py demo [output folder]
        run_demo(*sys.argv[2:3])
    elif sys.argv[1:2] == ["online_bench"]:  # python test_rebel.py online_bench [folder]
        online_bench(*sys.argv[2:3])
    elif sys.argv[1:2] == ["online_bench_worker"]:
        online_bench_worker(*sys.argv[2:])
    elif sys.argv[1:2] == ["memory_probe"]:
        memory_probe(*sys.argv[2:])
    elif sys.argv[1:2] == ["gpu"]:  # python test_rebel.py gpu [output folder] [--smoke]
        sys.exit(gpu_check(sys.argv[2:]))
    else:
        sys.exit(
            "usage: python test_rebel.py demo [output folder] | gpu [output folder] | online_bench [folder]   (the"
            " tests: pytest -q test_rebel.py)"
        )
