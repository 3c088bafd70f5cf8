"""Sample responses from a policy: the first step of each REBEL iteration (Gao et al. 2024, arXiv 2404.16767).

Formats every prompt with the policy's chat template (the user turn(s) and the generation prompt) and samples
num_samples responses per prompt: temperature 0.8, top_p 0.9, no top_k, at most 2048 new tokens, ending at the model's
end tokens. Defaults reproduce the authors' run: 5 samples from Meta-Llama-3-8B-Instruct for each UltraFeedback prompt.
Writes one row per prompt, in input order, as a .jsonl or .parquet file that `datasets` loads:

    prompt_id    the input's `prompt_id` column, else the row index
    prompt       as in the input: a string (one user turn) or a list of {"role", "content"} messages
    responses    num_samples strings: the tokens before the first stop token, special tokens removed
    truncated    num_samples bools: true when the response hit max_new_tokens without a stop token
    num_tokens   num_samples ints: tokens generated, the stop token included

score.py scores the responses and picks the pairs that rebel.py trains on.

    # one process (CPU or one GPU), e.g. a tiny run:
    python generate.py --model path/to/model --prompts prompts.jsonl --limit 100 --max_new_tokens 256 --output gen.jsonl
    # one node, 8 GPUs, one model replica per GPU (the paper's run):
    torchrun --nproc_per_node=8 generate.py --output runs/iter_1/generations.jsonl
    # several nodes (run on every node; --output on a filesystem they all see):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 generate.py --output ...
    # after a crash or a job's time limit: the same command again continues where it stopped
    # vLLM instead of transformers' generate: add --engine vllm (pip install vllm)

The prompts, sorted by templated length, are cut into blocks of batch_size; block b is sampled in one call seeded
from (seed, b), whichever process runs it, so the output depends on seed and batch_size but not on the number of
processes. Each finished block is saved atomically as OUTPUT.shards/block_NNNNNN.jsonl; a rerun skips saved blocks
(refusing blocks made with other settings), and the output is merged from the shards at the end. The shards are
kept: delete OUTPUT.shards to sample afresh.
"""
import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from rebel import (arg, atomic_write, chat_messages, compute_dtype, fail, from_rank0, init_distributed, load_split, load_tokenizer,
                   parse_config, print0)


@dataclass
class Config:
    model: str = arg("meta-llama/Meta-Llama-3-8B-Instruct", "policy to sample from (Hub id or local folder)")
    prompts: str = arg("allenai/ultrafeedback_binarized_cleaned_train", "Hub id, datasets folder, or .json/.jsonl/.parquet file")
    split: str = arg("train", "split of --prompts to read")
    prompt_column: str = arg("prompt", "column holding each prompt: a string (one user turn) or a list of messages")
    num_samples: int = arg(5, "responses sampled per prompt")
    temperature: float = arg(0.8, "sampling temperature")
    top_p: float = arg(0.9, "nucleus sampling threshold (1 = off); top_k is always off, as in the paper")
    max_new_tokens: int = arg(2048, "most tokens per response; a response still going is cut and marked truncated")
    output: str = arg("runs/generations.jsonl", "output file (.jsonl or .parquet); finished blocks go to OUTPUT.shards/")
    seed: int = arg(0, "sampling seed (block b is seeded from seed and b)")
    limit: int = arg(0, "use only the first this many prompts; 0 = all")
    batch_size: int = arg(16, "prompts per generate call (× num_samples sequences); also the block of sharding and resuming")
    dtype: str = arg("auto", "auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32")
    engine: str = arg("hf", "hf (transformers generate with the KV cache) or vllm (needs `pip install vllm`)")


# ----------------------------------------------------------------------------- blocks, shards and output (score.py uses these too)

def derive_seed(*keys):
    """A seed from (seed, block, ...): well-separated streams for neighbouring keys."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def fingerprint(items):
    """A short hash of the input, so that shards of one input are never merged with another's."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item).encode())
    return h.hexdigest()[:16]


def open_shards(output, settings, rank):
    """OUTPUT.shards/ with a manifest of what its blocks depend on. Blocks of a run with other settings are refused."""
    shards, settings = output + ".shards", json.loads(json.dumps(settings))  # settings as they read back
    manifest = os.path.join(shards, "manifest.json")
    if os.path.exists(manifest):
        old = json.load(open(manifest))
        changed = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(old.keys() | settings.keys()) if old.get(k) != settings.get(k)]
        if changed:
            fail(f"{shards} holds blocks made with other settings ({'; '.join(changed)}); rerun with those settings "
                 f"to resume, or delete {shards} or choose another --output to start afresh")
    elif rank == 0:
        os.makedirs(shards, exist_ok=True)
        atomic_write(manifest, json.dumps(settings, indent=1))
    return shards


