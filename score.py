"""Score sampled responses and pick the training pairs: the second step of each REBEL iteration (Gao et al. 2024).

Reads generate.py's output (columns prompt, responses, truncated), scores every (prompt, response) with a reward model
or with a Python function, and keeps per prompt the highest-reward response as `chosen` and the lowest as `rejected`.
A prompt is dropped, and counted, when any of its responses hit the token limit (--drop_truncated, the authors'
length filter), when chosen and rejected tie in reward, or when they are the same text. Writes every input column plus

    rewards                           num_samples floats, in the order of `responses`
    chosen, rejected                  the response texts
    chosen_reward, rejected_reward    their rewards

which is what rebel.py --dataset reads. Defaults reproduce the authors' scoring: RLHFlow/ArmoRM-Llama3-8B-v0.1 in bf16,
input = its chat template of [user, assistant] cut to the first 4096 tokens, reward = its `score` output (raw).

    # reward model, one process (CPU or one GPU):
    python score.py --input gen.jsonl --reward_model path/to/rm --output pairs.jsonl
    # a rule-based reward: a function (prompt, response) -> float in a Python file
    python score.py --input gen.jsonl --reward_fn my_rewards.py:correct --output pairs.jsonl
    # one node, 8 GPUs, one reward model per GPU, with a held-out test split (rebel.py's default split names):
    torchrun --nproc_per_node=8 score.py --input runs/iter_1/generations.jsonl --output runs/iter_1/pairs --test_size 1000
    # several nodes: as for generate.py. After a crash: the same command again continues where it stopped

Like generate.py, the rows are cut into blocks (block_size prompts) dealt over the processes; each scored block is
saved atomically in OUTPUT.shards/ and skipped by a rerun; rank 0 merges them and picks the pairs.
"""
import hashlib
import importlib.util
import math
import numbers
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from generate import check_output_path, fingerprint, open_shards, run_blocks, write_rows
from rebel import (BadRow, arg, chat_messages, check_config, check_writable, compute_dtype, fail, files_fingerprint, init_distributed,
                   load_split, load_tokenizer, open_tracker, parse_config, print0)


@dataclass
class Config:
    input: str = arg("runs/generations.jsonl", "generate.py's output: Hub id, datasets folder, or .json/.jsonl/.parquet file")
    split: str = arg("train", "split of --input to read")
    output: str = arg("runs/pairs.jsonl", "a .jsonl or .parquet file; with --test_size, a datasets folder (save_to_disk)")
    reward_model: str = arg("RLHFlow/ArmoRM-Llama3-8B-v0.1", "sequence-classification reward model (Hub id or local folder)")
    reward_fn: str = arg("", "instead of a reward model: path/to/file.py:name, a function (prompt, response) -> float")
    trust_remote_code: bool = arg(True, "run the reward model's own modelling code from its folder (ArmoRM needs it)")
    max_length: int = arg(4096, "reward-model input: the chat template of [user, assistant], cut to its first this many tokens")
    batch_size: int = arg(8, "sequences per reward-model forward, grouped by length")
    block_size: int = arg(128, "prompts per block: the unit of sharding over processes and of resuming")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = arg("auto", "reward model dtype: auto = bfloat16 on GPU, float32 on CPU")
    drop_truncated: bool = arg(True, "drop prompts with a response that hit generate.py's max_new_tokens (the authors' length filter)")
    test_size: int = arg(0, "hold out this many pairs (seeded) as split test_prefs, the rest being train_prefs; 0 = one file")
    seed: int = arg(0, "seed of the train/test split")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also send the run's summary (counts, reward statistics) to this tracker")

    def __post_init__(self):
        check_config(self, max_length="[1, inf)", batch_size="[1, inf)", block_size="[1, inf)", test_size="[0, inf)", seed="[0, inf)")
        if self.test_size and self.output.endswith((".jsonl", ".parquet", ".json")):
            fail(f"--test_size writes a datasets folder with splits train_prefs and test_prefs: give --output a folder, not {self.output}")
        if not self.test_size:
            check_output_path(self.output)


# ----------------------------------------------------------------------------- input and rewards

def check_rows(rows, where, need_truncated):
    """Fail on the first malformed row, naming it. Returns the number of responses per prompt."""
    if not rows:
        fail(f"{where}: no rows")
    for column in ["prompt", "responses"] + (["truncated"] if need_truncated else []):
        if column not in rows[0]:
            fail(f"{where}: missing column {column!r} (columns: {', '.join(rows[0])})"
                 + ("; without it, pass --drop_truncated false" if column == "truncated" else ""))
    k = len(rows[0]["responses"]) if isinstance(rows[0]["responses"], list) else None
    for i, row in enumerate(rows):
        try:
            chat_messages(row["prompt"])
        except BadRow as e:
            fail(f"{where} row {i}: {e}")
        responses = row["responses"]
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            fail(f"{where} row {i}: 'responses' must be a non-empty list of strings, got {str(responses)[:80]}")
        if len(responses) != k:
            fail(f"{where} row {i}: {len(responses)} responses where row 0 has {k}; every prompt needs the same number")
        if "response_ids" in row and not (isinstance(row["response_ids"], list) and len(row["response_ids"]) == k
                                          and all(isinstance(ids, list) for ids in row["response_ids"])):
            fail(f"{where} row {i}: 'response_ids' must be {k} lists of token ids, one per response")
        if need_truncated and (not isinstance(row["truncated"], list) or len(row["truncated"]) != k
                               or not all(isinstance(t, bool) for t in row["truncated"])):
            fail(f"{where} row {i}: 'truncated' must be a list of {k} booleans, one per response, got {str(row['truncated'])[:80]}")
    if k < 2:
        fail(f"{where}: {k} response per prompt; a pair needs at least 2")
    return k


