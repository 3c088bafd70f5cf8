"""Tests for rebel.py, generate.py, score.py and eval_gsm8k.py, on CPU with tiny models built offline.

    pytest -q test_rebel.py                                   # the suite (a few minutes on 2 cores)
    RUN_BENCH=1 pytest -q test_rebel.py -k bench -s           # the performance benchmark (prints a table)

Every model here is a tiny Llama built from a config, with a byte-level BPE tokenizer trained offline and a
Llama-3-style chat template, saved with save_pretrained so that the scripts' real from_pretrained path is used.
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")  # this project's GSM8K and AlpacaEval; else the tests download them
sys.path.insert(0, HERE)

import eval_gsm8k  # noqa: E402
import generate  # noqa: E402
import rebel  # noqa: E402
import score  # noqa: E402

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["The quick brown fox jumps over the lazy dog. Answer the question with care and show your work.",
          "Question: Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
          "Answer: She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in all. #### 72",
          "Write a short poem about the sea, the sky and the wind. Explain why the sky is blue."] * 5


def make_tokenizer(path, vocab_size=384, chat_template=LLAMA3_CHAT_TEMPLATE, corpus=CORPUS):
    """Byte-level BPE (every byte string is encodable) with Llama-3's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # Llama-3's split pattern, then bytes -> printable characters
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        chat_template=chat_template)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_model(path, hidden=64, layers=2, heads=4, kv_heads=2, seed=0, vocab_size=384, corpus=CORPUS):
    """A tiny random Llama with the tokenizer above, saved like a Hub checkpoint (config, safetensors, tokenizer,
    generation config with Llama-3's two stop tokens)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    tokenizer = make_tokenizer(path, vocab_size=vocab_size, corpus=corpus)
    eot, end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=[end, eot], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[end, eot])
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny_llama")))


# ----------------------------------------------------------------------------- rebel.py

WORDS = "the quick brown fox jumps over a lazy dog while sea and sky and wind are blue answer question".split()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def torchrun(script, args):
    """`script` under torchrun with 2 processes (one thread each: 2 cores), flags from a dict."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    command += [x for k, v in args.items() for x in (f"--{k}", str(v))]
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write_pairs(path, n=40, seed=0, schema="common", message_prompts=False):
    """Preference pairs of random words in the common schema (rejected, rejected_reward) or Cornell-AGI's (reject...)."""
    rng = random.Random(seed)
    rejected, rejected_reward = ("rejected", "rejected_reward") if schema == "common" else ("reject", "reject_reward")
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
        rows.append({"prompt": [{"role": "user", "content": prompt}] if message_prompts else prompt,
                     "chosen": " ".join(rng.choices(WORDS, k=rng.randint(1, 24))),
                     rejected: " ".join(rng.choices(WORDS, k=rng.randint(1, 24))),
                     "chosen_reward": rng.uniform(0.5, 1.0), rejected_reward: rng.uniform(0.0, 0.5), "extra": i})
    return write_jsonl(path, rows)


TRAIN_SETTINGS = dict(total_episodes=32, batch_size=8, micro_batch_size=2, eval_micro_batch_size=4, eval_size=8, eta=1.0,
                      lr=1e-3, warmup_ratio=0.25, eval_every=2, save_every=2, activation_checkpointing=False, seed=1)


def train(model, dataset, output_dir, **overrides):
    """rebel.main in this process (a 1-process gloo group), small and fast settings."""
    settings = dict(model=model, dataset=dataset, output_dir=str(output_dir), **TRAIN_SETTINGS)
    settings.update(overrides)
    rebel.main(rebel.Config(**settings))
    return str(output_dir)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def naive_logprob(model, prompt_ids, response_ids, temperature):
    """The textbook computation, one sequence, full-vocabulary logits everywhere."""
    ids = torch.tensor([prompt_ids + response_ids])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].float() / temperature, dim=-1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum()


def test_rebel_loss_by_hand():
    # pair 1: log-ratio diff (−1 − −2) − (−3 − −1) = 3; target 2·(0.9 − 0.4) = 1; (3 − 1)² = 4
    # pair 2: (0 − 0) − (−1 − 0) = 1; target 2·(0.1 − 0.6) = −1; (1 + 1)² = 4, plus pair 3 with a zero error
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss = rebel.rebel_loss(t(-1.0, 0.0, -5.0), t(-3.0, -1.0, -2.0), t(-2.0, 0.0, -5.0), t(-1.0, 0.0, -2.0),
                            t(0.9, 0.1, 0.3), t(0.4, 0.6, 0.3), eta=2.0)
    assert loss.tolist() == pytest.approx([4.0, 4.0, 0.0])


