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
    eval_micro_batch_size: int = arg(8, "pairs per forward per process in the no-grad reference and eval passes")
    max_prompt_len: int = arg(1024, "drop pairs whose templated prompt is longer (tokens)")
    max_response_len: int = arg(2048, "drop pairs with a longer response (tokens, end-of-turn included)")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this; 0 = no clipping (the paper)")
    dtype: str = arg("auto", "compute dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16 or float32; master weights are fp32")
    activation_checkpointing: bool = arg(True, "recompute decoder layers in backward to save memory")
    logprob_chunk: int = arg(256, "response tokens per lm_head chunk (bounds the memory of the logits)")
    seed: int = arg(555134, "seed of data order and eval hold-out")
    eval_every: int = arg(50, "evaluate every this many updates (and at start and end); 0 = only at start and end")
    save_every: int = arg(100, "resumable checkpoint every this many updates; 0 = only at the end")
    resume: bool = arg(False, "continue from the last checkpoint in output_dir")
    stop_after: int = arg(0, "end this run after this many updates, with a checkpoint (e.g. a job's time limit); 0 = run to the end")
    save_final: bool = arg(True, "write a consolidated Hugging Face model to output_dir/final")


# what a resumed run may not change: it would change the data, the reference or the optimisation already done
FIXED_ON_RESUME = ("model", "dataset", "train_split", "eval_split", "eval_size", "seed", "eta", "lr", "beta1", "beta2",
                   "adam_eps", "weight_decay", "warmup_ratio", "temperature", "total_episodes", "batch_size",
                   "max_prompt_len", "max_response_len", "max_grad_norm", "dtype")


# ----------------------------------------------------------------------------- helpers shared with sibling scripts

def to_bool(text):
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")


def parse_config(cls, argv=None):
    """Dataclass -> argparse, so `--help` lists every field with its one-line doc. Booleans: `--flag` or `--flag false`."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {"bool": to_bool, "int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        extra = dict(nargs="?", const=True) if kind is to_bool else {}
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"], **extra)
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
        backend, gpu = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=gpu)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=gpu)
    return rank, world_size, device


def from_rank0(value):
    """Rank 0's value on every rank: decisions read from a shared filesystem must not differ between processes."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side=padding_side)
    except (OSError, ValueError) as e:  # no such folder or Hub id, no access, offline
        fail(f"could not load the tokenizer of {name!r}: {str(e).splitlines()[0]}")
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


# ----------------------------------------------------------------------------- data

def pick_column(columns, names, where):
    for name in names:
        if name in columns:
            return name
    fail(f"{where}: missing column {' or '.join(map(repr, names))} (columns: {', '.join(columns)})")


def tokenize_pairs(rows, tokenizer, where, rank=0, world_size=1):
    """Chat-template each pair. prompt ids = template of the user turn(s) + generation prompt; response ids = the tokens
    the template adds for the assistant turn, end-of-turn token included. Rewards are checked here, before any model work.
    Each process does every world_size-th row; all get all pairs (one dict per row, `index` = its row in the split)."""
    cols = rows.column_names
    columns = [pick_column(cols, names, where) for names in
               (["prompt"], ["chosen"], ["rejected", "reject"], ["chosen_reward"], ["rejected_reward", "reject_reward"])]
    pairs, error = [], None
    for i in tqdm(range(rank, len(rows), world_size), desc=f"tokenize {where}", unit="pair", disable=rank != 0 or len(rows) < 1000):
        try:
            pairs.append(tokenize_row(rows[i], i, columns, tokenizer, where))
        except SystemExit as e:  # a bad row: every process must stop with the first one's message, not hang below
            error = (i, str(e))
            break
    parts = [(pairs, error)]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, (pairs, error))
    errors = sorted(e for _, e in parts if e)
    if errors:
        raise SystemExit(errors[0][1])
    return sorted((p for part, _ in parts for p in part), key=lambda p: p["index"])


