"""Sample responses from a policy: the first step of each REBEL iteration (Gao et al. 2024, arXiv 2404.16767).

Formats every prompt with the policy's chat template (the user turn(s) and the generation prompt) and samples
num_samples responses per prompt: temperature 0.8, top_p 0.9, no top_k, at most 2048 new tokens, ending at the model's
end tokens. Nothing else from the checkpoint's generation_config.json (a repetition penalty, min_new_tokens, ...)
applies: the responses are on-policy samples of exactly these settings. Defaults reproduce the authors' run: 5
samples from Meta-Llama-3-8B-Instruct for each UltraFeedback prompt. Writes one row per prompt, in input order, as a
.parquet or .jsonl file that `datasets` loads (parquet is ~3× smaller: use it for large runs):

    prompt_id      the input's `prompt_id` column, else the row index
    prompt         as in the input: a string (one user turn) or a list of {"role", "content"} messages
    prompt_ids     the templated prompt's token ids: what was sampled after
    responses      num_samples strings: the tokens before the stop token, special tokens removed
    response_ids   num_samples lists of the sampled token ids, the stop token included when one was sampled
    truncated      num_samples bools: true when the response hit max_new_tokens without a stop token
    num_tokens     num_samples ints: tokens sampled, the stop token included
    temperature, top_p   the sampling settings (rebel.py checks its --temperature against them)
    chat_date      only where the chat template writes today's date: the one it wrote, when this output was begun
    sampled_by     the fingerprint of the model's files (rebel.py drops pairs sampled by a model other than --model)

score.py scores the responses and picks the pairs that rebel.py trains on, token for token.

A prompt is a string (one user turn) or a list of {"role", "content"} messages. A string in Anthropic-HH's and
Nectar's format, "\n\nHuman: What is X?\n\nAssistant: It is Y.\n\nHuman: And Z?\n\nAssistant:" (leading newlines
optional; turns alternating, ending with an empty Assistant: turn), is templated as its turns: user, assistant, user
(one line says how many were; --convert_hh false keeps each as one user turn; rebel.py's --convert_hh must agree).

--format alpaca_eval writes AlpacaEval's model_outputs instead: a .json list of {"instruction", "output",
"generator"}, in input order, output = the first sample of each prompt, e.g. for AlpacaEval's 805 instructions:

    python generate.py --model runs/iter_1/final --prompts alpaca_eval.json --prompt_column instruction \\
        --format alpaca_eval --num_samples 1 --greedy true --output runs/iter_1/alpaca_eval/model_outputs.json

    # one process (CPU or one GPU), e.g. a tiny run:
    python generate.py --model path/to/model --prompts prompts.jsonl --limit 100 --max_new_tokens 256 \\
        --output gen.parquet
    # one node, 8 GPUs, one model replica per GPU (the paper's run):
    torchrun --nproc_per_node=8 generate.py --output runs/iter_1/generations.parquet
    # several nodes (run on every node; --output on a filesystem they all see):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 generate.py \\
        --output ...
    # after a crash or a job's time limit: the same command again continues where it stopped
    # vLLM instead of transformers' generate: add --engine vllm (pip install vllm)

Prompts that cannot be used (a chat template that raises on them, malformed messages, longer than max_prompt_len
tokens) are skipped and counted. The prompts, sorted by templated length, are cut into blocks of batch_size; block b
is sampled in one call seeded from (seed, b), whichever process runs it, so the output depends on seed and batch_size
but not on the number of processes. Each finished block is saved atomically as OUTPUT.shards/block_NNNNNN.jsonl; a
rerun checks and skips saved blocks (a damaged one is redone; blocks made with other settings, prompts or model files
are refused), and the output is merged from the shards at the end. Delete OUTPUT.shards to sample afresh.
"""
import contextlib
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from rebel import (STRFTIME_NOW, arg, arrow_table, atomic_write, changed_settings, check_config, check_output,
                   check_prompt_column, check_writable, compute_dtype, end_of_turn, fail, files_fingerprint, first_line,
                   from_rank0, init_distributed, load_model_config, load_pretrained, load_tokenizer, lock_folder,
                   log_summary, note_pad_outside, print0, replace_path, require_split, run_script, sha256,
                   template_prompts, vocab_size)


