"""Score sampled responses and pick the training pairs: the second step of each REBEL iteration (Gao et al. 2024).

Reads generate.py's output (columns prompt, responses, truncated), scores every (prompt, response) with a reward model
or with a Python function, and keeps per prompt the highest-reward response as `chosen` and the lowest as `rejected`.
A prompt is dropped, and counted, when any of its responses hit the token limit (--drop_truncated, the authors'
length filter), when chosen and rejected tie in reward, or when they are the same text. Writes every input column plus

    rewards                           num_samples floats, in the order of `responses`
    chosen, rejected                  the response texts
    chosen_reward, rejected_reward    their rewards

which is what rebel.py --dataset reads. Defaults reproduce the authors' scoring: RLHFlow/ArmoRM-Llama3-8B-v0.1 in bf16,
input = its chat template of [user, assistant] cut to the first 4096 tokens, reward = its `score` output (raw), computed
from its weights by class ArmoRM below, without running the repository's code. A reward model whose checkpoint lacks any
of its parameters is refused; a prompt the reward model cannot score is dropped and counted, with the reason.

Reward models (--reward_model, a Hub id or local folder), each recognised from its files:
    RLHFlow/ArmoRM-Llama3-8B-v0.1   config architectures ["LlamaForRewardModelWithGating"]: class ArmoRM, the reward
                                    its `score`; input its chat template (the authors' UltraFeedback runs)
    openbmb/Eurus-RM-7b             architectures ["EurusRewardModel"] or an auto_map to it: class EurusRM, the reward
                                    at the last token; input its chat template. The authors divided its scores by 1000
                                    (reward_reg): rebel.py's online mode applies that with --reward_scale, not score.py
    berkeley-nest/Starling-RM-7B-alpha  a bare state dict (pytorch_model.bin, no config.json, no tokenizer): class
                                    StarlingRM on the config and tokenizer of --reward_base (Llama-2-7b-chat-hf), the
                                    reward before the first unk; input the authors' (their Nectar runs)
                                    "<s>[INST] {prompt} [/INST] {response} </s>", cut from the left as theirs (to 2048
                                    tokens: --max_length 2048)
    any AutoModelForSequenceClassification with one label (e.g. sfairXC/FsfairX-LLaMA3-RM-v0.1): its logit at the last
                                    token that is not the pad id; input its chat template
ArmoRM and Eurus-RM run their repository's code only with --trust_remote_code; Starling-RM has none to run.

    # reward model, one process (CPU or one GPU):
    python score.py --input gen.jsonl --reward_model path/to/rm --output pairs.jsonl
    # a rule-based reward: a function (prompt, response) -> float in a Python file; it also gets the row's other
    # columns that its signature names (e.g. `answer` for a verifiable reward), or all of them with **kwargs
    python score.py --input gen.jsonl --reward_fn my_rewards.py:correct --output pairs.jsonl
    # one node, 8 GPUs, one reward model per GPU, with a held-out test split (rebel.py's default split names):
    torchrun --nproc_per_node=8 score.py --input runs/iter_1/generations.jsonl --output runs/iter_1/pairs \\
        --test_size 1000
    # several nodes: as for generate.py. After a crash: the same command again continues where it stopped

Like generate.py, the rows are cut into blocks (block_size prompts) dealt over the processes; each scored block is
saved atomically in OUTPUT.shards/ and skipped by a rerun; rank 0 merges them and picks the pairs.
"""
import importlib.util
import json
import math
import numbers
import os
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from generate import fingerprint, open_shards, run_blocks, write_rows
from rebel import (TOKENIZER_FILES, BadRow, arg, arrow_table, chat_messages, check_config, check_output,
                   check_prompt_column, check_writable, compute_dtype, fail, first_line, has_tokenizer_files,
                   init_distributed, load_tokenizer, log_summary, print0, replace_path, require_split, run_script,
                   sha256)


