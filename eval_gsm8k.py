"""GSM8K 5-shot accuracy of a causal LM, scored exactly as lm-evaluation-harness's `gsm8k` task (v3.0) scores it.

This is the "GSM8K (5-shot)" of the REBEL model card (75.8 for REBEL-Llama-3-Armo-iter_1). Everything that moves the
number follows the harness: the prompt, the draw of the shots, greedy decoding, the stop sequences, the two answer
filters and the exact-match normalisation.

  prompt     5 shots "Question: {question}\\nAnswer: {answer}" drawn from the train split by one random.Random(1234),
             `.sample(train, 5)` once per test question in test order; every shot ends with "\\n\\n"; then
             "Question: {question}\\nAnswer:". Raw text, no chat template (--chat_template: one user turn).
  decoding   greedy, at most 256 new tokens, cut at the first "Question:", "</s>", "<|im_end|>" or end token.
  filters    strict-match: the first "#### <number>"; flexible-extract: the last number-like string.
  metric     exact match after removing ",", "$", everything up to "#### " and a final "." from both sides,
             ignoring case; standard error sqrt(sample variance / n).

    # one process (CPU or one GPU):
    python eval_gsm8k.py --model runs/rebel/final
    # one node, 8 GPUs (the questions are split over the processes; the results do not depend on how many):
    torchrun --nproc_per_node=8 eval_gsm8k.py --model Cornell-AGI/REBEL-Llama-3-Armo-iter_1
    # several nodes (run on every node):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 eval_gsm8k.py \\
        --model ...
"""
import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from rebel import (arg, atomic_write, check_config, check_output, compute_dtype, fail, first_line, init_distributed,
                   load_model_config, load_pretrained, note_pad_outside, print0, run_script)

STOP = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml `until`; the tokenizer's end token is appended at run time
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # strict-match filter, first match
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # flexible-extract filter, last match
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # exact_match regexes_to_ignore, applied in this order
INVALID = "[invalid]"  # what a filter returns when nothing matches