@dataclass
class Config:
    model: str = arg("meta-llama/Meta-Llama-3-8B-Instruct", "policy to sample from (Hub id or local folder)")
    prompts: str = arg("allenai/ultrafeedback_binarized_cleaned_train", "Hub id, datasets folder, or "
                       ".json/.jsonl/.parquet file")
    split: str = arg("train", "split of --prompts to read")
    prompt_column: str = arg("prompt", "column holding each prompt: a string (one user turn) or a list of messages")
    num_samples: int = arg(5, "responses sampled per prompt (score.py needs 2 or more for a pair)", "[1, inf)")
    temperature: float = arg(0.8, "sampling temperature", "(0, inf)")
    top_p: float = arg(0.9, "nucleus sampling threshold (1 = off); top_k is always off, as in the paper", "(0, 1]")
    max_new_tokens: int = arg(2048, "most tokens per response; a response still going is cut and marked truncated",
                              "[1, inf)")
    max_prompt_len: int = arg(1024, "skip prompts whose templated tokens are more (rebel.py's --max_prompt_len drops "
                              "them too)", "[1, inf)")
    output: str = arg("runs/generations.parquet", "output file (.parquet or .jsonl); finished blocks go to "
                      "OUTPUT.shards/")
    seed: int = arg(0, "sampling seed (block b is seeded from seed and b)", "[0, 4294967296)")
    limit: int = arg(0, "use only the first this many prompts; 0 = all", "[0, inf)")
    batch_size: int = arg(16, "prompts per generate call (× num_samples sequences); also the block of sharding and "
                          "resuming", "[1, inf)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = arg("auto", "auto = bfloat16 on GPU, float32 on CPU")
    engine: Literal["hf", "vllm"] = arg("hf", "hf (transformers generate with the KV cache) or vllm (needs `pip "
                                        "install vllm`)")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also send the run's summary (counts, "
                                                             "throughput) to this tracker")
    convert_hh: bool = arg(True, "a prompt string in Anthropic-HH/Nectar's Human:/Assistant: format is templated as "
                           "its turns (false: as one user turn)")
    format: Literal["rows", "alpaca_eval"] = arg("rows", "rows (the columns above, .jsonl/.parquet) or alpaca_eval "
                                                 "(a .json list of {instruction, output, generator}: the first sample)")
    generator: str = arg("", "alpaca_eval: the generator name written; empty = the model folder's basename")
    greedy: bool = arg(False, "greedy decoding (temperature and top_p unused): e.g. for --format alpaca_eval")

    def __post_init__(self):
        check_config(self)
        if self.format == "alpaca_eval" and not self.output.endswith(".json"):
            fail(f"--output {self.output}: --format alpaca_eval writes a .json file")
        if self.format == "rows" and not self.output.endswith((".jsonl", ".parquet")):
            fail(f"--output {self.output}: expected a .jsonl or .parquet file (or --format alpaca_eval and .json)")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            fail("--engine vllm: vLLM is not installed (pip install vllm), or use --engine hf")


# what generate.py writes in each row; the input's other columns are carried through beside them
OUTPUT_COLUMNS = ("index", "prompt", "prompt_ids", "responses", "response_ids", "truncated", "num_tokens",
                  "temperature", "top_p", "sampled_by", "chat_date")


# ----------------------------------------------------------------------------- sampling