@dataclass
class Config:
    input: str = arg("runs/generations.parquet", "generate.py's output: Hub id, datasets folder, or "
                     ".json/.jsonl/.parquet file")
    split: str = arg("train", "split of --input to read")
    output: str = arg("runs/pairs.jsonl", "a .jsonl or .parquet file; with --test_size, a datasets folder "
                      "(save_to_disk)")
    reward_model: str = arg("RLHFlow/ArmoRM-Llama3-8B-v0.1", "sequence-classification reward model or ArmoRM (Hub id "
                            "or local folder)")
    reward_fn: str = arg("", "instead of a reward model: path/to/file.py:name, a function (prompt, response, "
                         "**the row's columns it names) -> float")
    reward_base: str = arg("meta-llama/Llama-2-7b-chat-hf", "config and tokenizer of a reward model saved as a bare "
                           "state dict (Starling-RM-7B-alpha: the model it was trained from)")
    trust_remote_code: bool = arg(False, "run the Python code in the reward model's folder/repository (ArmoRM and "
                                  "Eurus-RM do not need it)")
    max_length: int = arg(4096, "reward-model input: the chat template of [user, assistant], cut to its first this "
                          "many tokens", "[1, inf)")
    batch_size: int = arg(8, "sequences per reward-model forward, grouped by length", "[1, inf)")
    block_size: int = arg(128, "prompts per block: the unit of sharding over processes and of resuming", "[1, inf)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = arg("auto", "reward model dtype: auto = bfloat16 on "
                                                                   "GPU, float32 on CPU")
    drop_truncated: bool = arg(True, "drop prompts with a response that hit generate.py's max_new_tokens (the "
                               "authors' length filter)")
    test_size: int = arg(0, "hold out this many pairs (seeded) as split test_prefs, the rest being train_prefs; "
                         "0 = one file", "[0, inf)")
    seed: int = arg(0, "seed of the train/test split", "[0, 4294967296)")
    report_to: Literal["none", "wandb", "tensorboard"] = arg("none", "also send the run's summary (counts, reward "
                                                             "statistics) to this tracker")
    convert_hh: bool = arg(True, "a prompt string in Anthropic-HH/Nectar's Human:/Assistant: format is its turns in "
                           "the reward model's chat template (as generate.py and rebel.py template it)")

    def __post_init__(self):
        check_config(self)
        if self.test_size and self.output.endswith((".jsonl", ".parquet", ".json")):
            fail("--test_size writes a datasets folder with splits train_prefs and test_prefs: give --output a "
                 f"folder, not {self.output}")
        if not self.test_size and not self.output.endswith((".jsonl", ".parquet")):
            fail(f"--output {self.output}: expected a .jsonl or .parquet file")


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
            fail(f"{where} row {i}: 'truncated' must be a list of {k} booleans, one per response, got "
                 f"{str(row['truncated'])[:80]}")
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
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 — a syntax error, a missing import, ...: one line naming the file
        fail(f"--reward_fn {spec}: {path} could not be imported: {type(e).__name__}: {first_line(e)}")
    if not callable(getattr(module, name, None)):
        fail(f"--reward_fn {spec}: {path} has no function {name!r}")
    return getattr(module, name)


def check_reward(value, where):
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    fail(f"{where}: the reward must be a finite number, got {value!r}")


def extra_arguments(fn):
    """The names of the row's other columns that the reward function takes as keyword arguments (e.g. `answer`, for a
    verifiable reward): those its signature names after (prompt, response); every column (True) with **kwargs."""
    import inspect
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C function: (prompt, response) only
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_reward_fn_columns(fn, spec, columns, where):
    """Fail in one line, before any work, when the reward function needs an argument that is not a column of the
    data (after prompt and response, each of its parameters without a default is a column)."""
    import inspect
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):
        return
    needed = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
              and p.name not in columns]
    if needed:
        fail(f"--reward_fn {spec} takes {', '.join(map(repr, needed))}, which {where} has no column of "
             f"(columns: {', '.join(columns)})")


def function_rewards(fn, spec, rows, block):
    """{index, rewards, cut, dropped} for each row of the block, from the Python reward function fn(prompt, response,
    **the row's other columns it takes), given copies (an edit by the function changes no row); it fails loudly."""
    import copy
    out, extra = [], extra_arguments(fn)
    for i in block:
        rewards = []
        columns = {k: v for k, v in rows[i].items()
                   if k not in ("prompt", "response") and (extra is True or k in extra)}
        for j, response in enumerate(rows[i]["responses"]):
            try:
                value = fn(copy.deepcopy(rows[i]["prompt"]), response, **copy.deepcopy(columns))
            except (Exception, SystemExit) as e:  # noqa: BLE001 — any failure, sys.exit() too, is reported with its row
                if isinstance(e, SystemExit):
                    fail(f"--reward_fn {spec} called sys.exit({e.code!r}) on row {i}, response {j}")
                fail(f"--reward_fn {spec} raised on row {i}, response {j}: {type(e).__name__}: {e}")
            rewards.append(check_reward(value, f"--reward_fn {spec} on row {i}, response {j}"))
        out.append(dict(index=i, rewards=rewards, cut=0, dropped=None))
    return out


# ----------------------------------------------------------------------------- reward models

# Llama-3: 128009, 128006, 78191, 128007, 271
ARMO_GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
STARLING_FILES = ("pytorch_model.bin", "model.safetensors")  # the Hub's Starling-RM-7B-alpha: pytorch_model.bin


def is_armo(config):
    return "LlamaForRewardModelWithGating" in (getattr(config, "architectures", None) or [])


def is_eurus(config):
    """openbmb/Eurus-RM-7b: architectures ["EurusRewardModel"], or an auto_map entry naming that class."""
    auto_map = getattr(config, "auto_map", None) or {}
    return "EurusRewardModel" in (getattr(config, "architectures", None) or []) or any(
        isinstance(v, str) and v.endswith(".EurusRewardModel") for v in auto_map.values())


