"""Issue i21 ("every row of the REBEL model card runs"): Anthropic-HH/Nectar prompts as chat messages, text-only pairs
tokenised in context (a SentencePiece "legacy" family), a pad id outside the embedding, generate.py --format
alpaca_eval. To be merged into test_rebel.py's sections (make_tokenizer then builds the llama2_sp family itself)."""
import json
import os
import shutil

import pytest

import generate
import rebel
import test_rebel
from test_rebel import (CORPUS, FAMILIES, SHARED_DATA, WORDS, gen, gsm8k_dir, make_model, read_json,  # noqa: F401
                        read_jsonl, run_eval, run_score, train, write_jsonl, write_pairs)

# Llama-2-chat's template: [INST] ... [/INST], the response between spaces, then </s>; a system turn in <<SYS>>
LLAMA2_SP_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# sentencepiece: Llama-2's tokenizer.json (legacy): "▁" prepended to every text between special tokens, spaces -> "▁"
FAMILIES.setdefault("llama2_sp", dict(template=LLAMA2_SP_TEMPLATE, special=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>",
                                      ends=["</s>"], sentencepiece=True,
                                      corpus=["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n" + " ".join(WORDS) + " [/INST] "
                                              + " ".join(WORDS)] * 5))
_byte_level_tokenizer = test_rebel.make_tokenizer


def make_tokenizer(path, vocab_size=384, corpus=CORPUS, family="llama3"):
    """test_rebel's make_tokenizer, and a SentencePiece-style "legacy" BPE (Llama-2, Mistral v0.1, OpenChat) for a
    family marked sentencepiece: Prepend("▁") + Replace(" ", "▁") normalizer, split at "▁", Llama-2's decoder."""
    spec = FAMILIES[family]
    if not spec.get("sentencepiece"):
        return _byte_level_tokenizer(path, vocab_size=vocab_size, corpus=corpus, family=family)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(corpus + spec.get("corpus", []), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], unk_token="<unk>",
                                        chat_template=spec["template"])
    tokenizer.save_pretrained(path)
    return tokenizer


test_rebel.make_tokenizer = make_tokenizer  # make_model and family_pipeline build the llama2_sp family too

HH = "\n\nHuman: the sea is blue\n\nAssistant: and the sky\n\nHuman: why is the sky blue\n\nAssistant:"


# ----------------------------------------------------------------------------- 1. Human:/Assistant: prompts

def test_hh_prompt_strings_are_converted_to_chat_messages():
    user, assistant = (lambda text: {"role": "user", "content": text}), (lambda text: {"role": "assistant", "content": text})
    assert rebel.hh_messages(HH) == [user("the sea is blue"), assistant("and the sky"), user("why is the sky blue")]
    assert rebel.hh_messages("Human: hi there \n\nAssistant:") == [user("hi there")]  # HH without the leading newlines
    assert rebel.hh_messages("  \n\nHuman: a\nb\n\nAssistant:  ") == [user("a\nb")]
    for text in ("Human: hi", "hi\n\nHuman: x\n\nAssistant:", "Human: a\n\nHuman: b\n\nAssistant:",  # not the format
                 "Human: a\n\nAssistant: b", "Human: \n\nAssistant:", "Human: a\n\nAssistant:\n\nHuman: c\n\nAssistant:",
                 "Assistant: a\n\nHuman: b\n\nAssistant:", "What does Human: mean?"):
        assert rebel.hh_messages(text) is None, text
        assert rebel.chat_messages(text, convert_hh=True) == [user(text)]
    assert rebel.chat_messages(HH) == [user(HH)] and len(rebel.chat_messages(HH, convert_hh=True)) == 3
    assert rebel.Config().convert_hh and generate.Config().convert_hh