def make_blocks(lengths, size):
    """Blocks of `size` prompts, longest first: neighbours pad little, and an out-of-memory shows in the first block.
    They depend only on the prompts and `size`, never on the number of processes."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + size] for s in range(0, len(order), size)]


def stop_token_ids(tokenizer, model, model_config):
    """The tokens that end a response: the eos_token_id of the model's config and generation_config.json, the
    tokenizer's eos, and the chat template's end-of-turn token (found from the template; e.g. <|eot_id|>, which
    older Llama-3 configs do not list). Warns when the template's token is missing from the model's configs."""
    from transformers import GenerationConfig
    # a multimodal config (Qwen2.5-VL's) may keep it in its text config only
    config_eos = getattr(model_config, "eos_token_id", None) or getattr(model_config.get_text_config(), "eos_token_id",
                                                                        None)
    try:
        listed = [GenerationConfig.from_pretrained(model).eos_token_id, config_eos]
    except OSError as e:  # no generation_config.json is fine; a broken one is not
        if os.path.isfile(os.path.join(model, "generation_config.json")):
            fail(f"{model}/generation_config.json cannot be read: {first_line(e)}")
        listed = [config_eos]
    configured = {t for eos in listed for t in (eos if isinstance(eos, list) else [eos]) if t is not None}
    eot = end_of_turn(tokenizer)
    if eot is None:
        print0(f"warning: the chat template of {model} writes no end-of-turn token after an assistant message: the "
               "end of a response is not learned from text-only pairs, only from a sampled end token of the model's "
               "configs")
    elif eot not in configured | {tokenizer.eos_token_id}:
        print0(f"warning: the chat template ends a turn with {tokenizer.convert_ids_to_tokens(eot)!r} (id {eot}), "
               f"which {model}'s configs do not list as an end token: it is added to the stop tokens")
    return sorted(configured | {t for t in (tokenizer.eos_token_id, eot) if t is not None})


def cut_at_stop(ids, stop_ids):
    """(the sampled ids up to and including the first stop token, truncated): what follows the stop is padding."""
    for t, token in enumerate(ids):
        if token in stop_ids:
            return ids[:t + 1], False
    return ids, True


def sample_record(tokenizer, ids, truncated):
    """(text, truncated, tokens sampled, ids) of one response; the text leaves out the stop token and special tokens."""
    return tokenizer.decode(ids[:-1] if not truncated else ids, skip_special_tokens=True), truncated, len(ids), ids


def sampling(cfg):
    """The sampling settings of a config, as hf_sample takes them."""
    return dict(num_samples=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy)


@torch.no_grad()
def hf_sample(model, prompts, *, num_samples, temperature, top_p, max_new_tokens, stop_ids, seed, greedy=False):
    """`num_samples` responses to each prompt (token ids), seeded: one left-padded `generate` call with the KV cache.
    Returns per prompt a list of (ids up to and including the first stop token, truncated) samples. Pads are
    masked, so any id serves: the first stop id (a tokenizer's own pad may lie outside the embedding). greedy: the
    most likely token at each step instead (temperature and top_p unused)."""
    from transformers import GenerationConfig
    width, pad = max(map(len, prompts)), stop_ids[0]
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    # a fresh config, and none left on the model to fill its gaps: nothing of the checkpoint's generation_config.json
    # (repetition_penalty, min_new_tokens, ...) may bend the samples away from the policy's distribution
    model.generation_config = GenerationConfig()
    sampled = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
    settings = GenerationConfig(do_sample=not greedy, **sampled, max_new_tokens=max_new_tokens,
                                num_return_sequences=num_samples, eos_token_id=stop_ids, pad_token_id=pad)
    torch.manual_seed(seed)  # CPU and every GPU
    # synced_gpus=False: transformers would sync every step of a policy it sees as FSDP-managed; rebel.py's online
    # rollout gathers the weights first, so each process generates alone (one with no prompts must not be waited for)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=settings,
                         synced_gpus=False)
    samples = [cut_at_stop(ids, set(stop_ids)) for ids in out[:, width:].tolist()]
    return [samples[i:i + num_samples] for i in range(0, len(samples), num_samples)]  # prompt-major


def load_vllm(cfg, world_size):
    """One vLLM engine per process. Under torchrun, vLLM's data-parallel "external launcher" mode (its
    torchrun_dp_example): each process is one replica, and this script gives each its own blocks.
    generation_config="vllm": the checkpoint's generation_config.json sets no sampling default."""
    from vllm import LLM
    parallel = (dict(distributed_executor_backend="external_launcher", data_parallel_size=world_size)
                if world_size > 1 else {})
    return LLM(model=cfg.model, dtype=cfg.dtype, seed=cfg.seed, generation_config="vllm", **parallel)