def is_starling(name):
    """True for a checkpoint laid out as berkeley-nest/Starling-RM-7B-alpha: the model card's GPTRewardModel state
    dict (pytorch_model.bin or model.safetensors) and no config.json. For a Hub id the config's absence decides (the
    weights are fetched when the model loads); an unreachable one is not (its loading then fails in one line)."""
    from transformers.utils import cached_file
    if os.path.isdir(name):
        return (not os.path.isfile(os.path.join(name, "config.json"))
                and any(os.path.isfile(os.path.join(name, f)) for f in STARLING_FILES))
    try:
        return cached_file(name, "config.json", _raise_exceptions_for_missing_entries=False) is None
    except (OSError, ValueError):  # no such repository, offline, or not a Hub id at all
        return False


def reward_tokenizer_source(cfg):
    """The folder or Hub id of the reward model's tokenizer: --reward_base for a Starling-RM state dict (which has
    neither tokenizer nor config), else --reward_model. Fails in one line for a folder without tokenizer files, and for
    a Starling-RM whose --reward_base cannot be read."""
    from transformers import AutoConfig
    name, files = cfg.reward_model, " / ".join(TOKENIZER_FILES)
    if not is_starling(name):
        if os.path.isdir(name) and not has_tokenizer_files(name):
            fail(f"reward model {name}: no tokenizer files ({files}) in the folder; copy them there from the model it "
                 f"was trained from")
        return name
    lead = (f"reward model {name}: no tokenizer files ({files}) in the folder; a Starling-RM state dict (no "
            f"config.json) takes its config and tokenizer from --reward_base")
    base = cfg.reward_base
    try:
        AutoConfig.from_pretrained(base)
    except Exception as e:  # noqa: BLE001 — no such folder, not a Hub id, offline, no access: one line
        fail(f"{lead}, and {base!r} could not be read: {type(e).__name__}: {first_line(e)}")
    if os.path.isdir(base) and not has_tokenizer_files(base):
        fail(f"{lead}, and the folder {base} has none either")
    return base


def last_occurrence(ids, pattern):
    """Start of the last occurrence of the list `pattern` in the list `ids`, or None."""
    n = len(pattern)
    return next((j for j in range(len(ids) - n, -1, -1) if ids[j:j + n] == pattern), None)


def before_first(input_ids, pad):
    """[B] the position of the token before the first `pad` in each row of input_ids [B, T]; the last token in a row
    without one (argmax is then 0, and (0 - 1) % T = T - 1), as `c_ind - 1` in the originals' Python loops."""
    return ((input_ids == (-1 if pad is None else pad)).int().argmax(-1) - 1) % input_ids.shape[1]


class ArmoRM(torch.nn.Module):
    """RLHFlow/ArmoRM-Llama3-8B-v0.1 (Wang et al. 2024, "Interpretable Preferences via Multi-Objective Reward Modeling
    and Mixture-of-Experts") computed from its weights: the same operations as LlamaForRewardModelWithGating.forward
    and GatingNetwork in its modeling_custom.py, which is never run. For input_ids [B, T], right-padded with
    pad_token_id:

        h        = the Llama backbone's final (normed) hidden states                         [B, T, hidden]
        rewards  = h[reward position] @ regression_layer.weightᵀ                             [B, K] (K objectives, 19)
        gate     = softmax(gating(h[gating position]) / gating_temperature) · logit_scale    [B, K]
        score    = Σ_k gate · (rewards @ reward_transform_matrix)                            [B]

    gating = Linear+ReLU × gating_n_hidden, then Linear to K. The reward position is the token before the first pad
    (the last token without one); the gating position is the start of the last `gating_ids` (ARMO_GATING_TEXT, the end
    of the last user turn; ValueError if absent). All in the backbone's dtype, as the original. Returns .score [B]."""

    def __init__(self, backbone, gating_ids):
        super().__init__()
        config, dtype = backbone.config, backbone.dtype
        k, width = getattr(config, "num_objectives", 19), getattr(config, "gating_hidden_dim", 1024)
        dims = [config.hidden_size] + [width] * getattr(config, "gating_n_hidden", 3) + [k]
        self.model, self.config, self.gating_ids = backbone, config, gating_ids
        self.temperature = getattr(config, "gating_temperature", 10)
        self.regression_layer = torch.nn.Linear(config.hidden_size, k, bias=False, dtype=dtype)
        self.reward_transform_matrix = torch.nn.Parameter(torch.zeros(k, k, dtype=dtype), requires_grad=False)
        self.gating = torch.nn.Module()  # the original's names: gating.layers.N.weight/bias, gating.logit_scale
        self.gating.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, dtype=dtype) for a, b in zip(dims, dims[1:]))
        self.gating.logit_scale = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = torch.arange(len(input_ids), device=h.device)
        reward_at = before_first(input_ids, self.config.pad_token_id)
        gate_at = [last_occurrence(ids, self.gating_ids) for ids in input_ids.tolist()]
        if None in gate_at:
            raise ValueError(f"ArmoRM: no gating tokens {self.gating_ids} in sequence {gate_at.index(None)} of the "
                             "batch")
        rewards = self.regression_layer(h[rows, reward_at])
        x = h[rows, torch.tensor(gate_at, device=h.device)]
        for n, layer in enumerate(self.gating.layers):
            x = layer(x) if n == len(self.gating.layers) - 1 else F.relu(layer(x))
        gate = F.softmax(x / self.temperature, dim=1) * self.gating.logit_scale[0]
        score = (gate * (rewards @ self.reward_transform_matrix)).sum(1)
        return SimpleNamespace(score=score, rewards=rewards, gate=gate)