def test_tokenize_pairs_schema_and_end_of_turn(tiny_model, tmp_path):
    from datasets import Dataset
    tokenizer = rebel.load_tokenizer(tiny_model)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for schema, messages in (("common", False), ("cornell", True)):
        rows = Dataset.from_list(read_jsonl(write_pairs(tmp_path / f"{schema}.jsonl", n=5, schema=schema, message_prompts=messages)))
        pairs = rebel.tokenize_pairs(rows, tokenizer, schema)
        for row, pair in zip(rows, pairs):
            prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][0]["content"]
            assert tokenizer.decode(pair["prompt_ids"]).endswith(f"{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
            assert pair["chosen_ids"][-1] == eot and pair["rejected_ids"][-1] == eot
            assert tokenizer.decode(pair["chosen_ids"]) == row["chosen"] + "<|eot_id|>"
            assert pair["rejected_reward"] == (row.get("rejected_reward") or row.get("reject_reward"))


def test_logprobs_match_naive_and_ignore_padding_and_batching(tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = rebel.load_tokenizer(tiny_model)
    pairs = rebel.tokenize_pairs(Dataset.from_list(read_jsonl(write_pairs(tmp_path / "p.jsonl", n=6))), tokenizer, "t")
    temperature = 0.7
    naive = torch.stack([torch.stack([naive_logprob(model, p["prompt_ids"], p[k], temperature) for k in ("chosen_ids", "rejected_ids")])
                         for p in pairs])

    def batched(group, chunk):
        out = rebel.response_logprobs(model, *rebel.collate(group, tokenizer.pad_token_id), temperature, chunk)
        return out.view(2, len(group)).T

    together = batched(pairs, chunk=7)                                  # all six padded to the longest, 7-token chunks
    alone = torch.cat([batched([p], chunk=1024) for p in pairs])        # each pair on its own, no padding
    torch.testing.assert_close(together, naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(alone, naive, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(batched(pairs, 7), rebel.response_logprobs(  # the temperature does change the result
        model, *rebel.collate(pairs, tokenizer.pad_token_id), 1.0, 7).view(2, -1).T)

    # gradients of the chunked, recomputed path equal the naive ones
    model.zero_grad()
    batched(pairs[:3], chunk=5).sum().backward()
    chunked_grad = model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    sum(naive_logprob(model, p["prompt_ids"], p[k], temperature) for p in pairs[:3] for k in ("chosen_ids", "rejected_ids")).backward()
    torch.testing.assert_close(chunked_grad[0], model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked_grad[1], model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_global_batches_depend_only_on_the_seed():
    stream = [rebel.global_batch(10, 4, u, seed=3) for u in range(6)]   # 24 pairs drawn from 10: crosses two epochs
    flat = sum(stream, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert stream == [rebel.global_batch(10, 4, u, seed=3) for u in range(6)] != [rebel.global_batch(10, 4, u, seed=4) for u in range(6)]
    batches = rebel.micro_batches([{"prompt_ids": [0] * i, "chosen_ids": [0], "rejected_ids": [0]} for i in range(10)], stream[0], 1)
    dealt = [rebel.for_rank(batches, r, 3) for r in range(3)]   # 4 micro-batches over 3 ranks: same count each
    assert [len(d) for d in dealt] == [2, 2, 2] and sum(b is None for d in dealt for b in d) == 2
    assert sorted(id(b) for d in dealt for b in d if b) == sorted(map(id, batches))


def test_first_update_loss_is_mean_squared_scaled_reward_gap(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl", n=24)
    out = train(tiny_model, data, tmp_path / "run", eta=3.0, total_episodes=8, batch_size=8, eval_size=0, save_final=False)
    first = read_jsonl(os.path.join(out, "metrics.jsonl"))[0]
    positions = rebel.global_batch(24, 8, 0, seed=1)
    rows = read_jsonl(data)
    expected = sum((3.0 * (rows[i]["chosen_reward"] - rows[i]["rejected_reward"])) ** 2 for i in positions) / 8
    assert first["update"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(first["logratio_chosen"]) < 1e-5 and abs(first["logratio_rejected"]) < 1e-5
    ref = read_jsonl(os.path.join(out, "ref_logprobs.jsonl"))
    assert sorted(r["index"] for r in ref) == list(range(24)) and {r["split"] for r in ref} == {"train"}


def final_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "model.safetensors"))


def test_two_processes_equal_one_and_final_model_reloads(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "p.jsonl", n=40)
    one = train(tiny_model, data, tmp_path / "one")
    two = str(tmp_path / "two")  # the same settings, but 2 processes and activation checkpointing on
    torchrun("rebel.py", dict(TRAIN_SETTINGS, model=tiny_model, dataset=data, output_dir=two, activation_checkpointing="true"))
    m1, m2 = read_jsonl(os.path.join(one, "metrics.jsonl")), read_jsonl(os.path.join(two, "metrics.jsonl"))
    assert [r["update"] for r in m1] == [r["update"] for r in m2] == [0, 1, 2, 2, 3, 4, 4]
    for r1, r2 in zip(m1, m2):  # losses square differences of fp32 sums of ~50 log-probs: equal to ~1e-5 relative
        for key in ("loss", "val_loss", "sign_align"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6)
    w1, w2 = final_weights(one), final_weights(two)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    from transformers import AutoModelForCausalLM
    first = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert max((w1[k] - first.state_dict()[k]).abs().max().item() for k in w1) > 1e-3   # it did train

    # the consolidated model reloads and reproduces the last evaluation
    from datasets import Dataset
    model = AutoModelForCausalLM.from_pretrained(os.path.join(one, "final"))
    tokenizer = rebel.load_tokenizer(os.path.join(one, "final"))
    ref = {r["index"]: (r["chosen_logprob"], r["rejected_logprob"]) for r in read_jsonl(os.path.join(one, "ref_logprobs.jsonl")) if r["split"] == "eval"}
    rows = Dataset.from_list(read_jsonl(data))
    pairs = [p for p in rebel.tokenize_pairs(rows, tokenizer, "t") if p["index"] in ref]
    with torch.no_grad():
        logps = rebel.response_logprobs(model, *rebel.collate(pairs, tokenizer.pad_token_id), 0.8, 1024).view(2, -1)
    diff = (logps[0] - torch.tensor([ref[p["index"]][0] for p in pairs])) - (logps[1] - torch.tensor([ref[p["index"]][1] for p in pairs]))
    gap = torch.tensor([p["chosen_reward"] - p["rejected_reward"] for p in pairs])
    assert len(pairs) == 8 and ((diff - gap) ** 2).mean().item() == pytest.approx(m1[-1]["val_loss"], rel=1e-4)


def test_resume_equals_uninterrupted(tiny_model, tmp_path, capsys):
    data = write_pairs(tmp_path / "p.jsonl", n=40)
    full = train(tiny_model, data, tmp_path / "full", total_episodes=48)
    part = train(tiny_model, data, tmp_path / "part", total_episodes=48, stop_after=3)
    checkpoints = os.path.join(part, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["update_000003"] and not os.path.exists(os.path.join(part, "final"))
    # a crash while writing the next checkpoint, and records logged after the checkpoint, must not matter
    os.makedirs(os.path.join(checkpoints, "update_000004.partial"))
    rebel.append_jsonl(os.path.join(part, "metrics.jsonl"), {"update": 4, "loss": -1.0})
    capsys.readouterr()
    train(tiny_model, data, part, total_episodes=48, resume=True)
    assert "reference log-probs: reusing" in capsys.readouterr().out
    w1, w2 = final_weights(full), final_weights(part)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    m_full, m_part = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(os.path.join(part, "metrics.jsonl"))
    assert [r["update"] for r in m_part] == [r["update"] for r in m_full] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]
    assert [r.get("loss", r.get("val_loss")) for r in m_part] == pytest.approx([r.get("loss", r.get("val_loss")) for r in m_full], rel=1e-5)
    # a finished run is not redone, and a resume may not change what the run is
    stamp = os.path.getmtime(os.path.join(part, "final", "model.safetensors"))
    train(tiny_model, data, part, total_episodes=48, resume=True)
    assert "this run is finished" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(part, "final", "model.safetensors")) == stamp
    with pytest.raises(SystemExit, match=r"made with other settings \(--eta 1.0 -> 2.0; --seed 1 -> 3\)"):
        train(tiny_model, data, part, total_episodes=48, resume=True, eta=2.0, seed=3)


def test_final_model_keeps_the_starting_dtype_tokenizer_and_no_dropout(tiny_model, tmp_path):
    """A bf16 checkpoint with attention dropout: training turns dropout off (update 1's log-ratios are exactly 0, as
    policy = reference), and final/ is bf16 in its config and tensors, with the tokenizer as it was (no pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    start = str(tmp_path / "bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attention_dropout=0.5).to(torch.bfloat16)
    model.save_pretrained(start)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(start)
    out = train(start, write_pairs(tmp_path / "p.jsonl", n=24), tmp_path / "run", total_episodes=8, eval_size=0)
    first = read_jsonl(os.path.join(out, "metrics.jsonl"))[0]
    assert first["logratio_chosen"] == 0.0 and first["logratio_rejected"] == 0.0
    final = os.path.join(out, "final")
    assert json.load(open(os.path.join(final, "config.json")))["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(final, dtype="auto").dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(final).pad_token is None
    from transformers import GenerationConfig
    assert GenerationConfig.from_pretrained(final).eos_token_id == GenerationConfig.from_pretrained(tiny_model).eos_token_id


def test_non_finite_loss_stops_without_touching_the_checkpoint(tiny_model, tmp_path):
    rows = read_jsonl(write_pairs(tmp_path / "p.jsonl", n=40))
    first, second = rebel.global_batch(40, 8, 0, seed=1), rebel.global_batch(40, 8, 1, seed=1)
    row = next(i for i in second if i not in first)  # η·Δr overflows to inf in update 2 only
    rows[row]["chosen_reward"], rows[row]["rejected_reward"] = 1e308, -1e308
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit, match=r"non-finite loss .* at update 2; .*update_000001"):
        train(tiny_model, data, tmp_path / "run", eval_size=0, save_every=1, save_final=False)
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["update_000001"]


def test_bad_input_fails_clearly_before_loading_the_model(tiny_model, tmp_path, monkeypatch):
    import shutil
    import transformers
    from datasets import Dataset

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    good = read_jsonl(write_pairs(tmp_path / "good.jsonl", n=12))

    def data(name, rows):
        path = str(tmp_path / f"{name}.parquet")
        Dataset.from_list(rows).to_parquet(path)
        return path
    no_template = str(tmp_path / "no_template")
    shutil.copytree(tiny_model, no_template)
    config = json.load(open(os.path.join(no_template, "tokenizer_config.json")))
    config.pop("chat_template", None)
    json.dump(config, open(os.path.join(no_template, "tokenizer_config.json"), "w"))
    for name in os.listdir(no_template):
        if name.startswith("chat_template"):
            os.remove(os.path.join(no_template, name))

    cases = [
        (dict(dataset=str(tmp_path / "missing.jsonl")), r"missing\.jsonl.*no such file"),
        (dict(dataset=data("no_col", [{k: v for k, v in r.items() if k != "chosen_reward"} for r in good])), r"missing column 'chosen_reward'"),
        (dict(dataset=data("text_reward", [{**r, "rejected_reward": "low"} for r in good])), r"row 0: column 'rejected_reward' must be a finite number, got 'low'"),
        (dict(dataset=data("nan_reward", [{**r, "chosen_reward": float("nan") if i == 5 else r["chosen_reward"]} for i, r in enumerate(good)])),
         r"row 5: column 'chosen_reward' must be a finite number, got nan"),
        (dict(max_response_len=1), r"train: no pair left after the length filter"),
        (dict(model=no_template), r"has no chat template"),
        (dict(model=str(tmp_path / "no_model")), r"could not load the tokenizer of '.*no_model'"),
        (dict(micro_batch_size=3), r"--batch_size 8 must be a multiple of --micro_batch_size × processes = 3 × 1"),
        (dict(total_episodes=4), r"less than one batch"),
        (dict(dtype="fp8"), r"--dtype must be"),
        (dict(output_dir=str(tmp_path / "earlier")), r"holds a checkpoint of an earlier run: add --resume"),
    ]
    os.makedirs(tmp_path / "earlier" / "checkpoints" / "update_000002")
    (tmp_path / "earlier" / "checkpoints" / "update_000002" / "train_state.json").write_text('{"update": 2}')
    for overrides, message in cases:
        settings = {"dataset": str(tmp_path / "good.jsonl"), **overrides}
        with pytest.raises(SystemExit, match=message):
            train(settings.pop("model", tiny_model), settings.pop("dataset"), settings.pop("output_dir", tmp_path / "run"), **settings)


def test_help_documents_every_flag(capsys):
    """Every script's --help lists each flag with its one-line doc (rebel.py's as a real command line)."""
    helps = {rebel: subprocess.run([sys.executable, "rebel.py", "--help"], cwd=HERE, capture_output=True, text=True, check=True).stdout}
    for module in (generate, score, eval_gsm8k):
        with pytest.raises(SystemExit) as done:
            rebel.parse_config(module.Config, ["--help"])
        assert done.value.code == 0
        helps[module] = capsys.readouterr().out
    for module, out in helps.items():
        assert out.startswith("usage:")
        for field in rebel.dataclasses.fields(module.Config):
            assert f"--{field.name}" in out and field.metadata["help"].split()[0] in out
    cfg = rebel.parse_config(score.Config, ["--drop_truncated", "false", "--test_size", "3", "--reward_fn", "f.py:g"])
    assert (cfg.drop_truncated, cfg.test_size, cfg.reward_fn) == (False, 3, "f.py:g")


# ----------------------------------------------------------------------------- generate.py and score.py


def write_prompts(path, n, seed=0, ids=False, messages=False):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))
        rows.append({"prompt": [{"role": "user", "content": text}] if messages else text, **({"prompt_id": f"p{i}"} if ids else {})})
    return write_jsonl(path, rows)


def gen(model, prompts, output, **overrides):
    """generate.main in this process (a 1-process gloo group), small and fast settings."""
    settings = dict(model=model, prompts=prompts, output=str(output), num_samples=3, max_new_tokens=8, batch_size=2, seed=0)
    settings.update(overrides)
    generate.main(generate.Config(**settings))
    return str(output)


def run_score(data, output, **overrides):
    settings = dict(input=data, output=str(output), batch_size=4, block_size=3)
    settings.update(overrides)
    score.main(score.Config(**settings))
    return str(output)


def load_rows(path):
    from datasets import load_dataset
    return load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train").to_list()


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory):
    """A tiny random LlamaForSequenceClassification (one output) with the test tokenizer; pads with <|end_of_text|>,
    which the chat template never produces."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    path = str(tmp_path_factory.mktemp("tiny_rm"))
    tokenizer = make_tokenizer(path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, num_labels=1,
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|end_of_text|>"), bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- generate.py

def test_cut_at_stop_and_the_models_stop_tokens(tiny_model):
    tokenizer = rebel.load_tokenizer(tiny_model)
    end, eot = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    stop_ids = generate.stop_token_ids(tokenizer, tiny_model)
    assert stop_ids == sorted([end, eot])
    assert generate.cut_at_stop([7, 8, eot, eot, eot], set(stop_ids)) == ([7, 8], False, 3)   # padding after the stop
    assert generate.cut_at_stop([7, end, 9, eot], set(stop_ids)) == ([7], False, 2)            # the first of either stop
    assert generate.cut_at_stop([eot, 7], set(stop_ids)) == ([], False, 1)
    assert generate.cut_at_stop([7, 8, 9], set(stop_ids)) == ([7, 8, 9], True, 3)


def test_generate_rows_stops_and_truncation(tiny_model, tmp_path):
    # a copy of the model that also stops at 60 more tokens, so both natural stops and truncations happen
    model = str(tmp_path / "stoppy")
    shutil.copytree(tiny_model, model)
    config = json.load(open(os.path.join(model, "generation_config.json")))
    config["eos_token_id"] = config["eos_token_id"] + list(range(100, 160))
    json.dump(config, open(os.path.join(model, "generation_config.json"), "w"))
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=5, messages=True)
    rows = read_jsonl(gen(model, prompts, tmp_path / "gen.jsonl", num_samples=4, max_new_tokens=6))
    assert [r["prompt_id"] for r in rows] == list(range(5))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in read_jsonl(prompts)]
    samples = [(text, t, n) for r in rows for text, t, n in zip(r["responses"], r["truncated"], r["num_tokens"])]
    assert all(len(r["responses"]) == len(r["truncated"]) == len(r["num_tokens"]) == 4 for r in rows)
    assert all(isinstance(text, str) and isinstance(t, bool) and 1 <= n <= 6 for text, t, n in samples)
    assert all(n == 6 for _, t, n in samples if t)               # truncated: ran to max_new_tokens
    assert {t for _, t, _ in samples} == {True, False}          # both kinds occur
    assert any(n < 6 for _, t, n in samples if not t)           # stopped early at a stop token


def test_generate_samples_without_top_k(tiny_model, tmp_path):
    # transformers' default top_k=50 would allow at most 50 distinct first tokens for one prompt
    prompts = write_prompts(tmp_path / "one.jsonl", n=1)
    row, = read_jsonl(gen(tiny_model, prompts, tmp_path / "gen.jsonl", num_samples=150, max_new_tokens=1, temperature=1.0, top_p=1.0))
    assert len(set(row["responses"])) > 60


def test_generate_is_seeded_and_independent_of_the_number_of_processes(tiny_model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=9, ids=True)  # 5 blocks of 2: 3 on one process, 2 on the other
    one = read_jsonl(gen(tiny_model, prompts, tmp_path / "one.jsonl"))
    again = read_jsonl(gen(tiny_model, prompts, tmp_path / "again.jsonl"))
    other_seed = read_jsonl(gen(tiny_model, prompts, tmp_path / "seed1.jsonl", seed=1))
    assert one == again and [r["prompt_id"] for r in one] == [f"p{i}" for i in range(9)]
    assert [r["responses"] for r in one] != [r["responses"] for r in other_seed]
    torchrun("generate.py", dict(model=tiny_model, prompts=prompts, output=tmp_path / "two.parquet", num_samples=3,
                                 max_new_tokens=8, batch_size=2, seed=0))
    assert load_rows(str(tmp_path / "two.parquet")) == one


def test_generate_resumes_after_an_interruption(tiny_model, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=9)
    out = gen(tiny_model, prompts, tmp_path / "part.jsonl")
    full, shards = read_jsonl(out), out + ".shards"
    # a kill leaves saved blocks, no output, maybe a half-written temporary file; a saved block is never redone
    os.remove(out)
    for b in (3, 4):
        os.remove(os.path.join(shards, f"block_{b:06d}.jsonl"))
    with open(os.path.join(shards, "block_000003.jsonl.tmp999"), "w") as f:
        f.write('{"index": 0, "respo')
    first = read_jsonl(os.path.join(shards, "block_000000.jsonl"))
    rebel.atomic_write(os.path.join(shards, "block_000000.jsonl"),
                       "".join(json.dumps({**r, "responses": ["SAVED"] * 3}) + "\n" for r in first))
    capsys.readouterr()
    resumed = read_jsonl(gen(tiny_model, prompts, out))
    assert "3 of 5 blocks already saved" in capsys.readouterr().out
    saved = {r["index"] for r in first}
    assert [r["responses"] == ["SAVED"] * 3 for r in resumed] == [i in saved for i in range(9)]
    assert [r for i, r in enumerate(resumed) if i not in saved] == [r for i, r in enumerate(full) if i not in saved]
    with pytest.raises(SystemExit, match=r"part\.jsonl\.shards holds blocks made with other settings \(temperature 0\.8 -> 1\.5\)"):
        gen(tiny_model, prompts, out, temperature=1.5)
    write_prompts(tmp_path / "prompts.jsonl", n=9, seed=1)  # other prompts under the same file name
    with pytest.raises(SystemExit, match=r"other settings \(prompts_sha256"):
        gen(tiny_model, prompts, out)


def test_generate_bad_input_fails_before_loading_the_model(tiny_model, tmp_path, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=4)
    bad_prompt = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": "fine"}, {"prompt": {"text": "no"}}])
    cases = [
        (dict(prompts=str(tmp_path / "missing.jsonl")), r"missing\.jsonl.*no such file"),
        (dict(prompt_column="question"), r"prompts\.jsonl: missing column 'question' \(columns: prompt\)"),
        (dict(prompts=bad_prompt), r"bad\.jsonl row 2: prompt must be a string or a list"),
        (dict(split="test"), r"has no split 'test'"),
        (dict(output=str(tmp_path / "gen.csv")), r"expected a \.jsonl or \.parquet file"),
        (dict(engine="vllm"), r"vLLM is not installed \(pip install vllm\)"),
        (dict(engine="tgi"), r"--engine must be hf or vllm"),
        (dict(num_samples=0), r"--num_samples must be at least 1"),
        (dict(dtype="fp8"), r"--dtype must be"),
    ]
    for overrides, message in cases:
        if overrides.get("engine") == "vllm" and generate.importlib.util.find_spec("vllm"):
            continue
        settings = {"prompts": prompts, "output": str(tmp_path / "gen.jsonl"), **overrides}
        with pytest.raises(SystemExit, match=message):
            gen(tiny_model, settings.pop("prompts"), settings.pop("output"), **settings)


# ----------------------------------------------------------------------------- score.py

def test_select_pair_and_reward_of():
    responses = ["a", "b", "c", "d", "e"]
    assert score.select_pair([0.1, 0.9, 0.5, 0.9, 0.1], responses, [False] * 5, True) == (1, 0, None)  # first of equals
    assert score.select_pair([0.1, 0.9, 0.5, 0.2, 0.0], responses, [False, False, True, False, False], True)[2] == "a response hit the token limit"
    assert score.select_pair([0.1, 0.9, 0.5, 0.2, 0.0], responses, [False, False, True, False, False], False) == (1, 4, None)
    assert score.select_pair([0.3] * 5, responses, [False] * 5, True)[2] == "all rewards equal"
    assert score.select_pair([0.9, 0.5, 0.1], ["same", "b", "same"], [False] * 3, True)[2] == "chosen and rejected are the same text"
    armo = SimpleNamespace(score=torch.tensor([1.5, -2.0]), logits=torch.tensor([1.5, -2.0]))
    ordinary = SimpleNamespace(logits=torch.tensor([[0.5], [0.25]]))
    assert score.reward_of(armo).tolist() == [1.5, -2.0] and score.reward_of(ordinary).tolist() == [0.5, 0.25]


def generations(n, k=3, seed=0, long_every=0):
    """generate.py-like rows of random words; every `long_every`-th response is long (past a small max_length)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        responses = [" ".join(rng.choices(WORDS, k=40 if long_every and (i * k + j) % long_every == 0 else rng.randint(1, 12)))
                     for j in range(k)]
        rows.append(dict(prompt_id=i, prompt=" ".join(rng.choices(WORDS, k=rng.randint(1, 8))), responses=responses,
                         truncated=[False] * k, num_tokens=[len(r) for r in responses], source=f"s{i}"))
    return rows


def test_score_with_a_reward_model_matches_scoring_one_at_a_time(reward_model, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification
    rows = generations(7, long_every=4)
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    out = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_model=reward_model, max_length=48))
    # the reference: each (prompt, response) alone, no padding, through the same chat template and cut
    tokenizer = rebel.load_tokenizer(reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    expected, cut = [], 0
    for row in rows:
        rewards = []
        for response in row["responses"]:
            text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": response}], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            cut += len(ids) > 48
            with torch.no_grad():
                rewards.append(model(torch.tensor([ids[:48]])).logits[0, 0].item())
        expected.append(rewards)
    assert cut >= 3 and f"{cut} of 21 reward-model inputs were cut to max_length=48 tokens" in capsys.readouterr().out
    assert len(out) == 7 and [r["prompt_id"] for r in out] == list(range(7)) and [r["source"] for r in out] == [f"s{i}" for i in range(7)]
    for row, rewards in zip(out, expected):
        assert row["rewards"] == pytest.approx(rewards, abs=1e-5)
        best, worst = max(range(3), key=lambda j: rewards[j]), min(range(3), key=lambda j: rewards[j])
        assert (row["chosen"], row["rejected"]) == (row["responses"][best], row["responses"][worst])
        assert (row["chosen_reward"], row["rejected_reward"]) == (row["rewards"][best], row["rewards"][worst])


REWARD_FN = '''
import math, os

def count_x(prompt, response):
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write("call\\n")
    return response.count("x")

def fails_on_row_1(prompt, response):
    return 1 / 0 if prompt == "p1" else 1.0

def nan_on_row_2(prompt, response):
    return math.nan if prompt == "p2" and response == "b" else 1.0
'''


def test_score_with_a_reward_function_drops_splits_and_resumes(tmp_path, capsys, monkeypatch):
    fn = tmp_path / "rewards.py"
    fn.write_text(REWARD_FN)
    calls = tmp_path / "calls"
    monkeypatch.setenv("CALLS_FILE", str(calls))
    rows = [dict(prompt=f"p{i}", responses=["x" * (1 + i % 3), "x" * (2 + i % 4), "y" * i], truncated=[False] * 3) for i in range(12)]
    rows[1]["responses"] = ["a", "b", "c"]                           # all rewards 0: a tie
    rows[4]["truncated"] = [False, True, False]                       # dropped unless --drop_truncated false
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    capsys.readouterr()
    out = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:count_x"))
    printed = capsys.readouterr().out
    assert "dropped 2 of 12 prompts | 1 a response hit the token limit | 1 all rewards equal | 10 pairs kept" in printed
    assert "mean gap chosen − rejected" in printed
    assert [r["prompt"] for r in out] == [f"p{i}" for i in range(12) if i not in (1, 4)]
    for r in out:
        assert r["rewards"] == [float(s.count("x")) for s in r["responses"]]
        assert r["chosen_reward"] == max(r["rewards"]) and r["rejected_reward"] == min(r["rewards"]) == 0.0
        assert r["chosen"].count("x") == r["chosen_reward"] and "x" not in r["rejected"]
    assert len(open(calls).readlines()) == 36

    # resume: only the missing block is scored again, and the output is the same
    os.remove(tmp_path / "pairs.jsonl")
    os.remove(tmp_path / "pairs.jsonl.shards" / "block_000002.jsonl")
    assert read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:count_x")) == out
    assert len(open(calls).readlines()) == 36 + 9

    kept = read_jsonl(run_score(data, tmp_path / "all.jsonl", reward_fn=f"{fn}:count_x", drop_truncated=False))
    assert [r["prompt"] for r in kept] == [f"p{i}" for i in range(12) if i != 1]

    # a seeded train/test split in one folder, with the split names rebel.py reads by default
    folder = run_score(data, tmp_path / "split", reward_fn=f"{fn}:count_x", test_size=3, seed=5)
    train, test = rebel.load_split(folder, "train_prefs").to_list(), rebel.load_split(folder, "test_prefs").to_list()
    assert len(train) == 7 and len(test) == 3
    assert sorted(r["prompt"] for r in train + test) == sorted(r["prompt"] for r in out)
    other = run_score(data, tmp_path / "split2", reward_fn=f"{fn}:count_x", test_size=3, seed=6)
    assert rebel.load_split(other, "test_prefs").to_list() != test


def test_score_bad_input_names_the_row(reward_model, tmp_path, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the reward model was loaded before the input was checked")
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_model)
    fn = tmp_path / "rewards.py"
    fn.write_text(REWARD_FN)
    good = [dict(prompt=f"p{i}", responses=["a", "b", "c"], truncated=[False] * 3) for i in range(5)]

    def data(name, rows):
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)
    cases = [
        (dict(input=data("no_responses", [{"prompt": r["prompt"]} for r in good])), r"no_responses\.jsonl: missing column 'responses'"),
        (dict(input=data("no_truncated", [{k: v for k, v in r.items() if k != "truncated"} for r in good])),
         r"missing column 'truncated'.*--drop_truncated false"),
        (dict(input=data("empty", [{**r, "responses": [], "truncated": []} if i == 2 else r for i, r in enumerate(good)])),
         r"empty\.jsonl row 2: 'responses' must be a non-empty list of strings"),
        (dict(input=data("unequal", [{**r, "responses": ["a", "b"], "truncated": [False] * 2} if i == 3 else r for i, r in enumerate(good)])),
         r"unequal\.jsonl row 3: 2 responses where row 0 has 3"),
        (dict(input=data("one", [{**r, "responses": ["a"], "truncated": [False]} for r in good])), r"1 response per prompt; a pair needs at least 2"),
        (dict(reward_fn=f"{fn}:fails_on_row_1"), r"raised on row 1, response 0: ZeroDivisionError"),
        (dict(reward_fn=f"{fn}:nan_on_row_2"), r"on row 2, response 1: the reward must be a finite number, got nan"),
        (dict(reward_fn=f"{tmp_path}/nowhere.py:f"), r"no file .*nowhere\.py"),
        (dict(reward_fn=f"{fn}:missing"), r"rewards\.py has no function 'missing'"),
        (dict(reward_fn=str(fn)), r"--reward_fn must be path/to/file\.py:function_name"),
        (dict(test_size=2), r"--test_size writes a datasets folder"),
        (dict(output=str(tmp_path / "pairs.csv")), r"expected a \.jsonl or \.parquet file"),
    ]
    for n, (overrides, message) in enumerate(cases):
        settings = {"input": data("good", good), "output": str(tmp_path / f"out{n}.jsonl"), "reward_model": reward_model, **overrides}
        with pytest.raises(SystemExit, match=message):
            run_score(settings.pop("input"), settings.pop("output"), **settings)


def test_score_two_processes_equal_one(reward_model, tmp_path):
    data = write_jsonl(tmp_path / "gen.jsonl", generations(7, long_every=5))
    one = read_jsonl(run_score(data, tmp_path / "one.jsonl", reward_model=reward_model, max_length=48))
    torchrun("score.py", dict(input=data, output=tmp_path / "two.jsonl", reward_model=reward_model, max_length=48, batch_size=4, block_size=3))
    two = read_jsonl(str(tmp_path / "two.jsonl"))
    assert [{k: v for k, v in r.items() if "reward" not in k} for r in two] == [{k: v for k, v in r.items() if "reward" not in k} for r in one]
    assert [x for r in two for x in r["rewards"]] == pytest.approx([x for r in one for x in r["rewards"]], abs=1e-6)


def test_generated_and_scored_pairs_train_with_rebel(tiny_model, tmp_path):
    fn = tmp_path / "rewards.py"
    fn.write_text("def length(prompt, response):\n    return len(response)\n")
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=16)
    generated = gen(tiny_model, prompts, tmp_path / "gen.jsonl", num_samples=3, max_new_tokens=8, batch_size=4)
    pairs = run_score(generated, tmp_path / "pairs", reward_fn=f"{fn}:length", drop_truncated=False, test_size=4)
    n_train = len(rebel.load_split(pairs, "train_prefs"))
    assert n_train >= 8
    out = tmp_path / "run"
    rebel.main(rebel.Config(model=tiny_model, dataset=pairs, output_dir=str(out), total_episodes=8, batch_size=4, micro_batch_size=2,
                            eval_micro_batch_size=4, eta=1.0, lr=1e-3, warmup_ratio=0.25, eval_every=1, save_every=0,
                            activation_checkpointing=False, seed=1))
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert [m["update"] for m in metrics if "val_loss" in m] == [0, 1, 2]
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))


# ----------------------------------------------------------------------------- eval_gsm8k.py

def read_json(path):
    with open(path) as f:
        return json.load(f)


def no_data(reason):
    """A test without its data is skipped, saying what to do; in CI (CI=true), where ../shared/data is expected, it
    fails instead, so that the real data cannot silently stop being used."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory):
    """A folder with GSM8K's train.jsonl and test.jsonl, as eval_gsm8k.py --data takes it: ../shared/data/gsm8k, else
    openai/gsm8k (config main) from the Hub or the HF cache, written out in the same order."""
    shared = os.path.join(SHARED_DATA, "gsm8k")
    if all(os.path.exists(os.path.join(shared, f"{split}.jsonl")) for split in ("train", "test")):
        return shared
    import datasets
    from huggingface_hub import constants, dataset_info
    try:  # look first, 5 s at most: load_dataset retries an unreachable Hub for ~25 s (HF_HUB_OFFLINE=1: the cache only)
        if not constants.HF_HUB_OFFLINE:
            dataset_info("openai/gsm8k", timeout=5)
        hub = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # offline, unreachable or not cached: every way of not having the data
        no_data(f"no ../shared/data/gsm8k and the Hub is unreachable ({type(e).__name__}: {' '.join(str(e).split())[:160]}): "
                "connect to the Hub (openai/gsm8k is then cached), or set HF_HUB_OFFLINE=1 if it is in your HF cache, "
                f"or put GSM8K's train.jsonl and test.jsonl in {os.path.normpath(shared)}")
    folder = tmp_path_factory.mktemp("gsm8k")
    for split in ("train", "test"):
        write_jsonl(folder / f"{split}.jsonl", [{"question": r["question"], "answer": r["answer"]} for r in hub[split]])
    return str(folder)


@pytest.fixture(scope="module")
def gsm8k(gsm8k_dir):
    return read_jsonl(os.path.join(gsm8k_dir, "train.jsonl")), read_jsonl(os.path.join(gsm8k_dir, "test.jsonl"))


def test_gsm8k_prompts_are_the_harness_prompts(gsm8k):
    train, test = gsm8k
    prompts = eval_gsm8k.build_prompts(test, train)
    assert len(prompts) == len(test) == 1319
    # Shots of test questions 0, 1 and 1318, worked out once from the harness's definition (ContextSampler: one
    # random.Random(1234), .sample(train, 5) per test question in test order, nothing removed since train != test):
    shots = {0: [6374, 3610, 957, 61, 742], 1: [7462, 6610, 4769, 286, 5501], 1318: [220, 4179, 6064, 5599, 5541]}
    for i, indices in shots.items():
        expected = "".join("Question: " + train[j]["question"] + "\nAnswer: " + train[j]["answer"] + "\n\n" for j in indices)
        assert prompts[i] == expected + "Question: " + test[i]["question"] + "\nAnswer:"
    # the same facts as literal text
    assert prompts[0].startswith("Question: Jen and Tyler are gymnasts practicing flips. Jen is practicing")
    assert "\n#### 12\n\nQuestion: Four people in a law firm are planning a party." in prompts[0]
    assert prompts[0].endswith(
        "\n\nQuestion: Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
        "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
        "egg. How much in dollars does she make every day at the farmers' market?\nAnswer:")
    # every prompt, re-derived on indices with an independent generator
    rnd = random.Random(1234)
    for doc, prompt in zip(test, prompts):
        context = "".join(f"Question: {train[j]['question']}\nAnswer: {train[j]['answer']}\n\n"
                          for j in rnd.sample(range(len(train)), 5))
        assert prompt == f"{context}Question: {doc['question']}\nAnswer:"
    # a prompt depends on its position only: a prefix of the test set (--limit) gets the same prompts
    assert eval_gsm8k.build_prompts(test[:8], train) == prompts[:8]
    assert eval_gsm8k.build_prompts(test[:2], train, num_fewshot=0) == [f"Question: {d['question']}\nAnswer:" for d in test[:2]]
    assert eval_gsm8k.build_prompts(test[:1], train, seed=1) != prompts[:1]


EOT = eval_gsm8k.STOP + ("<|eot_id|>",)


# generation, answer field, stop strings, expected (strict, flexible) extraction, expected (strict, flexible) correctness
@pytest.mark.parametrize("generation, answer, stop, extracted, correct", [
    ("16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = $18.\n#### 18", "9 * 2 = 18\n#### 18", None, ("18", "18"), (True, True)),
    ("#### 1,000", "#### 1000", None, ("1,000", "1,000"), (True, True)),  # commas removed on both sides
    ("She earns 1,234, which is plenty", "#### 1234", None, ("[invalid]", "1,234,"), (False, True)),
    ("The answer is $18.", "#### 18", None, ("[invalid]", "$18."), (False, True)),  # '$' and the final '.' removed
    ("#### 18.", "#### 18", None, ("18.", "18."), (True, True)),
    ("So she makes 18 dollars every day.", "#### 18", None, ("[invalid]", "18"), (False, True)),  # no '####'
    ("####18", "#### 18", None, ("[invalid]", "18"), (False, True)),  # '#### ' needs the space
    ("so the answer is 7.", "#### 7", None, ("[invalid]", "7."), (False, True)),
    ("2 + 2 = 4\n#### 4\n\nQuestion: Tom has 3 apples and gets 2 more.\nAnswer: 3 + 2 = 5\n#### 5", "#### 4", None,
     ("4", "4"), (True, True)),  # everything after "Question:" is cut
    ("#### 7</s>#### 8", "#### 8", None, ("7", "7"), (False, False)),
    ("The answer is 12<|im_end|>\n12 + 1 = 13", "#### 12", None, ("[invalid]", "12"), (False, True)),
    ("#### 4<|eot_id|>#### 5", "#### 5", EOT, ("4", "4"), (False, False)),  # the tokenizer's end token is a stop too
    ("#### 4<|eot_id|>#### 5", "#### 5", None, ("4", "5"), (False, True)),
    ("#### 5\n#### 6", "#### 6", None, ("5", "6"), (False, True)),  # strict: the first '####', flexible: the last number
    ("3 + 4 = 7 apples, then 7 * 2 = 14 in total", "#### 14", None, ("[invalid]", "14"), (False, True)),
    ("I have 12 apples and ate 1", "#### 12", None, ("[invalid]", "1"), (False, False)),
    ("5-3 = 2", "#### 2", None, ("[invalid]", "2"), (False, True)),
    ("It drops to -5 degrees.\n#### -5", "#### -5", None, ("-5", "-5"), (True, True)),
    ("The loss is -$5.", "#### -5", None, ("[invalid]", "-$5."), (False, True)),
    ("Each costs 2.50, so 2.5\n#### 2.5", "#### 2.5", None, ("2.5", "2.5"), (True, True)),
    ("#### 18.00", "#### 18", None, ("18.00", "18.00"), (False, False)),  # no numeric comparison, as in the harness
    ("The answer is 42...", "#### 42", None, ("[invalid]", "42..."), (False, False)),  # only one final '.' goes
    ("", "#### 3", None, ("[invalid]", "[invalid]"), (False, False)),
])
def test_gsm8k_extraction_and_scoring(generation, answer, stop, extracted, correct):
    stop = eval_gsm8k.STOP if stop is None else stop
    assert eval_gsm8k.extract(generation, stop) == extracted
    assert eval_gsm8k.score(generation, answer, stop) == {"strict": correct[0], "flexible": correct[1]}


def test_gsm8k_every_gold_answer_scores_correct(gsm8k):
    train, test = gsm8k
    for doc in train + test:
        assert eval_gsm8k.score(doc["answer"], doc["answer"]) == {"strict": True, "flexible": True}, doc["answer"]
        assert eval_gsm8k.extract(doc["answer"])[0] == doc["answer"].split("#### ")[-1]
    assert eval_gsm8k.mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)  # sqrt((3·1/16 + 9/16) / 3) / 2
    assert eval_gsm8k.mean_stderr([1.0]) is None


def test_gsm8k_early_stop_equals_full_generation_then_cut(tiny_model, gsm8k):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = tokenizer([f"Question: {d['question']}\nAnswer:" for d in gsm8k[1][:4]], add_special_tokens=False)["input_ids"]
    full = eval_gsm8k.generate(model, tokenizer, ids, 24, (), tokenizer.eos_token_id)
    # stop strings that the generations do contain (printable ASCII: a partly decoded character shows as U+FFFD)
    stop = tuple(next(t[k:k + 2] for k in range(6, len(t)) if t[k:k + 2].isascii() and t[k:k + 2].isprintable()) for t in full)
    early = eval_gsm8k.generate(model, tokenizer, ids, 24, stop, tokenizer.eos_token_id)
    assert [eval_gsm8k.cut(t, stop) for t in early] == [eval_gsm8k.cut(t, stop) for t in full]
    assert max(map(len, early)) < max(map(len, full))  # it did stop early


def run_eval(model, data, output, **overrides):
    settings = dict(model=model, data=data, output=str(output), limit=8, num_fewshot=1, batch_size=3, max_new_tokens=12)
    settings.update(overrides)
    eval_gsm8k.main(eval_gsm8k.Config(**settings))
    return read_json(os.path.join(output, "summary.json")), read_jsonl(os.path.join(output, "samples.jsonl"))


def test_gsm8k_tiny_model_end_to_end_and_two_processes(tiny_model, gsm8k, gsm8k_dir, tmp_path):
    train, test = gsm8k
    summary, records = run_eval(tiny_model, gsm8k_dir, tmp_path / "one")
    prompts = eval_gsm8k.build_prompts(test, train, num_fewshot=1)
    assert [r["index"] for r in records] == list(range(8))
    for r in records:
        assert r["prompt"] == prompts[r["index"]]
        assert (r["strict_answer"], r["flexible_answer"]) == eval_gsm8k.extract(r["generation"], EOT)
        assert {"strict": r["strict_correct"], "flexible": r["flexible_correct"]} == eval_gsm8k.score(
            r["generation"], test[r["index"]]["answer"], EOT)
        assert r["gold"] == test[r["index"]]["answer"].split("#### ")[-1].replace(",", "")
    for name, key in (("strict-match", "strict_correct"), ("flexible-extract", "flexible_correct")):
        values = [float(r[key]) for r in records]
        assert summary[name]["accuracy"] == sum(values) / 8 and summary[name]["correct"] == sum(values)
        assert summary[name]["stderr"] == eval_gsm8k.mean_stderr(values)
    assert summary["questions"] == 8 and summary["settings"]["limit"] == 8 and summary["runtime"]["processes"] == 1
    # left padding is right: one question per batch generates the same text
    assert run_eval(tiny_model, gsm8k_dir, tmp_path / "unbatched", batch_size=1)[1] == records
    # two processes (each a share of the batches) write the same records and results
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "eval_gsm8k.py"), "--model", tiny_model, "--data", gsm8k_dir, "--output", str(tmp_path / "two"),
               "--limit", "8", "--num_fewshot", "1", "--batch_size", "3", "--max_new_tokens", "12"]
    subprocess.run(command, check=True, env=env, cwd=tmp_path, timeout=300)
    two = read_json(tmp_path / "two" / "summary.json")
    assert read_jsonl(tmp_path / "two" / "samples.jsonl") == records and two["runtime"]["processes"] == 2
    assert {k: v for k, v in two.items() if k not in ("runtime", "settings")} == {
        k: v for k, v in summary.items() if k not in ("runtime", "settings")}