def vllm_sample(llm, tokenizer, prompts, cfg, stop_ids, seeds):
    """As hf_sample, with vLLM; each prompt has its own seed, so its samples do not depend on the batch."""
    from vllm import SamplingParams
    temperature, top_p = (0.0, 1.0) if cfg.greedy else (cfg.temperature, cfg.top_p)  # vLLM: temperature 0 is greedy
    params = [SamplingParams(n=cfg.num_samples, temperature=temperature, top_p=top_p, top_k=-1,  # -1: no top_k
                             max_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids, seed=seed) for seed in seeds]
    # token ids, not text: vLLM would add a second <|begin_of_text|> to the templated text
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    samples = []
    for o in outputs:
        samples.append([])
        for c in o.outputs:
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and (not ids or ids[-1] not in stop_ids) and isinstance(c.stop_reason, int):
                ids.append(c.stop_reason)  # the stop token, if this vLLM version leaves it out of token_ids
            samples[-1].append(sample_record(tokenizer, ids, c.finish_reason == "length"))
    return samples


# ----------------------------------------------------------------------------- main

def main(cfg):
    world = init_distributed()
    dtype = compute_dtype(cfg.dtype, world.device)
    check_output(cfg.output, "--output", "file", inputs={"--prompts": cfg.prompts}, model=cfg.model)
    check_writable(cfg.output + ".shards", "--output")
    if cfg.num_samples < 2 and cfg.format != "alpaca_eval":
        print0(f"warning: --num_samples {cfg.num_samples}: score.py needs 2 or more responses per prompt for a pair")
    if cfg.num_samples > 1 and cfg.format == "alpaca_eval":
        print0(f"warning: --format alpaca_eval keeps the first of --num_samples {cfg.num_samples} responses per "
               "prompt: add --num_samples 1 (and --greedy true for greedy answers)")

    # prompts: read, check and template every one before the model is loaded
    data = require_split(cfg.prompts, cfg.split)
    if cfg.prompt_column not in data.column_names:
        fail(f"{cfg.prompts}: missing column {cfg.prompt_column!r} (columns: {', '.join(data.column_names)})")
    check_prompt_column(data, cfg.prompt_column, cfg.prompts)
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    model_config = load_model_config(cfg.model)
    note_pad_outside(tokenizer, vocab_size(model_config), cfg.model)
    context = getattr(model_config, "max_position_embeddings", None)
    if context and cfg.max_prompt_len + cfg.max_new_tokens > context:
        print0(f"warning: --max_prompt_len {cfg.max_prompt_len} + --max_new_tokens {cfg.max_new_tokens} is more than "
               f"{cfg.model}'s {context} positions")
    chat_date = output_chat_date(cfg, tokenizer)
    date = chat_date and datetime.datetime.fromisoformat(chat_date)
    if cfg.limit:
        data = data.select(range(min(cfg.limit, len(data))))
    prompts = list(data[cfg.prompt_column])
    prompt_ids = list(data["prompt_id"]) if "prompt_id" in data.column_names else list(range(len(data)))
    # the input's other columns (e.g. a gold answer) go into the output rows: a reward function can take them
    carried = {c: list(data[c]) for c in data.column_names
               if c not in (cfg.prompt_column, "prompt_id", *OUTPUT_COLUMNS)}
    if cfg.output.endswith(".parquet"):  # ids or prompts that a parquet file cannot hold: said before sampling
        arrow_table([dict(prompt_id=i, prompt=p) for i, p in zip(prompt_ids, prompts)], cfg.output)
    tokens, dropped = template_prompts(prompts, tokenizer, cfg.max_prompt_len, cfg.prompts, world=world, date=date,
                                       convert_hh=cfg.convert_hh)
    if not tokens:
        fail(f"{cfg.prompts}: no prompt to sample from" + (f" ({dropped[0][1]}, ...)" if dropped else ""))
    kept = sorted(tokens)
    blocks = [[kept[j] for j in block] for block in make_blocks([len(tokens[i]) for i in kept], cfg.batch_size)]
    stop_ids = stop_token_ids(tokenizer, cfg.model, model_config)
    settings = {**{k: v for k, v in dataclasses.asdict(cfg).items()
                   if k not in ("output", "report_to", "format", "generator")},  # those two only shape the output
                "prompts_sha256": fingerprint([i, prompt_ids[i], tokens[i], {c: v[i] for c, v in carried.items()}]
                                              for i in kept), "stop_ids": stop_ids,
                "chat_date": chat_date}
    shards, old = open_shards(cfg.output, settings, flags=dataclasses.asdict(cfg), paths=("model", "prompts"))
    print0(f"{len(kept)} prompts × {cfg.num_samples} samples | {len(blocks)} blocks of {cfg.batch_size} prompts | "
           f"{world.size} processes | engine {cfg.engine} | device {world.device.type} | dtype {dtype}\n"
           + ("sampling: greedy | max_new_tokens " if cfg.greedy else
              f"sampling: temperature {cfg.temperature} | top_p {cfg.top_p} | no top_k | max_new_tokens ")
           + f"{cfg.max_new_tokens} | stop tokens {stop_ids} {tokenizer.convert_ids_to_tokens(stop_ids)} | nothing "
           f"else from generation_config.json\nprompt tokens mean {np.mean([len(t) for t in tokens.values()]):.0f} max "
           f"{max(map(len, tokens.values()))}")

    def make_worker():
        if cfg.engine == "vllm":
            llm = load_vllm(cfg, world.size)
            sample = lambda b, block: vllm_sample(llm, tokenizer, [tokens[i] for i in block], cfg,  # noqa: E731
                                                  stop_ids, [derive_seed(cfg.seed, i) for i in block])
        else:
            from transformers import AutoModelForCausalLM
            model = load_pretrained(AutoModelForCausalLM, cfg.model, dtype=dtype).to(world.device).eval()
            sample = lambda b, block: [[sample_record(tokenizer, *s) for s in samples] for samples in hf_sample(
                model, [tokens[i] for i in block], **sampling(cfg), stop_ids=stop_ids, seed=derive_seed(cfg.seed, b))]
        sampled_by = files_fingerprint(cfg.model)  # once loaded (a Hub model is then in the cache): rebel.py checks it

        def work(b, block):
            with sampling_errors(cfg.dtype, dtype):
                samples = sample(b, block)
            rows = [dict({c: v[i] for c, v in carried.items()}, index=i, prompt_id=prompt_ids[i], prompt=prompts[i],
                         prompt_ids=tokens[i],
                         responses=[s[0] for s in samples], response_ids=[s[3] for s in samples],
                         truncated=[s[1] for s in samples], num_tokens=[s[2] for s in samples],
                         temperature=cfg.temperature, top_p=cfg.top_p, sampled_by=sampled_by,
                         **({"chat_date": chat_date} if chat_date else {}))
                    for i, samples in zip(block, samples)]
            return rows, sum(sum(row["num_tokens"]) for row in rows)
        return work

    rows = run_blocks(blocks, shards, (settings, old), make_worker, cfg.model, world, "tokens")
    if world.rank == 0:
        rows.sort(key=lambda row: row["index"])  # input order
        for row in rows:
            del row["index"]
        if cfg.format == "alpaca_eval":
            generator = cfg.generator or os.path.basename(os.path.normpath(cfg.model))
            atomic_write(cfg.output, json.dumps([dict(instruction=row["prompt"], output=row["responses"][0],
                                                      generator=generator) for row in rows], indent=2))
        else:
            write_rows(cfg.output, rows)
        samples = [(t, n) for row in rows for t, n in zip(row["truncated"], row["num_tokens"])]
        summary = dict(prompts=len(rows), prompts_skipped=len(dropped), responses=len(samples),
                       mean_response_tokens=float(np.mean([n for _, n in samples])),
                       truncated=sum(t for t, _ in samples))
        print0(f"{len(rows)} prompts × {cfg.num_samples} responses -> {cfg.output} | mean response "
               f"{summary['mean_response_tokens']:.0f} tokens | {summary['truncated']} of {len(samples)} responses "
               f"hit max_new_tokens={cfg.max_new_tokens}")
        log_summary(cfg.report_to, cfg.output, dataclasses.asdict(cfg), "generate", summary)
    dist.destroy_process_group()


