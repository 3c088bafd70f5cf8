"""REBEL: Reinforcement Learning via Regressing Relative Rewards (Gao et al. 2024, arXiv 2404.16767).

REBEL trains a policy πθ by regressing the difference of two log-ratios onto the scaled difference of two rewards:

    loss = ( [log πθ(y|x) − log πref(y|x)] − [log πθ(y'|x) − log πref(y'|x)] − η·(r(x,y) − r(x,y')) )²     (Eq. 1)

Offline (default; REBEL-Llama-3-Armo-iter_k): pairs (prompt x, chosen y, rejected y', rewards) from generate.py →
score.py or a released dataset, their sampled token ids trained exactly; πref = the starting policy, its log-probs
computed once. Online (--online true; REBEL-OpenChat-3.5, REBEL-Llama-3): every update samples from the current policy
π_t, scores with a KL penalty to π_0, and regresses with πref = π_t (`rollout`). Plain PyTorch with FSDP2. Defaults
reproduce REBEL-Llama-3-Armo-iter_1 (Meta-Llama-3-8B-Instruct, η 1e6); recipes/ holds every model-card row.

    # one process (CPU or one GPU), a tiny run; settings may also come from a YAML/JSON file (--config run.yaml):
    python rebel.py --model path/to/model --dataset pairs.jsonl --total_episodes 64 --batch_size 8
    # one node, 8 GPUs (the paper's run):
    torchrun --nproc_per_node=8 rebel.py --output_dir runs/iter_1
    # several nodes (run on every node; README: SLURM):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 rebel.py
    # resume after a crash or a job's time limit: the same command plus --resume
    # online REBEL, one row of the model card (recipes/*.yaml hold each script's settings):
    torchrun --nproc_per_node=8 rebel.py --config recipes/rebel-llama-3.yaml
"""
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm


def arg(default, help, valid=None):
    """A setting, with its --help text and its valid interval ("(0, inf)", "[0, 1)", ...), checked before any work."""
    return dataclasses.field(default=default, metadata=dict(help=help + (f" (valid: {valid})" if valid else "")))


@dataclass
class Config:
    model: str = arg("meta-llama/Meta-Llama-3-8B-Instruct", "policy to train (Hub id or local folder); also πref")
    dataset: str = arg("Cornell-AGI/Ultrafeedback-Llama-3-Armo-iter_1", "pairs: Hub id, folder, .json/.jsonl/.parquet")
    train_split: str = arg("train_prefs", "split to train on")
    eval_split: str = arg("test_prefs", "offline: split to evaluate on; without it, eval_size pairs are held out")
    eval_size: int = arg(1000, "offline: pairs held out (seeded) when the data has no eval split", "[0, inf)")
    output_dir: str = arg("runs/rebel", "where metrics, reference log-probs, checkpoints and final/ go")
    eta: float = arg(1e6, "η: the regression target is η·(r_chosen − r_rejected)", "(0, inf)")
    lr: float = arg(3e-7, "peak learning rate (AdamW)", "(0, inf)")
    beta1: float = arg(0.9, "AdamW β1", "[0, 1)")
    beta2: float = arg(0.95, "AdamW β2", "[0, 1)")
    adam_eps: float = arg(1e-8, "AdamW ε", "(0, inf)")
    weight_decay: float = arg(1e-6, "AdamW weight decay", "[0, inf)")
    warmup_ratio: float = arg(0.1, "fraction of updates with linear warm-up, then cosine decay to 0", "[0, 1]")
    temperature: float = arg(0.8, "logits ÷ this before log-softmax: the sampling temperature", "(0, inf)")
    total_episodes: int = arg(60000, "pairs to train on (updates = total_episodes // batch_size)", "[1, inf)")
    batch_size: int = arg(128, "pairs per update, over all processes", "[1, inf)")
    micro_batch_size: int = arg(2, "pairs per forward per process (2 sequences each)", "[1, inf)")
    eval_micro_batch_size: int = arg(8, "pairs per no-grad forward (reference and eval passes)", "[1, inf)")
    max_prompt_len: int = arg(1024, "drop pairs whose templated prompt is longer (tokens)", "[1, inf)")
    max_response_len: int = arg(2048, "drop pairs with a longer response (tokens, end of turn included)", "[1, inf)")
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this; 0 = no clipping (the paper)", "[0, inf)")
    dtype: Literal["auto", "bfloat16", "float32"] = arg("auto", "compute: auto = bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = arg(True, "recompute decoder layers in backward to save memory")
    logprob_chunk: int = arg(256, "response tokens per lm_head chunk (bounds the logits' memory)", "[1, inf)")
    seed: int = arg(555134, "seed of the data order and the eval hold-out", "[0, 4294967296)")
    eval_every: int = arg(50, "offline: evaluate every N updates, and at the start and the end", "[0, inf)")
    save_every: int = arg(100, "resumable checkpoint every this many updates; 0 = at the end only", "[0, inf)")
    resume: bool = arg(False, "continue from the last checkpoint in output_dir")
    stop_after: int = arg(0, "end after this many updates, with a checkpoint (a job's time limit); 0 = off", "[0, inf)")
    save_final: bool = arg(True, "write a consolidated Hugging Face model to output_dir/final")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also send metrics.jsonl's records there")
    epochs_per_batch: int = arg(1, "passes over each update's pairs, one optimizer step each", "[1, inf)")
    lr_schedule: Literal["cosine", "linear"] = arg("cosine", "warm-up then cosine to 0, or linear to 0 (online)")
    num_layers_unfrozen: int = arg(0, "train the last N decoder layers, final norm, head; 0 = all", "[0, inf)")
    # online REBEL: every update samples from the current policy, scores, and regresses (ONLINE_DEFAULTS apply)
    online: bool = arg(False, "online REBEL: prompts from --dataset's --prompt_column, num_samples responses each")
    prompt_column: str = arg("prompt", "online: the column of prompts (a string, or a list of messages)")
    num_samples: int = arg(2, "online: responses per prompt; chosen/rejected = highest/lowest reward", "[2, inf)")
    max_new_tokens: int = arg(1024, "online: most tokens per response (top_p 1, no top_k)", "[1, inf)")
    rollout_block: int = arg(4, "online: prompts per generate call, seeded by (seed, update, block)", "[1, inf)")
    reward_model: str = arg("", "online: a reward model score.py scores with (Hub id or local folder)")
    reward_base: str = arg("meta-llama/Llama-2-7b-chat-hf", "online: config and tokenizer of a Starling reward model")
    reward_fn: str = arg("", "online: instead, path/to/file.py:name, a function (prompt, response) -> float")
    trust_remote_code: bool = arg(False, "online: run the Python code of the reward model's repository")
    reward_scale: float = arg(1.0, "online: the score is multiplied by this (the authors' Eurus-RM: 0.001)")
    missing_eos_penalty: float = arg(-4.0, "online: the score of a response without a stop token (replaces it)")
    kl_coef: float = arg(0.05, "online: reward = score − kl_coef·Σ(log π_t − log π_0) over the response", "[0, inf)")
    convert_hh: bool = arg(True, "a Human:/Assistant: prompt string (Anthropic HH, Nectar) is its turns")

    def __post_init__(self):
        check_config(self)


# the authors' online runs (REBEL-OpenChat-3.5, REBEL-Llama-3), applied with --online true to the settings not given
ONLINE_DEFAULTS = dict(dataset="allenai/ultrafeedback_binarized_cleaned_train", train_split="train", eta=1.0, lr=1e-7,
                       temperature=0.5, batch_size=32, warmup_ratio=0.0, lr_schedule="linear", epochs_per_batch=4,
                       num_layers_unfrozen=4)


# ----------------------------------------------------------------------------- the REBEL math

def rebel_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, reward_chosen, reward_rejected, eta):
    """The REBEL regression of Eq. (1), Gao et al. 2024, per pair, in the authors' code form (η² times the paper's
    1/η-scaled one: the same minimiser). Shape: every argument [pairs] → [pairs]. Log-probs are summed over a
    response's tokens (nats); rewards are in the reward's units and η converts them to nats; the result is nats².

        ( [ln πθ(y|x) − ln πref(y|x)] − [ln πθ(y'|x) − ln πref(y'|x)] − η·(r(x,y) − r(x,y')) )²
    """
    logratio_diff = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    return (logratio_diff - eta * (reward_chosen - reward_rejected)) ** 2  # Eq. (1)


def token_logprobs(hidden, weight, targets, temperature, bias=None, scale=1.0, softcap=None):
    """log softmax(z / T)[target] of a chunk of positions, z the logits as the model's own forward makes them:
    (h·Wᵀ + b)·scale, then c·tanh(·/c) where it soft-caps (see `head_transform`). hidden [n, d], weight [vocab, d],
    targets [n] → [n] nats, in fp32 (dividing in place: no second vocabulary-sized copy)."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits * (scale / softcap)) * (softcap / temperature)
    else:
        logits.div_(temperature / scale)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(self, input_ids, token_at, sequence_of, temperature, chunk_size):
    """log π(y|x) = Σₜ log π(yₜ | x, y<ₜ) of each sequence's response, at `temperature`: input_ids [S, W] and the
    index of every response token (see `collate`) → [S] nats. A method of the policy (registered with FSDP so that the
    root's parameters are gathered around it). The full-vocabulary logits are built only for response positions,
    `chunk_size` at a time, each chunk recomputed in backward rather than stored."""
    hidden = self.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, token_at)  # [response tokens, d]
    targets = input_ids.reshape(-1).index_select(0, token_at + 1)  # position p predicts token p + 1
    head, (scale, softcap) = self.get_output_embeddings(), head_transform(self.config)  # Granite's ÷8, Gemma-2's cap
    pieces = []
    for s in range(0, len(targets), chunk_size):
        args = (hidden[s:s + chunk_size], head.weight, targets[s:s + chunk_size], temperature, head.bias, scale,
                softcap)
        pieces.append(torch.utils.checkpoint.checkpoint(token_logprobs, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else token_logprobs(*args))
    per_token = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(len(input_ids), device=input_ids.device).index_add(0, sequence_of, per_token)


# ----------------------------------------------------------------------------- batches

def pair_tokens(pair):
    return 2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def global_batch(num_pairs, batch_size, update, seed):
    """Pair indices of update `update` (0-based): consecutive slices of an endless stream of epochs, each a permutation
    seeded by (seed, epoch) alone: never by the number of processes."""
    stream_start, picked = update * batch_size, []
    while len(picked) < batch_size:
        epoch, offset = divmod(stream_start + len(picked), num_pairs)
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        picked += order[offset:offset + batch_size - len(picked)]
    return picked


def micro_batches(pairs, picked, micro_batch_size):
    """The pairs at indices `picked`, longest first (an out-of-memory shows at once), cut into micro-batches, so that
    each pads only to a similar neighbour's length."""
    width = lambda p: len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))  # noqa: E731
    ordered = sorted(picked, key=lambda i: (-width(pairs[i]), i))
    return [[pairs[i] for i in ordered[s:s + micro_batch_size]] for s in range(0, len(ordered), micro_batch_size)]


