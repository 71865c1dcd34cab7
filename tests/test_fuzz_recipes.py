"""Fuzz `parse_recipe` with random recipe YAML: the only outcomes allowed are a valid config or one clean SfnError.

Random keys come from the real key set (every dataclass field TrlParser knows) mixed with junk keys; values are
random scalars, lists and nested mappings; documents are also random non-mapping YAML and malformed text. Any other
exception (TypeError, AttributeError, KeyError, an argparse SystemExit, ...) is a bug in sfn_train/config.py.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sfn_train.config import make_parser, parse_recipe
from sfn_train.errors import SfnError

KEYS = sorted({a.dest for a in make_parser()._actions if a.dest not in ("help", "config")})

# Keys that make TrainingArguments reach outside the process (hub, trackers, DeepSpeed config files) are fuzzed too;
# they must fail cleanly like any other bad value.
scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=16) | st.sampled_from(["true", "false", "all", "o_proj", "0-3", "none", "auto", "1e-3",
                                                     "steps", "no", "epoch", "bf16", "sdpa", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
real_keys = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
junk_keys = st.dictionaries(st.text(min_size=1, max_size=12), values, max_size=1)
recipes = st.builds(lambda real, junk, use_junk: {**real, **junk} if use_junk else real, real_keys, junk_keys,
                    st.booleans().map(lambda b: b and False) | st.booleans())
as_yaml = recipes.map(lambda r: yaml.safe_dump(r, allow_unicode=True))
documents = st.one_of(
    as_yaml, as_yaml, as_yaml, as_yaml,  # mostly mappings of real keys, so that values reach the dataclasses
    values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),  # non-mapping documents
    st.text(max_size=60),  # malformed (or accidentally valid) YAML text
    st.dictionaries(st.integers() | st.booleans() | st.none(), values, min_size=1, max_size=2).map(yaml.safe_dump),
)


def check(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(text, encoding="utf-8")
        cwd = os.getcwd()
        os.chdir(tmp)  # a relative output_dir or logging_dir lands in the temporary folder
        try:
            parsed = parse_recipe(["--config", str(recipe)])
        except SfnError as exc:
            message = str(exc)
            assert message and "\n" not in message, repr(message)
            return
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{type(exc).__name__} escaped parse_recipe for recipe {text!r}: {exc}")
        finally:
            os.chdir(cwd)
            for fd in (0, 1, 2):  # parsing must not close the process's standard streams
                try:
                    os.fstat(fd)
                except OSError:
                    pytest.fail(f"recipe {text!r} closed file descriptor {fd}")
    assert len(parsed) == 4 and all(dataclasses.is_dataclass(p) for p in parsed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
@example("learning_rate: [1, 2]\n")
@example("trainable_modules: {a: 1}\n")
@example("trainable_layers: [[1]]\n")
@example("max_steps: null\n")
@example("gradient_checkpointing_kwargs: 3\n")
@example("- a\n- b\n")
@example("key: [unclosed\n")
@example("help: true\n")
@example("{1: 2}\n")
@example("accelerator_config: true\n")  # open(True) is open(1): TrainingArguments would close stdout
@example("deepspeed: 2\n")
@example("? '\n\n'")  # a key made of newlines (found by CI's run of this test)
@example("metric_for_best_model: {a: 1}\n")
def test_random_recipes_parse_or_fail_cleanly(text):
    check(text)


def test_fuzz_key_set_is_the_real_one():
    assert {"learning_rate", "trainable_modules", "model_name_or_path", "dataset_name", "max_length"} <= set(KEYS)


def test_value_types_are_checked_before_parsing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resume_from_checkpoint: true\ntrainable_layers: 3\nlearning_rate: 1\n")
    parsed = parse_recipe(["--config", str(recipe)])
    assert parsed[1].resume_from_checkpoint in (True, "True", "true") and parsed[3].trainable_layers == ["3"]
    recipe.write_text("accelerator_config: true\n")
    with pytest.raises(SfnError, match="`accelerator_config` takes a mapping or a string, not True"):
        parse_recipe(["--config", str(recipe)])
    recipe.write_text("help: true\n")
    with pytest.raises(SfnError, match="help, which is a command-line option"):
        parse_recipe(["--config", str(recipe)])


def test_problems_are_found_as_data_not_from_trl_message_text(tmp_path, monkeypatch):
    """Unknown keys and flags, wrong kinds and refused values are named without reading TRL's error messages.

    TRL's and transformers' own parse entry points (whose ValueError text the errors were once decoded from) are
    replaced by ones that raise a reworded message: every error still names its key, and a good recipe parses.
    """
    from transformers import HfArgumentParser
    from trl import TrlParser

    def reworded(*args, **kwargs):
        raise ValueError("a message worded some other way")

    monkeypatch.setattr(TrlParser, "parse_args_and_config", reworded)
    monkeypatch.setattr(HfArgumentParser, "parse_args_into_dataclasses", reworded)
    recipe = tmp_path / "r.yaml"
    cases = [
        ("learning_rate: 1.0e-3\ntrainable_modlues: [o_proj]\n", [], "unknown key(s) trainable_modlues (did you "
                                                                    "mean trainable_modules?)"),
        ("learning_rate: 1.0e-3\n", ["--learnig_rate", "1"], "unknown flag(s) --learnig_rate (did you mean "
                                                             "--learning_rate?)"),
        ("learning_rate: fast\n", [], "`learning_rate` is 'fast'"),
        ("max_steps: null\n", [], "`max_steps` takes an integer, not null"),
        ("lr_scheduler_type: cosinus\n", [], "`lr_scheduler_type` is 'cosinus'; use one of linear, cosine"),
        ("deepspeed: missing.json\n", [], "(key `deepspeed`)"),  # refused inside TrainingArguments.__post_init__
    ]
    for text, flags, expected in cases:
        recipe.write_text(text)
        with pytest.raises(SfnError) as err:
            parse_recipe(["--config", str(recipe), *flags])
        assert expected in str(err.value) and "\n" not in str(err.value)
    recipe.write_text("learning_rate: 1.0e-3\ntrainable_modules: [o_proj, q_proj]\n")
    parsed = parse_recipe(["--config", str(recipe), "--max_steps", "3"])
    assert parsed[1].learning_rate == 1e-3 and parsed[1].max_steps == 3
    assert parsed[3].trainable_modules == ["o_proj", "q_proj"]