@dataclass
class Config:
    model: str = arg("runs/rebel/final", "model to evaluate: a folder (e.g. rebel.py's output_dir/final) or a Hub id")
    data: str = arg("openai/gsm8k", "folder with train.jsonl and test.jsonl (question, answer), or a Hub id (config "
                    "'main')")
    num_fewshot: int = arg(5, "shots per prompt, drawn from the train split", "[0, inf)")
    limit: int = arg(0, "evaluate only the first this many test questions (0 = all 1,319); their prompts do not "
                     "change", "[0, inf)")
    batch_size: int = arg(32, "questions per generate call (the harness's default is 1: padding can change a few "
                              "bfloat16 greedy tokens)", "[1, inf)")
    max_new_tokens: int = arg(256, "new tokens per question at most (the harness's max_gen_toks)", "[1, inf)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = arg("auto", "auto = bfloat16 on GPU, float32 on CPU")
    output: str = arg("", "folder for summary.json and samples.jsonl; empty: runs/gsm8k/<the model's path>")
    chat_template: bool = arg(False, "wrap each whole few-shot prompt in the chat template as one user turn "
                                     "(lm-eval --apply_chat_template)")
    add_bos_token: bool = arg(False, "let the tokenizer add its BOS token (e.g. Llama-3's), as lm-eval does since late "
                                     "2025 (PR #3347); off: as it did before, when the model card's numbers were made")

    def __post_init__(self):
        check_config(self)


def load_docs(source, split):
    """GSM8K rows {question, answer} of one split, from a folder of .jsonl files or the Hub, checked row by row."""
    if os.path.isdir(source):
        path = os.path.join(source, f"{split}.jsonl")
        if not os.path.isfile(path):
            fail(f"{path}: no such file (--data is a folder with train.jsonl and test.jsonl)")
        rows = []
        with open(path, encoding="utf-8-sig") as f:  # a BOM and blank lines, as `datasets` reads .jsonl files
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path} line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    fail(f"{path} line {n}: not valid JSON ({e.msg})")
    elif source.count("/") == 1:
        import datasets
        try:
            loaded = datasets.load_dataset(source, "main", split=split)
            rows = [(f"{source} {split} row {i}", row) for i, row in enumerate(loaded)]
        except Exception as e:  # noqa: BLE001 — offline, no access, no such dataset: one line
            fail(f"--data {source!r} could not be loaded: {type(e).__name__}: {first_line(e)}")
    else:
        fail(f"--data {source!r}: no such folder, and not a Hub id (owner/name)")
    for where, row in rows:
        for key in ("question", "answer"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                fail(f"{where}: expected a JSON object with a string {key!r}")
        if "#### " not in row["answer"]:
            fail(f"{where}: the answer has no '#### ' before the final number")
    if not rows:
        fail(f"{source}: the {split} split is empty")
    return [row for _, row in rows]


def build_prompts(test_docs, train_docs, num_fewshot=5, seed=1234):
    """One prompt per test doc, in order. As in the harness, one random.Random(seed) draws the shots for every test doc
    in turn, so a prompt depends only on its position in the test set: never on --limit or the number of processes
    (lm-eval run data-parallel restarts the generator on each process; its one-process prompts are these). The shots
    come from another split than the test docs, so the harness draws exactly num_fewshot and removes none."""
    rnd = random.Random(seed)
    prompts = []
    for doc in test_docs:
        shots = rnd.sample(train_docs, num_fewshot)
        # doc_to_text + target_delimiter " " + doc_to_target (the full answer) + fewshot_delimiter "\n\n"
        prompts.append("".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
                       + f"Question: {doc['question']}\nAnswer:")
    return prompts


def cut(generation, stop=STOP):
    """The generation up to its first stop string (the harness splits at each stop string in turn)."""
    for s in stop:
        if s:
            generation = generation.split(s)[0]
    return generation


def extract(generation, stop=STOP):
    """(strict, flexible) answers, as the harness's two filters return them, from the generation cut at its stops."""
    generation = cut(generation, stop)
    strict = STRICT.findall(generation)
    flexible = FLEXIBLE.findall(generation)  # (group 1, group 2) per match; exactly one of them is non-empty
    return (strict[0].strip() if strict else INVALID,
            next(group for group in flexible[-1] if group).strip() if flexible else INVALID)


def normalize(text):
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def score(generation, answer, stop=STOP):
    """Exact match of each filter's answer with the dataset's answer field ("... #### 18")."""
    strict, flexible = extract(generation, stop)
    gold = normalize(answer)
    return {"strict": normalize(strict) == gold, "flexible": normalize(flexible) == gold}


def mean_stderr(values):
    """The harness's standard error of a mean: sample standard deviation (n - 1) / sqrt(n)."""
    n, mean = len(values), sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None


def encode(tokenizer, prompts, add_bos_token=False):
    """Token ids of the prompts: the bare text, or with add_bos_token the tokenizer's own special tokens (its BOS),
    except for a text that already starts with BOS (a chat template's), which gets no second one; as lm-eval does."""
    return [tokenizer(p, add_special_tokens=add_bos_token and not (tokenizer.bos_token
                                                                   and p.startswith(tokenizer.bos_token)))["input_ids"]
            for p in prompts]


class StopWhenAllDone(StoppingCriteria):
    """Ends generation once every sequence of the batch holds a stop string or has ended (end token). Only speed: the
    text before a stop string never changes, and no sequence is cut short, so the result is the same as generating
    max_new_tokens tokens and cutting afterwards."""

    def __init__(self, tokenizer, prompt_len, stop, end_ids):
        self.tokenizer, self.prompt_len, self.stop, self.end_ids = tokenizer, prompt_len, stop, end_ids
        self.done = None

    def __call__(self, input_ids, scores, **kwargs):
        self.done = self.done or [False] * len(input_ids)
        for i, row in enumerate(input_ids[:, self.prompt_len:].tolist()):
            if not self.done[i]:
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                self.done[i] = any(t in self.end_ids for t in row) or any(s and s in text for s in self.stop)
        return torch.full((len(input_ids),), all(self.done), dtype=torch.bool, device=input_ids.device)


def padding_id(tokenizer, num_embeddings, name):
    """The id that pads prompts on the left: pads are masked, so any id of the embedding serves. The tokenizer's pad,
    else its unk, eos or 0; a pad outside the embedding (REBEL-Llama-3's [PAD] is 128256 of 128,256 rows) is said
    and replaced."""
    note_pad_outside(tokenizer, num_embeddings, name)
    ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, 0)
    return next(t for t in ids if t is not None and 0 <= t < num_embeddings)


@torch.no_grad()
def generate(model, tokenizer, batch, max_new_tokens, stop, pad_id):
    """Greedy continuations of a batch of token-id lists (left-padded), decoded as the harness decodes them."""
    width = max(map(len, batch))
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device)
    end = model.generation_config.eos_token_id  # generate ends a sequence at these and pads it afterwards
    end_ids = set(end if isinstance(end, list) else [] if end is None else [end])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                         stopping_criteria=StoppingCriteriaList([StopWhenAllDone(tokenizer, width, stop, end_ids)]))
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:].tolist()]