def test_gsm8k_chat_template_wraps_the_whole_prompt(tiny_model, gsm8k, gsm8k_dir, tmp_path):
    train, test = gsm8k
    _, records = run_eval(tiny_model, gsm8k_dir, tmp_path, limit=2, max_new_tokens=2, chat_template=True)
    for r, prompt in zip(records, eval_gsm8k.build_prompts(test, train, num_fewshot=1)):
        assert r["prompt"] == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + prompt
                               + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gsm8k_bos_token_only_when_asked_and_never_twice(tiny_model):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    bos = tokenizer.bos_token_id
    # a tokenizer that adds BOS by itself, as Llama-3's does
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                                    special_tokens=[("<|begin_of_text|>", bos)])
    plain = "Question: How many?\nAnswer:"
    templated = tokenizer.apply_chat_template([{"role": "user", "content": plain}], tokenize=False, add_generation_prompt=True)
    text_ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert eval_gsm8k.encode(tokenizer, [plain]) == [text_ids]  # lm-eval's old default: no BOS
    assert eval_gsm8k.encode(tokenizer, [plain], add_bos_token=True) == [[bos] + text_ids]
    for flag in (False, True):  # the template's own BOS, once
        ids = eval_gsm8k.encode(tokenizer, [templated], add_bos_token=flag)[0]
        assert ids[0] == bos and ids.count(bos) == 1