def run_blocks(blocks, shards, make_worker, rank, world_size, rate_unit):
    """Do the blocks not yet saved in `shards`, dealt round-robin over the processes (so they finish within about a
    block of each other), each saved atomically when done. make_worker() loads the model and returns
    work(block_index, rows) -> (shard rows, count for the rate shown). Returns all blocks' rows, in block order, on rank 0."""
    path = lambda b: os.path.join(shards, f"block_{b:06d}.jsonl")  # noqa: E731
    todo = from_rank0([b for b in range(len(blocks)) if not os.path.exists(path(b))])  # one list for all processes
    print0(f"{len(blocks) - len(todo)} of {len(blocks)} blocks already saved in {shards}; {len(todo)} to do on {world_size} processes")
    work = make_worker() if todo else None  # every process loads the model when any does (vLLM's data parallel needs all)
    mine = todo[rank::world_size]
    bar = tqdm(total=sum(len(blocks[b]) for b in mine), unit="prompt", disable=rank != 0 or not mine,
               desc="prompts" if world_size == 1 else f"prompts (process 0 of {world_size})")
    start, count = time.time(), 0
    for b in mine:
        rows, n = work(b, blocks[b])
        atomic_write(path(b), "".join(json.dumps(row) + "\n" for row in rows))
        count += n
        bar.update(len(blocks[b]))
        bar.set_postfix_str(f"{count / (time.time() - start):.0f} {rate_unit}/s")
    bar.close()
    dist.barrier()  # every block is saved (ranks arrive within about a block of each other: well inside NCCL's timeout)
    return [json.loads(line) for b in range(len(blocks)) for line in open(path(b))] if rank == 0 else None


def check_output_path(path):
    if not path.endswith((".jsonl", ".parquet")):
        fail(f"--output {path}: expected a .jsonl or .parquet file")


def write_rows(path, rows):
    """A .jsonl or .parquet file that `datasets` loads, written so that a crash never leaves half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".parquet"):
        from datasets import Dataset
        tmp = f"{path}.tmp{os.getpid()}"
        Dataset.from_list(rows).to_parquet(tmp)
        os.replace(tmp, path)
    else:
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


# ----------------------------------------------------------------------------- sampling

def prompt_tokens(tokenizer, prompt, where):
    """The chat template of the prompt plus the generation prompt, as rebel.py tokenises it."""
    text = tokenizer.apply_chat_template(chat_messages(prompt, where), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_blocks(lengths, size):
    """Blocks of `size` prompts, longest first: neighbours pad little, and an out-of-memory shows in the first block.
    They depend only on the prompts and `size`, never on the number of processes."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + size] for s in range(0, len(order), size)]