def collate(sequences):
    """input_ids [S, W]: S (prompt ids, response ids) sequences, right-padded to the longest. Causal attention never
    looks right, so pads need no mask and their id is never seen: 0 (in every vocabulary; a tokenizer's pad id may
    not be, e.g. REBEL-Llama-3's [PAD]). token_at [n] indexes the flattened [S × W] hidden states that predict the n
    response tokens (end-of-turn included), one position before each; sequence_of [n] is each one's sequence. Built
    on the CPU, so the GPU never waits on a boolean mask."""
    width = max(len(q) + len(r) for q, r in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    token_at, sequence_of = [], []
    for s, (q, r) in enumerate(sequences):
        input_ids[s, :len(q) + len(r)] = torch.tensor(q + r)
        token_at += range(s * width + len(q) - 1, s * width + len(q) + len(r) - 1)
        sequence_of += [s] * len(r)
    return input_ids, torch.tensor(token_at), torch.tensor(sequence_of)


def pair_sequences(pairs):
    """The chosen sequences, then the rejected ones."""
    return [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]


# ----------------------------------------------------------------------------- passes over the pairs

def policy_logprobs(model, pairs, cfg, world):
    """[2, pairs] log π of the chosen (row 0) and rejected (row 1) responses of one micro-batch, nats, on the device."""
    sequences = to_device(collate(pair_sequences(pairs)), world.device)
    return model.response_logprobs(*sequences, cfg.temperature, cfg.logprob_chunk).view(2, len(pairs))


@torch.no_grad()
def all_logprobs(model, pairs, cfg, world, desc):
    """{pair index: (log π(chosen), log π(rejected))} of every pair: micro-batches of eval_micro_batch_size pairs
    (independent of the number of processes), dealt over the processes, gathered."""
    batches = micro_batches(pairs, range(len(pairs)), cfg.eval_micro_batch_size)
    done = []
    for batch in tqdm(for_rank(batches, world.rank, world.size), desc=desc, unit="batch", disable=world.rank != 0,
                      leave=False):
        logps = policy_logprobs(model, batch or batches[0], cfg, world)
        if batch is not None:
            done.append((batch, logps))  # kept on the device: one host sync at the end
    results = [(p["index"], c, r) for batch, logps in done for p, (c, r) in zip(batch, logps.T.tolist())]
    model.reshard()  # FSDP keeps the root unsharded after a forward with no backward; the optimizer needs the shards
    gathered = [None] * world.size
    dist.all_gather_object(gathered, results)
    return {index: (c, r) for part in gathered for index, c, r in part}


def reference_logprobs(model, splits, cfg, world, run_key):
    """log πref of every train and eval pair: the starting policy's, computed with the training code before the first
    update, so that the first update's log-ratios are exactly 0. Reused from output_dir's cache when `run_key` (the
    model files, the pairs' tokens, temperature and dtype) is the one it was made with."""
    ref_logps = read_reference_cache(cfg.output_dir, splits, run_key)
    if ref_logps is None:
        start = time.time()
        ref_logps = {split: all_logprobs(model, pairs, cfg, world, f"reference log-probs ({split})")
                     for split, pairs in splits.items()}
        write_reference_cache(cfg.output_dir, ref_logps, run_key, time.time() - start)
    return ref_logps


def train_step(model, optimizer, batch, ref_logps, cfg, world, update):
    """One optimizer step on the mean REBEL loss over `batch` (all processes' pairs): each process runs its
    micro-batches and divides by its share of the batch; FSDP averages the gradients over processes, giving the
    global batch mean. Returns ({the batch's mean loss and log-ratios, the gradient norm}, the tokens it trained)."""
    sums = torch.zeros(4, dtype=torch.float64, device=world.device)  # Σ loss, Σ log-ratio chosen, rejected, tokens
    for pairs in micro_batches(batch, range(len(batch)), cfg.micro_batch_size)[world.rank::world.size]:
        logp_c, logp_r = policy_logprobs(model, pairs, cfg, world).double()
        # float64 for these few numbers (free): η·Δr is ~1e4 with η = 1e6
        ref_c, ref_r, reward_c, reward_r, tokens = to_device([torch.tensor(
            [[*ref_logps[p["index"]], p["chosen_reward"], p["rejected_reward"], pair_tokens(p)] for p in pairs],
            dtype=torch.float64)], world.device)[0].T
        losses = rebel_loss(logp_c, logp_r, ref_c, ref_r, reward_c, reward_r, cfg.eta)
        (losses.sum() / (len(batch) // world.size)).backward()
        sums += torch.stack([losses.sum(), (logp_c - ref_c).sum(), (logp_r - ref_r).sum(), tokens.sum()]).detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    dist.all_reduce(sums)
    loss, logratio_chosen, logratio_rejected, tokens = (s / len(batch) for s in sums.tolist())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        fail(f"non-finite loss {loss} (grad norm {grad_norm}) at update {update + 1}; stopping without saving "
             f"(last good checkpoint: {latest_checkpoint(cfg.output_dir)})")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss, logratio_chosen=logratio_chosen, logratio_rejected=logratio_rejected,
                grad_norm=grad_norm), tokens * len(batch)


def evaluate(model, pairs, ref_logps, cfg, world):
    """Validation loss, and sign_align: the fraction of pairs whose log-ratio difference has the sign of Δr."""
    logps = all_logprobs(model, pairs, cfg, world, "eval")
    logp_c, logp_r, ref_c, ref_r = (torch.tensor([v[p["index"]][k] for p in pairs], dtype=torch.float64)
                                    for v, k in ((logps, 0), (logps, 1), (ref_logps, 0), (ref_logps, 1)))
    reward_c, reward_r = (torch.tensor([p[k] for p in pairs], dtype=torch.float64)
                          for k in ("chosen_reward", "rejected_reward"))
    loss = rebel_loss(logp_c, logp_r, ref_c, ref_r, reward_c, reward_r, cfg.eta).mean().item()
    sign_align = ((((logp_c - ref_c) - (logp_r - ref_r)) * (reward_c - reward_r)) > 0).double().mean().item()
    return dict(val_loss=loss, sign_align=sign_align)


def lr_at(update, num_updates, cfg):
    """cosine: linear warm-up over the first warmup_ratio of the updates, then cosine decay to 0; update 0 gets
    lr/warmup (the authors' HF scheduler gives it 0, a wasted update). linear (the online runs'): lr·(1 − u/U)."""
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - update / num_updates)
    warmup = int(cfg.warmup_ratio * num_updates)
    if update < warmup:
        return cfg.lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, num_updates - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- online REBEL: one update's pairs

def rollout(policy, run, update, cfg, world):
    """The pairs of online update `update`, as the paper's online runs made them: num_samples responses to each prompt
    from the current policy π_t (blocks of rollout_block prompts seeded by (seed, update, block): the same for any
    number of processes), each scored and given the reward, its KL summed over the response (stop token included):

        r = (score·reward_scale, or missing_eos_penalty without a stop token) − kl_coef·Σₜ (log π_t − log π_0)(yₜ)

    Per prompt the highest reward is chosen, the lowest rejected (ties kept: the first chosen, the last rejected); the
    reference is π_t. Returns (pairs, {pair: (log π_t(chosen), log π_t(rejected))}, rollouts.jsonl's rows, stats)."""
    from generate import derive_seed, hf_sample
    start, picked = time.time(), global_batch(len(run.prompts), cfg.batch_size, update, cfg.seed)
    blocks = [picked[s:s + cfg.rollout_block] for s in range(0, len(picked), cfg.rollout_block)]
    mine = {}
    with gathered(policy):  # the whole policy on every process, gathered once for the rollout, not once per token
        for b in range(world.rank, len(blocks), world.size):
            mine[b] = hf_sample(policy, [run.prompts[i]["ids"] for i in blocks[b]], num_samples=cfg.num_samples,
                                temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                                stop_ids=run.stop_ids, seed=derive_seed(cfg.seed, update, b))
    scores = run.score({i: samples for b in mine for i, samples in zip(blocks[b], mine[b])})  # this process's blocks
    parts = [None] * world.size
    dist.all_gather_object(parts, (mine, scores))
    samples = {i: s for part, _ in parts for b, block in part.items() for i, s in zip(blocks[b], block)}
    scores = {i: s for _, part in parts for i, s in part.items()}
    k = cfg.num_samples  # log-probs of the samples two by two, grouped as the pairs the first pass trains on
    twos = [dict(index=n * k + j, prompt_ids=run.prompts[i]["ids"], chosen_ids=samples[i][j][0],
                 rejected_ids=samples[i][min(j + 1, k - 1)][0]) for n, i in enumerate(picked) for j in range(0, k, 2)]
    logp_t, logp_0 = ({t["index"] + s: logps[t["index"]][s] for t in twos for s in range(min(2, k - t["index"] % k))}
                      for logps in (all_logprobs(m, twos, cfg, world, f"log {name}")
                                    for m, name in ((policy, "π_t"), (run.initial, "π_0"))))
    pairs, ref_logps, picks = [], {}, []
    for n, i in enumerate(picked):
        kl = [logp_t[n * k + j] - logp_0[n * k + j] for j in range(k)]
        score = [cfg.missing_eos_penalty if cut else x * cfg.reward_scale for (_, cut), x in zip(samples[i], scores[i])]
        reward = [x - cfg.kl_coef * d for x, d in zip(score, kl)]
        c, r = int(np.argmax(reward)), k - 1 - int(np.argmin(reward[::-1]))
        pairs.append(dict(index=n, prompt_ids=run.prompts[i]["ids"], chosen_ids=samples[i][c][0],
                          rejected_ids=samples[i][r][0], chosen_reward=reward[c], rejected_reward=reward[r]))
        ref_logps[n] = (logp_t[n * k + c], logp_t[n * k + r])
        picks.append((i, c, r, kl))
    return pairs, ref_logps, *rollout_records(run, update, pairs, picks=picks, samples=samples, scores=scores,
                                              seconds=time.time() - start, cfg=cfg)  # rollouts.jsonl's rows, stats


# ----------------------------------------------------------------------------- the model

def build_model(cfg, world, dtype, frozen=False):
    """The policy under FSDP2: fp32 master weights, `fully_shard` on every decoder layer then the root, `dtype` compute
    (bf16 on GPU), no dropout. With num_layers_unfrozen N only the last N layers, the final norm and the head train;
    `frozen`: π_0, nothing trains. Rank 0 alone reads the checkpoint; the others receive their shards from it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from transformers import AutoModelForCausalLM
    config = load_model_config(cfg.model, attention_dropout=0.0)
    starting_dtype = config.dtype or torch.float32  # final/ is saved in it (bf16 for Llama-3)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.starting_dtype, layers = starting_dtype, decoder_layers(cfg.model, model)
    full, buffers = read_weights_on_rank0(cfg.model, config, dropout_off(model))  # {} and None on the other ranks
    if frozen or cfg.num_layers_unfrozen:  # the embeddings (and a head tied to them) and the bottom layers
        trained = [] if frozen else [*layers[-cfg.num_layers_unfrozen:], model.get_decoder().norm,
                                     model.get_output_embeddings()]
        model.requires_grad_(False)
        for module in trained:
            module.requires_grad_(not model.config.tie_word_embeddings or module is not trained[-1])
    if cfg.activation_checkpointing and not frozen:
        # transformers < 5.23 only has the older name, gradient_checkpointing_enable (same arguments)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model.train(not frozen)  # (activation checkpointing only acts in train mode)
    mixed_precision = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mixed_precision)
    fully_shard(model, mp_policy=mixed_precision)
    model.to_empty(device=world.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, value in from_rank0(buffers).items():
        model.get_buffer(name).copy_(value)
    model.response_logprobs = response_logprobs.__get__(model)  # a method, so that FSDP can gather the root around it
    register_fsdp_forward_method(model, "response_logprobs")
    return model


# ----------------------------------------------------------------------------- main

def main(cfg):
    world = init_distributed()
    accumulation, num_updates = derived_sizes(cfg, world)
    checkpoint, state = open_run_folder(cfg)  # a checkpoint to resume from, and what it was made with
    dtype = compute_dtype(cfg.dtype, world.device)

    tokenizer, model_config = load_tokenizer(cfg.model), load_model_config(cfg.model)  # then data, before the model
    if cfg.online:
        run, splits = load_online(cfg, tokenizer, model_config, world), {}
        inputs = dict(data=run.fingerprint)
    else:
        train_pairs, eval_pairs = load_pairs(cfg, tokenizer, vocab_size(model_config), world)
        splits = {"train": train_pairs, "eval": eval_pairs} if eval_pairs else {"train": train_pairs}
        inputs = dict(data=data_fingerprint(splits))
    print0(describe_run(cfg, world, dtype, splits, accumulation, num_updates))

    model = build_model(cfg, world, dtype)
    inputs["model_files"] = from_rank0(files_fingerprint(cfg.model) if world.rank == 0 else None)
    if check_resume(cfg, checkpoint, state, inputs, num_updates) == "finished":
        return dist.destroy_process_group()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.online:
        run.initial = build_model(cfg, world, dtype, frozen=True)  # π_0, for the KL term of the reward
    else:
        run_key = [inputs["model_files"], data_fingerprint(splits, rewards=False), cfg.temperature, str(dtype)]
        ref_logps = reference_logprobs(model, splits, cfg, world, run_key)
    start_update = load_checkpoint(model, optimizer, checkpoint) if checkpoint else 0
    log, close_log = open_metrics(cfg, world, num_updates, resumed_at=start_update if checkpoint else None)

    def log_eval(update):  # (open_metrics' log prints it)
        if not cfg.online and eval_pairs:
            log(dict(update=update, **evaluate(model, eval_pairs, ref_logps["eval"], cfg, world)))

    if start_update == 0:
        log_eval(0)
    bar, stopped = tqdm(range(start_update, num_updates), desc="updates", unit="update", disable=world.rank != 0,
                        initial=start_update, total=num_updates), False
    for update in bar:
        start, lr = time.time(), lr_at(update, num_updates, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.online:  # fresh pairs from the current policy; their reference is the policy that sampled them
            batch, batch_ref, rollouts, stats = rollout(model, run, update, cfg, world)
            log(dict(update=update + 1, **stats), rollouts)
        else:
            batch = [train_pairs[i] for i in global_batch(len(train_pairs), cfg.batch_size, update, cfg.seed)]
            batch_ref = ref_logps["train"]
        for epoch in range(cfg.epochs_per_batch):  # one optimizer step per pass over the batch
            step, tokens = train_step(model, optimizer, batch, batch_ref, cfg, world, update)
            seconds = time.time() - start
            record = dict(update=update + 1, **({"pass": epoch + 1} if cfg.epochs_per_batch > 1 else {}), **step,
                          lr=lr, pairs_per_s=cfg.batch_size * (epoch + 1) / seconds,
                          tokens_per_s=tokens * (epoch + 1) / seconds, pairs_seen=(update + 1) * cfg.batch_size)
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.3g}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"rollout_tok_s": f"{stats['rollout_tokens_per_s']:.0f}"} if cfg.online else {}))
        if (cfg.eval_every and (update + 1) % cfg.eval_every == 0) or update + 1 == num_updates:
            log_eval(update + 1)
        stop = update + 1 - start_update == cfg.stop_after
        if (cfg.save_every and (update + 1) % cfg.save_every == 0) or update + 1 == num_updates or stop:
            save_checkpoint(model, optimizer, cfg, world, dict(update=update + 1, **inputs))
        if stopped := stop and update + 1 < num_updates:
            print0(f"stopping after {cfg.stop_after} updates (--stop_after); continue: the same command and --resume")
            break
    bar.close()
    if cfg.save_final and not stopped:
        print0(f"final model -> {save_final(model, cfg, world)}")
    close_log()
    dist.destroy_process_group()


# ======================================================================= nothing below this line is REBEL
# What follows turns files into token ids, keeps the run's state (fingerprints, the reference cache, checkpoints) and
# holds the plumbing that generate.py, score.py and eval_gsm8k.py share: settings, processes, files, loaders, trackers.

# ----------------------------------------------------------------------------- data → token ids

class BadRow(ValueError):
    """A row that cannot be used. It is dropped and counted with this reason: one bad row never stops a run."""


def load_pairs(cfg, tokenizer, vocab_size, world):
    """Train and eval pairs, tokenised and length-filtered. Without an eval split (e.g. one .jsonl file), eval_size
    seeded rows of the train data are held out and never trained on."""
    single_file = os.path.isfile(cfg.dataset)  # one data file is one split
    train_rows = require_split(cfg.dataset, train_split(cfg))
    if not len(train_rows):
        fail(f"dataset {cfg.dataset!r}: no rows")
    eval_rows = None if single_file else load_split(cfg.dataset, cfg.eval_split)
    held_out = set()
    if eval_rows is None and cfg.eval_size > 0:
        if cfg.eval_size >= len(train_rows):
            fail(f"--eval_size {cfg.eval_size} leaves nothing to train on ({len(train_rows)} rows in {cfg.dataset})")
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed))
        held_out = set(order[:cfg.eval_size].tolist())
        print0(f"no eval split {cfg.eval_split!r} in {cfg.dataset}: holding out {cfg.eval_size} seeded rows of the "
               "train data")
    sampled = {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(train_rows.column_names)
    print0("tokens: " + ("the sampled token ids (columns prompt_ids, chosen_ids, rejected_ids)" if sampled
                         else "the chat template of the texts (no sampled token ids in the data)"))
    if "temperature" in train_rows.column_names:
        sampled_at = sorted({t for t in train_rows["temperature"] if isinstance(t, (int, float))
                             and t != cfg.temperature})
        if sampled_at:
            print0(f"warning: the pairs were sampled at temperature {', '.join(map(str, sampled_at))}, but the "
                   f"log-probs use --temperature {cfg.temperature}: REBEL's log-probs should use the sampling "
                   "temperature")
    where = f"{cfg.dataset}[{'train' if single_file else cfg.train_split}]"
    note_pad_outside(tokenizer, vocab_size, cfg.model)
    policy = policy_tokens(cfg.model, tokenizer)  # what says a pair was sampled by this model
    pairs = tokenize_pairs(train_rows, tokenizer, where, vocab_size, world=world, convert_hh=cfg.convert_hh, **policy)
    train_pairs = [p for p in pairs if p["index"] not in held_out]
    eval_pairs = [p for p in pairs if p["index"] in held_out]
    if eval_rows is not None:
        eval_pairs = tokenize_pairs(eval_rows, tokenizer, f"{cfg.dataset}[{cfg.eval_split}]", vocab_size, world=world,
                                    convert_hh=cfg.convert_hh, **policy)
    train_pairs = filter_by_length(train_pairs, cfg.max_prompt_len, cfg.max_response_len, "train")
    if eval_pairs:
        eval_pairs = filter_by_length(eval_pairs, cfg.max_prompt_len, cfg.max_response_len, "eval")
    eval_where = where if eval_rows is None else f"{cfg.dataset}[{cfg.eval_split}]"
    for pairs, at in ((train_pairs, where), (eval_pairs or [], eval_where)):
        check_reward_gaps(pairs, cfg, [f"{at} row {p['index']}" for p in pairs])
    return train_pairs, eval_pairs


def train_split(cfg):
    """The split of --dataset to train on: "train" for a single file (its one split), refusing another --train_split
    there rather than ignoring it."""
    if not os.path.isfile(cfg.dataset):
        return cfg.train_split
    if cfg.train_split not in ("train", Config.train_split, ONLINE_DEFAULTS["train_split"]):
        fail(f"--train_split {cfg.train_split!r}: {cfg.dataset} is one file, which has one split, 'train'")
    return "train"


def policy_tokens(model, tokenizer):
    """{stop_ids, model_files} of the policy, which sampled_ids and tokenize_pairs check the pairs against: the tokens
    that end a sampled response, generate.py's stop_token_ids (which also warns about a template without an end of
    turn), and the fingerprint of its files (read by rank 0; a local folder is cheap)."""
    from generate import stop_token_ids
    stop_ids = set(stop_token_ids(tokenizer, model, load_model_config(model)))
    return dict(stop_ids=stop_ids, model_files=from_rank0(files_fingerprint(model) if dist.get_rank() == 0 else None))


def check_reward_gaps(pairs, cfg, names):
    """Fail in one line naming the first pair whose η·(chosen_reward − rejected_reward) is finite but so large that
    the loss, its square summed over a batch, overflows (it would stop the run at the update that draws it)."""
    for pair, name in zip(pairs, names):
        gap = cfg.eta * (pair["chosen_reward"] - pair["rejected_reward"])
        if not math.isfinite(gap * gap * cfg.batch_size):
            fail(f"{name}: η·(chosen_reward − rejected_reward) = {cfg.eta:g}·({pair['chosen_reward']:g} − "
                 f"{pair['rejected_reward']:g}) is too large: the loss, its square, overflows; rescale the rewards "
                 "or lower --eta")


def pick_column(columns, names, where):
    """The one of `names` (a column's accepted spellings) that the data has."""
    present = [name for name in names if name in columns]
    if len(present) > 1:
        fail(f"{where}: has both columns {' and '.join(map(repr, present))}, which mean the same: keep one")
    if present:
        return present[0]
    fail(f"{where}: missing column {' or '.join(map(repr, names))} (columns: {', '.join(columns)})")


def tokenize_pairs(rows, tokenizer, where, vocab_size, *, world=None, convert_hh=False, stop_ids=None,
                   model_files=None):
    """Token ids of every usable pair: [{index (row in the split), prompt_ids, chosen_ids, rejected_ids, chosen_reward,
    rejected_reward}], sorted by index. With the columns prompt_ids/chosen_ids/rejected_ids (generate.py → score.py)
    they are the sampled tokens; else the chat template of the texts (`text_ids`). Rows that cannot be used are
    dropped and counted with their reason; a reward that is not a finite number stops the run, naming the row, before
    any model work. A chat template that writes today's date is rendered at the row's chat_date (generate.py's), else
    at rank 0's now. convert_hh: prompt strings in the Human:/Assistant: format are their turns (`hh_messages`). A
    row whose sampled_by (generate.py's fingerprint of the model's files) is not `model_files` was sampled by another
    model, and is dropped. Each process does every world.size-th row; all get the same pairs and the same count."""
    rank, size = (world.rank, world.size) if world else (0, 1)
    cols = rows.column_names
    prompt, chosen, rejected, chosen_reward, rejected_reward = (pick_column(cols, names, where) for names in (
        ["prompt"], ["chosen"], ["rejected", "reject"], ["chosen_reward"], ["rejected_reward", "reject_reward"]))
    id_columns = {"prompt_ids", "chosen_ids", "rejected_ids"} & set(cols)
    if id_columns and len(id_columns) < 3:
        fail(f"{where}: has {', '.join(sorted(id_columns))} but not all of prompt_ids, chosen_ids, rejected_ids: give "
             "the three sampled-id columns, or none (the texts are then tokenised)")
    check_prompt_column(rows, prompt, where)
    sampled, eot = len(id_columns) == 3, end_of_turn(tokenizer)
    now = from_rank0(datetime.datetime.now()) if size > 1 else datetime.datetime.now()
    pairs, dropped, error = [], [], None
    for i in tqdm(range(rank, len(rows), size), desc=f"tokenize {where}", unit="pair",
                  disable=rank != 0 or len(rows) < 1000):
        row = rows[i]
        try:
            for col in (chosen_reward, rejected_reward):
                if isinstance(row[col], bool) or not isinstance(row[col], (int, float)) or not math.isfinite(row[col]):
                    fail(f"{where} row {i}: column {col!r} must be a finite number, got {row[col]!r}")
            date = chat_date(row.get("chat_date")) or now
            if not same_model(row.get("sampled_by"), model_files):
                raise BadRow("sampled by another model: its files differ from --model's (drop the sampled_by column to "
                             "train on them all the same)")
            texts = [row[chosen], row[rejected]]
            ids = (sampled_ids(row, texts, tokenizer, vocab_size, date=date, convert_hh=convert_hh, stop_ids=stop_ids)
                   if sampled else text_ids(row[prompt], texts, tokenizer, eot, date=date, convert_hh=convert_hh))
            pairs.append(dict(index=i, prompt_ids=ids[0], chosen_ids=ids[1], rejected_ids=ids[2],
                              chosen_reward=float(row[chosen_reward]), rejected_reward=float(row[rejected_reward])))
        except BadRow as e:
            dropped.append((i, str(e)))
        except SystemExit as e:  # every process must stop with the first bad reward's message, not hang below
            error = (i, str(e))
            break
    parts = [(pairs, dropped, error)]
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, (pairs, dropped, error))
    errors = sorted(e for _, _, e in parts if e)
    if errors:
        raise SystemExit(errors[0][1])
    dropped = [d for _, part, _ in parts for d in part]
    if convert_hh:
        report_converted(rows[prompt], where)
    report_dropped(dropped, len(rows), where)
    if len(dropped) == len(rows):
        fail(f"{where}: every row was dropped ({min(dropped)[1]}, ...)")
    return sorted((p for part, _, _ in parts for p in part), key=lambda p: p["index"])


