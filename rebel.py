"""REBEL: Reinforcement Learning via Regressing Relative Rewards (Gao et al. 2024, arXiv 2404.16767).

Trains a causal LM on preference pairs (prompt, chosen, rejected, chosen_reward, rejected_reward) by regressing
the difference of two policy/reference log-ratios onto the scaled difference of the two rewards:

    loss = ( [log πθ(y|x) − log πref(y|x)] − [log πθ(y'|x) − log πref(y'|x)] − η·(r(x,y) − r(x,y')) )²

πref is the policy at the start of the iteration; its log-probs are computed once, before the first update, and
cached in output_dir/ref_logprobs.jsonl. The training loop is plain PyTorch with FSDP2 (`fully_shard`).

Defaults reproduce REBEL-Llama-3-Armo-iter_1 (Meta-Llama-3-8B-Instruct on Cornell-AGI/Ultrafeedback-Llama-3-Armo-iter_1).

    # one process (CPU or one GPU), e.g. a tiny run:
    python rebel.py --model path/to/model --dataset pairs.jsonl --total_episodes 64 --batch_size 8
    # one node, 8 GPUs (the paper's run):
    torchrun --nproc_per_node=8 rebel.py --output_dir runs/iter_1
    # several nodes (run on every node; see README for SLURM):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 rebel.py
    # resume after a crash: the same command plus --resume
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm


def arg(default, help):
    """A config field with its one-line --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = arg("meta-llama/Meta-Llama-3-8B-Instruct", "policy to train (Hub id or local folder); also πref")
    dataset: str = arg("Cornell-AGI/Ultrafeedback-Llama-3-Armo-iter_1", "Hub id, datasets folder, or .json/.jsonl/.parquet file")
    train_split: str = arg("train_prefs", "split to train on")
    eval_split: str = arg("test_prefs", "split to evaluate on; if the data has none, eval_size pairs are held out")
    eval_size: int = arg(1000, "pairs held out (seeded) for evaluation when the data has no eval split")
    output_dir: str = arg("runs/rebel", "where metrics, reference log-probs, checkpoints and the final model go")
    eta: float = arg(1e6, "η: the regression target is η·(r_chosen − r_rejected)")
    lr: float = arg(3e-7, "peak learning rate (AdamW)")
    beta1: float = arg(0.9, "AdamW β1")
    beta2: float = arg(0.95, "AdamW β2")
    adam_eps: float = arg(1e-8, "AdamW ε")
    weight_decay: float = arg(1e-6, "AdamW weight decay")
    warmup_ratio: float = arg(0.1, "fraction of updates with linear warm-up; cosine decay to 0 afterwards")
    temperature: float = arg(0.8, "logits are divided by this before log-softmax (the sampling temperature)")
    total_episodes: int = arg(60000, "pairs to train on in total (updates = total_episodes // batch_size)")
    batch_size: int = arg(128, "pairs per update, over all processes")
    micro_batch_size: int = arg(2, "pairs per forward per process (2 sequences each)")
    max_prompt_len: int = arg(1024, "drop pairs whose templated prompt is longer (tokens)")
    max_response_len: int = arg(2048, "drop pairs with a longer response (tokens, end-of-turn included)")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this; 0 = no clipping (the paper)")
    dtype: str = arg("auto", "compute dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16 or float32; master weights are fp32")
    activation_checkpointing: bool = arg(True, "recompute decoder layers in backward to save memory")
    logprob_chunk: int = arg(1024, "response tokens per lm_head chunk (bounds the memory of the logits)")
    seed: int = arg(555134, "seed of data order and eval hold-out")
    eval_every: int = arg(50, "evaluate every this many updates (and at start and end); 0 = only at start and end")
    save_every: int = arg(100, "resumable checkpoint every this many updates; 0 = only at the end")
    resume: bool = arg(False, "continue from the last checkpoint in output_dir")
    save_final: bool = arg(True, "write a consolidated Hugging Face model to output_dir/final")


# ----------------------------------------------------------------------------- helpers shared with sibling scripts

def parse_config(cls, argv=None):
    """Dataclass -> argparse, so `--help` lists every field with its one-line doc. Booleans: `--flag` or `--flag false`."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if f.type in (bool, "bool"):
            def to_bool(s, name=f.name):
                if s.lower() in ("1", "true", "yes", "on"):
                    return True
                if s.lower() in ("0", "false", "no", "off"):
                    return False
                raise argparse.ArgumentTypeError(f"--{name} expects true/false, got {s!r}")
            parser.add_argument(f"--{f.name}", type=to_bool, nargs="?", const=True, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return cls(**vars(parser.parse_args(argv)))


def init_distributed():
    """(rank, world_size, device). Under torchrun: NCCL on GPU, gloo on CPU. Alone: a 1-process gloo group, so
    the same FSDP code runs everywhere."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return rank, world_size, device


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def fail(message):
    """One clear line for the user, then exit (before any expensive work where possible)."""
    raise SystemExit(f"error: {message}")


def atomic_write(path, text):
    """Write a file so that a crash leaves either the old or the new version, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_split(source, split):
    """A datasets.Dataset from a Hub id, a folder saved by `save_to_disk`, a folder of data files, or one
    .json/.jsonl/.parquet file (which has a single split, 'train'). Returns None when the split does not exist."""
    import datasets
    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if os.path.isfile(source):
        kind = kinds.get(os.path.splitext(source)[1])
        if kind is None:
            fail(f"{source}: expected a .json, .jsonl or .parquet file")
        return datasets.load_dataset(kind, data_files={"train": source}, split="train") if split == "train" else None
    if os.path.isdir(source) and (os.path.exists(os.path.join(source, "dataset_dict.json"))
                                  or os.path.exists(os.path.join(source, "dataset_info.json"))):
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.Dataset):
            return data if split == "train" else None
        return data[split] if split in data else None
    if not os.path.isdir(source) and source.count("/") != 1:
        fail(f"dataset {source!r}: no such file or folder, and not a Hub id (owner/name)")
    try:
        available = datasets.get_dataset_split_names(source)
    except Exception as e:  # noqa: BLE001 — any loading failure is reported in one line
        fail(f"dataset {source!r} could not be opened: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return datasets.load_dataset(source, split=split) if split in available else None


def chat_messages(prompt, where):
    """A prompt is a string (one user turn) or a list of {'role', 'content'} messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    fail(f"{where}: prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}")


def load_tokenizer(name, padding_side="right"):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(name, padding_side=padding_side)
    if not tokenizer.chat_template:
        fail(f"tokenizer of {name} has no chat template; REBEL formats prompts and responses with it")
    if tokenizer.pad_token_id is None:  # Llama-3 has none; pads are masked out, so any id does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("bfloat16", "float16", "float32"):
        fail(f"--dtype must be auto, bfloat16, float16 or float32, got {name!r}")
    return getattr(torch, name)