def tokenize_row(row, i, columns, tokenizer, where):
    prompt_col, chosen_col, rejected_col, chosen_reward_col, rejected_reward_col = columns
    rewards = []
    for col in (chosen_reward_col, rejected_reward_col):
        value = row[col]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(f"{where} row {i}: column {col!r} must be a finite number, got {value!r}")
        rewards.append(float(value))
    messages = chat_messages(row[prompt_col], f"{where} row {i}")
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    responses = []
    for col in (chosen_col, rejected_col):
        if not isinstance(row[col], str):
            fail(f"{where} row {i}: column {col!r} must be a string (the assistant's response), got {type(row[col]).__name__}")
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row[col]}], tokenize=False)
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[:len(prompt_ids)] != prompt_ids:
            fail(f"{where} row {i}: the templated prompt is not a prefix of the templated conversation; "
                 "this chat template cannot be split into prompt and response tokens")
        responses.append(full_ids[len(prompt_ids):])
    return dict(index=i, prompt_ids=prompt_ids, chosen_ids=responses[0], rejected_ids=responses[1],
                chosen_reward=rewards[0], rejected_reward=rewards[1])


def filter_by_length(pairs, max_prompt_len, max_response_len, where):
    """Drop pairs over the limits (like the authors' filter) and say how many, why, and how many tokens that was."""
    kept, dropped = [], {"prompt": [], "response": []}
    for p in pairs:
        if len(p["prompt_ids"]) > max_prompt_len:
            dropped["prompt"].append(p)
        elif max(len(p["chosen_ids"]), len(p["rejected_ids"])) > max_response_len:
            dropped["response"].append(p)
        else:
            kept.append(p)
    if dropped["prompt"] or dropped["response"]:
        tokens = sum(map(pair_tokens, dropped["prompt"] + dropped["response"]))
        print0(f"{where}: dropped {len(dropped['prompt'])} pairs with a prompt > {max_prompt_len} tokens and "
               f"{len(dropped['response'])} with a response > {max_response_len} tokens ({tokens} tokens); "
               f"{len(kept)} of {len(pairs)} pairs kept")
    if not kept:
        fail(f"{where}: no pair left after the length filter (max_prompt_len={max_prompt_len}, max_response_len={max_response_len})")
    return kept


def load_pairs(cfg, tokenizer):
    """Train and eval pairs, tokenised and length-filtered. Without an eval split (e.g. one .jsonl file), eval_size
    seeded rows of the train data are held out and never trained on."""
    single_file = os.path.isfile(cfg.dataset)  # one data file is one split
    train_rows = load_split(cfg.dataset, "train" if single_file else cfg.train_split)
    if train_rows is None:
        fail(f"dataset {cfg.dataset!r} has no split {cfg.train_split!r}")
    eval_rows = None if single_file else load_split(cfg.dataset, cfg.eval_split)
    held_out = set()
    if eval_rows is None and cfg.eval_size > 0:
        if cfg.eval_size >= len(train_rows):
            fail(f"--eval_size {cfg.eval_size} leaves nothing to train on ({len(train_rows)} rows in {cfg.dataset})")
        held_out = set(torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.eval_size].tolist())
        print0(f"no eval split {cfg.eval_split!r} in {cfg.dataset}: holding out {cfg.eval_size} seeded rows of the train data")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    pairs = tokenize_pairs(train_rows, tokenizer, f"{cfg.dataset}[{'train' if single_file else cfg.train_split}]", rank, world_size)
    train_pairs = [p for p in pairs if p["index"] not in held_out]
    eval_pairs = [p for p in pairs if p["index"] in held_out]
    if eval_rows is not None:
        eval_pairs = tokenize_pairs(eval_rows, tokenizer, f"{cfg.dataset}[{cfg.eval_split}]", rank, world_size)
    train_pairs = filter_by_length(train_pairs, cfg.max_prompt_len, cfg.max_response_len, "train")
    if eval_pairs:
        eval_pairs = filter_by_length(eval_pairs, cfg.max_prompt_len, cfg.max_response_len, "eval")
    return train_pairs, eval_pairs