def output_chat_date(cfg, tokenizer):
    """The date a chat template that writes today's date (Llama-3.2's "Today Date", ...) shows: the day this output
    was begun (kept in its manifest), so that a resume on a later day samples the same prompts, and rebel.py can check
    the prompt ids against the template at that date. None for other templates."""
    template = tokenizer.get_chat_template()
    if template.count("strftime_now(") > len(STRFTIME_NOW.findall(template)):
        print0(f"warning: the chat template of {cfg.model} calls strftime_now with a format that is not a quoted "
               "literal: the date it writes cannot be fixed, so train on the day you sample (rebel.py checks the "
               "prompts then)")
    if not STRFTIME_NOW.search(template):
        return None
    old = read_manifest(cfg.output + ".shards")  # None for a new output; a damaged one is refused by open_shards
    chat_date = from_rank0((old.get("chat_date") if isinstance(old, dict) else None)
                           or datetime.datetime.now().isoformat(timespec="seconds"))
    try:
        datetime.datetime.fromisoformat(chat_date)
    except (TypeError, ValueError):
        fail(f"{cfg.output}.shards/manifest.json: chat_date {chat_date!r} is not a date and time; delete "
             f"{cfg.output}.shards to start afresh")
    return chat_date


# ======================================================================= nothing below this line is sampling
# The resumable blocks that score.py shares: shards saved atomically, checked, merged; the output file.