def test_hh_prompts_are_sampled_and_trained_as_their_turns(tmp_path, capsys):
    """generate.py templates a Human:/Assistant: prompt as its turns and says how many it converted; rebel.py checks
    the sampled prompt ids against the same conversion (with --convert_hh false they are another prompt: dropped),
    and text-only pairs are templated as the turns too."""
    model = make_model(str(tmp_path / "model"), ends_often=True)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": HH}, {"prompt": "Human: the quick fox\n\nAssistant:"},
                                                       {"prompt": "the lazy dog"}])
    tokenizer = rebel.load_tokenizer(model)
    capsys.readouterr()
    rows = read_jsonl(gen(model, prompts, tmp_path / "gen.jsonl", max_new_tokens=6))
    assert ("converted 2 of 3 prompts from the Human:/Assistant: format to chat messages (--convert_hh false to keep "
            "them as one user turn)") in capsys.readouterr().out
    assert [r["prompt"] for r in rows] == [HH, "Human: the quick fox\n\nAssistant:", "the lazy dog"]  # as in the input
    turns = rebel.hh_messages(HH)
    assert rows[0]["prompt_ids"] == rebel.prompt_tokens(tokenizer, turns)[1]
    assert tokenizer.decode(rows[0]["prompt_ids"]).count("<|start_header_id|>user") == 2
    one_turn = read_jsonl(gen(model, prompts, tmp_path / "one.jsonl", max_new_tokens=6, convert_hh=False))
    assert one_turn[0]["prompt_ids"] == rebel.prompt_tokens(tokenizer, HH)[1] != rows[0]["prompt_ids"]
    assert "converted" not in capsys.readouterr().out

    (tmp_path / "rewards.py").write_text(test_rebel.LENGTH_REWARD)
    pairs = run_score(str(tmp_path / "gen.jsonl"), tmp_path / "pairs.jsonl", reward_fn=f"{tmp_path / 'rewards.py'}:length",
                      drop_truncated=False)
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


# ----------------------------------------------------------------------------- 2. text-only pairs tokenised in context