def load_reward_fn(spec):
    """`path/to/file.py:name` -> the function."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        fail(f"--reward_fn must be path/to/file.py:function_name, got {spec!r}")
    if not os.path.isfile(path):
        fail(f"--reward_fn {spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        fail(f"--reward_fn {spec}: {path} has no function {name!r}")
    return getattr(module, name)


def check_reward(value, where):
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    fail(f"{where}: the reward must be a finite number, got {value!r}")


def function_rewards(fn, spec, rows, block):
    """{index, rewards} for each row of the block, from the Python reward function."""
    out = []
    for i in block:
        rewards = []
        for j, response in enumerate(rows[i]["responses"]):
            try:
                value = fn(rows[i]["prompt"], response)
            except Exception as e:  # noqa: BLE001 — any failure is reported with its row
                fail(f"--reward_fn {spec} raised on row {i}, response {j}: {type(e).__name__}: {e}")
            rewards.append(check_reward(value, f"--reward_fn {spec} on row {i}, response {j}"))
        out.append(dict(index=i, rewards=rewards, cut=0))
    return out


def reward_of(output):
    """ArmoRM's custom model returns `score` (one number per sequence); ordinary reward models return logits [B, 1]."""
    score = getattr(output, "score", None)
    return score if score is not None else output.logits[:, 0]


@torch.no_grad()
def model_rewards(model, tokenizer, rows, block, cfg, device):
    """{index, rewards, cut} for each row of the block: every response scored with the reward model's chat template,
    cut to the first max_length tokens (as the authors' truncation=True did), longest first in batches. Right padding
    with config.pad_token_id: both ordinary reward models and ArmoRM read the reward at the last token before it."""
    sequences, owner = [], []
    for i in block:
        messages = chat_messages(rows[i]["prompt"])
        for response in rows[i]["responses"]:
            text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
            sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            owner.append(i)
    cut = Counter(owner[s] for s, ids in enumerate(sequences) if len(ids) > cfg.max_length)
    sequences = [ids[:cfg.max_length] for ids in sequences]
    pad_id = getattr(model.config, "pad_token_id", None)
    batch_size = cfg.batch_size if pad_id is not None else 1  # without a pad id the model cannot find where a row ends
    order = sorted(range(len(sequences)), key=lambda s: -len(sequences[s]))
    rewards = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(sequences[batch[0]])  # the longest: sorted
        input_ids = torch.tensor([sequences[s] + [pad_id] * (width - len(sequences[s])) for s in batch], device=device)
        attention_mask = torch.tensor([[1] * len(sequences[s]) + [0] * (width - len(sequences[s])) for s in batch], device=device)
        for s, r in zip(batch, reward_of(model(input_ids=input_ids, attention_mask=attention_mask)).float().tolist()):
            rewards[s] = r
    out, k = [], len(rows[block[0]]["responses"])
    for n, i in enumerate(block):
        out.append(dict(index=i, rewards=[check_reward(r, f"reward model on row {i}, response {j}")
                                          for j, r in enumerate(rewards[n * k:(n + 1) * k])], cut=cut[i]))
    return out, sum(map(len, sequences))


# ----------------------------------------------------------------------------- pairs

def select_pair(rewards, responses, truncated, drop_truncated):
    """(chosen index, rejected index, why dropped or None): the best and the worst response (the first of equals)."""
    best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
    if drop_truncated and any(truncated):
        return best, worst, "a response hit the token limit"
    if rewards[best] == rewards[worst]:
        return best, worst, "all rewards equal"
    if responses[best] == responses[worst]:
        return best, worst, "chosen and rejected are the same text"
    return best, worst, None


def summary(pairs, all_rewards):
    chosen, rejected = [p["chosen_reward"] for p in pairs], [p["rejected_reward"] for p in pairs]
    lines = [f"{'reward':<12}{'mean':>12}{'median':>12}"]
    for name, values in (("chosen", chosen), ("rejected", rejected), ("all samples", all_rewards)):
        lines.append(f"{name:<12}{np.mean(values):>12.5g}{np.median(values):>12.5g}")
    return "\n".join(lines) + f"\nmean gap chosen − rejected: {np.mean(np.subtract(chosen, rejected)):.5g}"


# ----------------------------------------------------------------------------- main