def same_model(sampled_by, model_files):
    """False only when both fingerprints are known (neither absent nor an unresolved "hub:..." name) and differ."""
    known = [f for f in (sampled_by, model_files) if isinstance(f, str) and not f.startswith("hub:")]
    return len(known) < 2 or known[0] == known[1]


def chat_date(value):
    """A row's chat_date (ISO 8601, written by generate.py) as a datetime; None when absent. Raises BadRow."""
    if value is None or hasattr(value, "strftime"):  # `datasets` may read the column as timestamps: datetimes
        return value
    try:
        return datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise BadRow("chat_date must be an ISO 8601 date and time like 2024-07-26T09:30:00, got "
                     f"{str(value)[:40]!r}") from None


def sampled_ids(row, texts, tokenizer, vocab_size, *, date=None, convert_hh=False, stop_ids=None):
    """(prompt ids, chosen ids, rejected ids) as sampled, checked: integers of the vocabulary, prompt ids equal to this
    tokenizer's templated prompt at `date` (else the pair was sampled with another model), and response ids that
    decode to the response `texts` that were scored, as generate.py decoded them: all of them, or all but a last stop
    token (`stop_ids`, default the template's end of turn and the tokenizer's eos), which sampling leaves out of the
    text. Raises BadRow."""
    ids = [row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]]
    if not all(isinstance(x, list) and x and all(type(t) is int and 0 <= t < vocab_size for t in x) for x in ids):
        raise BadRow("prompt_ids, chosen_ids and rejected_ids must be non-empty lists of integers in "
                     f"[0, {vocab_size})")
    if prompt_tokens(tokenizer, row["prompt"], date, convert_hh)[1] != ids[0]:
        dated = STRFTIME_NOW.search(tokenizer.get_chat_template()) and row.get("chat_date") is None
        raise BadRow("prompt_ids are not this tokenizer's chat template of the prompt (sampled with another model?"
                     + (" the template writes today's date, and the row has no chat_date saying which day it was "
                        "sampled)" if dated else ")"))
    if stop_ids is None:
        stop_ids = {t for t in (end_of_turn(tokenizer), tokenizer.eos_token_id) if t is not None}
    for name, response, text in zip(("chosen", "rejected"), ids[1:], texts):
        if not isinstance(text, str):
            raise BadRow(f"the chosen and rejected responses must be strings, got {json_type(text)}")
        if text != tokenizer.decode(response, skip_special_tokens=True) and not (
                response[-1] in stop_ids and text == tokenizer.decode(response[:-1], skip_special_tokens=True)):
            raise BadRow(f"{name}_ids do not decode to the {name} text (edited after sampling, or decoded another "
                         "way?)")
    return ids


