"""Data files read as written ("Nothing silently wrong, round 3"): to be merged into test_rebel.py's TestInputs."""
import json
import os

import pytest
import transformers

import rebel
from test_rebel import (LENGTH_REWARD, gen, read_jsonl, run_score, tiny_model, train,  # noqa: F401 — a fixture
                        write_jsonl, write_pairs)

UINT64_MAX = 18446744073709551615  # a uint64 hash: past int64, not a float


def pairs(tmp_path, n=12, name="good.jsonl"):
    return read_jsonl(write_pairs(tmp_path / name, n=n))


def trained_rows(out):
    return sorted(r["index"] for r in read_jsonl(os.path.join(out, "ref_logprobs.jsonl")))


def plain_parquet(path, rows):
    """A parquet file whose size depends on the bytes of its values, not on their order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path), compression="none", use_dictionary=False)
    return str(path)


class TestDataFiles:
    """Local .json/.jsonl/.parquet files: every value as written, read from the content, bad lines said in one line."""

    def test_strings_that_look_like_json_stay_strings_and_a_bad_prompt_is_a_dropped_row(self, tiny_model, tmp_path,
                                                                                          capsys):
        # one integer prompt made `datasets` read the whole column as JSON: '"quoted answer"' lost its quotes, '42'
        # became an integer and 'null' nothing; the run refused the file as "mixing strings and lists"
        rows = pairs(tmp_path)
        texts = ['"quoted answer"', "42", "null", "[1, 2]", '{"role": "user"}']
        for i, text in enumerate(texts):
            rows[i]["prompt"] = text
        rows[7]["prompt"] = 7
        path = write_jsonl(tmp_path / "p.jsonl", rows)
        assert rebel.load_split(path, "train")["prompt"] == [r["prompt"] for r in rows]
        out = train(tiny_model, path, tmp_path / "run", total_episodes=8, eval_size=0, save_final=False)
        printed = capsys.readouterr().out
        assert ("dropped 1 of 12 rows | 1 × the prompt must be a string or a non-empty list of {'role', 'content'} "
                "messages, got int (first: row 7)") in printed
        assert trained_rows(out) == [i for i in range(12) if i != 7]

    def test_a_list_response_is_a_dropped_row_saying_so(self, tiny_model, tmp_path, capsys):
        rows = pairs(tmp_path)
        rows[4]["chosen"] = ["a", "list"]
        train(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run", total_episodes=8, eval_size=0,
              save_final=False)
        assert "1 × the chosen and rejected responses must be strings, got list (first: row 4)" in \
            capsys.readouterr().out

    def test_a_reward_written_as_a_string_stops_the_run(self, tiny_model, tmp_path):
        rows = pairs(tmp_path)
        rows[1]["chosen_reward"] = "0.7"  # `datasets` decoded it to 0.7000000000000001 and trained on it
        with pytest.raises(SystemExit, match=r"row 1: column 'chosen_reward' must be a finite number, got '0\.7'"):
            train(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run", total_episodes=8,
                  eval_size=0)

    def test_a_generate_prompt_that_is_not_text_is_dropped_saying_why(self, tiny_model, tmp_path, capsys):
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the sea"}, {"prompt": 7},
                                                           {"prompt": '"the sky"'}])
        kept = read_jsonl(gen(tiny_model, prompts, tmp_path / "gen.jsonl"))
        assert ("1 × the prompt must be a string or a non-empty list of {'role', 'content'} messages, got int "
                "(first: row 1)") in capsys.readouterr().out
        assert [(r["prompt_id"], r["prompt"]) for r in kept] == [(0, "the sea"), (2, '"the sky"')]

    def test_a_score_prompt_that_is_not_text_is_named(self, tmp_path):
        rows = [dict(prompt=p, responses=["a", "bb"], truncated=[False, False]) for p in ("x", 42, "y")]
        (tmp_path / "rewards.py").write_text(LENGTH_REWARD)
        with pytest.raises(SystemExit, match=r"g\.jsonl row 1: the prompt must be a string or a non-empty list "
                                             r"of \{'role', 'content'\} messages, got int"):
            run_score(write_jsonl(tmp_path / "g.jsonl", rows), tmp_path / "s.jsonl",
                      reward_fn=f"{tmp_path / 'rewards.py'}:length")

    def test_mixed_string_and_message_prompts_in_a_data_file_are_read_as_written(self, tiny_model, tmp_path):
        rows = pairs(tmp_path)
        rows[1]["prompt"] = [{"role": "user", "content": rows[1]["prompt"]}]
        rows[2]["prompt"] = '[{"role": "user", "content": "a string, not messages"}]'
        path = write_jsonl(tmp_path / "p.jsonl", rows)
        assert rebel.load_split(path, "train")["prompt"] == [r["prompt"] for r in rows]
        out = train(tiny_model, path, tmp_path / "run", total_episodes=8, eval_size=0, save_final=False)
        assert trained_rows(out) == list(range(12))

    @pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
    def test_prompt_ids_past_int64_round_trip_exactly(self, tiny_model, tmp_path, suffix):
        # `datasets` read uint64 hashes back as floats: 18446744073709551615 and 18446744073709551614 became equal
        ids = [UINT64_MAX, UINT64_MAX - 1, 3]
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [dict(prompt=f"the sea {i}", prompt_id=p)
                                                           for i, p in enumerate(ids)])
        assert rebel.load_split(prompts, "train")["prompt_id"] == ids
        generated = gen(tiny_model, prompts, tmp_path / f"gen{suffix}")
        assert [type(p) for p in rebel.load_split(generated, "train")["prompt_id"]] == [int] * 3
        assert rebel.load_split(generated, "train")["prompt_id"] == ids
        (tmp_path / "rewards.py").write_text(LENGTH_REWARD)
        scored = run_score(generated, tmp_path / f"pairs{suffix}", reward_fn=f"{tmp_path / 'rewards.py'}:length",
                           drop_truncated=False)
        assert rebel.load_split(scored, "train")["prompt_id"] == ids
        folder = run_score(generated, tmp_path / "pairs_folder", reward_fn=f"{tmp_path / 'rewards.py'}:length",
                           drop_truncated=False, test_size=1)
        assert sorted(list(rebel.load_split(folder, "train_prefs")["prompt_id"])
                      + list(rebel.load_split(folder, "test_prefs")["prompt_id"])) == sorted(ids)

    def test_ids_that_parquet_cannot_keep_are_refused_before_sampling(self, tiny_model, tmp_path, monkeypatch):
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the prompt ids were checked")
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [dict(prompt="the sea", prompt_id=UINT64_MAX),
                                                           dict(prompt="the sky", prompt_id=-1)])
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
        with pytest.raises(SystemExit, match=r"gen\.parquet: column 'prompt_id' holds integers that a parquet file "
                                             r"cannot keep exact .*write a \.jsonl file"):
            gen(tiny_model, prompts, tmp_path / "gen.parquet")
        mixed = write_jsonl(tmp_path / "mixed.jsonl", [dict(prompt="the sea", prompt_id=1),
                                                       dict(prompt="the sky", prompt_id="p2")])
        with pytest.raises(SystemExit, match=r"column 'prompt_id' mixes int and str values, which a parquet file "
                                             r"cannot hold: write a \.jsonl file"):
            gen(tiny_model, mixed, tmp_path / "gen.parquet")
        monkeypatch.undo()
        assert read_jsonl(gen(tiny_model, mixed, tmp_path / "gen.jsonl"))[1]["prompt_id"] == "p2"

    @pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
    def test_a_file_replaced_with_the_same_size_and_time_is_read_anew(self, tmp_path, suffix):
        # `datasets` cached a data file by path, size and modification time: `cp -p` of other pairs trained the old
        rows = pairs(tmp_path)
        other = rows[::-1]  # other pairs, the same bytes in another order
        write = write_jsonl if suffix == ".jsonl" else plain_parquet
        path, new = write(tmp_path / f"p{suffix}", rows), write(tmp_path / f"new{suffix}", other)
        assert os.path.getsize(path) == os.path.getsize(new)
        assert rebel.load_split(path, "train").to_list() == rows
        stat = os.stat(path)
        os.replace(new, path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert rebel.load_split(path, "train").to_list() == other

    def test_a_lone_surrogate_is_named_with_its_line(self, tiny_model, tmp_path):
        rows = pairs(tmp_path)
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows).replace(rows[2]["chosen"], "broken \\ud800", 1))
        with pytest.raises(SystemExit, match=r"p\.jsonl: line 3: column 'chosen' holds a lone surrogate escape"):
            train(tiny_model, str(path), tmp_path / "run", total_episodes=8, eval_size=0)

    @pytest.mark.parametrize("indent", [None, 1], ids=["one-line", "indented"])
    def test_a_column_oriented_json_file_is_its_rows(self, tiny_model, tmp_path, indent):
        rows = pairs(tmp_path)
        path = tmp_path / "columns.json"
        path.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}, indent=indent))
        assert rebel.load_split(str(path), "train").to_list() == rows
        out = train(tiny_model, str(path), tmp_path / "run", total_episodes=8, eval_size=0, save_final=False)
        assert trained_rows(out) == list(range(12))

    @pytest.mark.parametrize(
        "text, message",
        [
            pytest.param('{"prompt": "a"}\n\n{"prompt": "b"}\n[1, 2]\n', r"line 4: expected a JSON object, got list",
                         id="not-an-object"),
            pytest.param('{"prompt": "a"}\n{"prompt": "b",}\n', r"line 2: not valid JSON", id="not-json"),
            pytest.param('[\n {"prompt": "a"},\n {"prompt": "b",}\n]\n', r"line 3: not valid JSON",
                         id="broken-list"),
            pytest.param('[{"prompt": "a"}, 3]', r"row 1: expected a JSON object, got int", id="list-of-non-objects"),
            pytest.param('{"prompt": ["a", "b"], "chosen": ["c"]}', r"an object of columns needs lists of one length",
                         id="columns-of-two-lengths"),
            pytest.param("  \n\n", r"the file is empty", id="blank"),
        ],
    )
    def test_a_bad_json_file_is_said_in_one_line(self, tmp_path, text, message):
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(SystemExit, match=r"bad\.json: " + message):
            rebel.load_split(str(path), "train")

    def test_a_bom_blank_lines_and_missing_keys_are_accepted(self, tmp_path):
        path = tmp_path / "p.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "x": 1}\n\n{"prompt": "b\xe2\x80\xa8c"}\n')
        data = rebel.load_split(str(path), "train")
        assert data.column_names == ["prompt", "x"] and len(data) == 2
        assert data.to_list() == [{"prompt": "a", "x": 1}, {"prompt": "b\u2028c", "x": None}]
        assert data.select(range(1))[0] == {"prompt": "a", "x": 1} and data["x"] == [1, None]

    def test_a_folder_of_data_files_is_read_as_written(self, tmp_path):
        # a folder of train.jsonl and test.jsonl went through `datasets` too: cached, and a column of JSON decoded
        rows = [{"prompt": '"quoted answer"', "prompt_id": UINT64_MAX}, {"prompt": 7, "prompt_id": 1}]
        folder = tmp_path / "data"
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", rows)
        write_jsonl(folder / "test.jsonl", rows[:1])
        assert rebel.load_split(str(folder), "train").to_list() == rows
        assert rebel.load_split(str(folder), "test").to_list() == rows[:1]
        assert rebel.load_split(str(folder), "train_prefs") is None

    def test_a_parquet_json_column_that_datasets_wrote_is_decoded_as_datasets_does(self, tmp_path):
        # `datasets` writes a column it read as JSON as the JSON text of each value; read as it reads it, and a prompt
        # column of that kind is refused as before (its strings that looked like JSON were decoded already)
        import datasets
        features = datasets.Features({"prompt": datasets.Json(), "score": datasets.Json()})
        path = str(tmp_path / "json.parquet")
        datasets.Dataset.from_dict({"prompt": ["hi", [{"role": "user", "content": "x"}]], "score": [1, "a"]},
                                   features=features).to_parquet(path)
        data = rebel.load_split(path, "train")
        assert data.to_list() == [{"prompt": "hi", "score": 1},
                                  {"prompt": [{"role": "user", "content": "x"}], "score": "a"}]
        with pytest.raises(SystemExit, match=r"json\.parquet: column 'prompt' mixes strings and lists"):
            rebel.check_prompt_column(data, "prompt", path)

    def test_a_json_column_read_by_datasets_says_what_it_mixes(self):
        import datasets
        features = datasets.Features({"prompt": datasets.Json()})
        data = datasets.Dataset.from_dict({"prompt": ["hi", 7]}, features=features)
        with pytest.raises(SystemExit, match=r"hub: column 'prompt' mixes strings and integers, which datasets reads"):
            rebel.check_prompt_column(data, "prompt", "hub")