class StarlingRM(torch.nn.Module):
    """berkeley-nest/Starling-RM-7B-alpha (Zhu et al. 2023, "Starling-7B: Improving LLM Helpfulness & Harmlessness
    with RLAIF") computed from its weights: the same operations as GPTRewardModel.forward of its model card (and of
    REBEL's src/nectar/rebel.py), a Llama-2-7B-chat without its LM head plus a scalar head. For input_ids [B, T],
    right-padded with pad_id:

        h        = the Llama backbone's final (normed) hidden states                         [B, T, hidden]
        rewards  = h @ v_head.weightᵀ                                                        [B, T]
        score    = rewards at the token before the first pad_id (the last token without one) [B]

    pad_id is the tokenizer's unk id: the card sets pad = unk, and REBEL's script takes PAD_ID as the last id of
    tokenizer(unk_token) (the card's first id is the BOS that the Llama-2 tokenizer puts before it). The authors cut
    inputs from the left (truncation_side), keeping the end of the response where the reward is read."""
    truncation_side = "left"

    def __init__(self, backbone, pad_id):
        super().__init__()
        self.model, self.config = backbone, backbone.config
        self.config.pad_token_id = pad_id
        self.v_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False, dtype=backbone.dtype)

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rewards = self.v_head(h).squeeze(-1)  # every position, then one read per row, as the original
        rows = torch.arange(len(input_ids), device=h.device)
        return SimpleNamespace(score=rewards[rows, before_first(input_ids, self.config.pad_token_id)])


class EurusRM(torch.nn.Module):
    """openbmb/Eurus-RM-7b (Yuan et al. 2024, "Advancing LLM Reasoning Generalists with Preference Trees") computed from
    its weights: the same operations as EurusRewardModel.forward in its modeling_eurus_rm.py, which is not run. For
    input_ids [B, T] and attention_mask [B, T] (right padding):

        h        = the Mistral backbone's final (normed) hidden states                       [B, T, hidden]
        rewards  = h @ regression_head.weightᵀ                                               [B, T]
        score    = rewards at the last attended token (attention_mask.cumsum(1).argmax(1))   [B]

    The reward is found by the mask, never by a token id, so any id pads (pad_id: the config's, else 0)."""

    def __init__(self, backbone):
        super().__init__()
        self.model, self.config = backbone, backbone.config
        self.pad_id = 0 if self.config.pad_token_id is None else self.config.pad_token_id
        self.regression_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False, dtype=backbone.dtype)

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rewards = self.regression_head(h).squeeze(-1)
        ends = attention_mask.cumsum(dim=1).argmax(dim=1)  # the first position reaching the row's count of tokens
        return SimpleNamespace(score=rewards.gather(1, ends[:, None])[:, 0])


def read_tensors(path, keep=lambda name: True):
    """{name: tensor} of a .safetensors or torch .bin file, for the names `keep` accepts. A .bin is read with
    weights_only=True (a pickle cannot run code) and memory-mapped where its format allows (13 GB are not copied)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (not zip) format cannot be memory-mapped
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{os.path.basename(path)} holds a {type(state_dict).__name__}, not a state dict")
    return {k: v for k, v in state_dict.items() if keep(k)}


def head_tensors(name, is_head):
    """The checkpoint's tensors whose names is_head accepts, from its safetensors (else .bin) files: one file or the
    shards its index lists (a Hub id resolves to the files from_pretrained has just cached)."""
    from transformers.utils import cached_file
    for single in ("model.safetensors", "pytorch_model.bin"):  # a .bin only where there are no safetensors
        index = cached_file(name, single + ".index.json", _raise_exceptions_for_missing_entries=False)
        weight_map = json.load(open(index))["weight_map"] if index else {}
        files = sorted({f for k, f in weight_map.items() if is_head(k)}) if index else [single]
        paths = [cached_file(name, f, _raise_exceptions_for_missing_entries=False) for f in files]
        if index or all(paths):
            return {k: v for p in paths if p for k, v in read_tensors(p, is_head).items()}
    return {}


def add_head(model, head, info, is_head):
    """Loads the head tensors into `model`; those it expects (is_head) that are absent, or of another shape, are added
    to the loading info's missing/mismatched keys (sets in transformers 5, lists in 4). Returns the info."""
    wanted = {k: v.shape for k, v in model.state_dict().items() if is_head(k)}
    info["missing_keys"] = set(info["missing_keys"]) | (wanted.keys() - head.keys())
    info["mismatched_keys"] = set(info["mismatched_keys"]) | {(k, head[k].shape, s) for k, s in wanted.items()
                                                              if k in head and head[k].shape != s}
    model.load_state_dict({k: head[k] for k, s in wanted.items() if k in head and head[k].shape == s}, strict=False)
    return info