def test_gsm8k_bad_input_fails_clearly_before_loading_the_model(gsm8k, gsm8k_dir, tmp_path):
    not_a_model = tmp_path / "empty"  # a folder without a model: loading it would raise something else
    not_a_model.mkdir()

    def error(data, **overrides):
        settings = dict(model=str(not_a_model), data=str(data), output=str(tmp_path / "out"))
        settings.update(overrides)
        with pytest.raises(SystemExit) as e:
            eval_gsm8k.main(eval_gsm8k.Config(**settings))
        return str(e.value)

    def data_folder(name, test_lines, train=True):
        folder = tmp_path / name
        folder.mkdir()
        if train:
            (folder / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gsm8k[0][:10]))
        (folder / "test.jsonl").write_text("".join(line + "\n" for line in test_lines))
        return folder

    good = [json.dumps(d) for d in gsm8k[1][:3]]
    assert "train.jsonl: no such file" in error(data_folder("no_train", good, train=False))
    path = os.path.join(data_folder("no_answer", good[:2] + ['{"question": "How many?"}'] + good), "test.jsonl")
    assert error(os.path.dirname(path)) == f"error: {path} line 3: expected a JSON object with a string 'answer'"
    assert "test.jsonl line 2: not valid JSON" in error(data_folder("not_json", good[:1] + ["{oops"]))
    assert "line 1: the answer has no '#### '" in error(data_folder("no_hashes", ['{"question": "q", "answer": "18"}']))
    assert "--num_fewshot 11 is more than the 10 train questions" in error(data_folder("few", good), num_fewshot=11)
    assert "--limit must be >= 0" in error(gsm8k_dir, limit=-1)
    assert "--batch_size and --max_new_tokens >= 1" in error(gsm8k_dir, batch_size=0)
    assert "no such folder, and not a Hub id" in error(tmp_path / "missing")
    assert "no such folder, and not a Hub id" in error(gsm8k_dir, model=str(tmp_path / "no" / "model" / "here"))