def pair_tokens(pair):
    return 2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def epoch_order(num_pairs, seed, epoch):
    """A permutation of the pairs that depends only on (seed, epoch): never on the number of processes."""
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def global_batch(num_pairs, batch_size, update, seed):
    """Pair positions of update `update` (0-based): consecutive slices of an endless stream of seeded epoch permutations."""
    stream_start = update * batch_size
    positions = []
    while len(positions) < batch_size:
        epoch, offset = divmod(stream_start + len(positions), num_pairs)
        positions += epoch_order(num_pairs, seed, epoch)[offset:offset + batch_size - len(positions)]
    return positions


def padded_width(pair):
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


def micro_batches(pairs, positions, micro_batch_size):
    """Sort a batch by padded length, longest first (an out-of-memory shows at once), and cut it into micro-batches,
    so each pads only to a similar neighbour's length."""
    ordered = sorted(positions, key=lambda i: (-padded_width(pairs[i]), i))
    return [[pairs[i] for i in ordered[s:s + micro_batch_size]] for s in range(0, len(ordered), micro_batch_size)]


def for_rank(batches, rank, world_size):
    """Deal micro-batches round-robin (they are sorted by length, so ranks get similar work). Every rank must run the
    same number of forwards under FSDP, so short ranks get `None` placeholders: run them as dummies, drop the result."""
    mine = batches[rank::world_size]
    return mine + [None] * (math.ceil(len(batches) / world_size) - len(mine))


