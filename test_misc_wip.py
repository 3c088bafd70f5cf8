"""Robustness tests (head scaling, resumes with other inputs, sampled ids, reward functions, sampled_by, one-line
errors), to be merged into test_rebel.py's classes."""
import errno
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import eval_gsm8k
import generate
import rebel
import score
from test_rebel import (ONLINE_REWARD, gen, make_model, make_tokenizer, naive_logprob, read_jsonl, run_score,  # noqa
                        tiny_model, train, train_online, write_jsonl, write_pairs, write_prompts)


def small(tokenizer, **fields):
    """The fields of a tiny decoder config on the test tokenizer."""
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), bos_token_id=tokenizer.bos_token_id,
                tie_word_embeddings=False, **fields)


def make_arch(path, kind, **fields):
    """A tiny random model of another architecture with the test tokenizer, saved like a Hub checkpoint. Its head's
    output is scaled ×4, so that a scaling or a soft cap changes the log-probs a lot."""
    tokenizer, t = make_tokenizer(path), transformers
    if kind == "granite":
        config, cls = t.GraniteConfig(**small(tokenizer, logits_scaling=8.0)), t.GraniteForCausalLM
    elif kind == "gemma2":
        config, cls = t.Gemma2Config(**small(tokenizer, head_dim=16, final_logit_softcapping=0.5)), t.Gemma2ForCausalLM
    elif kind == "cohere":
        config, cls = t.CohereConfig(**small(tokenizer, logit_scale=0.25)), t.CohereForCausalLM
    elif kind == "phi":  # its head has a bias
        config, cls = t.PhiConfig(**small(tokenizer)), t.PhiForCausalLM
    elif kind == "falcon_h1":
        config = t.FalconH1Config(**small(tokenizer, lm_head_multiplier=0.5, mamba_d_ssm=64, mamba_n_heads=4,
                                          mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16))
        cls = t.FalconH1ForCausalLM
    elif kind == "gpt2":
        config = t.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512)
        cls = t.GPT2LMHeadModel
    elif kind == "gemma3":  # multimodal: no top-level vocab_size or eos_token_id
        config = t.Gemma3Config(text_config=small(tokenizer, head_dim=16, **fields), mm_tokens_per_image=4,
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=16))
        cls = t.Gemma3ForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4)
        if model.get_output_embeddings().bias is not None:  # initialised to 0
            model.get_output_embeddings().bias.normal_()
    model.save_pretrained(path)
    return str(path)


def logprobs_and_naive(path, tmp_path, temperature=0.7):
    from datasets import Dataset
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = rebel.load_tokenizer(path)
    pairs = rebel.tokenize_pairs(Dataset.from_list(read_jsonl(write_pairs(tmp_path / "p.jsonl", n=3))), tokenizer,
                                 "t", len(tokenizer))
    got = rebel.response_logprobs(model, *rebel.collate(rebel.pair_sequences(pairs)), temperature, 5)
    naive = torch.stack([naive_logprob(model, p["prompt_ids"], p[k], temperature)
                         for k in ("chosen_ids", "rejected_ids") for p in pairs])
    return got.detach(), naive.detach()


SHORT_RUN = dict(total_episodes=8, batch_size=8, eval_size=0, save_final=False)