@contextlib.contextmanager
def sampling_errors(flag, dtype):
    """One line for sampling that overflowed: inf or nan probabilities, as float16 gives on models trained in bf16."""
    try:
        yield
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        fail(f"sampling in --dtype {flag} ({str(dtype).replace('torch.', '')}) gave inf or nan probabilities (an "
             "overflow): use --dtype bfloat16 or --dtype float32")


def derive_seed(*keys):
    """A seed from (seed, block, ...): well-separated streams for neighbouring keys."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def fingerprint(items):
    """The checksum of an input's items, so that shards of one input are never merged with another's."""
    return sha256("".join(json.dumps(item, default=str) for item in items))


def open_shards(output, settings, flags=(), paths=()):
    """OUTPUT.shards/, locked for this run, and its manifest of what the blocks depend on (None for a new folder).
    Blocks made with other settings or input are refused here, before any model is loaded; run_blocks checks the
    model files. `flags` are the settings that are flags (named --flag in errors). `paths` are settings kept for the
    record but not compared: what they name is compared by content (so a resume may name the same files by another
    path, e.g. from another working directory)."""
    shards, settings = output + ".shards", json.loads(json.dumps(settings))  # settings as they read back
    if from_rank0(dist.get_rank() == 0 and not lock_folder(shards)):
        fail(f"--output {output} is in use by another run (it holds {shards}/.lock)")
    old = read_manifest(shards)
    if not isinstance(old, dict) and (old or glob.glob(os.path.join(shards, "block_*.jsonl"))):
        fail(f"{shards} holds blocks but {'an unreadable' if old else 'no'} manifest.json saying what made them; "
             f"delete {shards} or choose another --output to start afresh")
    if old is not None:
        changed = changed_settings(old, settings, (old.keys() | settings.keys()) - {"model_files", *paths}, flags)
        if changed:
            fail(f"{shards} holds blocks made with other settings ({changed}); rerun with those settings to resume, "
                 f"or delete {shards} or choose another --output to start afresh")
    return shards, old


def read_manifest(shards):
    """shards/manifest.json as a dict; None when there is none; "unreadable" (or what else it holds) when damaged."""
    manifest = os.path.join(shards, "manifest.json")
    try:
        return json.load(open(manifest)) if os.path.exists(manifest) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable"


def block_text(rows):
    """A block's file: its rows as JSON lines, then a line with their sha256, so that damage is seen, not merged."""
    text = "".join(json.dumps(row, default=str) + "\n" for row in rows)  # default: e.g. a carried date column
    return text + json.dumps({"sha256": sha256(text)}) + "\n"


