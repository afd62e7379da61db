"""Strict config loading: every problem named by its TOML path, all reported at once."""

from pathlib import Path

import pytest

from trainer import optimizers
from trainer.config import load as config
from trainer.config.load import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


MINIMAL = """
[model]
pretrained = "some/model"
[data]
path = "data"
"""


def problems_of(tmp_path, text: str, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), overrides)
    return err.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.model.pretrained == "some/model"
    assert cfg.train.batch_size == config.TrainConfig().batch_size
    assert cfg.lr_scheduler.name == "constant"


def test_typo_in_key_names_path_and_suggests(tmp_path):
    (problem,) = problems_of(tmp_path, MINIMAL + "[train]\nlearning_rat = 1e-4\n")
    assert problem.startswith("train.learning_rat:")
    assert "did you mean 'learning_rate'" in problem


def test_wrong_type_names_path_and_types(tmp_path):
    (problem,) = problems_of(tmp_path, MINIMAL + '[train]\nbatch_size = "4"\n')
    assert problem.startswith("train.batch_size:")
    assert "expected int" in problem and "str" in problem


def test_bool_is_not_an_int_but_int_is_a_float(tmp_path):
    (problem,) = problems_of(tmp_path, MINIMAL + "[train]\nbatch_size = true\n")
    assert "train.batch_size" in problem
    cfg = config.load(write(tmp_path, MINIMAL + "[train]\nlearning_rate = 1\n"))
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)


def test_unknown_table_is_named_with_suggestion(tmp_path):
    (problem,) = problems_of(tmp_path, MINIMAL + "[trian]\nseed = 1\n")
    assert problem.startswith("[trian]") and "did you mean 'train'" in problem


def test_bad_choice_suggests_the_closest(tmp_path):
    (problem,) = problems_of(tmp_path, MINIMAL + '[train]\nmixed_precision = "bf61"\n')
    assert "train.mixed_precision" in problem and 'did you mean "bf16"' in problem


def test_all_problems_are_reported_at_once(tmp_path):
    text = """
[model]
pretrianed = "x"
[data]
path = "d"
resolution = 100
[train]
batch_size = 0
optimiser = "adamw"
[lr_scheduler]
name = "constant"
[bogus]
x = 1
"""
    problems = problems_of(tmp_path, text)
    joined = "\n".join(problems)
    for expected in (
        "model.pretrianed",
        "model.pretrained: required",
        "data.resolution",
        "train.batch_size",
        "train.optimiser",
        "[bogus]",
    ):
        assert expected in joined
    assert len(problems) == 6


def test_set_overrides_parse_toml_values_and_bare_strings(tmp_path):
    cfg = config.load(
        write(tmp_path, MINIMAL),
        ["train.max_steps=7", "data.path=/data/cats", 'lora.target_modules=["to_q"]'],
    )
    assert cfg.train.max_steps == 7
    assert cfg.data.path == "/data/cats"
    assert cfg.lora.target_modules == ("to_q",)


def test_set_override_typo_is_reported_like_a_file_typo(tmp_path):
    (problem,) = problems_of(tmp_path, MINIMAL, ["train.max_stpes=3"])
    assert "train.max_stpes" in problem and "max_steps" in problem


def test_invalid_toml_names_the_file(tmp_path):
    (problem,) = problems_of(tmp_path, "[model\n")
    assert "run.toml" in problem and "TOML" in problem


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "nope.toml")


def test_text_encoder_lr_without_text_encoder_training_is_an_error(tmp_path):
    (problem,) = problems_of(tmp_path, MINIMAL + "[train]\ntext_encoder_lr = 1e-5\n")
    assert "train.text_encoder_lr" in problem and "train_text_encoder" in problem


def test_to_toml_round_trips_every_default(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL))
    again = config.load(write(tmp_path, config.to_toml(cfg.to_dict())))
    assert again == cfg


# configs/sweeps/ holds sweep files, not run configs: tests/test_sweep_spec.py loads those.
RUN_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.toml") if "sweeps" not in p.parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = config.load(path)
    assert cfg.model.pretrained and cfg.data.path


def test_reference_config_sets_every_key_with_a_comment():
    """configs/lora.toml is the documented reference: every key present, each commented."""
    import dataclasses

    import tomllib

    text = (REPO / "configs" / "lora.toml").read_text()
    data = tomllib.loads(text)
    for table in dataclasses.fields(config.RunConfig):
        value = getattr(config.RunConfig(), table.name)
        if table.name == "optimizer":
            # A registry table: every key of the optimizer it names.
            value = optimizers.get(data["optimizer"]["name"])()
        if dataclasses.is_dataclass(value) and table.name != "lr_scheduler":
            for f in dataclasses.fields(value):
                assert f.name in data[table.name], f"configs/lora.toml lacks {table.name}.{f.name}"
        elif table.name != "lr_scheduler":
            assert table.name in data
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line or _previous_is_comment(text, line), f"uncommented: {line}"


