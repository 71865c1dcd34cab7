"""Every shipped recipe parses into the four dataclasses; the lab recipes name the variants the lab compares."""

from pathlib import Path

import pytest
import yaml

from helpers import REPO
from sfn_train.config import parse_recipe
from sfn_train.roles import normalize_modules

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "studies" not in p.parts)  # studies: test_study


def test_recipes_exist():
    assert len(RECIPES) >= 20


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_parses(recipe: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository root, as users launch them
    script_args, training_args, model_args, sfn_args = parse_recipe(["--config", str(recipe)])
    raw = yaml.safe_load(recipe.read_text())
    assert model_args.model_name_or_path == raw["model_name_or_path"]
    assert sfn_args.trainable_modules == normalize_modules(raw["trainable_modules"])
    assert training_args.learning_rate == raw["learning_rate"]
    header = recipe.read_text().split("\nmodel_name_or_path")[0]
    assert "Launch" in header and "Effective batch" in header and ("Hardware" in header)


def test_paper_variants_select_what_the_paper_tuned():
    recipes = {p.stem: yaml.safe_load(p.read_text()) for p in (REPO / "recipes" / "qwen2.5-32b-instruct").glob("*.yaml")}
    assert recipes["f1_s1k"]["trainable_modules"] == ["embed", "lm_head", "norm"]
    assert recipes["f2_s1k"]["trainable_modules"] == ["embed", "lm_head", "norm", "o_proj"]
    assert recipes["f4_s1k"]["trainable_modules"] == "all"
    for raw in recipes.values():  # s1's hyperparameters
        assert (raw["learning_rate"], raw["num_train_epochs"], raw["weight_decay"]) == (1e-5, 5, 1e-4)
        assert (raw["adam_beta1"], raw["adam_beta2"], raw["max_length"]) == (0.9, 0.95, 32768)