def read_block(path, block):
    """The rows of a saved block, or None with why when it is missing or damaged (a bad disk, a bad copy)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text, _, last = data.rstrip(b"\n").rpartition(b"\n")
        text += b"\n" if text else b""
        if json.loads(last or b"{}").get("sha256") != sha256(text):
            return None, "its checksum does not match its rows"
        rows = [json.loads(line) for line in text.decode().splitlines()]
    except FileNotFoundError:
        return None, None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        return None, f"an unreadable line ({e})"
    if [row.get("index") if isinstance(row, dict) else None for row in rows] != list(block):
        return None, f"{len(rows)} rows, not the block's {len(block)} rows in order"
    return rows, None


def run_blocks(blocks, shards, manifest, make_worker, model, world, rate_unit):
    """Do the blocks not yet saved in `shards`, dealt round-robin over the processes (so they finish within about a
    block of each other), each saved atomically when done. A saved block that is damaged is named and done again.
    make_worker() loads the model and returns work(block_index, rows) -> (shard rows, count for the rate shown). The
    files of `model` (a path or Hub id; None for no model) are fingerprinted once it has loaded (a Hub model is then
    in the cache), or without loading it when nothing is left to do; the manifest is written, or its fingerprint
    checked. Returns all blocks' rows, in block order, on rank 0."""
    settings, old = manifest
    path = lambda b: os.path.join(shards, f"block_{b:06d}.jsonl")  # noqa: E731
    todo = None
    if world.rank == 0:
        for stray in glob.glob(os.path.join(shards, "*.tmp*")):  # half-written files of a killed run
            os.remove(stray)
        todo = []
        for b, block in enumerate(blocks):
            rows, damaged = read_block(path(b), block)
            if damaged:
                print(f"{path(b)} is damaged ({damaged}): doing it again", flush=True)
            if rows is None:
                todo.append(b)
    todo = from_rank0(todo)  # one list for all processes
    print0(f"{len(blocks) - len(todo)} of {len(blocks)} blocks already saved in {shards}; {len(todo)} to do on "
           f"{world.size} processes")
    work = make_worker() if todo else None  # every process loads the model when any does (vLLM's data parallel)
    model_files = from_rank0(files_fingerprint(model) if world.rank == 0 and model else None)
    # with nothing to do, a Hub model not in this machine's cache ("hub:...") cannot be checked without fetching it
    if old is not None and old.get("model_files") != model_files and (todo or not str(model_files).startswith("hub:")):
        fail(f"{shards} holds blocks made with other model files than the model has now; delete {shards} or "
             "choose another --output to start afresh")
    if todo and world.rank == 0:
        atomic_write(os.path.join(shards, "manifest.json"),
                     json.dumps({**settings, "model_files": model_files}, indent=1))
    mine = todo[world.rank::world.size]
    bar = tqdm(total=sum(len(blocks[b]) for b in mine), unit="prompt", disable=world.rank != 0 or not mine,
               desc="prompts" if world.size == 1 else f"prompts (process 0 of {world.size})")
    start, count = time.time(), 0
    for b in mine:
        rows, n = work(b, blocks[b])
        atomic_write(path(b), block_text(rows))
        count += n
        bar.update(len(blocks[b]))
        bar.set_postfix_str(f"{count / (time.time() - start):.0f} {rate_unit}/s")
    bar.close()
    dist.barrier()  # every block is saved (ranks arrive within about a block of each other: well inside NCCL's timeout)
    if world.rank != 0:
        return None
    done = [read_block(path(b), block) for b, block in enumerate(blocks)]
    damaged = [why for rows, why in done if rows is None]
    if damaged:
        fail(f"{shards}: a block is missing or damaged after all were written ({damaged[0]})")
    return [row for rows, _ in done for row in rows]


def write_rows(path, rows):
    """A .jsonl or .parquet file that `datasets` loads, written so that a crash never leaves half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".parquet"):
        from datasets import Dataset
        tmp = f"{path}.tmp{os.getpid()}"
        Dataset(arrow_table(rows, path)).to_parquet(tmp)  # exact values (uint64 ids), or one line saying why not
        replace_path(tmp, path)
    else:
        # default: `datasets` reads chat_date back as a datetime (score.py passes it on)
        atomic_write(path, "".join(json.dumps(row, default=datetime.datetime.isoformat) + "\n" for row in rows))


if __name__ == "__main__":
    run_script(main, Config, "the same command continues where it stopped")