def collate(pairs, pad_id):
    """Chosen sequences then rejected ones, right-padded to the longest in this micro-batch only (causal attention
    never looks right, so the pads need no attention mask). Where the log-probs count, every response token,
    end-of-turn included: `positions` index the flattened [sequence × width] hidden states that predict them (one
    before each), `rows` their sequence. Built here on the CPU, so the GPU never waits on a boolean mask."""
    sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    width = max(len(q) + len(r) for q, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    positions, rows = [], []
    for row, (q, r) in enumerate(sequences):
        input_ids[row, :len(q) + len(r)] = torch.tensor(q + r)
        positions += range(row * width + len(q) - 1, row * width + len(q) + len(r) - 1)
        rows += [row] * len(r)
    return input_ids, torch.tensor(positions), torch.tensor(rows)


def to_device(tensors, device):
    """Pinned host memory and non-blocking copies on GPU: the CPU keeps queueing work while the GPU computes."""
    return [t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t for t in tensors]


# ----------------------------------------------------------------------------- model

def build_model(cfg, device, dtype):
    """fp32 master weights, FSDP2 on every decoder layer then the root; `dtype` compute (bf16 on GPU). Only rank 0
    reads the checkpoint (one fp32 copy in host memory, not one per process); the others build an empty
    model on the meta device and receive their shards from it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(cfg.model, attention_dropout=0.0)  # no dropout (as the paper): log-probs must be deterministic
    starting_dtype, full, buffers = config.dtype or torch.float32, {}, None  # the final model is saved in it (bf16 for Llama-3)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if dist.get_rank() == 0:
        loaded = AutoModelForCausalLM.from_pretrained(cfg.model, config=config, dtype=torch.float32)
        full = loaded.state_dict()
        buffers = {n: b for n, b in loaded.named_buffers() if n not in full}  # not in checkpoints, e.g. rotary inv_freq
        model.generation_config = loaded.generation_config  # Llama-3's two stop tokens, saved with the final model
    model.starting_dtype = starting_dtype
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    head = model.get_output_embeddings()
    if head.bias is not None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        fail(f"{cfg.model}: its output head has a bias, logit soft-capping or scaling, which response_logprobs does not apply")
    if cfg.activation_checkpointing:
        # transformers < 5.23 only has the older name, gradient_checkpointing_enable (same arguments)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)({"use_reentrant": False})
    model.train()  # (activation checkpointing only acts in train mode)
    mixed_precision = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mixed_precision)
    fully_shard(model, mp_policy=mixed_precision)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, value in from_rank0(buffers).items():
        model.get_buffer(name).copy_(value)
    model.response_logprobs = response_logprobs.__get__(model)  # a method, so that FSDP can gather the root around it
    register_fsdp_forward_method(model, "response_logprobs")
    return model


# ----------------------------------------------------------------------------- log-probs and the loss

def token_logprobs(hidden, weight, targets, temperature):
    """log softmax(h·Wᵀ / T)[target] for a chunk of positions, in fp32 (dividing in place: no second vocabulary-sized copy)."""
    logits = F.linear(hidden, weight).float().div_(temperature)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(self, input_ids, positions, rows, temperature, chunk_size):
    """Sum of log πθ(token | prefix) over each sequence's response tokens (see `collate`). A method of the policy
    (registered with FSDP so the root's parameters are gathered): the full-vocabulary logits are never built for all
    positions, only for response positions, `chunk_size` at a time, each chunk recomputed in backward, not stored."""
    hidden = self.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [response tokens, hidden]
    targets = input_ids.reshape(-1).index_select(0, positions + 1)
    weight = self.get_output_embeddings().weight
    pieces = []
    for s in range(0, len(targets), chunk_size):
        args = (hidden[s:s + chunk_size], weight, targets[s:s + chunk_size], temperature)
        pieces.append(torch.utils.checkpoint.checkpoint(token_logprobs, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else token_logprobs(*args))
    per_token = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(len(input_ids), device=input_ids.device).index_add(0, rows, per_token)


def rebel_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, reward_chosen, reward_rejected, eta):
    """Per-pair squared regression error: the REBEL update, Eq. (1) of Gao et al. 2024, times η² (the authors' code
    form; same minimiser): ((ln πθ(y|x)/πref(y|x) − ln πθ(y'|x)/πref(y'|x)) − η·(r(x,y) − r(x,y')))²."""
    logratio_diff = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    return (logratio_diff - eta * (reward_chosen - reward_rejected)) ** 2


@torch.no_grad()
def all_logprobs(model, pairs, cfg, rank, world_size, device, pad_id, desc):
    """{row index: (log π(chosen), log π(rejected))} for every pair, micro-batches sharded over processes, gathered."""
    batches = micro_batches(pairs, range(len(pairs)), cfg.eval_micro_batch_size)
    done = []
    for batch in tqdm(for_rank(batches, rank, world_size), desc=desc, unit="batch", disable=rank != 0, leave=False):
        logps = model.response_logprobs(*to_device(collate(batch or batches[0], pad_id), device), cfg.temperature, cfg.logprob_chunk)
        if batch is not None:
            done.append((batch, logps.view(2, len(batch))))  # kept on the device: one host sync at the end
    results = [(p["index"], c, r) for batch, logps in done for p, (c, r) in zip(batch, logps.T.tolist())]
    model.reshard()  # FSDP keeps the root unsharded after a forward with no backward; the optimizer needs the shards
    gathered = [None] * world_size
    dist.all_gather_object(gathered, results)
    return {index: (c, r) for part in gathered for index, c, r in part}


def fingerprint(cfg, compute_dtype, splits):
    """What the reference log-probs depend on: the starting model, the pairs' tokens, the temperature and dtype."""
    h = hashlib.sha256(json.dumps([cfg.model, cfg.temperature, str(compute_dtype)]).encode())
    for name in ("config.json", "model.safetensors.index.json", "model.safetensors"):  # a local model's files
        path = os.path.join(cfg.model, name)
        if os.path.isfile(path):
            h.update(f"{name}:{os.path.getsize(path)}:{os.path.getmtime(path)}".encode())
    for split, pairs in splits.items():
        h.update(split.encode())
        for p in pairs:
            h.update(np.asarray([p["index"], -1, *p["prompt_ids"], -1, *p["chosen_ids"], -1, *p["rejected_ids"]], np.int64).tobytes())
    return h.hexdigest()


def reference_logprobs(model, splits, cfg, rank, world_size, device, pad_id, compute_dtype):
    """log πref of every train and eval pair, under the starting policy, with the same code as training. Cached as
    output_dir/ref_logprobs.jsonl (one row per pair) and reused when the model and the data are unchanged."""
    path, meta_path = os.path.join(cfg.output_dir, "ref_logprobs.jsonl"), os.path.join(cfg.output_dir, "ref_logprobs.meta.json")
    key, ref = fingerprint(cfg, compute_dtype, splits), None
    if rank == 0 and os.path.exists(meta_path) and json.load(open(meta_path)).get("fingerprint") == key:
        ref = {split: {} for split in splits}
        for line in open(path):
            row = json.loads(line)
            ref[row["split"]][row["index"]] = (row["chosen_logprob"], row["rejected_logprob"])
    if (ref := from_rank0(ref)) is not None:  # one decision for all processes
        print0(f"reference log-probs: reusing {path}")
        return ref
    start = time.time()
    ref = {split: all_logprobs(model, pairs, cfg, rank, world_size, device, pad_id, f"reference log-probs ({split})")
           for split, pairs in splits.items()}
    if rank == 0:
        rows = [dict(split=split, index=i, chosen_logprob=c, rejected_logprob=r)
                for split in ref for i, (c, r) in sorted(ref[split].items())]
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))
        atomic_write(meta_path, json.dumps(dict(fingerprint=key, model=cfg.model, temperature=cfg.temperature,
                                                dtype=str(compute_dtype), pairs={s: len(p) for s, p in splits.items()})))
    n = sum(len(p) for p in splits.values())
    print0(f"reference log-probs: {n} pairs in {time.time() - start:.1f}s ({n / (time.time() - start):.1f} pairs/s) -> {path}")
    return ref


def evaluate(model, pairs, ref, cfg, rank, world_size, device, pad_id):
    """Validation loss and sign agreement: the fraction of pairs whose chosen-minus-rejected log-ratio has the sign of Δr."""
    logps = all_logprobs(model, pairs, cfg, rank, world_size, device, pad_id, "eval")
    logp_c, logp_r, ref_c, ref_r = (torch.tensor([v[p["index"]][k] for p in pairs], dtype=torch.float64)
                                    for v, k in ((logps, 0), (logps, 1), (ref, 0), (ref, 1)))
    reward_c, reward_r = (torch.tensor([p[k] for p in pairs], dtype=torch.float64) for k in ("chosen_reward", "rejected_reward"))
    loss = rebel_loss(logp_c, logp_r, ref_c, ref_r, reward_c, reward_r, cfg.eta).mean().item()
    logratio_diff = (logp_c - ref_c) - (logp_r - ref_r)
    sign_align = ((logratio_diff * (reward_c - reward_r)) > 0).double().mean().item()
    return dict(val_loss=loss, sign_align=sign_align)


def lr_at(update, num_updates, cfg):
    """Linear warm-up over the first warmup_ratio of the updates, then cosine decay to 0. Update 0 gets lr/warmup
    (the authors' HF scheduler gives it 0, a wasted update)."""
    warmup = int(cfg.warmup_ratio * num_updates)
    if update < warmup:
        return cfg.lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, num_updates - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(output_dir):
    done = [d for d in glob.glob(os.path.join(output_dir, "checkpoints", "update_*"))
            if not d.endswith(".partial") and os.path.exists(os.path.join(d, "train_state.json"))]
    return max(done, key=lambda d: int(d.rsplit("_", 1)[1]), default=None)


def save_checkpoint(model, optimizer, update, cfg, rank):
    """A resumable, sharded checkpoint (torch.distributed.checkpoint). Written to a .partial folder and renamed when
    complete, so a crash while saving leaves the previous checkpoint usable; older ones are removed afterwards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(cfg.output_dir, "checkpoints", f"update_{update:06d}")
    partial = final + ".partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)
    if rank == 0:
        # rank 0's RNG (nothing in training draws random numbers; kept for forks that do)
        torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(partial, "rng.pt"))
        atomic_write(os.path.join(partial, "train_state.json"),
                     json.dumps(dict(update=update, pairs_seen=update * cfg.batch_size, config=dataclasses.asdict(cfg))))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in glob.glob(os.path.join(cfg.output_dir, "checkpoints", "update_*")):
            if old != final and not old.endswith(".partial"):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(model, optimizer, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.load(open(os.path.join(path, "train_state.json")))["update"]


def save_final(model, cfg, rank):
    """A consolidated Hugging Face checkpoint (safetensors + tokenizer) loadable by from_pretrained, vLLM, lm-eval."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoTokenizer
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = os.path.join(cfg.output_dir, "final")
    if rank == 0:
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, state_dict={k: v.to(model.starting_dtype) for k, v in state.items()})
        model.config.dtype = model.starting_dtype  # save_pretrained wrote the fp32 of the live weights
        model.config.save_pretrained(partial)
        AutoTokenizer.from_pretrained(cfg.model).save_pretrained(partial)  # as it was: without the pad set for training
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    dist.barrier()
    return final


# ----------------------------------------------------------------------------- main

def main(cfg):
    rank, world_size, device = init_distributed()
    per_update = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_update:
        fail(f"--batch_size {cfg.batch_size} must be a multiple of --micro_batch_size × processes = "
             f"{cfg.micro_batch_size} × {world_size} = {per_update}")
    accumulation = cfg.batch_size // per_update
    num_updates = cfg.total_episodes // cfg.batch_size
    if num_updates < 1:
        fail(f"--total_episodes {cfg.total_episodes} is less than one batch of {cfg.batch_size} pairs")
    dtype = compute_dtype(cfg.dtype, device)
    if dtype == torch.float16:
        fail("--dtype float16 would need loss scaling, which rebel.py does not do: use bfloat16 or float32")
    checkpoint = from_rank0(latest_checkpoint(cfg.output_dir))  # one decision for all processes
    if checkpoint and not cfg.resume:
        fail(f"{cfg.output_dir} holds a checkpoint of an earlier run: add --resume to continue it, or pick another --output_dir")
    if checkpoint:
        state = json.load(open(os.path.join(checkpoint, "train_state.json")))
        changed = [f"--{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in state["config"].items()
                   if k in FIXED_ON_RESUME and v != getattr(cfg, k)]
        if changed:
            fail(f"--resume: {checkpoint} was made with other settings ({'; '.join(changed)}); resume with those, or use another --output_dir")
        if state["update"] == num_updates and os.path.isdir(os.path.join(cfg.output_dir, "final")):
            print0(f"{cfg.output_dir}: this run is finished ({num_updates} updates; the model is in final/)")
            dist.destroy_process_group()
            return
    os.makedirs(cfg.output_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    # data: read, validate and tokenise everything before the model is loaded
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs = load_pairs(cfg, tokenizer)
    splits = {"train": train_pairs, "eval": eval_pairs} if eval_pairs else {"train": train_pairs}
    mean_tokens = sum(map(pair_tokens, train_pairs)) / len(train_pairs)
    print0(f"processes {world_size} | device {device.type} | compute dtype {dtype} | train pairs {len(train_pairs)} | "
           f"eval pairs {len(eval_pairs)} | mean tokens per pair {mean_tokens:.0f}\n"
           f"updates {num_updates} of {cfg.batch_size} pairs = {cfg.micro_batch_size} per forward × {accumulation} "
           f"accumulation × {world_size} processes | warm-up {int(cfg.warmup_ratio * num_updates)} updates | "
           f"epochs {num_updates * cfg.batch_size / len(train_pairs):.2f} | "
           f"{cfg.total_episodes - num_updates * cfg.batch_size} of total_episodes left over (not a whole batch)")

    model = build_model(cfg, device, dtype)
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    ref = reference_logprobs(model, splits, cfg, rank, world_size, device, pad_id, dtype)
    start_update = load_checkpoint(model, optimizer, checkpoint) if checkpoint else 0
    if checkpoint:
        print0(f"resumed from {checkpoint} at update {start_update}")
    elif cfg.resume:
        print0(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints, starting from scratch")
    if rank == 0:  # keep the records up to the checkpoint only, so that none is duplicated
        old = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
        atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in old if checkpoint and r["update"] <= start_update))

    def log_eval(update):
        if eval_pairs:
            record = dict(update=update, **evaluate(model, eval_pairs, ref["eval"], cfg, rank, world_size, device, pad_id))
            print0(f"eval @ update {update}: val_loss {record['val_loss']:.4g} | sign_align {record['sign_align']:.3f}")
            if rank == 0:
                append_jsonl(metrics_path, record)

    if start_update == 0:
        log_eval(0)
    bar = tqdm(range(start_update, num_updates), desc="updates", unit="update", disable=rank != 0,
               initial=start_update, total=num_updates)
    for update in bar:
        start = time.time()
        lr = lr_at(update, num_updates, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        positions = global_batch(len(train_pairs), cfg.batch_size, update, cfg.seed)
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # Σ loss, Σ log-ratio chosen, rejected, Σ tokens
        for batch in micro_batches(train_pairs, positions, cfg.micro_batch_size)[rank::world_size]:
            logps = model.response_logprobs(*to_device(collate(batch, pad_id), device), cfg.temperature, cfg.logprob_chunk)
            # float64 for these few numbers (free): η·Δr is ~1e4 with η = 1e6
            ref_c, ref_r, reward_c, reward_r, tokens = to_device([torch.tensor(
                [[*ref["train"][p["index"]], p["chosen_reward"], p["rejected_reward"], pair_tokens(p)] for p in batch],
                dtype=torch.float64)], device)[0].T
            logp_c, logp_r = logps.double().view(2, len(batch))  # chosen rows first, then rejected
            losses = rebel_loss(logp_c, logp_r, ref_c, ref_r, reward_c, reward_r, cfg.eta)
            # this rank's share of the batch mean; FSDP averages gradients over ranks, giving the global batch mean
            (losses.sum() / (cfg.batch_size // world_size)).backward()
            stats += torch.stack([losses.sum(), (logp_c - ref_c).sum(), (logp_r - ref_r).sum(), tokens.sum()]).detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        dist.all_reduce(stats)
        stats = stats.tolist()
        loss = stats[0] / cfg.batch_size
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            fail(f"non-finite loss {loss} (grad norm {grad_norm}) at update {update + 1}; stopping without saving "
                 f"(last good checkpoint: {latest_checkpoint(cfg.output_dir)})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - start
        record = dict(update=update + 1, loss=loss, logratio_chosen=stats[1] / cfg.batch_size,
                      logratio_rejected=stats[2] / cfg.batch_size, lr=lr, grad_norm=grad_norm,
                      pairs_per_s=cfg.batch_size / seconds, tokens_per_s=stats[3] / seconds,
                      pairs_seen=(update + 1) * cfg.batch_size)
        if rank == 0:
            append_jsonl(metrics_path, record)
            bar.set_postfix(loss=f"{loss:.3g}", pairs_s=f"{record['pairs_per_s']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
            tqdm.write(f"update {update + 1}/{num_updates} | loss {loss:.4g} | logratio chosen {record['logratio_chosen']:+.4f} "
                       f"rejected {record['logratio_rejected']:+.4f} | lr {lr:.3g} | grad norm {grad_norm:.3g} | "
                       f"{record['pairs_per_s']:.2f} pairs/s | {record['tokens_per_s']:.0f} tokens/s")
        if (cfg.eval_every and (update + 1) % cfg.eval_every == 0) or update + 1 == num_updates:
            log_eval(update + 1)
        stop = update + 1 - start_update == cfg.stop_after
        if (cfg.save_every and (update + 1) % cfg.save_every == 0) or update + 1 == num_updates or stop:
            save_checkpoint(model, optimizer, update + 1, cfg, rank)
        if stop and update + 1 < num_updates:
            print0(f"stopping after {cfg.stop_after} updates (--stop_after); continue with the same command and --resume")
            dist.destroy_process_group()
            return
    bar.close()
    if cfg.save_final:
        print0(f"final model -> {save_final(model, cfg, rank)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config(Config))