def _previous_is_comment(text: str, line: str) -> bool:
    lines = text.splitlines()
    i = lines.index(line)
    return i > 0 and lines[i - 1].lstrip().startswith("#")


def test_describe_lists_every_key():
    text = config.describe()
    for name in ("train.learning_rate", "data.resolution", "lora.rank"):
        table, key = name.split(".")
        assert f"[{table}]" in text and f"  {key} (" in text


def test_describe_shows_toml_values_every_table_and_the_schedule_name():
    import tomllib

    text = config.describe()
    assert "configs/lora.toml is a recipe" in text
    assert '  name (str, default "constant"): the LR schedule' in text
    lines = [line for line in text.splitlines() if ", default " in line]
    assert len(lines) > 60
    for line in lines:
        shown = line.split(", default ", 1)[1].split("): ", 1)[0]
        # Every default is written as TOML, so it can be pasted into a config as is.
        tomllib.loads(f"v = {shown}")
    assert "default False" not in text and "default ()" not in text
    assert "    eps (float, default 1e-8)" in text  # the [optimizer] keys, per optimizer


def test_schedule_problems_are_config_problems(tmp_path):
    text = MINIMAL + (
        "[train]\nmax_steps = 100\nlearning_rate = 1e-4\n"
        '[lr_scheduler]\nname = "cosine"\nwarmup_steps = 100\nmin_lr = 1e-3\nwarmup_stpes = 3\n'
    )
    joined = "\n".join(problems_of(tmp_path, text))
    assert "lr_scheduler.warmup_stpes" in joined and "warmup_steps" in joined
    (problem,) = problems_of(tmp_path, MINIMAL + '[lr_scheduler]\nname = "cosin"\n')
    assert "cosine" in problem
    problems = problems_of(
        tmp_path,
        MINIMAL + "[train]\nmax_steps = 100\nlearning_rate = 1e-4\n"
        '[lr_scheduler]\nname = "cosine"\nwarmup_steps = 100\nmin_lr = 1e-3\n',
    )
    joined = "\n".join(problems)
    assert "warmup" in joined and "min_lr" in joined  # warmup >= run, floor above the base LR


@pytest.mark.parametrize(
    "override, kind, reason",
    [
        ('lr_scheduler={name="cosine"', "inline table", "unclosed inline table"),
        ("lr_scheduler={name=cosine}", "inline table", "invalid value"),  # quotes the shell ate
        ('lora.target_modules=["to_q", "to_v"', "array", "unclosed array"),
        ('model.pretrained="some/model', "string", "unterminated string"),
        ("model.pretrained='some/model", "string", 'expected "\'"'),
    ],
)
def test_set_value_that_opens_like_toml_but_does_not_parse_names_the_set(
    tmp_path, override, kind, reason
):
    """It used to pass on as a string, and the error then blamed the config file's table."""
    (problem,) = problems_of(tmp_path, MINIMAL, [override])
    assert problem.startswith(f"--set {override!r}: the value opens like a TOML {kind}")
    assert reason in problem.lower(), problem
    assert "quote the whole argument" in problem
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, MINIMAL), [override])
    assert err.value.source == "--set" and "run.toml" not in str(err.value)


def test_set_toml_error_says_where_in_the_value():
    value = '{name = "cosine", warmup_steps = }'
    with pytest.raises(ConfigError) as err:
        config.apply_overrides({}, [f"lr_scheduler={value}"])
    (problem,) = err.value.problems
    # tomllib's own column, counted in "v = " + value, is 4 past the value's 1-based character.
    assert f"(at character {value.index('}') + 1} of the value)" in problem


def test_every_bad_set_is_reported_at_once_and_bare_words_stay_strings(tmp_path):
    bad = ["lr_scheduler={", "lora.target_modules=[", "data.path.x=1"]
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, MINIMAL), ["data.path=/data/[cats]", *bad])
    assert [p.split(":")[0] for p in err.value.problems] == [f"--set {b!r}" for b in bad]
    cfg = config.load(write(tmp_path, MINIMAL), ["data.path=/data/[cats]", "output_dir=a{b"])
    assert cfg.data.path == "/data/[cats]" and cfg.output_dir == "a{b"


def test_a_deprecated_lora_key_warns_once_per_load_not_per_rebuild(tmp_path, caplog):
    """lora.save_dtype is warned about by config.deprecated when the TOML is read; building or
    replacing the [lora] table afterwards (sample, resume, sweeps do) says nothing again."""
    import dataclasses
    import logging

    with caplog.at_level(logging.WARNING, logger="sdlora"):
        cfg = config.load(write(tmp_path, MINIMAL + '[lora]\nsave_dtype = "fp16"\n'))
        assert caplog.text.count("lora.save_dtype is deprecated") == 1
        assert 'output.save_dtype = "fp16"' in caplog.text
        caplog.clear()
        dataclasses.replace(cfg.lora, rank=8)
        config.LoraConfig(save_dtype="bf16")
    assert caplog.text == ""
    assert cfg.lora.save_dtype == "fp16"