class TestHeads:
    @pytest.mark.parametrize("kind", ["granite", "gemma2", "cohere", "falcon_h1", "phi"])
    def test_head_scaling_softcap_and_bias_are_in_the_logprobs(self, kind, tmp_path):
        # Granite's logits ÷ logits_scaling, Gemma-2's soft cap, Cohere's logit_scale, Falcon-H1's lm_head_multiplier,
        # Phi's head bias: log π is the model's own forward's, and the model trains under FSDP2
        model = make_arch(tmp_path / kind, kind)
        got, naive = logprobs_and_naive(model, tmp_path)
        torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
        out = train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)
        assert read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]["update"] == 1

    def test_gemma3_multimodal_checkpoint_samples_and_trains_text_only(self, tmp_path):
        model = make_arch(tmp_path / "gemma3", "gemma3")
        rows = read_jsonl(gen(model, write_prompts(tmp_path / "prompts.jsonl", 2), tmp_path / "gen.jsonl"))
        assert len(rows) == 2 and all(len(r["responses"]) == 3 for r in rows)
        got, naive = logprobs_and_naive(model, tmp_path)
        torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
        out = train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)
        assert read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]["update"] == 1

    def test_a_head_whose_forward_differs_is_refused_in_one_line(self, tmp_path):
        # Gemma3ForConditionalGeneration does not apply its text config's soft cap: the check on the loaded weights
        # sees its own forward differ
        model = make_arch(tmp_path / "gemma3", "gemma3", final_logit_softcapping=0.5)
        with pytest.raises(SystemExit, match=r"error: .*differ from Gemma3ForConditionalGeneration's own forward"):
            train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)

    def test_a_scaling_field_of_an_unknown_model_type_is_refused(self):
        config = transformers.LlamaConfig(logit_scale=0.5)
        with pytest.raises(SystemExit, match=r"error: m: its config's logit_scale \(0.5\) scales the logits"):
            rebel.head_transform(config, "m")

    def test_a_decoder_without_layers_is_one_line(self, tmp_path):
        model = make_arch(tmp_path / "gpt2", "gpt2")
        with pytest.raises(SystemExit, match=r"error: .*GPT2LMHeadModel's decoder has no \.layers"):
            train(model, write_pairs(tmp_path / "train.jsonl", n=16), tmp_path / "run", **SHORT_RUN)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    data = write_pairs(folder / "p.jsonl", n=16)
    run = train(tiny_model, data, folder / "run", total_episodes=8, batch_size=8, eval_size=0)
    return data, run


class TestResume:
    @pytest.mark.parametrize("change", ["model", "pairs"])
    def test_a_finished_run_resumed_with_other_inputs_is_refused(self, change, finished_run, tiny_model, tmp_path):
        data, run = finished_run
        run = shutil.copytree(run, tmp_path / "run")
        model = tiny_model
        if change == "model":
            model = make_model(str(tmp_path / "other"), seed=1)
        else:
            rows = read_jsonl(data)
            rows[0]["chosen_reward"] += 0.125
            data = write_jsonl(tmp_path / "other.jsonl", rows)
        with pytest.raises(SystemExit, match=r"error: --resume: the (files of --model|pairs) .*differ"):
            train(model, data, run, total_episodes=8, batch_size=8, eval_size=0, resume=True)


class TestSampledIds:
    @pytest.mark.parametrize("last", ["word", "eot"])
    def test_only_a_stop_token_may_be_left_out_of_the_text(self, last, tiny_model):
        tokenizer = rebel.load_tokenizer(tiny_model)
        text = "the quick brown fox"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        extra = tokenizer.convert_tokens_to_ids("<|eot_id|>") if last == "eot" else ids[0]
        row = dict(prompt="the sea", prompt_ids=rebel.prompt_tokens(tokenizer, "the sea")[1], chosen_ids=ids + [extra],
                   rejected_ids=ids)
        if last == "eot":
            assert rebel.sampled_ids(row, [text, text], tokenizer, len(tokenizer))[1] == ids + [extra]
        else:  # a never-sampled token appended: its text is not the scored text
            with pytest.raises(rebel.BadRow, match="chosen_ids do not decode to the chosen text"):
                rebel.sampled_ids(row, [text, text], tokenizer, len(tokenizer))

    def test_pairs_sampled_by_another_model_are_dropped(self, tiny_model, tmp_path, capsys):
        prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
        generated = gen(tiny_model, prompts, tmp_path / "gen.jsonl")
        rows = read_jsonl(generated)
        assert {r["sampled_by"] for r in rows} == {rebel.files_fingerprint(tiny_model)}
        (tmp_path / "rewards.py").write_text("def length(prompt, response):\n    return float(len(response))\n")
        pairs = run_score(generated, tmp_path / "pairs.jsonl", reward_fn=f"{tmp_path / 'rewards.py'}:length",
                          drop_truncated=False)
        assert {r["sampled_by"] for r in read_jsonl(pairs)} == {rebel.files_fingerprint(tiny_model)}
        other = make_model(str(tmp_path / "other"), seed=1)  # the same tokenizer, other weights
        with pytest.raises(SystemExit, match=r"every row was dropped \(sampled by another model: its files differ "
                                             r"from --model's"):
            train(other, pairs, tmp_path / "run", total_episodes=2, batch_size=2, eval_size=0, save_final=False)