def main(cfg):
    # the input is checked first, so that a mistake fails in one line before any process group or model
    if not os.path.isdir(cfg.model) and cfg.model.count("/") != 1:
        fail(f"--model {cfg.model!r}: no such folder, and not a Hub id (owner/name)")
    output = cfg.output or os.path.join("runs", "gsm8k",
                                        os.path.normpath(cfg.model).strip(os.sep).replace(os.sep, "__"))
    train_docs, test_docs = load_docs(cfg.data, "train"), load_docs(cfg.data, "test")
    if cfg.num_fewshot > len(train_docs):
        fail(f"--num_fewshot {cfg.num_fewshot} is more than the {len(train_docs)} train questions")
    n = min(cfg.limit or len(test_docs), len(test_docs))
    # prompts for the whole test set, then the first n: --limit and the number of processes change none of them
    prompts = build_prompts(test_docs, train_docs, cfg.num_fewshot)[:n]
    load_model_config(cfg.model)  # a folder without a config or weights fails here, in one line
    check_output(output, "--output", "folder")
    world = init_distributed()
    dtype = compute_dtype(cfg.dtype, world.device)

    tokenizer = load_pretrained(AutoTokenizer, cfg.model)
    if cfg.chat_template:
        if not tokenizer.chat_template:
            fail(f"--chat_template: the tokenizer of {cfg.model} has no chat template")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    ids = encode(tokenizer, prompts, cfg.add_bos_token)
    stop = STOP + ((tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False),)
                   if tokenizer.eos_token_id is not None else ())
    # the harness's batches: longest first, then by text (an out-of-memory shows at once). Each process takes whole
    # batches, so a batch (hence its padding and numerics) is the same for any number of processes.
    order = sorted(range(n), key=lambda i: (-len(ids[i]), prompts[i]))
    batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)][world.rank::world.size]

    model = load_pretrained(AutoModelForCausalLM, cfg.model, dtype=dtype).to(world.device).eval()
    pad_id = padding_id(tokenizer, model.get_input_embeddings().num_embeddings, cfg.model)
    print0(f"processes {world.size} | device {world.device.type} | dtype {dtype} | questions {n} | shots "
           f"{cfg.num_fewshot} | chat template {cfg.chat_template} | mean prompt tokens {sum(map(len, ids)) / n:.0f}")
    start, records = time.time(), []
    bar = tqdm(total=sum(map(len, batches)), desc=f"gsm8k (process 0 of {world.size})", unit="question",
               disable=world.rank != 0)
    for batch in batches:
        texts = generate(model, tokenizer, [ids[i] for i in batch], cfg.max_new_tokens, stop, pad_id)
        for i, text in zip(batch, texts):
            strict, flexible = extract(text, stop)
            correct = score(text, test_docs[i]["answer"], stop)
            records.append(dict(index=i, prompt=prompts[i], generation=text, strict_answer=strict,
                                flexible_answer=flexible, gold=normalize(test_docs[i]["answer"]),
                                strict_correct=correct["strict"], flexible_correct=correct["flexible"]))
        bar.update(len(batch))
        bar.set_postfix(strict=f"{sum(r['strict_correct'] for r in records) / len(records):.3f}",
                        flexible=f"{sum(r['flexible_correct'] for r in records) / len(records):.3f}")
    bar.close()
    parts = [None] * world.size
    dist.all_gather_object(parts, records)
    if world.rank == 0:
        records = sorted((r for part in parts for r in part), key=lambda r: r["index"])
        seconds = time.time() - start
        metrics = {}
        for name, key in (("strict-match", "strict_correct"), ("flexible-extract", "flexible_correct")):
            values = [float(r[key]) for r in records]
            metrics[name] = dict(accuracy=sum(values) / n, stderr=mean_stderr(values), correct=int(sum(values)))
        summary = dict(model=cfg.model, task="gsm8k (lm-evaluation-harness v3.0)", questions=n, **metrics,
                       invalid=dict(strict=sum(r["strict_answer"] == INVALID for r in records),
                                    flexible=sum(r["flexible_answer"] == INVALID for r in records)),
                       settings=dict(dataclasses.asdict(cfg), dtype=str(dtype).removeprefix("torch."),
                                     stop=list(stop)),
                       runtime=dict(processes=world.size, device=world.device.type, seconds=round(seconds, 1),
                                    questions_per_s=round(n / seconds, 3)))
        os.makedirs(output, exist_ok=True)
        atomic_write(os.path.join(output, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
        atomic_write(os.path.join(output, "summary.json"), json.dumps(summary, indent=2) + "\n")
        print0(" | ".join(f"{name} {m['accuracy']:.4f} ± {m['stderr'] or 0:.4f}" for name, m in metrics.items())
               + f" | {n} questions in {seconds:.0f}s ({n / seconds:.2f} questions/s) -> {output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main, Config, "nothing was written; the same command starts again")
