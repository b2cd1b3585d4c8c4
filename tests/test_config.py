from __future__ import annotations

import pytest

from study import config
from study.config import ConfigError


def test_defaults_are_valid_and_documented():
    cfg = config.build()
    assert cfg.storage == "sqlite:///storage/sinstudy.db"
    assert cfg.sampler == "tpe" and cfg.pruner == "hyperband"
    assert cfg.train.batch_size == 64 and cfg.train.optimizer == "adam"
    assert len(cfg.space.activation) >= 5


def test_toml_merges_over_defaults_and_flags_win(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[search_space]\ndepth = [2, 4]\nactivation = ["tanh", "relu"]\n[train]\nmax_epochs = '
        "7\n[study]\nn_trials = 3\n"
    )
    cfg = config.build(config.load_toml(f), n_trials=5)
    assert cfg.space.depth == (2, 4)
    assert cfg.space.activation == ("tanh", "relu")
    assert cfg.space.width == config.SearchSpace().width  # untouched default
    assert cfg.train.max_epochs == 7
    assert cfg.n_trials == 5  # flag over TOML
    assert config.build(config.load_toml(f), max_epochs=9).train.max_epochs == 9


def test_single_value_fixes_a_parameter(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[search_space]\ndepth = [3]\nlr = 0.01\n")
    cfg = config.build(config.load_toml(f))
    assert cfg.space.depth == (3, 3) and cfg.space.lr == (0.01, 0.01)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[search_space]\ndeep = [1, 2]\n", "unknown key 'deep'"),
        ("[searchspace]\ndepth = [1, 2]\n", "unknown section [searchspace]"),
        ('[search_space]\nactivation = ["tanh", "swish"]\n', "unknown activation 'swish'"),
        ("[search_space]\ndepth = [5, 2]\n", "reversed"),
        ("[search_space]\nwidth = []\n", "[low, high]"),
        ("[search_space]\nactivation = []\n", "non-empty list"),
        ("[search_space]\nlr = [0.0, 0.1]\n", "lr"),
        ("[search_space]\ndepth = [0, 3]\n", "depth"),
        ("[search_space]\ndepth = [1.5, 3]\n", "ints"),
        ("[train]\nscheduler = 'warmup'\n", "unknown scheduler"),
        ("[data]\ninput_scaling = 'log'\n", "unknown data.input_scaling 'log'"),
        ("[study]\nrepeats = 0\n", "--repeats must be an integer from 1"),
        ("[study]\nrepeats = 2.5\n", "--repeats"),
        ("[data]\nn_train = -3\n", "data.n_train"),
        ("depth = [", "not valid TOML"),
    ],
)
def test_bad_toml_is_one_clear_line(tmp_path, text, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.build(config.load_toml(f))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"n_trials": 0}, "--n-trials"),
        ({"max_epochs": 0}, "--max-epochs"),
        ({"sampler": "bayes"}, "unknown sampler"),
        ({"pruner": "asha"}, "unknown pruner"),
        ({"timeout": -1.0}, "--timeout"),
        ({"study": " "}, "study name"),
        ({"repeats": 4, "slots": 3}, "--slots 3 cannot hold one trial of --repeats 4"),
    ],
)
def test_bad_overrides(kw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("-", "\\-")):
        config.build(**kw)


def test_cmaes_rejects_categorical_choices_but_accepts_fixed(tmp_path):
    with pytest.raises(ConfigError, match="cmaes"):
        config.build(sampler="cmaes")
    f = tmp_path / "c.toml"
    f.write_text('[search_space]\nactivation = ["tanh"]\n')
    assert config.build(config.load_toml(f), sampler="cmaes").sampler == "cmaes"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_toml(tmp_path / "nope.toml")


def test_per_layer_width_list_must_match_depth():
    with pytest.raises(ConfigError, match="one per layer"):
        config.validate_train(config.TrainConfig(depth=3, width=(8, 8)))
    assert config.TrainConfig(depth=2, width=(8, 4)).widths == (8, 4)
    assert config.TrainConfig(depth=3, width=5).widths == (5, 5, 5)


def _run_flags() -> dict[str, object]:
    from study.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse's subparsers
    return {
        a.option_strings[0]: a
        for a in sub.choices["run"]._actions
        if a.option_strings and a.dest not in {"help", "config", "no_progress"}
    }


def _key_of(dest: str):
    """The config object and field a `run` flag sets (max_epochs lives in [train])."""
    cfg = config.StudyConfig()
    return (cfg.train, dest) if dest == "max_epochs" else (cfg, dest)


def test_every_run_flag_is_a_config_key_with_the_same_default_in_help_and_readme():
    """The flags are generated from the dataclasses (cli.RUN_FLAGS): each must name a key, state
    that key's default (in its help and in the README's table) and nothing else."""
    import re
    import tomllib
    from dataclasses import fields
    from pathlib import Path

    flags = _run_flags()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = {}  # a row may name several flags, their defaults separated by ";"
    for m in re.finditer(r"^\| (`--[^|]*)\|([^|]*)\|", readme, re.M):
        names = re.findall(r"`(--[a-z-]+)[^`]*`", m[1])
        said = [d.strip().strip("`") for d in m[2].split(";")]
        assert len(said) == len(names), m[0]
        table |= {n: ("" if d == "none" else d) for n, d in zip(names, said, strict=True)}
    assert set(table) == set(flags) | {"--config"}, "README's flag table and `run` differ"
    for flag, action in flags.items():
        obj, name = _key_of(action.dest)
        assert flag == "--" + name.replace("_", "-")
        assert name in {f.name for f in fields(obj)}, f"{flag}: no config key {name}"
        default = getattr(obj, name)
        said = re.search(r"\(default ([^)]*)\)", action.help or "")
        if name == "slots":  # per device, when not set
            shown = [str(n) for n in config.DEFAULT_SLOTS.values()]
            assert default is None and all(n in said[1] and n in table[flag] for n in shown)
        elif default is None:
            assert said is None and table[flag] == "", (flag, said, table[flag])
        else:
            text = ",".join(default) if isinstance(default, tuple) else str(default)
            assert said is not None and said[1].strip("'") == text, (flag, said)
            assert table[flag] == text, (flag, table[flag], default)
    # the README's config file: every key there is a key, with its default
    block = re.search(r"```toml\n(.*?)```", readme[readme.index("## Configure") :], re.S)[1]
    cfg = config.StudyConfig()
    tables = {"study": cfg, "train": cfg.train, "data": cfg.data, "search_space": cfg.space}
    for table_name, keys in tomllib.loads(block).items():
        for key, value in keys.items():
            want = getattr(tables[table_name], key)
            assert (list(want) if isinstance(want, tuple) else want) == value, (table_name, key)