def text_ids(prompt, responses, tokenizer, eot, *, date=None, convert_hh=False):
    """(prompt ids, *response ids) of text-only pairs (e.g. the authors' released data), tokenised as sampling makes
    them: prompt ids from the templated prompt alone (what generate.py samples after); response ids from the text that
    the template adds after it, up to and including its end-of-turn token `eot` (ChatML's and Gemma's "\\n" after it
    is never sampled, so never trained; nor is the space Llama-2's template writes before its </s>), tokenised in
    context: the ids of the whole conversation after the prompt's. A SentencePiece "legacy" tokenizer (Llama-2, Mistral
    v0.1, OpenChat) would put a stray "▁" token at the start of the response tokenised alone. Where the conversation's
    ids do not start with the prompt's (a byte-level pre-tokenizer merges "\\n\\n" + word across the boundary, as
    GPT-2's does), the response is tokenised alone, as sampling produces it after the prompt, if the prompt's ids and
    these decode to the conversation's text. Raises BadRow when neither holds, when the template cannot be split
    there, or when it changes the response text (e.g. strips reasoning)."""
    prompt_text, prompt_ids = prompt_tokens(tokenizer, prompt, date, convert_hh)
    eot_text, out = None if eot is None else tokenizer.convert_ids_to_tokens(eot), [prompt_ids]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for response in responses:
        if not isinstance(response, str):
            raise BadRow(f"the chosen and rejected responses must be strings, got {json_type(response)}")
        messages = chat_messages(prompt, convert_hh) + [{"role": "assistant", "content": response}]
        full = apply_template(tokenizer, messages, date)
        if not full.startswith(prompt_text):
            raise BadRow("the templated prompt is not a prefix of the templated conversation")
        added = full[len(prompt_text):]
        end = added.find(eot_text) if eot_text else -1
        text = added[:end] if end >= 0 else added.rstrip()  # without an end token: not the template's turn separator
        if text.strip() != response.strip():
            raise BadRow("the chat template changes the response text (e.g. it strips or rewrites reasoning)")
        if end >= 0 and response == response.rstrip():
            text = text.rstrip()  # whitespace the template writes before its end token (Llama-2's " </s>")
        tail, eot_part = ([eot], eot_text) if end >= 0 else ([], "")
        together, alone = encode(prompt_text + text + eot_part), encode(text) + tail
        if together[:len(prompt_ids)] == prompt_ids:
            out.append(together[len(prompt_ids):])
        elif tokenizer.decode(prompt_ids + alone) == tokenizer.decode(together):
            out.append(alone)  # tokens merge across the boundary in context; sampling after the prompt's makes these
        else:
            raise BadRow("the response cannot be tokenised as sampled: in context its tokens merge with the prompt's, "
                         "and tokenised alone they decode to another text")
    return out


def filter_by_length(pairs, max_prompt_len, max_response_len, where):
    """The authors' length filter: pairs with a longer prompt or response are dropped, and counted."""
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
        fail(f"{where}: no pair left after the length filter (max_prompt_len={max_prompt_len}, "
             f"max_response_len={max_response_len})")
    return kept


def report_dropped(dropped, total, where):
    """Print how many of `total` rows were dropped, by reason, each with its first row: [(row, reason), ...]."""
    if dropped:
        first = {}
        for row, why in sorted(dropped):
            first.setdefault(why, row)
        counts = Counter(why for _, why in dropped)
        print0(f"{where}: dropped {len(dropped)} of {total} rows" + "".join(
            f" | {n} × {why} (first: row {first[why]})" for why, n in counts.most_common()))


def check_prompt_column(data, column, where):
    """Fail on a column that mixes strings and message lists in data that `datasets` read (a Hub dataset, a folder):
    it then keeps the column as JSON and decodes every string that looks like JSON ('"hi"' becomes hi,
    '[{"role": ...}]' a conversation), so prompts would change silently; a parquet file that `datasets` wrote from
    such a column has them changed already. Any other data file (Rows) is read as written."""
    if type(getattr(data, "features", {}).get(column)).__name__ != "Json" and column not in getattr(
            data, "json_columns", ()):
        return
    kinds = {json_type(v) for v in data[column]}
    kinds = [name for kind, name in JSON_KINDS.items() if kind in kinds] + sorted(kinds - JSON_KINDS.keys())
    fail(f"{where}: column {column!r} " + (f"mixes {' and '.join(kinds)}" if len(kinds) > 1 else "is JSON")
         + ", which datasets reads back as JSON (a string prompt that looks like JSON would change): give every "
         "prompt as a string, or every prompt as a list of messages")


JSON_KINDS = {"str": "strings", "list": "lists", "dict": "objects", "int": "integers", "float": "numbers",
              "bool": "booleans", "null": "nulls"}


