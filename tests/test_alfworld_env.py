import json
from pathlib import Path

import pytest
from alfworld.info import ALFRED_TWL2_PATH

from a3t.envs.alfworld import AlfWorldEnv, GameFileError, find_games, load_game, set_phrasing
from a3t.envs.base import convert_action
from a3t.envs.alfworld_gen import TASK_TYPES
from a3t.envs.base import TerminalReason


@pytest.fixture(scope="module")
def train_games(games_root):
    return find_games(games_root, "train")


def test_every_task_type_is_generated(train_games):
    assert sorted(load_game(g).task_type for g in train_games) == sorted(TASK_TYPES)


@pytest.mark.parametrize("phrasing", ["put", "move"])
def test_walkthrough_wins_every_task_type_in_both_phrasings(train_games, phrasing):
    for game in train_games:
        env = AlfWorldEnv(game, phrasing=phrasing)
        reset = env.reset()
        assert reset.task and reset.task in reset.observation
        assert reset.task_type == json.loads((game.parent / "traj_data.json").read_text())["task_type"]
        for action in env.game.walkthrough:
            assert action in env.admissible_actions, (game, action)
            step = env.step(action)
            assert step.valid
            assert step.won == (action == env.game.walkthrough[-1])
        assert step.won and step.done and step.reward == 1.0
        assert env.terminal_reason is TerminalReason.WON
        assert env.invalid_actions == 0


def test_phrasing_changes_what_the_engine_accepts_and_says(train_games):
    game = next(g for g in train_games if load_game(g).task_type == "pick_and_place_simple")
    put, move = AlfWorldEnv(game, phrasing="put"), AlfWorldEnv(game, phrasing="move")
    put_action = next(a for a in put.game.walkthrough if a.startswith("put "))
    assert " in/on " in put_action
    move_action = convert_action(put_action, "move")
    assert move_action.startswith("move ") and " to " in move_action
    for env, action, said in ((put, put_action, "You put the"), (move, move_action, "You move the")):
        env.reset()
        for a in env.game.walkthrough:
            step = env.step(a)
            if a == action:
                assert step.observation.startswith(said)
    # The old phrase against the new grammar is just an invalid action, as in alfworld >= 0.4.
    move.reset()
    assert not any(a.startswith("put ") for a in move.admissible_actions)


def test_set_phrasing_round_trips():
    grammar = Path(ALFRED_TWL2_PATH).read_text()
    assert set_phrasing(set_phrasing(grammar, "put"), "move") == grammar
    assert 'template :: "put {o} in/on {r}";' in set_phrasing(grammar, "put")


def test_invalid_action_says_nothing_happens_and_is_counted(train_games):
    env = AlfWorldEnv(train_games[0])
    env.reset()
    for action in ["dance wildly", "", "go to the moon", "Go To " + env.admissible_actions[0][6:]]:
        step = env.step(action)
        assert step.observation == "Nothing happens."
        assert not step.valid and not step.done and step.reward == 0.0
    assert env.invalid_actions == 4 and env.steps_taken == 4


def test_step_limit_ends_the_episode(train_games):
    env = AlfWorldEnv(train_games[0], max_steps=3)
    env.reset()
    steps = [env.step("look") for _ in range(3)]
    assert [s.done for s in steps] == [False, False, True]
    assert not steps[-1].won and env.terminal_reason is TerminalReason.STEP_LIMIT
    with pytest.raises(RuntimeError):
        env.step("look")
    env.reset()  # a reset starts a fresh episode
    assert env.steps_taken == 0 and env.terminal_reason is None


def _copy_game(src, dst, **changes):
    dst.mkdir(parents=True)
    (dst / "traj_data.json").write_text((src.parent / "traj_data.json").read_text())
    data = json.loads(src.read_text())
    data.update(changes)
    (dst / "game.tw-pddl").write_text(json.dumps(data))
    return dst / "game.tw-pddl"


def test_missing_game_file_names_the_file(tmp_path):
    with pytest.raises(GameFileError, match=f"{tmp_path}/nope/game.tw-pddl: game file not found"):
        AlfWorldEnv(tmp_path / "nope" / "game.tw-pddl")


def test_game_file_that_is_not_json_names_file_and_position(tmp_path):
    path = tmp_path / "game.tw-pddl"
    path.write_text('{"pddl_domain": "x",\n oops')
    with pytest.raises(GameFileError, match=r"game.tw-pddl: not JSON \(.* at line 2, column 2\)"):
        AlfWorldEnv(path)


def test_game_file_without_game_fields_is_rejected(tmp_path):
    path = tmp_path / "game.tw-pddl"
    path.write_text('{"walkthrough": []}')
    with pytest.raises(GameFileError, match="not a game file"):
        load_game(path)


def test_pddl_that_does_not_parse_names_the_file(train_games, tmp_path):
    src = train_games[0]
    broken = json.loads(src.read_text())["pddl_problem"].replace("(:init", "(:init (", 1)
    path = _copy_game(src, tmp_path / "broken", pddl_problem=broken)
    with pytest.raises(GameFileError, match=f"{path}: the PDDL does not parse"):
        AlfWorldEnv(path)
    # The engine is still usable for good games afterwards.
    assert AlfWorldEnv(src).reset().observation


def test_missing_traj_data_names_the_file(train_games, tmp_path):
    path = _copy_game(train_games[0], tmp_path / "g")
    (path.parent / "traj_data.json").unlink()
    with pytest.raises(GameFileError, match="traj_data.json not found"):
        load_game(path)


def test_find_games_skips_unsolvable_and_errors_on_a_missing_split(train_games, tmp_path):
    root = tmp_path / "root"
    _copy_game(train_games[0], root / "json_2.1.1" / "train" / "task-a" / "trial_1")
    _copy_game(train_games[0], root / "json_2.1.1" / "train" / "task-b" / "trial_1", solvable=False)
    assert [g.parent.parent.name for g in find_games(root, "train")] == ["task-a"]
    with pytest.raises(FileNotFoundError, match="valid_unseen"):
        find_games(root, "valid_unseen")


def test_textworld_parse_cache_plays_exactly_as_the_parsers(train_games, monkeypatch):
    """With textworld's parsers behind a3t's cache (installed with a3t.envs.alfworld) every
    observation and admissible command is what the plain parsers give."""
    import random

    from textworld import logic
    from textworld.envs.pddl import logic as pddl_logic
    from textworld.envs.pddl import textgen

    from a3t.envs import textworld_cache

    def play(game):
        env, rng = AlfWorldEnv(game, max_steps=30), random.Random(str(game))
        seen = [env.reset().observation, env.admissible_actions]
        for action in env.game.walkthrough[:3] + [None] * 6 + env.game.walkthrough:
            step = env.step(action or rng.choice(env.admissible_actions))
            seen += [step.observation, env.admissible_actions]
            if step.done:
                break
        return seen

    caches = textworld_cache.install()
    before = sum(c.hits for c in caches)
    cached = [play(game) for game in train_games]
    assert sum(c.hits for c in caches) > before
    for module, cache in zip((textgen, pddl_logic, logic), caches):
        monkeypatch.setattr(module, "_parse_and_convert", cache.parse)
    assert [play(game) for game in train_games] == cached