# ----------------------------------------------------------------------------- the demo: python test_rebel.py demo

def demo_reward(prompt, response):
    """The demo's rule-based reward, one a tiny random model can learn: the share of vowels among the response's characters."""
    return sum(c in "aeiou" for c in response) / max(1, len(response))


def run_stage(module, argv, log):
    """Run one stage's real command line in this process (its output goes to `log`), printing the command."""
    import contextlib
    import shlex
    print(f"$ python {module.__name__}.py {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        module.main(rebel.parse_config(module.Config, argv))


def held_out_reward(model, prompts, out_dir, iteration, samples=4, max_new_tokens=16):
    """Mean reward of the policy's samples on prompts it never trained on."""
    output = os.path.join(out_dir, f"eval_{iteration}.jsonl")
    run_stage(generate, ["--model", model, "--prompts", prompts, "--output", output, "--num_samples", str(samples),
                         "--max_new_tokens", str(max_new_tokens), "--seed", str(1000 + iteration)], output + ".log")
    rewards = [demo_reward(row["prompt"], r) for row in read_jsonl(output) for r in row["responses"]]
    return sum(rewards) / len(rewards)


def run_demo(out="runs/demo", iterations=3, num_prompts=256, num_eval_prompts=64, num_samples=5, max_new_tokens=16, eta=20.0):
    """The whole REBEL loop on a tiny Llama, CPU only: for each iteration, sample K responses per prompt from the current
    policy (generate.py), keep the best and worst under a rule-based reward (score.py --reward_fn), train from the
    current policy with REBEL (rebel.py), and measure the new policy's mean reward on held-out prompts."""
    import time
    start = time.time()
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(num_prompts + num_eval_prompts)]
    train_prompts, eval_prompts = os.path.join(out, "train_prompts.jsonl"), os.path.join(out, "eval_prompts.jsonl")
    write_jsonl(train_prompts, [{"prompt": p} for p in prompts[:num_prompts]])
    write_jsonl(eval_prompts, [{"prompt": p} for p in prompts[num_prompts:]])
    policy = make_model(os.path.join(out, "iter_0"))
    table = [dict(iteration=0, held_out_reward=held_out_reward(policy, eval_prompts, out, 0, max_new_tokens=max_new_tokens))]
    for it in range(1, iterations + 1):
        step = os.path.join(out, f"iter_{it}")
        os.makedirs(step, exist_ok=True)
        generations, pairs = os.path.join(step, "generations.jsonl"), os.path.join(step, "pairs.jsonl")
        run_stage(generate, ["--model", policy, "--prompts", train_prompts, "--output", generations, "--seed", str(it),
                             "--num_samples", str(num_samples), "--max_new_tokens", str(max_new_tokens)], generations + ".log")
        # a random tiny model rarely ends its turn within max_new_tokens: keep the cut responses
        run_stage(score, ["--input", generations, "--output", pairs, "--reward_fn", f"{os.path.abspath(__file__)}:demo_reward",
                          "--drop_truncated", "false"], pairs + ".log")
        rows = read_jsonl(pairs)
        episodes = 2 * (len(rows) - 32) // 16 * 16  # two epochs of the pairs left after the eval hold-out
        run_stage(rebel, ["--model", policy, "--dataset", pairs, "--output_dir", os.path.join(step, "train"), "--eta", str(eta),
                          "--lr", "1e-3", "--batch_size", "16", "--micro_batch_size", "8", "--total_episodes", str(episodes),
                          "--eval_size", "32", "--eval_every", "0", "--save_every", "0", "--activation_checkpointing", "false",
                          "--seed", str(it)], os.path.join(step, "train.log"))
        policy = os.path.join(step, "train", "final")
        metrics = read_jsonl(os.path.join(step, "train", "metrics.jsonl"))
        losses = [m["loss"] for m in metrics if "loss" in m]
        table.append(dict(iteration=it, held_out_reward=held_out_reward(policy, eval_prompts, out, it, max_new_tokens=max_new_tokens),
                          chosen_reward=sum(r["chosen_reward"] for r in rows) / len(rows),
                          rejected_reward=sum(r["rejected_reward"] for r in rows) / len(rows), pairs=len(rows),
                          train_loss=sum(losses[-4:]) / len(losses[-4:]), sign_align=[m for m in metrics if "sign_align" in m][-1]["sign_align"]))
    print("\n| iteration | held-out reward | chosen reward | rejected reward | pairs | train loss (last 4) | val sign_align |\n"
          "|---|---|---|---|---|---|---|")
    for row in table:
        cells = [f"{row[k]:.3f}" if k in row else "" for k in ("chosen_reward", "rejected_reward")]
        extra = [str(row.get("pairs", "")), f"{row['train_loss']:.3f}" if "train_loss" in row else "",
                 f"{row['sign_align']:.3f}" if "sign_align" in row else ""]
        print(f"| {row['iteration']} | {row['held_out_reward']:.3f} | " + " | ".join(cells + extra) + " |")
    gain = table[-1]["held_out_reward"] - table[0]["held_out_reward"]
    print(f"\nheld-out reward {table[0]['held_out_reward']:.3f} -> {table[-1]['held_out_reward']:.3f} ({gain:+.3f}) in {time.time() - start:.0f}s; "
          f"models, data and logs in {out}/")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    return table