def load_armo(name, dtype, gating_ids):
    """(ArmoRM, loading info as from_pretrained's): the backbone through transformers' LlamaModel (weights model.*), the
    head's tensors from the checkpoint's files. Head parameters absent from the checkpoint or of another shape are
    added to the info's missing/mismatched keys."""
    from transformers import LlamaModel

    class Backbone(LlamaModel):  # the head's tensors are read below: not "unexpected" in transformers' load report
        _keys_to_ignore_on_load_unexpected = [r"^(regression_layer|reward_transform_matrix|gating)\b"]
    backbone, info = Backbone.from_pretrained(name, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    model, is_head = ArmoRM(backbone, gating_ids), lambda k: not k.startswith("model.")
    return model, add_head(model, head_tensors(name, is_head), info, is_head)


def load_eurus(name, dtype):
    """(EurusRM, loading info as from_pretrained's): the backbone through transformers' MistralModel (weights model.*),
    regression_head.weight from the checkpoint's files (absent or of another shape: in the info's missing/mismatched
    keys)."""
    from transformers import MistralModel

    class Backbone(MistralModel):  # as load_armo's
        _keys_to_ignore_on_load_unexpected = [r"^regression_head\b"]
    backbone, info = Backbone.from_pretrained(name, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    model, is_head = EurusRM(backbone), lambda k: not k.startswith("model.")
    return model, add_head(model, head_tensors(name, is_head), info, is_head)


def starling_backbone(state_dict):
    """The LlamaModel weights in a GPTRewardModel state dict: transformer.X and model.model.X are both X (one module
    under two names in the card's class, so a saved state dict holds either or both). model.lm_head.weight, the LM head
    the card removes, is not read; v_head.weight is the head."""
    weights = {}
    for prefix in ("model.model.", "transformer."):
        weights.update({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    return weights


def load_starling(name, base, dtype, tokenizer):
    """(StarlingRM, loading info as from_pretrained's): a LlamaModel of --reward_base's config with the backbone of the
    checkpoint's state dict, and its v_head; pad id = the --reward_base tokenizer's unk id."""
    from transformers import AutoConfig, LlamaModel
    from transformers.utils import cached_file
    config = AutoConfig.from_pretrained(base)
    if config.model_type != "llama":
        fail(f"reward model {name}: a Starling-RM state dict is a Llama's; --reward_base {base} is {config.model_type}")
    if tokenizer.unk_token_id is None:
        fail(f"reward model {name}: the tokenizer of --reward_base {base} has no unk token, with which Starling-RM "
             f"pads (its reward is read before the first)")
    where = (lambda f: os.path.join(name, f)) if os.path.isdir(name) else (  # noqa: E731
        lambda f: cached_file(name, f, _raise_exceptions_for_missing_entries=False))
    found = [p for p in map(where, STARLING_FILES) if p and os.path.isfile(p)]
    if not found:
        raise OSError(f"no {' or '.join(STARLING_FILES)}")
    state_dict = read_tensors(found[0])
    backbone, info = LlamaModel.from_pretrained(None, config=config, state_dict=starling_backbone(state_dict),
                                                dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    model, is_head = StarlingRM(backbone, tokenizer.unk_token_id), lambda k: k == "v_head.weight"
    return model, add_head(model, {k: v for k, v in state_dict.items() if is_head(k)}, info, is_head)


def transformers_class(model):
    """True for transformers' own classes, which read the reward at the last token that is not the pad id (so a pad id
    inside the text is harmless). ArmoRM, and maybe other models' own code, read it at the token before the first
    one."""
    return type(model).__module__.startswith("transformers.")


def reads_before_first_pad(model):
    """True where a pad id inside the text would move the reward's position (ArmoRM, Starling-RM, remote code)."""
    return not transformers_class(model) and not isinstance(model, EurusRM)


def load_reward_model(cfg, dtype, tokenizer):
    """The reward model: Starling-RM natively (it has no code to run), ArmoRM and Eurus-RM natively unless
    --trust_remote_code, else AutoModelForSequenceClassification (AutoModel for Eurus-RM's remote class). `tokenizer`
    is the one of reward_tokenizer_source(cfg). Fails in one line if it cannot be loaded, if any parameter was not in
    its checkpoint (it would be random), or if a transformers classifier has more than one output."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    name = cfg.reward_model
    try:
        remote = cfg.trust_remote_code
        config = None if is_starling(name) else AutoConfig.from_pretrained(name, trust_remote_code=remote)
        if config is None:
            model, info = load_starling(name, cfg.reward_base, dtype, tokenizer)
        elif is_armo(config) and not remote:
            model, info = load_armo(name, dtype, tokenizer.encode(ARMO_GATING_TEXT, add_special_tokens=False))
        elif is_eurus(config) and not remote:
            model, info = load_eurus(name, dtype)
        else:
            cls = AutoModel if is_eurus(config) else AutoModelForSequenceClassification  # Eurus maps only AutoModel
            model, info = cls.from_pretrained(name, dtype=dtype, trust_remote_code=remote, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001 — no such folder or Hub id, no weights, offline, failing remote code
        fail(f"could not load the reward model {name!r}: {type(e).__name__}: {first_line(e)}")
    absent = sorted(info["missing_keys"]) + [f"{k} (checkpoint {list(a)}, model {list(b)})"
                                             for k, a, b in sorted(info["mismatched_keys"])]
    if absent:
        fail(f"reward model {name}: {', '.join(absent)} not in its checkpoint, where {type(model).__name__} expects "
             "them; "
             f"refusing to score with random values in their place")
    if transformers_class(model) and model.config.num_labels != 1:
        fail(f"reward model {name}: {type(model).__name__} with {model.config.num_labels} outputs (num_labels); a "
             "reward model has 1")
    return model


def reward_of(output, n):
    """[n] rewards from a forward's output: its `score` when it has one (ArmoRM, Starling-RM, Eurus-RM), else its single
    logit per sequence, or the output itself when it is a tensor (Eurus-RM's remote code returns rewards [n, 1])."""
    score = output if torch.is_tensor(output) else getattr(output, "score", None)
    reward = score if score is not None else getattr(output, "logits", None)
    if reward is not None and reward.dim() == 2 and reward.shape[1] == 1:
        reward = reward[:, 0]
    if reward is None or tuple(reward.shape) != (n,):
        fail(f"the reward model's output has neither `score` nor one logit per sequence "
             f"(got {None if reward is None else list(reward.shape)} for {n} sequences)")
    return reward


def cut(ids, model, max_length):
    """The max_length tokens of a reward-model input that are scored: the first, or the last where the model's authors
    truncated from the left (Starling-RM)."""
    return ids[-max_length:] if getattr(model, "truncation_side", "right") == "left" else ids[:max_length]


def reward_text(model, tokenizer, messages, response, ended):
    """The reward model's input text for one response: the chat template of [*messages, assistant response], or for
    Starling-RM the REBEL authors' (src/nectar/rebel.py): the prompt in the Llama-2 chat format of --reward_base's
    template, "<s>[INST] {prompt} [/INST]", then " " + response, then " </s>" if the response ended (they joined prompt
    and response with a space and replaced the policy's end of turn by " </s>": "<gen> </s> rather than <gen></s>")."""
    if isinstance(model, StarlingRM):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + " " + response + (" " + tokenizer.eos_token if ended else "")
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)


def unscorable(ids, model, gating_ids, max_length):
    """Why the reward-model inputs of one prompt (token lists, before the cut) cannot be scored, or None."""
    pad_id = model.config.pad_token_id
    if pad_id is not None and reads_before_first_pad(model) and any(pad_id in cut(s, model, max_length) for s in ids):
        return "the text holds the reward model's pad token (the reward would be read before it)"
    if gating_ids:
        at = [last_occurrence(s, gating_ids) for s in ids]
        if None in at:
            return "no end of a user turn followed by the assistant header (ArmoRM's gating tokens)"
        if max(at) + len(gating_ids) > max_length:
            return "ArmoRM's gating tokens (end of the last user turn) cut off by --max_length"
    return None


@torch.no_grad()
def model_rewards(model, tokenizer, rows, block, cfg, device):
    """{index, rewards, cut, dropped} for each row of the block: every response scored with reward_text, cut to
    max_length tokens (the first, or Starling-RM's last, as the authors' truncation=True did), longest first in
    batches. Right padding with the model's pad id. A row that cannot be scored gets rewards None, `dropped` = why."""
    gating_ids = tokenizer.encode(ARMO_GATING_TEXT, add_special_tokens=False) if is_armo(model.config) else None
    sequences, out = [], []
    for i in block:
        messages, truncated = chat_messages(rows[i]["prompt"], cfg.convert_hh), rows[i].get("truncated")
        truncated = truncated if isinstance(truncated, list) else []  # Starling-RM's " </s>" closes the ended only
        try:
            ended = [j >= len(truncated) or truncated[j] is not True for j in range(len(rows[i]["responses"]))]
            texts = [reward_text(model, tokenizer, messages, r, end) for r, end in zip(rows[i]["responses"], ended)]
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
            why = unscorable(ids, model, gating_ids, cfg.max_length)
        except Exception as e:  # noqa: BLE001 — e.g. a template that refuses a system turn: this row only
            why = f"the reward model's chat template raised {type(e).__name__}: {first_line(e)[:80]}"
        over = 0 if why else sum(len(s) > cfg.max_length for s in ids)
        out.append(dict(index=i, rewards=None, cut=over, dropped=why))
        if not why:
            sequences += [cut(s, model, cfg.max_length) for s in ids]
    pad_id = getattr(model, "pad_id", model.config.pad_token_id)
    batch_size = cfg.batch_size if pad_id is not None else 1  # without a pad id the model cannot find where a row ends
    order = sorted(range(len(sequences)), key=lambda s: -len(sequences[s]))
    rewards = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(sequences[batch[0]])  # the longest: sorted
        input_ids = torch.tensor([sequences[s] + [pad_id] * (width - len(sequences[s])) for s in batch], device=device)
        attention_mask = torch.tensor([[1] * len(sequences[s]) + [0] * (width - len(sequences[s])) for s in batch],
                                      device=device)
        output = model(input_ids=input_ids, attention_mask=attention_mask)
        for s, r in zip(batch, reward_of(output, len(batch)).float().tolist()):
            rewards[s] = r
    n, k = 0, len(rows[block[0]]["responses"])
    for row in out:  # the kept rows' sequences are consecutive, k per row, in block order
        if not row["dropped"]:
            row["rewards"] = [check_reward(r, f"reward model on row {row['index']}, response {j}")
                              for j, r in enumerate(rewards[n:n + k])]
            n += k
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


def make_pairs(rows, scored, drop_truncated):
    """(pairs, Counter of why prompts were dropped): every input row with its rewards, and its best response as
    `chosen`, its worst as `rejected` (with their sampled ids when the row has them, which rebel.py then trains)."""
    pairs, dropped = [], Counter()
    for i, row in enumerate(rows):
        rewards = scored[i]["rewards"]
        if rewards is None:  # the reward model could not score this prompt
            dropped[scored[i]["dropped"]] += 1
            continue
        chosen, rejected, why = select_pair(rewards, row["responses"], row.get("truncated") or [], drop_truncated)
        if not math.isfinite(rewards[chosen] - rewards[rejected]):
            fail(f"row {i}: its rewards {rewards[chosen]} and {rewards[rejected]} differ by more than a float can "
                 "hold: scale the reward down")
        if why:
            dropped[why] += 1
            continue
        pairs.append({**row, "rewards": rewards, "chosen": row["responses"][chosen],
                      "rejected": row["responses"][rejected], "chosen_reward": rewards[chosen],
                      "rejected_reward": rewards[rejected]})
        if "response_ids" in row:
            pairs[-1].update(chosen_ids=row["response_ids"][chosen], rejected_ids=row["response_ids"][rejected])
    return pairs, dropped


def summary(pairs, all_rewards):
    chosen, rejected = [p["chosen_reward"] for p in pairs], [p["rejected_reward"] for p in pairs]
    lines = [f"{'reward':<12}{'mean':>12}{'median':>12}"]
    for name, values in (("chosen", chosen), ("rejected", rejected), ("all samples", all_rewards)):
        lines.append(f"{name:<12}{np.mean(values):>12.5g}{np.median(values):>12.5g}")
    return "\n".join(lines) + f"\nmean gap chosen − rejected: {np.mean(np.subtract(chosen, rejected)):.5g}"


# ----------------------------------------------------------------------------- main

def main(cfg):
    world = init_distributed()
    if cfg.test_size and os.path.exists(cfg.output) and not os.path.exists(os.path.join(cfg.output,
                                                                                        "dataset_dict.json")):
        fail(f"--output {cfg.output} exists and is not a datasets folder that score.py wrote: it would be replaced; "
             "choose another")
    check_output(cfg.output, "--output", "folder" if cfg.test_size else "file", inputs={"--input": cfg.input},
                 model=None if cfg.reward_fn or cfg.test_size else cfg.reward_model)
    check_writable(cfg.output + ".shards", "--output")
    reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
    dtype = compute_dtype(cfg.dtype, world.device)

    # input: read and check every row before the reward model is loaded
    data = require_split(cfg.input, cfg.split)
    if "prompt" in data.column_names:
        check_prompt_column(data, "prompt", cfg.input)
    rows = data.to_list()
    k = check_rows(rows, cfg.input, cfg.drop_truncated)
    if reward_fn:
        check_reward_fn_columns(reward_fn, cfg.reward_fn, list(rows[0]), cfg.input)
    if cfg.test_size or cfg.output.endswith(".parquet"):  # columns that parquet cannot hold: said before scoring
        arrow_table(rows, cfg.output)
    source = None if reward_fn else reward_tokenizer_source(cfg)  # --reward_base for a Starling-RM state dict
    tokenizer = source and load_tokenizer(source)
    blocks = [list(range(s, min(s + cfg.block_size, len(rows)))) for s in range(0, len(rows), cfg.block_size)]
    model_settings = None if reward_fn else cfg  # settings that only a reward model reads
    settings = dict(reward=cfg.reward_fn or cfg.reward_model,
                    function=cfg.reward_fn.rpartition(":")[2] if reward_fn else None,
                    max_length=model_settings and cfg.max_length, dtype=model_settings and cfg.dtype,
                    block_size=cfg.block_size, trust_remote_code=model_settings and cfg.trust_remote_code,
                    reward_base=source if source != cfg.reward_model else None,  # where Starling-RM's config comes from
                    # a reward function's file is part of what the rewards depend on: an edited one is not mixed in
                    reward_fn_sha256=sha256(open(cfg.reward_fn.rpartition(":")[0], "rb").read()) if reward_fn else None,
                    input_sha256=fingerprint([row["prompt"], row["responses"], row.get("response_ids")]
                                             for row in rows))
    shards, old = open_shards(cfg.output, settings, flags=vars(cfg), paths=("reward",))  # compared by content
    print0(f"{len(rows)} prompts × {k} responses | reward {settings['reward']} | {len(blocks)} blocks of "
           f"{cfg.block_size} prompts | {world.size} processes | device {world.device.type}"
           + ("" if reward_fn else f" | dtype {dtype}"))

    def make_worker():
        if reward_fn:
            return lambda b, block: (function_rewards(reward_fn, cfg.reward_fn, rows, block), len(block) * k)
        model = load_reward_model(cfg, dtype, tokenizer).to(world.device).eval()
        return lambda b, block: model_rewards(model, tokenizer, rows, block, cfg, world.device)

    scored = run_blocks(blocks, shards, (settings, old), make_worker, None if reward_fn else cfg.reward_model, world,
                        "responses" if reward_fn else "tokens")
    if world.rank == 0:
        scored = {s["index"]: s for s in scored}
        pairs, dropped = make_pairs(rows, scored, cfg.drop_truncated)
        replaced = sorted({"rewards", "chosen", "rejected", "chosen_reward", "rejected_reward", "chosen_ids",
                           "rejected_ids"} & rows[0].keys())
        if replaced:
            print0(f"note: input columns {', '.join(replaced)} are replaced by this scoring")
        cut = sum(s["cut"] for s in scored.values())
        if cut:
            print0(f"{cut} of {len(rows) * k} reward-model inputs were cut to max_length={cfg.max_length} tokens")
        print0(f"dropped {sum(dropped.values())} of {len(rows)} prompts"
               + "".join(f" | {n} {why}" for why, n in sorted(dropped.items())) + f" | {len(pairs)} pairs kept")
        if len(pairs) <= cfg.test_size:
            fail(f"{len(pairs)} pairs kept: " + (f"not enough for --test_size {cfg.test_size} and a train split"
                                                 if pairs else "nothing to train on"))
        print0(summary(pairs, [r for s in scored.values() for r in s["rewards"] or []]))
        log_summary(cfg.report_to, cfg.output, vars(cfg), "score", {
            "pairs": len(pairs), "prompts_dropped": sum(dropped.values()), "inputs_cut": cut,
            "chosen_reward_mean": float(np.mean([p["chosen_reward"] for p in pairs])),
            "rejected_reward_mean": float(np.mean([p["rejected_reward"] for p in pairs]))})
        if cfg.test_size:
            write_splits(cfg.output, pairs, cfg.test_size, cfg.seed)
            print0(f"{len(pairs) - cfg.test_size} train_prefs + {cfg.test_size} test_prefs pairs -> {cfg.output}")
        else:
            write_rows(cfg.output, pairs)
            print0(f"{len(pairs)} pairs -> {cfg.output}")
    dist.destroy_process_group()


def write_splits(output, pairs, test_size, seed):
    """A datasets folder with splits train_prefs and test_prefs (test_size seeded pairs), rebel.py's defaults."""
    from datasets import Dataset, DatasetDict
    held_out = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:test_size].tolist())

    def split(test):
        return Dataset(arrow_table([p for n, p in enumerate(pairs) if (n in held_out) == test], output))
    splits = DatasetDict(train_prefs=split(False), test_prefs=split(True))
    tmp = f"{output}.tmp{os.getpid()}"
    splits.save_to_disk(tmp)
    replace_path(tmp, output)


if __name__ == "__main__":
    run_script(main, Config, "the same command continues where it stopped")