def chat_messages(prompt, convert_hh=False):
    """A prompt as chat messages: a string is one user turn (with convert_hh, a string in Anthropic-HH/Nectar's
    Human:/Assistant: format is its turns: `hh_messages`); a list of {'role', 'content'} messages must use the roles
    system, user and assistant, with string contents, and end with a user turn. Raises BadRow saying what is wrong."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("the prompt is empty")
        return (convert_hh and hh_messages(prompt)) or [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise BadRow("the prompt must be a string or a non-empty list of {'role', 'content'} messages, got "
                     + json_type(prompt))
    if not prompt:
        raise BadRow("the prompt must be a string or a non-empty list of {'role', 'content'} messages")
    for m in prompt:
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise BadRow("each message must be {'role': 'system'|'user'|'assistant', 'content': a string}")
    if prompt[-1]["role"] != "user":
        raise BadRow(f"the prompt must end with a user turn, not {prompt[-1]['role']!r}")
    if not prompt[-1]["content"].strip():
        raise BadRow("the last user turn is empty")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(prompt):
    """The chat messages of a prompt string in Anthropic-HH's (and Nectar's) format, "\\n\\nHuman: a\\n\\nAssistant: b
    \\n\\nHuman: c\\n\\nAssistant:" (the leading newlines optional): [user a, assistant b, user c], the contents
    stripped and the final empty Assistant: turn left out. None for any other string: one that does not start with
    Human:, whose turns do not alternate Human/Assistant, with an empty turn, or that does not end with an empty
    Assistant: turn."""
    if not isinstance(prompt, str) or not prompt.lstrip().startswith("Human:"):
        return None
    parts = HH_TURN.split("\n\n" + prompt.lstrip())  # ["", "Human", " a", "Assistant", " b", ..., "Assistant", ""]
    roles, contents = parts[1::2], [c.strip() for c in parts[2::2]]
    if (parts[0] or len(roles) < 2 or len(roles) % 2 or contents[-1] or not all(contents[:-1])
            or roles != ["Human", "Assistant"] * (len(roles) // 2)):
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content}
            for role, content in zip(roles[:-1], contents[:-1])]


def report_converted(prompts, where):
    """One line saying how many prompt strings hh_messages turned into chat messages (none: nothing said)."""
    converted = sum(hh_messages(p) is not None for p in prompts)
    if converted:
        print0(f"{where}: converted {converted} of {len(prompts)} prompts from the Human:/Assistant: format to chat "
               "messages (--convert_hh false to keep them as one user turn)")


STRFTIME_NOW = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def apply_template(tokenizer, messages, date=None, **kwargs):
    """The chat template's text. `date` (a datetime) fixes what the template's strftime_now("...") writes (Llama-3.2's
    "Today Date", Mistral Small's, ...), so that a prompt sampled one day is the same prompt the next. A template that
    raises on a row (e.g. Gemma's on a system turn) raises BadRow."""
    template = tokenizer.get_chat_template()
    if date is not None:
        template = STRFTIME_NOW.sub(lambda m: json.dumps(date.strftime(m.group(2))), template)
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    except Exception as e:  # noqa: BLE001 — jinja2's TemplateError and whatever a template's own code raises
        raise BadRow(f"the chat template raised {type(e).__name__}: {first_line(e)}")


def prompt_tokens(tokenizer, prompt, date=None, convert_hh=False):
    """(text, token ids) of the templated prompt + generation prompt: what generate.py samples after. Raises BadRow."""
    text = apply_template(tokenizer, chat_messages(prompt, convert_hh), date, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn(tokenizer):
    """The special token the chat template writes right after an assistant message (Llama-3 <|eot_id|>, ChatML
    <|im_end|>, Gemma <end_of_turn>, Mistral </s>), found from the template itself; None when it writes none."""
    marker = "REBEL-END-OF-TURN-PROBE"
    try:
        text = apply_template(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}])
    except BadRow:
        return None
    after = text[text.rfind(marker) + len(marker):].lstrip() if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


# ----------------------------------------------------------------------------- online: prompts, reward, sampling

@dataclass
class OnlineRun:
    """What online REBEL samples from and scores with: the prompts ({index, prompt_id, prompt, ids}), the stop tokens,
    score({row: [(ids, truncated), ...]}) -> {row: [score, ...]}, the inputs' fingerprint, and π_0 once built."""
    prompts: list
    stop_ids: list
    score: typing.Callable
    fingerprint: str
    initial: typing.Any = None


def load_online(cfg, tokenizer, model_config, world):
    """The prompts (templated, too long or malformed ones dropped and counted), the stop tokens and the reward
    (generate.py's and score.py's), each checked in one line before the policy loads."""
    from generate import fingerprint, sample_record, stop_token_ids
    if bool(cfg.reward_model) == bool(cfg.reward_fn):
        fail("--online: give one of --reward_model and --reward_fn" + (
            f", not both (--reward_model {cfg.reward_model}, --reward_fn {cfg.reward_fn}; one may come from --config: "
            "--reward_model '' clears it)" if cfg.reward_model else ""))
    rows = require_split(cfg.dataset, train_split(cfg))
    if "chosen_reward" in rows.column_names:
        fail(f"--online: {cfg.dataset} is a file of scored pairs (chosen_reward); online REBEL samples and scores its "
             "own: give prompts, or train offline without --online")
    if cfg.prompt_column not in rows.column_names:
        fail(f"{cfg.dataset}: missing column {cfg.prompt_column!r} (columns: {', '.join(rows.column_names)})")
    check_prompt_column(rows, cfg.prompt_column, cfg.dataset)
    texts = list(rows[cfg.prompt_column])
    ids = list(rows["prompt_id"]) if "prompt_id" in rows.column_names else list(range(len(texts)))
    note_pad_outside(tokenizer, vocab_size(model_config), cfg.model)
    tokens, _ = template_prompts(texts, tokenizer, cfg.max_prompt_len, cfg.dataset, world=world,
                                 convert_hh=cfg.convert_hh)
    if not tokens:
        fail(f"{cfg.dataset}: no prompt to sample from")
    other = {c: list(rows[c]) for c in rows.column_names if c not in (cfg.prompt_column, "prompt")}  # for --reward_fn
    prompts = [dict(index=i, prompt_id=ids[i], prompt=texts[i], ids=tokens[i],
                    columns={c: v[i] for c, v in other.items()}) for i in sorted(tokens)]
    reward = load_reward(cfg, world, columns=list(other))

    def score(samples):
        rows = {i: dict(prompts[i]["columns"], prompt=prompts[i]["prompt"], truncated=[cut for _, cut in s],
                        responses=[sample_record(tokenizer, ids, cut)[0] for ids, cut in s])
                for i, s in samples.items()}
        return reward(rows)
    return OnlineRun(prompts, stop_token_ids(tokenizer, cfg.model, model_config), score,
                     fingerprint([[p["prompt_id"], p["ids"]] for p in prompts] + [reward.fingerprint]))


def load_reward(cfg, world, columns=()):
    """reward({row: {prompt, responses, the data's other `columns`}}) -> {row: [score, ...]}, with score.py's reward
    function or reward model (loaded here, on every process); a response it cannot score stops the run in one line
    naming the row."""
    import score as scoring
    if cfg.reward_fn:
        fn = scoring.load_reward_fn(cfg.reward_fn)
        scoring.check_reward_fn_columns(fn, cfg.reward_fn, ["prompt", "responses", "truncated", *columns],
                                        cfg.dataset)

        def reward(rows):
            return {r["index"]: r["rewards"] for r in scoring.function_rewards(fn, cfg.reward_fn, rows, list(rows))}
        reward.fingerprint = sha256(open(cfg.reward_fn.rpartition(":")[0], "rb").read())
        return reward
    settings = scoring.Config(reward_model=cfg.reward_model, reward_base=cfg.reward_base, dtype=cfg.dtype,
                              trust_remote_code=cfg.trust_remote_code, convert_hh=cfg.convert_hh)
    tokenizer = load_tokenizer(scoring.reward_tokenizer_source(settings))
    model = scoring.load_reward_model(settings, compute_dtype(cfg.dtype, world.device), tokenizer)
    model = model.to(world.device).eval()

    def reward(rows):
        out = scoring.model_rewards(model, tokenizer, rows, list(rows), settings, world.device)[0]
        for r in out:
            if r["rewards"] is None:
                fail(f"{cfg.dataset} row {r['index']}: the reward model cannot score its responses ({r['dropped']})")
        return {r["index"]: r["rewards"] for r in out}
    reward.fingerprint = files_fingerprint(cfg.reward_model)
    return reward


def template_prompts(prompts, tokenizer, max_prompt_len, where, *, world, date=None, convert_hh=False):
    """({row: token ids of the templated prompt}, [(row, why dropped)]): prompts the chat template refuses, or longer
    than max_prompt_len tokens, are dropped and counted with their reason. convert_hh: as chat_messages."""
    tokens, dropped = {}, []
    for i, prompt in enumerate(tqdm(prompts, desc="template prompts", unit="prompt",
                                    disable=world.rank != 0 or len(prompts) < 1000)):
        try:
            tokens[i] = prompt_tokens(tokenizer, prompt, date, convert_hh)[1]
            if len(tokens[i]) > max_prompt_len:
                raise BadRow(f"longer than --max_prompt_len {max_prompt_len} tokens")
        except BadRow as e:
            tokens.pop(i, None)
            dropped.append((i, str(e)))
    if convert_hh:
        report_converted(prompts, where)
    report_dropped(dropped, len(prompts), where)
    return tokens, dropped


@contextlib.contextmanager
def gathered(model):
    """The FSDP2 policy's full weights on every process while inside, gathered once (not once per decoding step as
    its hooks would), in eval mode; resharded and back in train mode after, its generation config as it was. No
    collective runs inside, so processes whose generations stop at different steps never wait on each other."""
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    generation_config, training = model.generation_config, model.training
    model.eval()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # fully_shard's defaults: layers, the root
        model.generation_config = generation_config
        model.train(training)


def rollout_records(run, update, pairs, *, picks, samples, scores, seconds, cfg):
    """(rows of rollouts.jsonl, the update's statistics) of an online update's pairs; a reward gap whose squared
    regression target overflows stops the run here, naming the prompt, rather than as an inf loss later."""
    check_reward_gaps(pairs, cfg, [f"{cfg.dataset} row {run.prompts[i]['index']} (update {update + 1})"
                                   for i, *_ in picks])
    rows = [dict(update=update + 1, prompt_id=run.prompts[i]["prompt_id"], prompt_ids=p["prompt_ids"],
                 chosen_ids=p["chosen_ids"], rejected_ids=p["rejected_ids"], chosen_score=scores[i][c],
                 rejected_score=scores[i][r], chosen_kl=kl[c], rejected_kl=kl[r], chosen_reward=p["chosen_reward"],
                 rejected_reward=p["rejected_reward"]) for p, (i, c, r, kl) in zip(pairs, picks)]
    flat = [(len(ids), not cut, x, d) for i, _, _, kl in picks for (ids, cut), x, d in zip(samples[i], scores[i], kl)]
    length, stopped, score, kl = (float(np.mean(v)) for v in zip(*flat))
    return rows, dict(score=score, kl=kl, stopped=stopped, response_tokens=length, rollout_s=seconds,
                      rollout_tokens_per_s=length * len(flat) / seconds)


# ----------------------------------------------------------------------------- the run's state

def derived_sizes(cfg, world):
    """(micro-batches accumulated per update and process, number of updates), checked before any work."""
    per_update = cfg.micro_batch_size * world.size
    if cfg.batch_size % per_update:
        fail(f"--batch_size {cfg.batch_size} must be a multiple of --micro_batch_size × processes = "
             f"{cfg.micro_batch_size} × {world.size} = {per_update}")
    num_updates = cfg.total_episodes // cfg.batch_size
    if num_updates < 1:
        fail(f"--total_episodes {cfg.total_episodes} is less than one batch of {cfg.batch_size} pairs")
    return cfg.batch_size // per_update, num_updates


# what a resumed run may not change: it would change the data, the reference or the optimisation already done
# (not the --dataset path: the pairs themselves are compared, so a resume may name the same file by another path)
FIXED_ON_RESUME = ("train_split", "eval_split", "eval_size", "seed", "eta", "lr", "beta1", "beta2", "adam_eps",
                   "weight_decay", "warmup_ratio", "temperature", "total_episodes", "batch_size", "max_prompt_len",
                   "max_response_len", "max_grad_norm", "dtype", "epochs_per_batch", "lr_schedule",
                   "num_layers_unfrozen", "online", "prompt_column", "num_samples", "max_new_tokens", "rollout_block",
                   "reward_scale", "missing_eos_penalty", "kl_coef")


def open_run_folder(cfg):
    """The pre-flight of output_dir: a folder this run can write and lock, not holding --model; returns (the checkpoint
    to resume from or None, its train_state). Settings a resume may not change are compared here, before any data
    work; the data and model files once they are read (check_resume)."""
    check_output(cfg.output_dir, "--output_dir", kind="folder", model=cfg.model)
    check_data_source(cfg.dataset)
    checkpoint = from_rank0(latest_checkpoint(cfg.output_dir))  # one decision for all processes
    if checkpoint and not cfg.resume:
        fail(f"{cfg.output_dir} holds a checkpoint of an earlier run: add --resume to continue it, or pick another "
             "--output_dir")
    state = read_train_state(checkpoint) if checkpoint else None
    if state:
        changed = changed_settings(state.get("config", {}), dataclasses.asdict(cfg), FIXED_ON_RESUME)
        if changed:
            fail(f"--resume: {checkpoint} was made with other settings ({changed}); resume with those, or use another "
                 "--output_dir")
    if from_rank0(dist.get_rank() == 0 and not lock_folder(cfg.output_dir)):
        fail(f"--output_dir {cfg.output_dir} is in use by another rebel.py run (it holds {cfg.output_dir}/.lock)")
    return checkpoint, state


def check_resume(cfg, checkpoint, state, inputs, num_updates):
    """Fail in one line when a checkpoint's model files or pairs differ from this run's; "finished" when the
    checkpoint is the last update and final/ is there (only once every input has been compared)."""
    if not state:
        if cfg.resume:
            print0(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints, starting from scratch")
        return None
    if state.get("model_files") != inputs["model_files"]:
        fail(f"--resume: the files of --model {cfg.model} differ from those {checkpoint} started from; resume with the "
             "same model, or use another --output_dir")
    if state.get("data") != inputs["data"]:
        fail(f"--resume: the pairs (their tokens or rewards) differ from those {checkpoint} was trained on; "
             "resume with the same data, or use another --output_dir")
    if state["update"] == num_updates and os.path.isdir(os.path.join(cfg.output_dir, "final")):
        print0(f"{cfg.output_dir}: this run is finished ({num_updates} updates; the model is in final/)")
        return "finished"
    return None


def files_fingerprint(path):
    """What a model folder holds, cheaply: sha256 over the name, size and content of each of its own files, which are
    what from_pretrained reads (not subfolders, e.g. Meta's original/ weights or a run's output; not hidden files). A
    Hub id: its snapshot in the local cache. Files over 64 MB, the weights, are read in 16 pieces of 1 MB spread over
    the file (~0.1 s for a 16 GB model), so a folder replaced at the same path is told apart however it was copied."""
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, local_files_only=True)
        except Exception:  # noqa: BLE001 — not in the cache: the name is all there is
            return f"hub:{path}"
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file) or name.startswith("."):
            continue
        size = os.path.getsize(file)
        h.update(f"{name}:{size}:".encode())
        with open(file, "rb") as f:
            if size <= 64 << 20:
                h.update(f.read())
            for k in range(16 if size > 64 << 20 else 0):
                f.seek(k * (size - (1 << 20)) // 15)
                h.update(f.read(1 << 20))
    return h.hexdigest()


def data_fingerprint(splits, rewards=True):
    """sha256 of every pair's row index and token ids (and rewards): what reference log-probs and a run depend on."""
    h = hashlib.sha256()
    for split, pairs in splits.items():
        h.update(split.encode())
        for p in pairs:
            h.update(np.asarray([p["index"], -1, *p["prompt_ids"], -1, *p["chosen_ids"], -1, *p["rejected_ids"]],
                                np.int64).tobytes())
            h.update(np.asarray([p["chosen_reward"], p["rejected_reward"]] if rewards else [], np.float64).tobytes())
    return h.hexdigest()


def read_reference_cache(output_dir, splits, run_key):
    """The cached reference log-probs {split: {index: (chosen, rejected)}}, read by rank 0 and shared, or None when
    there are none for this run_key, or the file is damaged or misses a pair."""
    path, meta_path = (os.path.join(output_dir, f"ref_logprobs{ext}") for ext in (".jsonl", ".meta.json"))
    ref_logps = None
    meta = (read_jsonl(meta_path)[0][:1] if dist.get_rank() == 0 and os.path.exists(meta_path)
            and os.path.exists(path) else [])
    if meta and meta[0].get("fingerprint") == sha256(json.dumps(run_key)):
        with open(path, "rb") as f:
            text = f.read()
        ref_logps = {split: {} for split in splits}
        for line in text.decode().splitlines() if sha256(text) == meta[0].get("sha256") else []:
            row = json.loads(line)  # the file is as written (its sha256): every line parses
            ref_logps.get(row["split"], {})[row["index"]] = (row["chosen_logprob"], row["rejected_logprob"])
        if any(set(ref_logps[s]) != {p["index"] for p in pairs} for s, pairs in splits.items()):
            print0(f"reference log-probs: {path} is incomplete or damaged; computing them again")
            ref_logps = None
    if (ref_logps := from_rank0(ref_logps)) is not None:  # one decision for all processes
        print0(f"reference log-probs: reusing {path}")
    return ref_logps


def write_reference_cache(output_dir, ref_logps, run_key, seconds):
    """output_dir/ref_logprobs.jsonl (one row per pair) and its .meta.json: the run_key and the file's sha256."""
    n = sum(map(len, ref_logps.values()))
    print0(f"reference log-probs: {n} pairs in {seconds:.1f}s ({n / seconds:.1f} pairs/s)")
    if dist.get_rank() != 0:
        return
    rows = [dict(split=split, index=i, chosen_logprob=c, rejected_logprob=r)
            for split in ref_logps for i, (c, r) in sorted(ref_logps[split].items())]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(os.path.join(output_dir, "ref_logprobs.jsonl"), text)
    atomic_write(os.path.join(output_dir, "ref_logprobs.meta.json"),
                 json.dumps(dict(fingerprint=sha256(json.dumps(run_key)), sha256=sha256(text))) + "\n")
    print0(f"reference log-probs -> {output_dir}/ref_logprobs.jsonl")


def latest_checkpoint(output_dir):
    done = [d for d in glob.glob(os.path.join(output_dir, "checkpoints", "update_*")) if not d.endswith(".partial")]
    return max(done, key=lambda d: int(d.rsplit("_", 1)[1]), default=None)


def read_train_state(checkpoint):
    """A checkpoint's train_state.json (written last, before the folder is renamed: never missing after a crash)."""
    try:
        with open(os.path.join(checkpoint, "train_state.json")) as f:
            state = json.load(f)
        if isinstance(state, dict) and type(state.get("update")) is int:
            return state
    except (OSError, ValueError):
        pass
    fail(f"{checkpoint}/train_state.json is missing or damaged: delete {checkpoint} to start afresh, or restore it")


def save_checkpoint(model, optimizer, cfg, world, train_state):
    """A resumable, sharded checkpoint (torch.distributed.checkpoint) with train_state.json: the update count, the
    config, and the fingerprints of the starting model's files and of the data that a resume must match. Written to a
    .partial folder and renamed when complete, so a crash while saving leaves the previous checkpoint usable; older
    ones are removed afterwards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(cfg.output_dir, "checkpoints", f"update_{train_state['update']:06d}")
    partial = final + ".partial"
    if world.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)
    if world.rank == 0:
        # rank 0's RNG (nothing in training draws random numbers; kept for forks that do)
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(partial, "rng.pt"))
        atomic_write(os.path.join(partial, "train_state.json"), json.dumps(dict(
            train_state, pairs_seen=train_state["update"] * cfg.batch_size, config=dataclasses.asdict(cfg))))
        replace_path(partial, final)
        for old in glob.glob(os.path.join(cfg.output_dir, "checkpoints", "update_*")):
            if old != final and not old.endswith(".partial"):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(model, optimizer, path):
    """Model, optimizer and RNG state from a checkpoint; returns its update count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
        rng = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 — a damaged checkpoint: one line, what to do
        fail(f"{path} cannot be read ({type(e).__name__}: {first_line(e)[:120]}): delete it to start afresh, or "
             "restore it")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    update = read_train_state(path)["update"]
    print0(f"resumed from {path} at update {update}")
    return update


def save_final(model, cfg, world):
    """A consolidated Hugging Face checkpoint (safetensors + tokenizer) loadable by from_pretrained, vLLM, lm-eval."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoTokenizer
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = os.path.join(cfg.output_dir, "final")
    if world.rank == 0:
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, state_dict={k: v.to(model.starting_dtype) for k, v in state.items()})
        model.config.dtype = model.starting_dtype  # save_pretrained wrote the fp32 of the live weights
        model.config.save_pretrained(partial)
        AutoTokenizer.from_pretrained(cfg.model).save_pretrained(partial)  # as it was: without the pad set for training
        replace_path(partial, final)
    dist.barrier()
    return final


def open_metrics(cfg, world, num_updates, resumed_at=None):
    """log(record, rollouts=None) and close(): rank 0 prints a line per record, appends it to output_dir/metrics.jsonl
    (and the rollout rows to rollouts.jsonl) and sends it to --report_to's tracker. A resume first keeps the lines up
    to its checkpoint's update only, so that none is there twice and none is lost."""
    paths = [os.path.join(cfg.output_dir, name) for name in ("metrics.jsonl", "rollouts.jsonl")]
    for path in paths if world.rank == 0 else []:
        old, unreadable = read_jsonl(path) if os.path.exists(path) else ([], 0)
        if unreadable:
            print(f"note: {unreadable} unreadable line(s) of {path} dropped (cut by a crash or a full disk)")
        if old or path == paths[0]:
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in old
                                       if resumed_at is not None and r.get("update", 1e9) <= resumed_at))
    track, close = open_tracker(cfg.report_to, cfg.output_dir, os.path.basename(os.path.abspath(cfg.output_dir)),
                                dataclasses.asdict(cfg), resumed_at=resumed_at)

    def log(record, rollouts=None):
        if world.rank != 0:
            return
        if "loss" in record:
            tqdm.write(f"update {record['update']}/{num_updates}" + (f" pass {record['pass']}" if "pass" in record
                                                                        else "")
                       + f" | loss {record['loss']:.4g} | logratio chosen {record['logratio_chosen']:+.4f} rejected "
                       f"{record['logratio_rejected']:+.4f} | lr {record['lr']:.3g} | grad norm "
                       f"{record['grad_norm']:.3g} | {record['pairs_per_s']:.2f} pairs/s | "
                       f"{record['tokens_per_s']:.0f} tokens/s")
        elif "val_loss" in record:
            tqdm.write(f"eval @ update {record['update']}: val_loss {record['val_loss']:.4g} | sign_align "
                       f"{record['sign_align']:.3f}")
        elif "score" in record:
            tqdm.write(f"rollout {record['update']}/{num_updates} | score {record['score']:.4g} | kl "
                       f"{record['kl']:+.4f} | with a stop token {record['stopped']:.2f} | response "
                       f"{record['response_tokens']:.0f} tokens | {record['rollout_s']:.1f}s, "
                       f"{record['rollout_tokens_per_s']:.0f} tokens/s")
        append_jsonl(paths[0], record)
        for row in rollouts or []:
            append_jsonl(paths[1], row)
        track(record, record["update"])
    return log, close