def test_demo_learns(tmp_path):
    """A shortened demo: two iterations must raise the held-out reward clearly above the starting policy's."""
    table = run_demo(str(tmp_path / "demo"), iterations=2, num_prompts=128, num_eval_prompts=48)
    assert table[-1]["held_out_reward"] > table[0]["held_out_reward"] + 0.03
    assert all(row["chosen_reward"] > row["rejected_reward"] for row in table[1:])


# ----------------------------------------------------------------------------- benchmark: RUN_BENCH=1 pytest -k bench -s

BENCH_MAX_PROMPT, BENCH_MAX_RESPONSE = 1024, 2048  # the authors' fixed maxima (the baseline pads every pair to them)
# AlpacaEval's own copies of the two models' answers (the files in ../shared/data/alpaca_eval, byte for byte)
ALPACA_EVAL_OUTPUTS = ("https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/e0135ed026d772eed40e8d22e38975b0f00e1545/"
                       "results/{}/model_outputs.json")


@pytest.fixture(scope="session")
def alpaca_eval():
    """AlpacaEval's 805 instructions with Meta-Llama-3-8B-Instruct's and REBEL-Llama-3-8B-Instruct-Armo's real answers
    (`instruction`, `output`): ../shared/data/alpaca_eval, else the same files downloaded from the AlpacaEval repository."""
    import urllib.request
    outputs = []
    for name in ("Meta-Llama-3-8B-Instruct", "REBEL-Llama-3-8B-Instruct-Armo"):
        path = os.path.join(SHARED_DATA, "alpaca_eval", f"{name}.json")
        if os.path.exists(path):
            outputs.append(read_json(path))
            continue
        try:
            with urllib.request.urlopen(ALPACA_EVAL_OUTPUTS.format(name), timeout=10) as f:
                outputs.append(json.load(f))
        except OSError as e:  # offline or unreachable (URLError, timeouts)
            no_data(f"no ../shared/data/alpaca_eval and {ALPACA_EVAL_OUTPUTS.format(name)} is unreachable ({e}): connect to "
                    f"the Internet, or save that file as {os.path.normpath(path)}")
    return outputs


