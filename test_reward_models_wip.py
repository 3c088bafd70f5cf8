"""Tests of score.py's native Starling-RM and Eurus-RM (to become class TestRewardModels in test_rebel.py).

    python -m pytest -q -x test_reward_models_wip.py -p no:cacheprovider

Each reward model is a tiny stand-in of its Hub layout, built offline: Starling-RM-7B-alpha's bare GPTRewardModel state
dict (pytorch_model.bin, no config, no tokenizer) beside a Llama-2-chat-like --reward_base folder, and Eurus-RM-7b's
MistralConfig + model.* / regression_head.weight safetensors + a modeling_eurus_rm.py with its EurusRewardModel.
"""
import os
import shutil

import pytest
import torch

import rebel
import score
from test_rebel import FAMILIES, generations, make_tokenizer, read_jsonl, run_score, write_jsonl

# meta-llama/Llama-2-7b-chat-hf's chat template (its tokenizer_config.json)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
FAMILIES.setdefault("llama2", dict(template=LLAMA2_CHAT_TEMPLATE, special=["<unk>", "<s>", "</s>"], bos="<s>",
                                   eos="</s>", ends=["</s>"]))

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


# ----------------------------------------------------------------------------- builders

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
    tokenizer = make_tokenizer(path, family="llama2")
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


def reward_inputs(path, rows):
    tokenizer = rebel.load_tokenizer(path)
    chats = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": r}]
             for row in rows for r in row["responses"]]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def max_difference(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- Starling-RM

@pytest.mark.parametrize("layout", ["both", "model", "transformer"])
def test_starling_is_scored_as_the_authors_computed_it(llama2_base, tmp_path, layout, capsys):
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
    assert len({round(r, 6) for r in got}) == len(got)  # rewards differ between responses: a wrong reading would show


def test_starling_weights_are_read_with_weights_only_and_without_the_lm_head(llama2_base, tmp_path, monkeypatch):
    rm = make_starling(str(tmp_path / "starling"), llama2_base)
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or load(*a, **kw))
    cfg = score.Config(reward_model=rm, reward_base=llama2_base)
    assert score.reward_tokenizer_source(cfg) == llama2_base
    model = score.load_reward_model(cfg, torch.float32, rebel.load_tokenizer(llama2_base))
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    assert type(model) is score.StarlingRM and not any("lm_head" in k for k in model.state_dict())
    assert model.config.pad_token_id == rebel.load_tokenizer(llama2_base).unk_token_id


def test_starling_hub_id_resolves_its_files_through_cached_file(llama2_base, tmp_path, monkeypatch):
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


# ----------------------------------------------------------------------------- Eurus-RM

def test_eurus_is_scored_natively_as_its_remote_code(eurus_model, tmp_path, remote_modules, capsys):
    rows = generations(7, seed=8)
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    out = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_model=eurus_model, dtype="float32"))  # 4 a batch
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


def test_eurus_runs_no_remote_code_unless_asked(eurus_model, remote_modules):
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
def test_eurus_is_recognised_by_its_config(config, expected):
    from transformers import MistralConfig
    assert score.is_eurus(MistralConfig(**config)) is expected


# ----------------------------------------------------------------------------- bad input, one line each

def test_a_reward_model_folder_without_tokenizer_files_says_so_in_one_line(eurus_model, tmp_path):
    folder = str(tmp_path / "no_tokenizer")
    shutil.copytree(eurus_model, folder, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "chat_*"))
    data = write_jsonl(tmp_path / "gen.jsonl", generations(2))
    with pytest.raises(SystemExit) as failed:
        run_score(data, tmp_path / "pairs.jsonl", reward_model=folder)
    assert str(failed.value) == (f"error: reward model {folder}: no tokenizer files (tokenizer.json / "
                                 f"tokenizer.model / tokenizer_config.json) in the folder; copy them there from the "
                                 f"model it was trained from")


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


@pytest.mark.parametrize("settings, message", BAD_INPUTS)
def test_bad_reward_models_fail_in_one_line_before_scoring(settings, message, llama2_base, tmp_path, monkeypatch):
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