def describe_run(cfg, world, dtype, splits, accumulation, num_updates):
    """The derived sizes of the run, in two lines."""
    train = splits.get("train", [])
    data = (f"online: {cfg.batch_size} prompts × {cfg.num_samples} samples per update" if cfg.online else
            f"train pairs {len(train)} | eval pairs {len(splits.get('eval', []))} | mean tokens per pair "
            f"{sum(map(pair_tokens, train)) / len(train):.0f}")
    epochs = f"epochs {num_updates * cfg.batch_size / len(train):.2f} | " if train else ""
    return (f"processes {world.size} | device {world.device.type} | compute dtype {dtype} | {data}\n"
            f"updates {num_updates} of {cfg.batch_size} pairs = {cfg.micro_batch_size} per forward × {accumulation} "
            f"accumulation × {world.size} processes" + (f" × {cfg.epochs_per_batch} passes" if cfg.epochs_per_batch > 1
                                                     else "") + " | warm-up "
            f"{int(cfg.warmup_ratio * num_updates) if cfg.lr_schedule == 'cosine' else 0} updates | {epochs}"
            f"{cfg.total_episodes - num_updates * cfg.batch_size} of total_episodes left over (not a whole batch)")


HELD_LOCKS = {}  # lock file -> its open handle, held until this process ends


def lock_folder(folder):
    """Take an exclusive lock on folder/.lock (POSIX flock) for the rest of this process; False when another process
    holds it: two runs writing one folder would mix their outputs."""
    import fcntl
    path = os.path.realpath(os.path.join(folder, ".lock"))
    if path not in HELD_LOCKS:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        HELD_LOCKS[path] = handle
    return True


# ----------------------------------------------------------------------------- models and tokenizers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer_files(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def load_tokenizer(name, padding_side="right"):
    from transformers import AutoTokenizer
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        fail(f"model {name!r}: no such folder, and not a Hub id (owner/name)")
    if os.path.isdir(name) and not has_tokenizer_files(name):
        fail(f"model {name}: no tokenizer files ({' / '.join(TOKENIZER_FILES)}) in the folder; copy them there from "
             "the model it was trained from")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side=padding_side)
    except (OSError, ValueError) as e:  # no such folder or Hub id, no access, offline
        fail(f"could not load the tokenizer of {name!r}: {first_line(e)}")
    if not tokenizer.chat_template:
        fail(f"tokenizer of {name} has no chat template; REBEL formats prompts and responses with it")
    if tokenizer.pad_token_id is None:  # Llama-3 has none; pads are masked out, so any id does
        tokenizer.pad_token = tokenizer.eos_token
    try:
        text = apply_template(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    except BadRow:
        text = ""
    if tokenizer.bos_token and text.startswith(2 * tokenizer.bos_token):
        print0(f"warning: the chat template of {name} writes the BOS token {tokenizer.bos_token} twice at the start "
               "of every prompt")
    return tokenizer


def load_model_config(name, **overrides):
    """The model's config, and a one-line error now (before data work) for a folder without config or weights."""
    from transformers import AutoConfig
    if os.path.isdir(name) and not glob.glob(os.path.join(name, "*.safetensors")) + glob.glob(
            os.path.join(name, "*.bin")):
        fail(f"model folder {name} has no weights (*.safetensors or *.bin)")
    try:
        return AutoConfig.from_pretrained(name, **overrides)
    except (OSError, ValueError) as e:
        fail(f"could not load the config of model {name!r}: {first_line(e)}")


def vocab_size(config):
    """Rows of the input embedding (a multimodal config keeps them in its text config)."""
    return getattr(config, "vocab_size", None) or config.get_text_config().vocab_size


def note_pad_outside(tokenizer, rows, name):
    """One line when the tokenizer's pad id is not a row of the model's embedding (REBEL-Llama-3's [PAD] is id 128256
    of 128,256 rows): nothing breaks, since pads are masked and padded with an id of the embedding instead."""
    pad = tokenizer.pad_token_id
    if pad is not None and not 0 <= pad < rows:
        print0(f"note: the pad token of {name} ({tokenizer.pad_token!r}, id {pad}) is outside its {rows}-row "
               "embedding; pads are masked, so an id of the embedding pads instead")


def read_weights_on_rank0(name, config, model):
    """(the full fp32 state dict, the buffers that checkpoints leave out, e.g. rotary's) of the checkpoint, read by rank
    0 alone (one copy in host memory); {} and None elsewhere. Rank 0 also gives `model` (on the meta device) the
    checkpoint's generation config (Llama-3's two stop tokens, saved with final/) and checks that its head computes as
    response_logprobs does. A checkpoint that cannot be loaded stops every rank in one line."""
    from transformers import AutoModelForCausalLM
    loaded = on_rank0(load_pretrained, AutoModelForCausalLM, name, config=config, dtype=torch.float32, share=False)
    on_rank0(check_architecture, name, model if dist.get_rank() else loaded)
    if dist.get_rank() != 0:
        return {}, None
    model.generation_config = loaded.generation_config
    full = loaded.state_dict()
    return full, {n: b for n, b in loaded.named_buffers(remove_duplicate=False) if n not in full}  # shared ones too


def dropout_off(model):
    """`model` without dropout (as the paper's runs): log-probs must be the same numbers in every forward."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    return model


def decoder_layers(name, model):
    """The decoder's layers, each its own FSDP unit; a one-line error for a model that keeps them elsewhere."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        fail(f"{name}: {type(model).__name__}'s decoder has no .layers (a GPT-2-style model?); rebel.py shards and "
             "checks the decoder layers found there")
    return layers


# Head fields of the installed transformers' CausalLM forwards, applied by token_logprobs: the logits are multiplied
# by these fields (Granite's logits_scaling divides), then soft-capped c·tanh(logits / c) by these.
HEAD_SCALES = {"logits_scaling": {"granite": -1, "hyperclovax": 1}, "logit_scale": {"cohere": 1, "aya_vision": 1},
               "lm_head_multiplier": {"falcon_h1": 1}, "output_multiplier": {"muse": 1}}  # model_type prefix: power
HEAD_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
HEAD_REFUSED = {"chameleon": "its forward masks the image tokens' logits", "inkling": "its forward caps or cuts the "
                "logits its own way (Inkling2Softcap, unpadded_vocab_size)"}