def alpaca_pairs(alpaca_eval, tokenizer, seed=0):
    """Real lengths: AlpacaEval instructions, chosen = Llama-3-8B-Instruct's answer, rejected = REBEL's answer."""
    rng = random.Random(seed)
    llama, rebel_answers = alpaca_eval
    from datasets import Dataset
    rows = Dataset.from_list([dict(prompt=a["instruction"], chosen=a["output"], rejected=b["output"],
                                   chosen_reward=rng.random(), rejected_reward=rng.random()) for a, b in zip(llama, rebel_answers)])
    pairs = rebel.tokenize_pairs(rows, tokenizer, "alpaca_eval")
    return rebel.filter_by_length(pairs, BENCH_MAX_PROMPT, BENCH_MAX_RESPONSE, "alpaca_eval")


def padded_full_logprobs(model, pair, temperature, pad_id):
    """The authors' way: prompt left-padded to the prompt maximum, response right-padded to the response maximum,
    full-vocabulary logits for every position, chosen and rejected in one forward."""
    rows, masks = [], []
    for response in (pair["chosen_ids"], pair["rejected_ids"]):
        q, r = pair["prompt_ids"], response
        rows.append([pad_id] * (BENCH_MAX_PROMPT - len(q)) + q + r + [pad_id] * (BENCH_MAX_RESPONSE - len(r)))
        masks.append([0] * (BENCH_MAX_PROMPT - len(q)) + [1] * (len(q) + len(r)) + [0] * (BENCH_MAX_RESPONSE - len(r)))
    ids, attention = torch.tensor(rows), torch.tensor(masks)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits[:, BENCH_MAX_PROMPT - 1:-1] / temperature
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, BENCH_MAX_PROMPT:, None]).squeeze(-1)
    return (logprobs * attention[:, BENCH_MAX_PROMPT:]).sum(-1)