def stop_token_ids(tokenizer, model):
    """The model's end tokens: generation_config's eos_token_id (Llama-3-Instruct: <|end_of_text|>, <|eot_id|>) and
    the tokenizer's eos."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def cut_at_stop(ids, stop_ids):
    """(tokens before the first stop token, truncated, tokens generated including the stop token). What follows the
    stop token is padding."""
    for t, token in enumerate(ids):
        if token in stop_ids:
            return ids[:t], False, t + 1
    return ids, True, len(ids)


@torch.no_grad()
def hf_sample(model, tokenizer, prompts, cfg, stop_ids, seed):
    """num_samples responses for each prompt (token ids): one left-padded `generate` call with the KV cache.
    Returns per prompt a list of (text, truncated, num_tokens)."""
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)  # the tokenizer pads on the left
    torch.manual_seed(seed)  # CPU and every GPU
    out = model.generate(**batch, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                         top_k=0,  # transformers applies top_k=50 unless told otherwise; the paper samples without
                         max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.num_samples,
                         eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    samples = []
    for ids in out[:, batch["input_ids"].shape[1]:].tolist():  # prompt-major: the samples of prompt i are rows i*K..i*K+K-1
        response, truncated, n = cut_at_stop(ids, set(stop_ids))
        samples.append((tokenizer.decode(response, skip_special_tokens=True), truncated, n))
    return [samples[i:i + cfg.num_samples] for i in range(0, len(samples), cfg.num_samples)]


def load_vllm(cfg, world_size):
    """One vLLM engine per process. Under torchrun, vLLM's data-parallel "external launcher" mode (its
    torchrun_dp_example): each process is one replica, and this script gives each its own blocks."""
    from vllm import LLM
    parallel = dict(distributed_executor_backend="external_launcher", data_parallel_size=world_size) if world_size > 1 else {}
    return LLM(model=cfg.model, dtype=cfg.dtype, seed=cfg.seed, **parallel)


def vllm_sample(llm, prompts, cfg, stop_ids, seeds):
    """As hf_sample, with vLLM; each prompt has its own seed, so its samples do not depend on the batch."""
    from vllm import SamplingParams
    params = [SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=-1,  # -1: no top_k
                             max_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids, seed=seed) for seed in seeds]
    # token ids, not text: vLLM would add a second <|begin_of_text|> to the templated text
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [[(c.text, c.finish_reason == "length", len(c.token_ids)) for c in o.outputs] for o in outputs]


# ----------------------------------------------------------------------------- main

def main(cfg):
    rank, world_size, device = init_distributed()
    check_output_path(cfg.output)
    if cfg.engine not in ("hf", "vllm"):
        fail(f"--engine must be hf or vllm, got {cfg.engine!r}")
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        fail("--engine vllm: vLLM is not installed (pip install vllm), or use --engine hf")
    for name in ("num_samples", "batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        fail(f"--seed must be 0 or more, got {cfg.seed}")
    dtype = compute_dtype(cfg.dtype, device)

    # prompts: read, check and template every one before the model is loaded
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    data = load_split(cfg.prompts, cfg.split)
    if data is None:
        fail(f"{cfg.prompts} has no split {cfg.split!r}")
    if cfg.prompt_column not in data.column_names:
        fail(f"{cfg.prompts}: missing column {cfg.prompt_column!r} (columns: {', '.join(data.column_names)})")
    if cfg.limit:
        data = data.select(range(min(cfg.limit, len(data))))
    prompts = list(data[cfg.prompt_column])
    prompt_ids = list(data["prompt_id"]) if "prompt_id" in data.column_names else list(range(len(data)))
    tokens = [prompt_tokens(tokenizer, p, f"{cfg.prompts} row {i}")
              for i, p in enumerate(tqdm(prompts, desc="template prompts", unit="prompt", disable=rank != 0 or len(prompts) < 1000))]
    if not tokens:
        fail(f"{cfg.prompts}: no prompts")
    blocks = make_blocks([len(t) for t in tokens], cfg.batch_size)
    stop_ids = stop_token_ids(tokenizer, cfg.model)
    settings = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "output"}, "prompts_sha256": fingerprint(tokens)}
    shards = open_shards(cfg.output, settings, rank)
    print0(f"{len(tokens)} prompts × {cfg.num_samples} samples | {len(blocks)} blocks of {cfg.batch_size} prompts | "
           f"{world_size} processes | engine {cfg.engine} | device {device.type} | dtype {dtype} | stop tokens {stop_ids} | "
           f"prompt tokens mean {np.mean([len(t) for t in tokens]):.0f} max {max(map(len, tokens))}")

    def make_worker():
        if cfg.engine == "vllm":
            llm = load_vllm(cfg, world_size)
            sample = lambda b, block: vllm_sample(llm, [tokens[i] for i in block], cfg, stop_ids,  # noqa: E731
                                                  [derive_seed(cfg.seed, i) for i in block])
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
            sample = lambda b, block: hf_sample(model, tokenizer, [tokens[i] for i in block], cfg, stop_ids,  # noqa: E731
                                                derive_seed(cfg.seed, b))

        def work(b, block):
            rows = [dict(index=i, prompt_id=prompt_ids[i], prompt=prompts[i], responses=[s[0] for s in samples],
                         truncated=[s[1] for s in samples], num_tokens=[s[2] for s in samples])
                    for i, samples in zip(block, sample(b, block))]
            return rows, sum(sum(row["num_tokens"]) for row in rows)
        return work

    rows = run_blocks(blocks, shards, make_worker, rank, world_size, "tokens")
    if rank == 0:
        rows.sort(key=lambda row: row["index"])  # input order
        for row in rows:
            del row["index"]
        write_rows(cfg.output, rows)
        samples = [(t, n) for row in rows for t, n in zip(row["truncated"], row["num_tokens"])]
        print0(f"{len(rows)} prompts × {cfg.num_samples} responses -> {cfg.output} | mean response {np.mean([n for _, n in samples]):.0f} "
               f"tokens | {sum(t for t, _ in samples)} of {len(samples)} responses hit max_new_tokens={cfg.max_new_tokens}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config(Config))