def head_transform(config, name=None):
    """(scale, softcap) of the logits as the model's own forward makes them from its head's output: Granite's
    ÷logits_scaling, Cohere's ×logit_scale, Falcon-H1's ×lm_head_multiplier, then Gemma-2/3's final_logit_softcapping
    c·tanh(x/c) (None: no cap). Fails in one line naming the field on a model whose forward does something else."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = {str(getattr(c, "model_type", "")) for c in (config, text)}
    for prefix, why in HEAD_REFUSED.items():
        if any(t.startswith(prefix) for t in types):
            fail(f"{name or config.model_type}: {why}, which response_logprobs does not apply")
    scale, softcap = 1.0, None
    for field, powers in HEAD_SCALES.items():
        value = getattr(text, field, None)
        if value is None:
            continue
        power = next((p for prefix, p in powers.items() if any(t.startswith(prefix) for t in types)), None)
        if power is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail(f"{name or config.model_type}: its config's {field} ({value!r}) scales the logits in a way "
                 f"response_logprobs does not know for model type {'/'.join(sorted(types))}")
        scale *= float(value) ** power
    caps = [getattr(text, f) for f in HEAD_SOFTCAPS if getattr(text, f, None)]
    if caps:
        if len(caps) > 1 or isinstance(caps[0], bool) or not isinstance(caps[0], (int, float)) or caps[0] <= 0:
            fail(f"{name or config.model_type}: logit soft-capping {caps} that response_logprobs cannot apply")
        softcap = float(caps[0])
    return scale, softcap


def check_architecture(name, model):
    """Fail in one line on a policy whose log-probs response_logprobs would not compute as its own forward does: the
    head's bias, scaling and soft-capping are applied (head_transform); anything else is refused. With real weights
    (rank 0's loaded copy), also compare log-probs at 8 positions with the model's own forward (two short forwards)."""
    scale, softcap = head_transform(model.config, name)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        fail(f"{name}: its output head is a {type(head).__name__}, not a linear layer: response_logprobs computes "
             "h·Wᵀ + b")
    if head.weight.is_meta:
        return
    ids = torch.arange(8)[None] * 7 % head.weight.shape[0]
    with torch.no_grad():
        own = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
        targets = torch.stack([own.argmax(-1), own.argmin(-1),
                               *torch.randint(own.shape[-1], (4, 8), generator=torch.Generator().manual_seed(0))])
        mine = torch.stack([token_logprobs(hidden, head.weight, t, 1.0, head.bias, scale, softcap) for t in targets])
    gap = (own.gather(-1, targets.T).T - mine).abs().max().item()
    if not gap <= 1e-3 * max(1.0, own.abs().max().item()):
        fail(f"{name}: the log-probs response_logprobs computes differ from {type(model).__name__}'s own forward (by "
             f"{gap:.3g} nats): its head does something to the logits that rebel.py does not apply")


def load_pretrained(cls, name, **kwargs):
    """cls.from_pretrained(name, ...), and a one-line error for what cannot be loaded (no weights, a truncated or
    corrupt file, no access, offline)."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except Exception as e:  # noqa: BLE001 — OSError, safetensors' errors, ...: all said in one line
        fail(f"could not load the model {name!r}: {type(e).__name__}: {first_line(e)}")


def compute_dtype(name, device):
    return (torch.bfloat16 if device.type == "cuda" else torch.float32) if name == "auto" else getattr(torch, name)


# ----------------------------------------------------------------------------- settings

def parse_config(cls, argv=None):
    """A config from the command line with transformers' HfArgumentParser (`--help` lists every field with its doc and
    default; booleans: `--flag`, `--flag false`), optionally from a YAML or JSON file, `--config run.yaml` or the file
    alone as HF's example scripts take it, whose settings the flags given with it override."""
    from transformers import HfArgumentParser
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        argv.insert(0, "--config")
    parser = HfArgumentParser(cls, description=sys.modules[cls.__module__].__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="YAML or JSON file of settings (field: value, or a "
                        "recipe's section named after this script); flags given too override it")
    for action in parser._actions:  # HfArgumentParser gives --no_flag the help of --flag, which says the opposite
        if any(o.startswith("--no_") for o in action.option_strings) and action.const is False:
            action.help = f"turn --{action.dest} off%(default).0s"  # (%(default).0s: no "(default: False)" after it)
    # a usage mistake in one line, not the usage block before it
    parser.error = lambda message: parser.exit(2, f"error: {message}{'' if '--help' in message else ' (see --help)'}\n")
    paths = parser.parse_known_args(argv)[0].config or []
    if len(paths) > 1:
        fail(f"--config given {len(paths)} times ({', '.join(paths)}): give one settings file, and flags for the rest")
    path = paths[0] if paths else None
    if path:
        parser.set_defaults(**read_settings(path, cls))
    cfg, *_, unknown = parser.parse_args_into_dataclasses(argv, look_for_args_file=False,
                                                          return_remaining_strings=True)
    if getattr(cfg, "online", False):  # the online runs' defaults, for the settings neither flags nor the file give
        given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")} | set(
            read_settings(path, cls) if path else {})
        cfg = dataclasses.replace(cfg, **{k: v for k, v in ONLINE_DEFAULTS.items() if k not in given})
    if unknown:
        files = [a for a in unknown if a.endswith((".yaml", ".yml", ".json"))]
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see --help)"
                     + (f"; a settings file goes first or after --config: --config {files[0]}" if files else ""))
    return cfg


SCRIPTS = ("rebel", "generate", "score", "eval_gsm8k")  # the sections of a recipe (recipes/*.yaml)


def read_settings(path, cls):
    """The settings of a YAML or JSON file: `setting: value` lines, or a recipe's sections named after the scripts,
    of which each script reads its own."""
    import yaml  # PyYAML: a dependency of transformers
    try:
        with open(path) as f:
            settings = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:
        fail(f"--config {path}: {first_line(e)}")
    if not isinstance(settings, dict):
        fail(f"--config {path}: expected a mapping of setting: value, got {type(settings).__name__}")
    if settings and set(settings) <= set(SCRIPTS):
        script = os.path.splitext(os.path.basename(sys.modules[cls.__module__].__file__))[0]
        if not isinstance(settings.get(script), dict):
            fail(f"--config {path}: no section {script}: (sections: {', '.join(settings)})")
        settings = dict(settings[script])
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(types))
    if unknown:
        fail(f"--config {path}: unknown settings {', '.join(unknown)} (see --help)")
    for name, value in settings.items():
        try:
            settings[name] = as_setting(value, types[name])
        except ValueError as e:
            fail(f"--config {path}: {name} {e}")
    return settings


def as_setting(value, kind):
    """`value` as a setting of type `kind` (int, float, bool, str or a Literal), a string read as a flag's would be
    (YAML reads 3e-7 as a string). Raises ValueError saying what was expected."""
    from argparse import ArgumentTypeError

    from transformers.hf_argparser import string_to_bool
    if typing.get_origin(kind) is Literal:
        if value in typing.get_args(kind):
            return value
        raise ValueError(f"must be one of {', '.join(typing.get_args(kind))}, got {value!r}")
    if isinstance(value, str) and kind in (int, float, bool):
        try:
            value = string_to_bool(value) if kind is bool else kind(value)
        except (ValueError, ArgumentTypeError):
            pass
    if kind is float and type(value) is int:
        value = float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        if kind is float and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value
    expected = dict(int="an integer", float="a number", bool="true or false", str="a string")[kind.__name__]
    raise ValueError(f"must be {expected}, got {value!r}")


def check_config(cfg):
    """Fail with one line on a setting of the wrong type, not among a Literal's values, or outside its field's valid
    interval ("(0, inf)", "[0, 1)", ...), before any data or model is loaded. --report_to's package must import."""
    for f in dataclasses.fields(cfg):
        try:
            setattr(cfg, f.name, as_setting(getattr(cfg, f.name), f.type))
        except ValueError as e:
            fail(f"--{f.name} {e}")
        interval, value = re.search(r"\(valid: (.*)\)$", f.metadata["help"]), getattr(cfg, f.name)
        if interval:
            interval = interval.group(1)
            low, high = map(float, interval[1:-1].split(","))
            if not ((low < value if interval[0] == "(" else low <= value)
                    and (value < high if interval[-1] == ")" else value <= high)):
                need = f"{'>' if interval[0] == '(' else '>='} {low:g}" if high == math.inf else f"in {interval}"
                fail(f"--{f.name} must be {need}, got {value}")
    if getattr(cfg, "report_to", "none") != "none":
        package = {"wandb": "wandb", "tensorboard": "torch.utils.tensorboard"}[cfg.report_to]
        try:
            __import__(package)
        except ImportError:
            fail(f"--report_to {cfg.report_to}: the package is not installed (pip install {cfg.report_to})")


def changed_settings(old, new, names, flags=None):
    """"--name old -> new; ..." for the settings among `names` that differ between two records ('' when none); only
    the `flags` are written --name (all when None)."""
    return "; ".join(f"{'--' if flags is None or k in flags else ''}{k} {old.get(k)!r} -> {new.get(k)!r}"
                     for k in sorted(names) if old.get(k) != new.get(k))


def run_script(main, cls, how_to_continue, argv=None):
    """main(its config from the command line); Ctrl-C (or SIGTERM) and a full disk end with one line saying how to
    continue, not a traceback. The process group is destroyed on every way out (else an error after it exists may
    abort the process, rc 134, "terminate called without an active exception")."""
    import signal
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a job's end (SLURM, kill): said as Ctrl-C is
        signal.signal(signal.SIGTERM, terminated)
    try:
        main(parse_config(cls, argv))
    except KeyboardInterrupt:
        print0(f"\ninterrupted: {how_to_continue}")
        raise SystemExit(130) from None
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is not an Exception
        full = None if isinstance(e, SystemExit) else disk_full(e)
        if full is None:
            raise
        raise SystemExit(f"error: no space left on device{f' ({full.filename})' if full.filename else ''}: free some "
                         f"space, then {how_to_continue} (what was saved is kept)") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def terminated(signum, frame):
    raise KeyboardInterrupt


def disk_full(error):
    """The OSError ENOSPC in an exception's chain (causes, contexts, a CheckpointException's failures), or None."""
    import errno
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if isinstance(e, tuple):  # CheckpointException's failures are (exception, traceback) pairs
            todo += [x for x in e if isinstance(x, BaseException)]
            continue
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        failures = getattr(e, "failures", None)
        todo += [e.__cause__, e.__context__, *(failures.values() if isinstance(failures, dict) else [])]
    return None


# ----------------------------------------------------------------------------- processes

@dataclass
class World:
    """Where this process runs: its rank among `size` processes, and its device."""
    rank: int
    size: int
    device: torch.device


def init_distributed():
    """The World of this process. Under torchrun: NCCL on GPU, gloo on CPU. Alone: a 1-process gloo group, so the same
    FSDP code runs everywhere."""
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend, gpu = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=gpu)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=gpu)
    return World(rank, size, device)


def for_rank(batches, rank, world_size):
    """Micro-batches dealt round-robin (sorted by length: ranks get similar work). Every rank must run as many forwards
    under FSDP, so short ranks get `None` placeholders: run them as dummies, drop the result."""
    mine = batches[rank::world_size]
    return mine + [None] * (math.ceil(len(batches) / world_size) - len(mine))


def to_device(tensors, device):
    """Pinned host memory and non-blocking copies on GPU: the CPU keeps queueing work while the GPU computes."""
    return [t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t for t in tensors]


def from_rank0(value):
    """Rank 0's value on every rank: decisions read from a shared filesystem must not differ between processes."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn, *args, share=True, **kwargs):
    """fn(*args, **kwargs) run by rank 0 alone; its result on every rank (`share`) or on rank 0 only. When it fails
    with a one-line error, every rank stops with that line, rather than the others waiting for rank 0 forever."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except SystemExit as e:
            error = str(e)
    if error := from_rank0(error):
        raise SystemExit(error)
    return from_rank0(result) if share else result


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def fail(message):
    """One clear line for the user, then exit (before any expensive work where possible)."""
    raise SystemExit(f"error: {message}")


def first_line(error):
    """The first line of an exception's message ('' for none): what a one-line error quotes of it."""
    return (str(error).splitlines() or [""])[0]


# ----------------------------------------------------------------------------- files

def sha256(data):
    """The one checksum of this project: sha256 of bytes or text (UTF-8), as hex."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def replace_path(tmp, path):
    """Put the finished file or folder `tmp` at `path` in one rename (an old folder there is removed first), so that a
    crash leaves the old version or the new, never half of one. Every output of the project is written this way."""
    if os.path.isdir(path) and os.path.isdir(tmp):
        shutil.rmtree(path)
    os.replace(tmp, path)


def atomic_write(path, text):
    """Write a text file at a temporary name, then replace_path."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    replace_path(tmp, path)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a .jsonl file, and how many lines could not be parsed (a line cut by a full disk or a kill)."""
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad


def check_writable(folder, what):
    """Fail now, not after hours of work, if `folder` cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, f".write_test{os.getpid()}"), "")
        os.remove(os.path.join(folder, f".write_test{os.getpid()}"))
    except OSError as e:
        fail(f"{what} {folder}: cannot write there ({e.strerror or e})")


def check_output(path, flag, kind, inputs=None, model=None):
    """The pre-flight of every script's output, before any work: `path` must be a `kind` ("file" or "folder") or not
    exist yet; it must not be one of the `inputs` ({flag: path}: it would replace it); a file must not be written
    among the `model` folder's files (their fingerprint says which model made it), nor a folder hold the model (a run
    replaces its final/ and checkpoints/). Its folder must be writable."""
    if os.path.exists(path) and os.path.isdir(path) != (kind == "folder"):
        fail(f"{flag} {path} is a {'folder' if os.path.isdir(path) else 'file'}, not a {kind}")
    for name, source in (inputs or {}).items():
        if source and os.path.realpath(path) == os.path.realpath(source):
            fail(f"{flag} {path} is the {name} file: it would be replaced; choose another")
    if model and os.path.isdir(model) and kind == "file" and (
            os.path.dirname(os.path.realpath(path)) == os.path.realpath(model)):
        fail(f"{flag} {path} is in the model folder {model}, whose files say which model made the output; write it "
             "elsewhere")
    if model and os.path.isdir(model) and kind == "folder" and os.path.join(os.path.realpath(model), "").startswith(
            os.path.join(os.path.realpath(path), "")):
        fail(f"--model {model} is inside {flag} {path}, where this run writes final/ and checkpoints/; use another "
             f"{flag}")
    check_writable(path if kind == "folder" else os.path.dirname(os.path.abspath(path)), flag)


def load_split(source, split):
    """The rows of a split: a Hub id, a folder saved by `save_to_disk` or a folder of data files (read by `datasets`),
    or one .json/.jsonl/.parquet file (which has a single split, 'train'), read by `read_data_file` from its content,
    every value exactly as written. Returns None when the split does not exist."""
    import datasets
    check_data_source(source)
    if os.path.isfile(source):
        if not source.endswith(DATA_FILE_TYPES):
            fail(f"{source}: expected a .json, .jsonl or .parquet file")
        return read_data_file(source) if split == "train" else None
    if os.path.isdir(source) and (os.path.exists(os.path.join(source, "dataset_dict.json"))
                                  or os.path.exists(os.path.join(source, "dataset_info.json"))):
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.Dataset):
            return data if split == "train" else None
        return data[split] if split in data else None
    files = os.path.isdir(source) and folder_data_files(source)
    if files:  # a folder of data files: `datasets` names each file's split, read_data_file reads them
        return Rows([r for path in files[split] for r in read_data_file(path).to_list()]) if split in files else None
    try:
        available = datasets.get_dataset_split_names(source)
    except Exception as e:  # noqa: BLE001 — any loading failure is reported in one line
        fail(f"dataset {source!r} could not be opened: {type(e).__name__}: {first_line(e)}")
    return datasets.load_dataset(source, split=split) if split in available else None


def folder_data_files(folder):
    """{split: [file, ...]} of a folder of .json/.jsonl/.parquet files, split as `datasets` names them (train.jsonl,
    data/test-*.parquet, a README's configs); None when it holds other files, or `datasets` cannot tell."""
    import datasets
    try:
        files = {str(split): list(paths) for split, paths in datasets.load_dataset_builder(folder).config.data_files
                 .items()}
    except Exception:  # noqa: BLE001 — load_split then asks `datasets` itself, failing in one line
        return None
    return files if files and all(p.endswith(DATA_FILE_TYPES) for ps in files.values() for p in ps) else None


def require_split(source, split):
    """load_split, failing in one line (the same in every script) when the split is missing."""
    data = load_split(source, split)
    if data is None:
        fail(f"{source} has no split {split!r}")
    return data


def check_data_source(source):
    """Fail in one line, before a model or tokenizer is fetched, on data that is neither a file or folder here nor a
    Hub id."""
    if not os.path.exists(source):
        if source.endswith((".json", ".jsonl", ".parquet")):
            fail(f"{source}: no such file")
        if source.count("/") != 1:
            fail(f"dataset {source!r}: no such file or folder, and not a Hub id (owner/name)")


DATA_FILE_TYPES = (".json", ".jsonl", ".parquet")


class Rows:
    """The rows of a data file, as the scripts use a datasets.Dataset: column_names, len(), rows[i] (a dict of every
    column, None where a row lacks one), rows["column"] (a list), select(indices) and to_list(). Nothing is cached or
    converted: a value is what the file holds (a JSON integer stays exact, a string that looks like JSON a string)."""

    def __init__(self, rows, column_names=None, json_columns=()):
        self.column_names = column_names or list(dict.fromkeys(k for row in rows for k in row))
        self.json_columns = set(json_columns)  # of a parquet file that `datasets` wrote as JSON: decoded as it does
        self._rows = rows

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.column_names:
                raise KeyError(key)
            return [row.get(key) for row in self._rows]
        return {c: self._rows[key].get(c) for c in self.column_names}

    def select(self, indices):
        return Rows([self._rows[i] for i in indices], self.column_names, self.json_columns)

    def to_list(self):
        return [self[i] for i in range(len(self))]


def arrow_table(rows, path):
    """The rows as a pyarrow Table for a parquet file, every value kept exact (integers past int64, e.g. uint64 hashes
    as prompt ids, as uint64); fails in one line on a column that parquet cannot hold as it is (e.g. integers and
    strings, strings and lists), before the long work where the caller can."""
    import pyarrow as pa
    columns = list(dict.fromkeys(k for row in rows for k in row))
    arrays = []
    for column in columns:
        values = [row.get(column) for row in rows]
        present = [v for v in values if v is not None]
        kind = None
        if any(type(v) is int and not -2 ** 63 <= v < 2 ** 63 for v in present):
            if not all(type(v) is int and 0 <= v < 2 ** 64 for v in present):
                fail(f"{path}: column {column!r} holds integers that a parquet file cannot keep exact (past int64, "
                     "and not all in [0, 2^64) for uint64): write a .jsonl file")
            kind = pa.uint64()
        if any(type(v) is float for v in present) and any(type(v) is int and abs(v) > 2 ** 53 for v in present):
            fail(f"{path}: column {column!r} mixes numbers with integers past 2^53, which a parquet column of "
                 "numbers would round: write a .jsonl file")
        try:
            arrays.append(pa.array(values, type=kind))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            types = sorted({json_type(v) for v in present})
            fail(f"{path}: column {column!r} " + (f"mixes {' and '.join(types)} values" if len(types) > 1 else
                                                  f"cannot be written as parquet ({first_line(e)})")
                 + ", which a parquet file cannot hold: write a .jsonl file")
    return pa.Table.from_arrays(arrays, names=columns)


def read_data_file(path):
    """The Rows of a .json/.jsonl/.parquet file, read from its content (a file replaced by another of the same size
    and time is read anew). JSON lines: one object per line, blank lines skipped, a UTF-8 BOM accepted; a .json file
    may also be one list of objects, or one object of equal-length column lists. Fails in one line naming the file
    and, for JSON, the line."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 — ArrowInvalid (not parquet, cut), OSError, ...: one line
            fail(f"{path}: could not be read as parquet ({type(e).__name__}: {first_line(e)})")
        try:  # `datasets` writes a column that it read as JSON (its Json feature) as the JSON text of each value
            features = json.loads((table.schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
        except (ValueError, KeyError, TypeError):
            features = {}
        json_columns = {f.name for f in table.schema if getattr(f.type, "extension_name", None) == "arrow.json"
                        or (features.get(f.name) or {}).get("_type") == "Json"}
        rows = table.to_pylist()
        for row in rows:
            for column in json_columns:
                if isinstance(row[column], str):
                    row[column] = json.loads(row[column])
        return Rows(rows, json_columns=json_columns)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        fail(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x})")
    if not text.strip():
        fail(f"{path}: the file is empty")
    rows, error = json_lines(text)
    if error:  # not JSON lines: one JSON document (`datasets` read one too)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            first = next(n for n, line in enumerate(text.split("\n"), 1) if line.strip())
            if error[0] == f"line {first}":  # a document that breaks on its first line: say where it breaks
                error = (f"line {e.lineno}", f"not valid JSON ({e.msg})")
        else:
            rows, error = json_document(document)
    elif path.endswith(".json") and len(rows) == 1 and all(isinstance(v, list) for v in rows[0][1].values()):
        rows, error = json_document(rows[0][1])  # one object of column lists, on one line
    if error:
        fail(f"{path}: " + ": ".join(filter(None, error)))
    if re.search(r"\\u[dD][89a-fA-F]", text):  # only an escape can make a lone surrogate
        for where, row in rows:
            found = lone_surrogate(row)
            if found:
                fail(f"{path}: {where}: {found} holds a lone surrogate escape (\\ud800-\\udfff without its pair), "
                     "which is not text: fix or drop that row")
    return Rows([row for _, row in rows])


def json_lines(text):
    """([(where, object)], None) of JSON lines text, or (None, (where, what is wrong)); where is "line N"."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): a JSON string may hold U+2028 as it is
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return None, (f"line {n}", f"not valid JSON ({e.msg})")
        if not isinstance(row, dict):
            return None, (f"line {n}", f"expected a JSON object, got {json_type(row)}")
        rows.append((f"line {n}", row))
    return rows, None


def json_document(document):
    """([(where, object)], None) of a JSON document: a list of objects, an object of equal-length column lists
    (transposed) or one object; or (None, (where, what is wrong)). where is "row N"."""
    if isinstance(document, list):
        for i, row in enumerate(document):
            if not isinstance(row, dict):
                return None, (f"row {i}", f"expected a JSON object, got {json_type(row)}")
        return [(f"row {i}", row) for i, row in enumerate(document)], None
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        lengths = {k: len(v) for k, v in document.items()}
        if len(set(lengths.values())) > 1:
            return None, (None, "an object of columns needs lists of one length, got "
                          + ", ".join(f"{k!r} {n}" for k, n in lengths.items())[:200])
        return [(f"row {i}", dict(zip(document, values))) for i, values in enumerate(zip(*document.values()))], None
    if isinstance(document, dict):
        return [("row 0", document)], None
    return None, (None, f"expected JSON objects, one per line, or a list of objects; got {json_type(document)}")


def lone_surrogate(value, where="a value"):
    """Where in a JSON value a string holds a lone surrogate ("\\ud800" escaped in JSON: not encodable text), or
    None."""
    if isinstance(value, str):
        return where if LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            found = lone_surrogate(k, "a column name") or lone_surrogate(v, f"column {k!r}")
            if found:
                return found
    if isinstance(value, list):
        for v in value:
            found = lone_surrogate(v, where)
            if found:
                return found
    return None


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_type(value):
    """The type of a value read from a data file, as an error says it: str, int, list, dict, null, ..."""
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------- trackers

def open_tracker(report_to, run_dir, name, config, resumed_at=None):
    """log(record, step) and close() for --report_to (HF Trainer's names), rank 0 only. wandb: one run per run_dir, its
    id kept in run_dir/wandb_run_id so that a resume continues it; TensorBoard: run_dir/tensorboard, where a resume
    purges the events logged after its checkpoint, so that no step is there twice. The full config is logged once.
    `update` is the step, not a metric."""
    if report_to == "none" or dist.get_rank() != 0:
        return (lambda record, step: None), (lambda: None)
    if report_to == "wandb":
        import wandb
        id_path = os.path.join(run_dir, "wandb_run_id")
        run_id = open(id_path).read().strip() if resumed_at is not None and os.path.exists(id_path) else None
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rebel"), id=run_id, resume="allow", name=name,
                         dir=run_dir, config=None if run_id else config)  # a resumed run has its config already
        atomic_write(id_path, run.id)
        return (lambda record, step: run.log({k: v for k, v in record.items() if k != "update"}, step=step)), run.finish
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                           purge_step=None if resumed_at is None else resumed_at + 1)
    if resumed_at is None:
        writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "))  # shown as code

    def log(record, step):
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "update":
                writer.add_scalar(key, value, step)
        writer.flush()
    return log, writer.close


def log_summary(report_to, output, config, prefix, summary):
    """A finished generate.py or score.py run's summary, as one record under `prefix/`, in OUTPUT.shards/'s tracker."""
    log, close = open_tracker(report_to, output + ".shards", os.path.basename(output), config)
    log({f"{prefix}/{k}": v for k, v in summary.items()}, 0)
    close()


if __name__ == "__main__":
    sys.modules["rebel"] = sys.modules["__main__"]  # generate.py and score.py import this copy, not a second one
    run_script(main, Config, "continue with the same command and --resume")