def main(cfg):
    rank, world_size, device = init_distributed()
    check_writable(cfg.output + ".shards", "--output")
    reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
    dtype = compute_dtype(cfg.dtype, device)

    # input: read and check every row before the reward model is loaded
    data = load_split(cfg.input, cfg.split)
    if data is None:
        fail(f"{cfg.input} has no split {cfg.split!r}")
    rows = data.to_list()
    k = check_rows(rows, cfg.input, cfg.drop_truncated)
    tokenizer = None if reward_fn else load_tokenizer(cfg.reward_model)
    blocks = [list(range(s, min(s + cfg.block_size, len(rows)))) for s in range(0, len(rows), cfg.block_size)]
    settings = dict(reward=cfg.reward_fn or cfg.reward_model, max_length=None if reward_fn else cfg.max_length,
                    dtype=None if reward_fn else cfg.dtype, block_size=cfg.block_size,
                    # a reward function's file is part of what the rewards depend on: an edited one is not mixed with the old
                    reward_fn_sha256=hashlib.sha256(open(cfg.reward_fn.rpartition(":")[0], "rb").read()).hexdigest()[:16] if reward_fn else None,
                    input_sha256=fingerprint([row["prompt"], row["responses"], row.get("response_ids")] for row in rows))
    shards, old = open_shards(cfg.output, settings)
    print0(f"{len(rows)} prompts × {k} responses | reward {settings['reward']} | {len(blocks)} blocks of {cfg.block_size} "
           f"prompts | {world_size} processes | device {device.type}" + ("" if reward_fn else f" | dtype {dtype}"))

    def make_worker():
        if reward_fn:
            return (lambda b, block: (function_rewards(reward_fn, cfg.reward_fn, rows, block), len(block) * k)), None
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(cfg.reward_model, dtype=dtype,
                                                                   trust_remote_code=cfg.trust_remote_code).to(device).eval()
        return (lambda b, block: model_rewards(model, tokenizer, rows, block, cfg, device)), files_fingerprint(cfg.reward_model)

    scored = run_blocks(blocks, shards, (settings, old), make_worker, rank, world_size, "responses" if reward_fn else "tokens")
    if rank == 0:
        scored = {s["index"]: s for s in scored}
        pairs, dropped = [], Counter()
        for i, row in enumerate(rows):
            rewards = scored[i]["rewards"]
            chosen, rejected, why = select_pair(rewards, row["responses"], row.get("truncated") or [], cfg.drop_truncated)
            if why:
                dropped[why] += 1
                continue
            pairs.append({**row, "rewards": rewards, "chosen": row["responses"][chosen], "rejected": row["responses"][rejected],
                          "chosen_reward": rewards[chosen], "rejected_reward": rewards[rejected]})
            if "response_ids" in row:  # the sampled tokens, which rebel.py then trains on exactly
                pairs[-1].update(chosen_ids=row["response_ids"][chosen], rejected_ids=row["response_ids"][rejected])
        replaced = sorted({"rewards", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_ids", "rejected_ids"} & rows[0].keys())
        if replaced:
            print0(f"note: input columns {', '.join(replaced)} are replaced by this scoring")
        cut = sum(s["cut"] for s in scored.values())
        if cut:
            print0(f"{cut} of {len(rows) * k} reward-model inputs were cut to max_length={cfg.max_length} tokens")
        print0(f"dropped {sum(dropped.values())} of {len(rows)} prompts"
               + "".join(f" | {n} {why}" for why, n in sorted(dropped.items())) + f" | {len(pairs)} pairs kept")
        if len(pairs) <= cfg.test_size:
            fail(f"{len(pairs)} pairs kept: " + (f"not enough for --test_size {cfg.test_size} and a train split" if pairs else "nothing to train on"))
        print0(summary(pairs, [r for s in scored.values() for r in s["rewards"]]))
        log, close = open_tracker(cfg.report_to, os.path.dirname(os.path.abspath(cfg.output)), os.path.basename(cfg.output), vars(cfg))
        log({"score/pairs": len(pairs), "score/prompts_dropped": sum(dropped.values()), "score/inputs_cut": cut,
             "score/chosen_reward_mean": float(np.mean([p["chosen_reward"] for p in pairs])),
             "score/rejected_reward_mean": float(np.mean([p["rejected_reward"] for p in pairs]))}, 0)
        close()
        if cfg.test_size:
            from datasets import Dataset, DatasetDict
            held_out = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.test_size].tolist())
            splits = DatasetDict(train_prefs=Dataset.from_list([p for n, p in enumerate(pairs) if n not in held_out]),
                                 test_prefs=Dataset.from_list([p for n, p in enumerate(pairs) if n in held_out]))
            tmp = f"{cfg.output}.tmp{os.getpid()}"
            splits.save_to_disk(tmp)
            shutil.rmtree(cfg.output, ignore_errors=True)
            os.replace(tmp, cfg.output)
            print0(f"{len(pairs) - cfg.test_size} train_prefs + {cfg.test_size} test_prefs pairs -> {cfg.output}")
        else:
            write_rows(cfg.output, pairs)
            print0(f"{len(pairs)} pairs -> {cfg.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config(Config))