GSM8K_REWARD = '''
import sys

def correct(prompt, response, answer):
    """A verifiable reward: 1 when the response ends with the gold answer's final number."""
    return float(response.strip().endswith(answer.split("#### ")[-1]))

def exits(prompt, response):
    if prompt[0]["content"] == "p1":
        sys.exit(3)
    return 1.0

def edits(prompt, response):
    prompt[0]["content"] = "edited"
    return float(len(response))

def everything(prompt, response, **columns):
    return float(len(columns) + len(response))
'''


class TestRewardFunctions:
    def rows(self, tmp_path):
        rows = [dict(prompt=[{"role": "user", "content": f"p{i}"}], responses=["a 1", f"b {i}", "c"],
                     truncated=[False] * 3, answer=f"so #### {i}") for i in range(3)]
        (tmp_path / "rewards.py").write_text(GSM8K_REWARD)
        return rows, write_jsonl(tmp_path / "gen.jsonl", rows), str(tmp_path / "rewards.py")

    def test_a_reward_function_gets_the_rows_gold_answer(self, tmp_path):
        rows, data, fn = self.rows(tmp_path)
        pairs = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:correct"))
        assert {p["prompt"][0]["content"]: p["rewards"] for p in pairs} == {
            "p0": [0.0, 1.0, 0.0], "p1": [1.0, 1.0, 0.0], "p2": [0.0, 1.0, 0.0]}
        # with **columns: every other column (responses, truncated, answer), then len(response)
        pairs = read_jsonl(run_score(data, tmp_path / "all.jsonl", reward_fn=f"{fn}:everything"))
        assert [p["rewards"] for p in pairs] == [[6.0, 6.0, 4.0]] * 3

    def test_a_reward_function_that_calls_sys_exit_names_the_row(self, tmp_path):
        _, data, fn = self.rows(tmp_path)
        with pytest.raises(SystemExit, match=r"error: --reward_fn .*:exits called sys.exit\(3\) on row 1, response 0"):
            run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:exits")

    def test_a_reward_function_that_edits_its_prompt_changes_no_row(self, tmp_path):
        rows, data, fn = self.rows(tmp_path)
        pairs = read_jsonl(run_score(data, tmp_path / "pairs.jsonl", reward_fn=f"{fn}:edits"))
        assert [p["prompt"] for p in pairs] == [r["prompt"] for r in rows]