def test_text_ids_of_a_sentencepiece_legacy_tokenizer_have_no_stray_space_token(tmp_path):
    """Llama-2's tokenizer prepends "▁" to every text it tokenises: the response alone would start with a stray "▁"
    token that no sampled response has. Tokenised in context, the response ids are the conversation's after the
    prompt's; sampled ids decoded to text come back as the same ids."""
    tokenizer = make_tokenizer(str(tmp_path), family="llama2_sp")
    eot = rebel.end_of_turn(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "</s>"
    assert tokenizer.convert_ids_to_tokens(tokenizer(" blue", add_special_tokens=False)["input_ids"]) == ["▁", "▁blue"]
    for prompt in ("the sea", test_rebel.MULTI_TURN, "Human: the sea\n\nAssistant: blue\n\nHuman: and the sky\n\nAssistant:"):
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


def test_llama2_sp_text_ids_equal_sampled_ids_of_the_same_tokens(tmp_path):
    """Every family: a response sampled as the in-context tokens of some text (e.g. the model's most likely tokens) is
    trained as the same ids from the text-only pairs."""
    for family in FAMILIES:
        if family == "thinking":  # cannot be split at all (test_text_pairs_split_where_the_template_does)
            continue
        tokenizer = make_tokenizer(str(tmp_path / family), family=family)
        eot = rebel.end_of_turn(tokenizer)
        prompt_text, prompt_ids = rebel.prompt_tokens(tokenizer, "the sea")
        for words in ("blue sky", "the quick brown fox jumps", "sea and sky and wind"):
            ids = rebel.text_ids("the sea", [words], tokenizer, eot)[1]
            sampled = tokenizer(words, add_special_tokens=False)["input_ids"] if not FAMILIES[family].get("sentencepiece") \
                else tokenizer(prompt_text + " " + words, add_special_tokens=False)["input_ids"][len(prompt_ids):]
            assert ids == sampled + ([eot] if eot is not None else []), family


def test_llama2_sp_generate_score_rebel_pipeline(tmp_path, capsys):
    """generate → score → rebel on the SentencePiece family: the sampled ids are trained (test_rebel's check); the
    same pairs as text only are the conversation's tokens: none starts with the stray "▁" of the response alone."""
    test_rebel.test_sampled_tokens_are_the_trained_tokens("llama2_sp", tmp_path, capsys)
    from datasets import Dataset
    rows = read_jsonl(str(tmp_path / "pairs.jsonl"))
    tokenizer = rebel.load_tokenizer(str(tmp_path / "llama2_sp"))
    texts = Dataset.from_list([{k: v for k, v in row.items() if not k.endswith("_ids")} for row in rows])
    pairs = rebel.tokenize_pairs(texts, tokenizer, "t", len(tokenizer))
    assert len(pairs) == len(rows)
    for pair in pairs:
        prompt_text, prompt_ids = rebel.prompt_tokens(tokenizer, rows[pair["index"]]["prompt"])
        for ids, text in ((pair["chosen_ids"], rows[pair["index"]]["chosen"]), (pair["rejected_ids"], rows[pair["index"]]["rejected"])):
            context = tokenizer(prompt_text + " " + text.strip() + "</s>", add_special_tokens=False)["input_ids"]
            assert ids == context[len(prompt_ids):]  # one "▁" between [/INST] and the response, as in the conversation


# ----------------------------------------------------------------------------- 3. a pad id outside the embedding

def test_pad_id_outside_the_embedding(tmp_path, gsm8k_dir, capsys):  # noqa: F811
    """REBEL-Llama-3's tokenizer pads with [PAD] = id 128256 of a 128,256-row embedding: generate.py, eval_gsm8k.py and
    rebel.py say so in one line and give exactly what the same weights give with an in-vocabulary pad."""
    inside = make_model(str(tmp_path / "inside"), ends_often=True)
    outside = str(tmp_path / "outside")
    shutil.copytree(inside, outside)
    tokenizer = rebel.load_tokenizer(outside)
    rows = rebel.vocab_size(rebel.load_model_config(outside))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(outside)
    assert rebel.load_tokenizer(outside).pad_token_id == rows  # one past the embedding, which is not resized
    prompts = test_rebel.write_prompts(tmp_path / "prompts.jsonl", 6)
    capsys.readouterr()
    runs = {}
    for name, model in (("inside", inside), ("outside", outside)):
        generated = read_jsonl(gen(model, prompts, tmp_path / f"{name}.jsonl", max_new_tokens=8, batch_size=3))
        printed = capsys.readouterr().out
        assert (f"note: the pad token of {model} ('[PAD]', id {rows}) is outside its {rows}-row embedding" in printed) == (
            name == "outside")
        answers = run_eval(model, gsm8k_dir, tmp_path / f"eval_{name}", limit=4, batch_size=2, max_new_tokens=6)[1]
        out = train(model, write_pairs(tmp_path / "pairs.jsonl", n=12), tmp_path / f"run_{name}", total_episodes=4,
                    batch_size=4, eval_size=4, save_final=False)
        printed = capsys.readouterr().out
        assert ("is outside its" in printed) == (name == "outside")
        runs[name] = generated, answers, read_jsonl(os.path.join(out, "ref_logprobs.jsonl")), [
            {k: v for k, v in r.items() if not k.endswith("_s")} for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
            if "loss" in r or "val_loss" in r]
    assert runs["inside"] == runs["outside"]


# ----------------------------------------------------------------------------- 4. generate.py --format alpaca_eval

def alpaca_instructions(tmp_path, n=5):
    """AlpacaEval's model_outputs (../shared/data/alpaca_eval), else a tiny file like it."""
    path = os.path.join(SHARED_DATA, "alpaca_eval", "Meta-Llama-3-8B-Instruct.json")
    if os.path.exists(path):
        return path, read_json(path)[:n]
    rows = [dict(instruction=" ".join(WORDS[i:i + 4]) + "?", output="x", generator="m", dataset="d") for i in range(n)]
    with open(tmp_path / "alpaca.json", "w") as f:
        json.dump(rows, f)
    return str(tmp_path / "alpaca.json"), rows


def test_generate_writes_alpaca_eval_model_outputs(tiny_model, tmp_path):
    data, rows = alpaca_instructions(tmp_path)
    settings = dict(prompt_column="instruction", limit=len(rows), num_samples=1, greedy=True, max_new_tokens=6, batch_size=2)
    out = gen(tiny_model, data, tmp_path / "model_outputs.json", format="alpaca_eval", **settings)
    outputs = read_json(out)
    assert isinstance(outputs, list) and len(outputs) == len(rows)
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]  # input order, strings as given
    assert {o["generator"] for o in outputs} == {os.path.basename(tiny_model)} and all(set(o) == {"instruction", "output",
                                                                                                 "generator"} for o in outputs)
    # output: the first sample, as the rows format has it; greedy: the same for any seed
    as_rows = read_jsonl(gen(tiny_model, data, tmp_path / "rows.jsonl", seed=7, **settings))
    assert [o["output"] for o in outputs] == [r["responses"][0] for r in as_rows]
    # resumable: a lost block is redone, the JSON list merged again; a generator name may be given
    os.remove(sorted(os.listdir(tmp_path / "model_outputs.json.shards"))[0] and
              sorted(str(p) for p in (tmp_path / "model_outputs.json.shards").glob("block_*.jsonl"))[0])
    again = read_json(gen(tiny_model, data, tmp_path / "model_outputs.json", format="alpaca_eval", generator="REBEL-tiny",
                          **settings))
    assert again == [dict(o, generator="REBEL-tiny") for o in outputs]
    with pytest.raises(SystemExit, match="--format alpaca_eval writes a .json file"):
        generate.Config(format="alpaca_eval", output=str(tmp_path / "x.jsonl"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_llama")))
