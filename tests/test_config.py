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