class TestOneLineErrors:
    def test_stop_tokens_of_a_config_with_eos_in_its_text_config(self, tiny_model):
        config = transformers.Qwen2_5_VLConfig(text_config=dict(eos_token_id=7))
        assert 7 in generate.stop_token_ids(rebel.load_tokenizer(tiny_model), tiny_model, config)

    def test_sampling_that_overflows_names_the_dtype(self, tiny_model, tmp_path, monkeypatch):
        def overflow(*args, **kwargs):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        monkeypatch.setattr(LlamaForCausalLM, "generate", overflow)
        prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
        with pytest.raises(SystemExit, match=r"error: sampling in --dtype float16 .*inf or nan.*--dtype bfloat16"):
            gen(tiny_model, prompts, tmp_path / "gen.jsonl", dtype="float16")

    @pytest.mark.parametrize("wrapped", [False, True])
    def test_a_full_disk_is_one_line_saying_the_run_resumes(self, wrapped, tmp_path):
        from torch.distributed.checkpoint.api import CheckpointException
        full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard"))

        def main(cfg):
            rebel.init_distributed()
            if not wrapped:
                raise full
            try:
                raise full
            except OSError as e:
                raise CheckpointException("save failed", {0: (e, None)}) from None
        with pytest.raises(SystemExit, match=r"^error: no space left on device \(.*shard\): free some space, then "
                                             r"continue with the same command and --resume"):
            rebel.run_script(main, rebel.Config, "continue with the same command and --resume", [])
        assert not dist.is_initialized()

    def test_an_error_after_the_process_group_exists_destroys_it(self):
        def main(cfg):
            rebel.init_distributed()
            rebel.fail("bad")
        with pytest.raises(SystemExit, match="error: bad"):
            rebel.run_script(main, rebel.Config, "again", [])
        assert not dist.is_initialized()

    def test_overflowing_reward_gap_names_the_row_up_front(self, tiny_model, tmp_path, monkeypatch):
        rows = read_jsonl(write_pairs(tmp_path / "p.jsonl", n=16))
        rows[5]["chosen_reward"], rows[5]["rejected_reward"] = 1e160, -1e160  # finite; (η·Δr)² is not
        data = write_jsonl(tmp_path / "bad.jsonl", rows)
        loads = []
        monkeypatch.setattr(rebel, "build_model", lambda *a, **k: loads.append(a))
        with pytest.raises(SystemExit, match=r"error: .*bad\.jsonl\[train\] row 5: η·\(chosen_reward − "
                                             r"rejected_reward\) = .* is too large"):
            train(tiny_model, data, tmp_path / "run", eta=1.0, **SHORT_RUN)
        assert not loads

    def test_online_overflowing_reward_gap_names_the_prompt_row(self, tmp_path):
        model = make_model(str(tmp_path / "model"), layers=2, ends_often=True)
        prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
        (tmp_path / "rewards.py").write_text(ONLINE_REWARD + "\ndef huge(prompt, response):\n"
                                             "    return 1e308 if len(response) % 2 else -1e308\n")
        with pytest.raises(SystemExit, match=r"error: .*prompts\.jsonl row \d \(update 1\): η·\(chosen_reward"):
            train_online(model, prompts, tmp_path / "run", reward_fn=f"{tmp_path / 'rewards.py'}:huge",
                         reward_scale=1.0, num_samples=4, max_new_tokens=8)

    def test_a_model_folder_without_tokenizer_files(self, tiny_model, tmp_path):
        folder = shutil.copytree(tiny_model, tmp_path / "model")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(folder / name)
        with pytest.raises(SystemExit, match=r"error: model .*: no tokenizer files \(tokenizer\.json / "
                                             r"tokenizer\.model / tokenizer_config\.json\) in the folder"):
            rebel.load_tokenizer(str(folder))

    def test_train_split_of_a_single_file_is_refused(self, tiny_model, tmp_path):
        data = write_pairs(tmp_path / "p.jsonl", n=16)
        with pytest.raises(SystemExit, match=r"error: --train_split 'dev': .*p\.jsonl is one file, which has one "
                                             r"split, 'train'"):
            train(tiny_model, data, tmp_path / "run", train_split="dev", **SHORT_RUN)

    def test_gsm8k_files_with_a_bom_and_a_blank_line(self, tmp_path):
        row = '{"question": "q", "answer": "a #### 1"}\n'
        (tmp_path / "test.jsonl").write_bytes(("\ufeff" + row + row + "\n").encode())
        assert eval_gsm8k.load_docs(str(tmp_path), "test") == [{"question": "q", "answer": "a #### 1"}] * 2

    def test_no_flags_say_what_they_turn_off(self, capsys):
        with pytest.raises(SystemExit):
            rebel.parse_config(rebel.Config, ["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--no_activation_checkpointing, --no-activation-checkpointing turn --activation_checkpointing off" in out
        assert "--no_save_final, --no-save-final turn --save_final off" in out
