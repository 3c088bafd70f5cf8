"""The model-card recipes (recipes/*.yaml): each section parses with its script's real parser into the settings the
recipe claims, every key is a known setting, and iter_k starts from iter_(k-1)'s final/. (To be merged into
test_rebel.py.)"""
import os

import pytest
import yaml

import generate
import rebel
import score

ROOT = os.path.dirname(os.path.abspath(__file__))
RECIPES = os.path.join(ROOT, "recipes")
SCRIPTS = {"generate": generate, "score": score, "rebel": rebel}
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"


def offline(k, model):
    run = f"runs/rebel-llama-3-armo-iter_{k}"
    return {
        "generate": dict(model=model, prompts="allenai/ultrafeedback_binarized_cleaned_train", split="train",
                         prompt_column="prompt", num_samples=5, temperature=0.8, top_p=0.9, max_new_tokens=2048,
                         max_prompt_len=1024, output=f"{run}/generations.parquet", engine="hf"),
        "score": dict(input=f"{run}/generations.parquet", output=f"{run}/pairs",
                      reward_model="RLHFlow/ArmoRM-Llama3-8B-v0.1", max_length=4096, drop_truncated=True,
                      test_size=1000, trust_remote_code=False),
        "rebel": dict(online=False, model=model, dataset=f"{run}/pairs", train_split="train_prefs",
                      eval_split="test_prefs", output_dir=run, eta=1e6, lr=3e-7, warmup_ratio=0.1,
                      lr_schedule="cosine", temperature=0.8, total_episodes=60000, batch_size=128,
                      max_prompt_len=1024, max_response_len=2048, epochs_per_batch=1, num_layers_unfrozen=0,
                      beta1=0.9, beta2=0.95, adam_eps=1e-8, weight_decay=1e-6, max_grad_norm=0.0),
    }


ONLINE = dict(online=True, num_samples=2, max_new_tokens=1024, max_prompt_len=1024, temperature=0.5, kl_coef=0.05,
              missing_eos_penalty=-4.0, epochs_per_batch=4, eta=1.0, lr=1e-7, lr_schedule="linear", warmup_ratio=0.0,
              num_layers_unfrozen=4, batch_size=32, train_split="train", prompt_column="prompt", reward_fn="",
              beta1=0.9, beta2=0.95, adam_eps=1e-8, weight_decay=1e-6)
UF = dict(model=LLAMA, dataset="allenai/ultrafeedback_binarized_cleaned_train",
          reward_model="sfairXC/FsfairX-LLaMA3-RM-v0.1", reward_scale=1.0, trust_remote_code=False)

# what each recipe claims (its comments cite the authors' file:line or the model card for every value)
EXPECTED = {
    "rebel-llama-3-armo-iter_1": offline(1, LLAMA),
    "rebel-llama-3-armo-iter_2": offline(2, "runs/rebel-llama-3-armo-iter_1/final"),
    "rebel-llama-3-armo-iter_3": offline(3, "runs/rebel-llama-3-armo-iter_2/final"),
    "rebel-llama-3": {"rebel": {**ONLINE, **UF, "output_dir": "runs/rebel-llama-3", "total_episodes": 60829}},
    "rebel-llama-3-epoch_2": {"rebel": {**ONLINE, **UF, "output_dir": "runs/rebel-llama-3-epoch_2",
                                        "total_episodes": 2 * 60829}},
    "rebel-openchat-3.5": {"rebel": {**ONLINE, "model": "openchat/openchat_3.5", "dataset": "berkeley-nest/Nectar",
                                     "reward_model": "berkeley-nest/Starling-RM-7B-alpha",
                                     "reward_base": "meta-llama/Llama-2-7b-chat-hf", "reward_scale": 1.0,
                                     "output_dir": "runs/rebel-openchat-3.5", "total_episodes": 182954}},
}


def recipe_path(row):
    return os.path.join(RECIPES, f"{row}.yaml")


def parse_section(path, section, tmp_path):
    """`python <section>.py --config path` as the script reads it. Until the scripts read their own section of a
    recipe, the section is written to a flat settings file and parsed from there by the same parser."""
    module = SCRIPTS[section]
    try:
        return rebel.parse_config(module.Config, ["--config", path])
    except SystemExit as e:
        if "unknown settings" not in str(e) or not set(str(e).split("unknown settings")[1].split(" (")[0]
                                                          .replace(",", " ").split()) <= set(SCRIPTS):
            raise
    with open(path) as f:
        settings = yaml.safe_load(f)[section]
    flat = tmp_path / f"{os.path.basename(path)}.{section}.yaml"
    flat.write_text(yaml.safe_dump(settings))
    return rebel.parse_config(module.Config, ["--config", str(flat)])


def test_every_recipe_is_in_the_table():
    assert sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("row", sorted(EXPECTED))
def test_recipe_parses_to_its_claimed_settings(row, tmp_path):
    path = recipe_path(row)
    with open(path) as f:
        text = f.read()
    assert text.startswith(f"# {row.replace('rebel', 'REBEL').replace('llama', 'Llama').replace('armo', 'Armo')}"
                           .replace("openchat", "OpenChat") + " — model card row: AlpacaEval 2 LC ")
    recipe = yaml.safe_load(text)
    assert sorted(recipe) == sorted(EXPECTED[row]), "sections"
    for section, claimed in EXPECTED[row].items():
        assert set(recipe[section]) <= set(claimed), f"{section}: a setting the table does not check"
        cfg = parse_section(path, section, tmp_path)
        assert {k: getattr(cfg, k) for k in claimed} == claimed, section


@pytest.mark.parametrize("k", [2, 3])
def test_iteration_starts_from_the_previous_final(k):
    with open(recipe_path(f"rebel-llama-3-armo-iter_{k - 1}")) as f:
        previous = yaml.safe_load(f)
    with open(recipe_path(f"rebel-llama-3-armo-iter_{k}")) as f:
        this = yaml.safe_load(f)
    final = os.path.join(previous["rebel"]["output_dir"], "final")
    assert this["generate"]["model"] == this["rebel"]["model"] == final
    assert this["score"]["input"] == this["generate"]["output"] and this["rebel"]["dataset"] == this["score"]["output"]


def test_epoch_2_is_two_passes_of_the_same_run():
    with open(recipe_path("rebel-llama-3")) as f:
        one = yaml.safe_load(f)["rebel"]
    with open(recipe_path("rebel-llama-3-epoch_2")) as f:
        two = yaml.safe_load(f)["rebel"]
    assert two["total_episodes"] == 2 * one["total_episodes"]
    assert {k: v for k, v in one.items() if k not in ("total_episodes", "output_dir")} == \
        {k: v for k, v in two.items() if k not in ("total_episodes", "output_dir")}


@pytest.mark.parametrize("section", sorted(SCRIPTS))
def test_a_recipe_naming_an_unknown_setting_fails_in_one_line(section, tmp_path):
    with open(recipe_path("rebel-llama-3-armo-iter_1")) as f:
        recipe = yaml.safe_load(f)
    recipe[section]["learning_rate"] = 1e-6  # not a setting of any script
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit, match="unknown settings learning_rate"):
        parse_section(str(path), section, tmp_path)
