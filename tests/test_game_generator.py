import json
import shutil
import subprocess
import sys
from pathlib import Path

import alfworld.gen.constants as C
import pytest
from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

from a3t.envs.alfworld import AlfWorldEnv, find_games, load_game
from a3t.envs.alfworld_gen import (
    MAX_PLAN_STEPS,
    SPLITS,
    TASK_TYPES,
    game_jobs,
    generate_games,
    load_floor_plans,
    split_floor_plans,
)


def _scene(game):
    return json.loads((game.parent / "traj_data.json").read_text())["scene"]["scene_num"]


def test_floor_plans_come_from_the_alfworld_wheel():
    plans = load_floor_plans()
    assert len(plans) == 120
    kitchen = plans[1]
    assert kitchen.room == "Kitchen" and kitchen.receptacles["Cabinet"] > 1
    assert "Apple" in kitchen.objects and "Fridge" in kitchen.receptacles


def test_valid_unseen_floor_plans_are_never_used_by_train():
    splits = split_floor_plans(load_floor_plans())
    unseen = {p.number for p in splits["valid_unseen"]}
    assert unseen and unseen == set(C.TEST_SCENE_NUMBERS)
    assert not unseen & {p.number for p in splits["train"]}
    assert {p.number for p in splits["valid_seen"]} == {p.number for p in splits["train"]}


def test_generated_splits_share_no_floor_plan(games_root):
    train = {_scene(g) for g in find_games(games_root, "train")}
    unseen = {_scene(g) for g in find_games(games_root, "valid_unseen")}
    assert train and unseen and not train & unseen


def test_games_are_in_the_official_layout_with_a_stored_walkthrough(games_root):
    for game in find_games(games_root, "train"):
        trial, task_dir = game.parent, game.parent.parent
        assert task_dir.parent == games_root / "json_2.1.1" / "train"
        assert task_dir.name.split("-")[0] in TASK_TYPES
        assert {p.name for p in trial.iterdir()} == {"game.tw-pddl", "traj_data.json", "initial_state.pddl"}
        data = json.loads(game.read_text())
        assert data["solvable"] is True and 0 < len(data["walkthrough"]) <= MAX_PLAN_STEPS
        assert data["pddl_problem"] == (trial / "initial_state.pddl").read_text()
        assert "UNKNOWN GOAL" not in data["grammar"]


def test_same_seed_same_games(tmp_path):
    counts = {"train": 2, "valid_unseen": 1}
    for name in ("a", "b"):
        list(generate_games(game_jobs(tmp_path / name, counts, seed=7, size="small"), workers=1))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 9
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    # A different seed gives different games.
    list(generate_games(game_jobs(tmp_path / "c", counts, seed=8, size="small"), workers=1))
    files_c = sorted(p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert files_c != files_a


def test_a_rerun_skips_games_already_written(tmp_path):
    jobs = game_jobs(tmp_path, {"train": 2}, seed=3, size="small")
    first = [written for _, _, written in generate_games(jobs, workers=1)]
    second = [written for _, _, written in generate_games(jobs, workers=1)]
    assert first == [True, True] and second == [False, False]


def test_alfworld_size_games_are_bigger(tmp_path):
    small = game_jobs(tmp_path / "s", {"train": 1}, seed=0, size="small")
    large = game_jobs(tmp_path / "l", {"train": 1}, seed=0, size="alfworld")
    (_, g_small, _), = generate_games(small)
    (_, g_large, _), = generate_games(large)
    n_small = len(AlfWorldEnv(g_small).reset().observation)
    n_large = len(AlfWorldEnv(g_large).reset().observation)
    assert n_large > n_small


def test_games_written_by_alfworld_generate_load_and_play(games_root, tmp_path):
    """The official tool (alfworld-generate) builds game.tw-pddl from traj_data.json and
    initial_state.pddl; a3t must load and play what it writes."""
    source = tmp_path / "alfred" / "json_2.1.1"
    for game in find_games(games_root, "train"):
        trial = source / "train" / game.parent.parent.name / game.parent.name
        trial.mkdir(parents=True)
        for name in ("traj_data.json", "initial_state.pddl"):
            shutil.copy(game.parent / name, trial / name)
    out = tmp_path / "alfworld" / "json_2.1.1"
    tool = shutil.which("alfworld-generate", path=str(Path(sys.executable).parent))
    # --end: the tool's default (-1) slices off the last game it finds.
    subprocess.run(
        [sys.executable, tool, "--data_path", str(source), "--save_path", str(out), "--end", "1000000",
         "--domain", ALFRED_PDDL_PATH, "--grammar", ALFRED_TWL2_PATH, "--expert_type", "planner"],
        check=True, capture_output=True, timeout=600,
    )
    games = find_games(out.parent, "train")
    assert len(games) == len(TASK_TYPES)
    for game in games:
        assert "generator" in json.loads((game.parent / "traj_data.json").read_text())
        env = AlfWorldEnv(game, phrasing="put")
        env.reset()
        for action in load_game(game).walkthrough:
            step = env.step(action)
        assert step.won, game


def test_unknown_split_or_size_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        game_jobs(tmp_path, {"test": 1}, seed=0, size="small")
    with pytest.raises(ValueError, match="unknown game size"):
        game_jobs(tmp_path, {"train": 1}, seed=0, size="huge")
    assert set(SPLITS) == {"train", "valid_seen", "valid_unseen"}
