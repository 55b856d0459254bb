import pytest

from a3t.config import ConfigError, load_config


def test_defaults_need_no_file():
    cfg = load_config()
    assert cfg.env.phrasing == "put" and cfg.env.max_steps == 12  # CPU default; the paper profile: 50
    assert cfg.games.size == "small"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("games:\n  train: 6\n  size: alfworld\nenv:\n  phrasing: move\n")
    cfg = load_config(path, ["games.train=12", "env.max_steps=30", "games.root=/x/y"])
    assert cfg.games.train == 12 and cfg.games.size == "alfworld"
    assert cfg.env.phrasing == "move" and cfg.env.max_steps == 30
    assert str(cfg.games.root) == "/x/y"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["games.trian=3"], "games.trian: unknown key"),
        (["bogus.key=1"], "bogus: unknown key"),
        (["games.size=huge"], "games.size: Input should be 'small' or 'alfworld'"),
        (["env.max_steps=0"], "env.max_steps: Input should be greater than or equal to 1"),
        (["games.train=many"], "games.train: Input should be a valid integer"),
        (["games.train"], "expected section.key=value"),
        (["games=3", "games.train=1"], "games is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("games:\n  train: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_profiles_sit_between_defaults_and_file(tmp_path):
    paper = load_config(profile="paper")
    assert paper.train.epochs_first_round == 10 and paper.train.epochs_later_rounds == 6  # the paper
    assert paper.train.learning_rate == 1e-4 and paper.rollout.retry_max == 40
    default = load_config()
    assert default.train.epochs_first_round < paper.train.epochs_first_round  # CPU default: fewer epochs
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs_first_round: 4\n")
    cfg = load_config(path, ["train.lora_r=8"], profile="paper")
    assert cfg.train.epochs_first_round == 4 and cfg.train.lora_r == 8 and cfg.train.epochs_later_rounds == 6
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config(profile="huge")


def test_overrides_never_leak_into_the_next_load():
    load_config(overrides=["eval.tasks=1", "env.name=webshop"])
    again = load_config()
    assert again.eval.tasks is None and again.env.name == "alfworld"