def bench_model(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(config).train()


def memory_probe(method, tokenizer_dir, pairs_file):
    """Peak resident memory (MB above the start) of one micro-batch's log-prob forward + backward at Llama-3's vocabulary."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pairs = json.load(open(pairs_file))
    model = bench_model(128256)
    input_ids, positions, rows = rebel.collate(pairs, tokenizer.eos_token_id)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
    start = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
    if method == "chunked":
        logps = rebel.response_logprobs(model, input_ids, positions, rows, 0.8, rebel.Config.logprob_chunk)
    else:  # full-vocabulary logits at every position, as HF's forward gives them
        logits = model(input_ids=input_ids).logits / 0.8
        per_token = torch.log_softmax(logits.float(), -1).flatten(0, 1)[positions].gather(-1, input_ids.flatten()[positions + 1, None])
        logps = torch.zeros(len(input_ids)).index_add(0, rows, per_token.squeeze(-1))
    logps.sum().backward()
    peak = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"peak_mb": (peak - start) / 1024}))


@pytest.mark.skipif(os.environ.get("RUN_BENCH") != "1", reason="benchmark: RUN_BENCH=1 pytest test_rebel.py -k bench -s")
def test_bench(tmp_path, alpaca_eval, gsm8k):
    import time
    torch.manual_seed(0)
    llama, rebel_answers = alpaca_eval
    corpus = [a["instruction"] for a in llama] + [a["output"] for a in llama] + [b["output"] for b in rebel_answers]
    tokenizer = make_tokenizer(str(tmp_path / "tok"), vocab_size=32000, corpus=corpus)
    pairs = alpaca_pairs(alpaca_eval, tokenizer)
    pad_id, cfg, rows = tokenizer.eos_token_id, rebel.Config(), []
    response_tokens = lambda ps: sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in ps)  # noqa: E731
    print(f"\n{len(pairs)} AlpacaEval pairs; mean tokens per pair (2 sequences) {sum(map(rebel.pair_tokens, pairs)) / len(pairs):.0f}")

    # 1. training step: rebel.py's (length-sorted micro-batches padded to their own longest, response-only chunked
    #    logits) against the authors' (one pair per forward, padded to the maxima, full logits)
    model = bench_model(32000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    batch = list(range(32))
    start = time.time()
    for group in rebel.micro_batches(pairs, batch, cfg.micro_batch_size):
        logps = rebel.response_logprobs(model, *rebel.collate(group, pad_id), 0.8, cfg.logprob_chunk)
        torch.stack([logps[:len(group)], logps[len(group):]]).sum().backward()
    optimizer.step(); optimizer.zero_grad()
    ours = time.time() - start
    start = time.time()
    for i in batch[:8]:
        padded_full_logprobs(model, pairs[i], 0.8, pad_id).sum().backward()
    optimizer.step(); optimizer.zero_grad()
    theirs = (time.time() - start) * len(batch) / 8
    rows.append(("training step", f"{len(batch) / theirs:.2f} pairs/s", f"{len(batch) / ours:.2f} pairs/s", theirs / ours))
    rows.append(("  response tokens/s", f"{response_tokens([pairs[i] for i in batch]) / theirs:.0f}",
                 f"{response_tokens([pairs[i] for i in batch]) / ours:.0f}", theirs / ours))

    # 2. peak memory of one micro-batch's log-prob forward + backward at vocabulary 128,256, each in a fresh process
    middle = sorted(range(len(pairs)), key=lambda i: rebel.pair_tokens(pairs[i]))[len(pairs) // 2:][:cfg.micro_batch_size]
    json.dump([pairs[i] for i in middle], open(tmp_path / "mb.json", "w"))
    peak = {m: json.loads(subprocess.run([sys.executable, __file__, "memory_probe", m, str(tmp_path / "tok"), str(tmp_path / "mb.json")],
                                         capture_output=True, text=True, check=True, cwd=HERE).stdout.strip().splitlines()[-1])["peak_mb"]
            for m in ("full", "chunked")}
    rows.append((f"log-prob peak memory, {cfg.micro_batch_size} pairs, vocab 128k", f"{peak['full']:.0f} MB", f"{peak['chunked']:.0f} MB",
                 peak["chunked"] / peak["full"]))

    # 3. reference pass: batched, no grad, against one sequence per forward padded to the maxima (the authors')
    with torch.no_grad():
        start = time.time()
        for group in rebel.micro_batches(pairs, range(64), cfg.eval_micro_batch_size):
            rebel.response_logprobs(model, *rebel.collate(group, pad_id), 0.8, cfg.logprob_chunk)
        ours = time.time() - start
        start = time.time()
        for i in range(8):
            padded_full_logprobs(model, pairs[i], 0.8, pad_id)
        theirs = (time.time() - start) * 8
    rows.append(("reference pass", f"{64 / theirs:.2f} pairs/s", f"{64 / ours:.2f} pairs/s", theirs / ours))

    # 4. generation: new tokens/s of one batched call (16 prompts) against one prompt per call; the random model never
    #    stops early, so both make the same number of tokens
    model.eval()
    settings = SimpleNamespace(temperature=0.8, top_p=0.9, max_new_tokens=32, num_samples=5)
    stop_ids = [tokenizer.eos_token_id]
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token  # as generate.py loads it
    prompts = [generate.prompt_tokens(tokenizer, a["instruction"], "alpaca") for a in llama[:16]]
    timed = {}
    for name, groups in (("batched", [prompts]), ("one", [[p] for p in prompts[:4]])):
        start, tokens = time.time(), 0
        for group in groups:
            tokens += sum(n for samples in generate.hf_sample(model, tokenizer, group, settings, stop_ids, 0) for _, _, n in samples)
        timed[name] = tokens / (time.time() - start)
    rows.append(("generate.py, 5 samples per prompt (new tokens/s)", f"{timed['one']:.0f}", f"{timed['batched']:.0f}", timed["batched"] / timed["one"]))
    gsm8k_train, gsm8k_test = gsm8k
    prompts = [eval_gsm8k.encode(tokenizer, [p])[0] for p in eval_gsm8k.build_prompts(gsm8k_test[:16], gsm8k_train)]
    for name, groups in (("batched", [prompts]), ("one", [[p] for p in prompts[:4]])):  # answers run ~100-250 tokens
        start, count = time.time(), 0
        for group in groups:
            eval_gsm8k.generate(model, tokenizer, group, 128, eval_gsm8k.STOP, tokenizer.eos_token_id)
            count += 128 * len(group)
        timed[name] = count / (time.time() - start)
    rows.append(("eval_gsm8k.py, greedy 5-shot (new tokens/s)", f"{timed['one']:.0f}", f"{timed['batched']:.0f}", timed["batched"] / timed["one"]))
    print_table(rows)


def print_table(rows):
    print(f"\n| {'measure':<44} | {'baseline':>14} | {'this repo':>14} | {'ratio':>6} |\n|{'-' * 46}|{'-' * 16}|{'-' * 16}|{'-' * 8}|")
    for name, base, ours, ratio in rows:
        print(f"| {name:<44} | {base:>14} | {ours:>14} | {ratio:>6.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["demo"]:  # python test_rebel.py demo [output folder]
        run_demo(*sys.argv[2:3])
    elif sys.argv[1:2] == ["memory_probe"]:
        memory_probe(*sys.argv[2:])
    else:
        sys.exit("usage: python test_rebel.py demo [output folder]   (the tests: pytest -q test_rebel.py)")
