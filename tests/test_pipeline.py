"""The round's library steps that need no model: task selection, filtering, success rates,
round bookkeeping and the evaluation data root."""

import json
from pathlib import Path

from a3t.config import load_config
from a3t.pipeline import (
    TRAIN_SET,
    RoundSummary,
    Workspace,
    build_training_set,
    eval_games_root,
    remove_rounds_after,
    stage_rollout_config,
    train_tasks,
)
from a3t.envs.spec import spread_over_task_types
from a3t.evaluate import SplitRates, success_rates
from a3t.stats import wilson_interval
from a3t.trajectory import StepRecord, TrajectoryStore
from factories import make_trajectory

STEP = StepRecord(thought="I go.", action="go to desk 1", observation="You arrive at desk 1.")


def traj(task_id, success, round_=0, attempt=0, source="policy", task_type="pick_and_place_simple"):
    return make_trajectory(task_id, success, attempt, round_, source=source, task_type=task_type, steps=[STEP])


def test_spread_over_task_types_takes_each_type_in_turn():
    games = [Path(f"train/{kind}-Obj-None-Desk-{i}/trial/game.tw-pddl") for kind in ("a_type", "b_type", "c_type")
             for i in range(3)]
    picked = spread_over_task_types(games, 4)
    assert [g.parent.parent.name.split("-")[0] for g in picked] == ["a_type", "b_type", "c_type", "a_type"]
    assert len(spread_over_task_types(games, None)) == 9
    assert len(spread_over_task_types(games[:2], 5)) == 2


def test_success_rates_first_attempt_and_within_k():
    trajectories = [
        traj("t1", True), traj("t2", False), traj("t2", True, attempt=1),
        traj("t3", False, task_type="look_at_obj_in_light"), traj("t3", False, attempt=1, task_type="look_at_obj_in_light"),
        traj("t4", False), traj("t4", True, attempt=2),  # beyond k=2: does not count
    ]
    rates = success_rates(trajectories, attempts=2)
    assert rates.tasks == 4 and rates.k == 2
    assert rates.success == 0.25 and rates.success_within_k == 0.5
    pick = rates.per_type["pick_and_place_simple"]
    assert (pick.tasks, pick.successes, pick.success, pick.success_within_k) == (3, 1, 1 / 3, 2 / 3)
    assert rates.per_type["look_at_obj_in_light"].success_within_k == 0.0
    # Each rate comes with its 95% Wilson interval.
    assert rates.successes == 1
    assert rates.success_ci == wilson_interval(1, 4)
    assert rates.success_within_k_ci == wilson_interval(2, 4)
    assert pick.success_ci == wilson_interval(1, 3)
    assert rates.per_type["look_at_obj_in_light"].success_within_k_ci == wilson_interval(0, 1)
    # The round summary stores it as JSON and reads it back unchanged.
    assert SplitRates.model_validate(json.loads(json.dumps(rates.model_dump(mode="json")))) == rates


def test_evaluation_games_cover_every_task_type(tmp_path, monkeypatch):
    """eval.tasks games spread over the task types, not the first N sorted (all of one type)."""
    import a3t.pipeline as pipeline
    from a3t.evaluate import evaluate_policy

    split = tmp_path / "json_2.1.1" / "valid_unseen"
    for kind in ("look_at_obj", "pick_and_place", "pick_two_obj"):
        for i in range(3):
            game = split / f"{kind}-Obj-None-Desk-{i}" / "trial" / "game.tw-pddl"
            game.parent.mkdir(parents=True)
            game.write_text("{}")
    played = []

    def rollout(tasks, *args, **kwargs):
        played.append([t.task_id for t in tasks])

    monkeypatch.setattr("a3t.rollout.rollout", rollout)
    monkeypatch.setattr(pipeline, "load_agents", lambda cfg, adapter=None: (None, None))
    cfg = load_config(overrides=["eval.tasks=3", "eval.attempts=2"])
    rates = evaluate_policy(cfg, tmp_path, "valid_unseen", None, tmp_path / "eval.jsonl")
    assert rates.tasks == 0  # nothing played by the stub
    assert len(played) == 2 and played[0] == played[1]
    types = sorted(task_id.split("/")[-2].split("-")[0] for task_id in played[0])  # valid_unseen/<task>/trial
    assert types == ["look_at_obj", "pick_and_place", "pick_two_obj"]


def _train_games(root: Path, count: int) -> None:
    split = root / "games" / "json_2.1.1" / "train"
    for i in range(count):
        game = split / f"pick_and_place_simple-Obj-None-Desk-{i:02d}" / "trial" / "game.tw-pddl"
        game.parent.mkdir(parents=True)
        game.write_text("{}")


def test_each_round_plays_the_next_train_tasks_and_wraps_around(tmp_path):
    """After the walkthroughs' 2 games, blocks of 3 of the 10: rounds 1, 2, 3 (round 0 plays none)."""
    _train_games(tmp_path, 10)
    ws = Workspace(tmp_path, "c")
    cfg = load_config(overrides=["games.root=games", "pipeline.annotate_walkthroughs=2", "pipeline.train_tasks=3",
                                 "pipeline.play_round_0=false", "pipeline.new_train_tasks_each_round=true"])

    def played(round_):
        return [int(t.task_id.split("-")[-1].split("/")[0]) for t in train_tasks(cfg, ws, round_)]

    assert played(1) == [2, 3, 4] and played(2) == [5, 6, 7]
    assert played(3) == [8, 9, 2]  # the split runs out: from its start again
    same = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"new_train_tasks_each_round": False})})
    assert [t.task_id for t in train_tasks(same, ws, 3)] == [t.task_id for t in train_tasks(cfg, ws, 1)]


def test_first_plays_are_greedy_and_explore_nothing_only_when_asked():
    paper = load_config(profile="paper").rollout
    first = stage_rollout_config(paper, False)
    assert (first.temperature, first.p_explore, first.retry_max) == (paper.temperature, paper.p_explore, 0)
    cpu = load_config().rollout
    first, retries = stage_rollout_config(cpu, False), stage_rollout_config(cpu, True)
    assert (first.temperature, first.p_explore, first.retry_max) == (0.0, 0.0, 0)
    assert (retries.temperature, retries.p_explore) == (cpu.temperature, cpu.p_explore) and retries.p_explore > 0


def test_training_set_keeps_every_round_and_only_nonzero_weights(tmp_path):
    cfg = load_config(overrides=["train.loss=pg"])
    ws = Workspace(tmp_path, "camp")
    r0 = TrajectoryStore(ws.round_data(0) / "rollout-0.jsonl")
    for t in (traj("won", True, source="annotated"), traj("mixed", False), traj("never", False)):
        r0.append(t)
    r1 = TrajectoryStore(ws.round_data(1) / "rollout-0.jsonl")
    r1.append(traj("mixed", True, round_=1, source="explored"))
    r1.append(traj("never", False, round_=1))

    first = build_training_set(cfg, ws, 0)
    assert first["train_set_size"] == 1 and first["train_set"]["annotated"] == 1
    second = build_training_set(cfg, ws, 1)
    kept = [json.loads(line)["episode_id"] for line in (ws.round_data(1) / TRAIN_SET).read_text().splitlines()]
    # "mixed" failed in round 0 and won in round 1: its round-0 failure is now a negative example;
    # "never" has no success in any round: weight 0 under pg, left out.
    assert sorted(kept) == ["r0/mixed#a0", "r0/won#a0", "r1/mixed#a0"]
    assert second["train_set_rounds"] == [0, 1]
    assert second["collected"] == {"policy": 1, "explored": 1, "annotated": 0}
    # The training set itself is never read back as collected data.
    assert build_training_set(cfg, ws, 1)["train_set_size"] == 3


def test_training_set_stops_replaying_walkthroughs_once_rollouts_won_enough(tmp_path):
    cfg = load_config(overrides=["pipeline.stop_replaying_walkthroughs_at=2"])
    ws = Workspace(tmp_path, "camp")
    TrajectoryStore(ws.round_data(0) / "annotated.jsonl").append(traj("walked", True, source="annotated"))
    TrajectoryStore(ws.round_data(1) / "rollout-0.jsonl").append(traj("a", True, round_=1))
    TrajectoryStore(ws.round_data(2) / "rollout-0.jsonl").append(traj("b", True, round_=2, source="explored"))

    def learnt(round_):
        stats = build_training_set(cfg, ws, round_)
        kept = [json.loads(line)["episode_id"] for line in (ws.round_data(round_) / TRAIN_SET).read_text().splitlines()]
        return stats["rollout_wins"], stats["replays_walkthroughs"], sorted(kept)

    assert learnt(1) == (1, True, ["r0/walked#a0", "r1/a#a0"])  # one rollout win: fewer than 2
    assert learnt(2) == (2, False, ["r1/a#a0", "r2/b#a0"])  # two: the rollouts' wins alone
    unset = load_config(overrides=["pipeline.stop_replaying_walkthroughs_at=null"])
    assert build_training_set(unset, ws, 2)["train_set"]["annotated"] == 1
    assert load_config().pipeline.stop_replaying_walkthroughs_at == 24  # the CPU default


def test_rounds_finish_resume_and_roll_back(tmp_path):
    ws = Workspace(tmp_path, "camp")
    assert ws.next_round() == 0
    for k in (0, 1):
        ws.round_data(k).mkdir(parents=True)
        ws.finish_round(k, RoundSummary(round=k))
    (ws.round_run(2) / "train").mkdir(parents=True)  # round 2 crashed during training
    assert ws.finished_rounds() == [0, 1] and ws.next_round() == 2
    assert remove_rounds_after(ws, 0) == [1, 2]
    assert not ws.round_run(1).exists() and ws.next_round() == 1
    # Data rolled back by DVC (round folder gone) means the round is not finished either.
    ws.finish_round(1, RoundSummary(round=1))
    assert ws.next_round() == 2
    ws.round_data(1).rmdir()
    assert ws.next_round() == 1


def test_eval_root_prefers_official_data_only_when_present(tmp_path, monkeypatch):
    cfg = load_config()
    ws = Workspace(tmp_path, "camp")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "alfworld"))
    assert eval_games_root(cfg, ws) == tmp_path / "data" / "games"  # importing alfworld sets the variable
    (tmp_path / "alfworld" / "json_2.1.1").mkdir(parents=True)
    assert eval_games_root(cfg, ws) == tmp_path / "alfworld"
    cfg = load_config(overrides=[f"eval.games_root={tmp_path / 'mine'}"])
    assert eval_games_root(cfg, ws) == tmp_path / "mine"


def test_a_round_that_trained_nothing_keeps_the_previous_policy(tmp_path):
    from a3t.pipeline import policy_adapter

    ws = Workspace(tmp_path, "camp")
    assert policy_adapter(ws, -1) is None and policy_adapter(ws, 2) is None  # the base model
    ws.adapter(0).mkdir(parents=True)
    (ws.adapter(0) / "adapter_config.json").write_text("{}")
    assert policy_adapter(ws, 0) == ws.adapter(0)
    assert policy_adapter(ws, 2) == ws.adapter(0)  # rounds 1 and 2 had no success to train on


def test_the_train_command_trains_what_the_filter_keeps(tmp_path):
    """`a3t train` goes through the pipeline's train_policy: the filter's weights, an adapter,
    and a clear exit when nothing has a non-zero weight."""
    from typer.testing import CliRunner

    from a3t.orchestration.cli import app

    played = TrajectoryStore(tmp_path / "played.jsonl")
    for t in (traj("mixed", True), traj("mixed", False, attempt=1), traj("never", False)):
        played.append(t)
    out = tmp_path / "round_0"
    args = ["train", "-d", str(played.path), "--out", str(out), "--profile", "smoke", "train.loss=pg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 weighted trajectories (pg loss)" in result.output  # the success and its task's failure
    assert (out / "adapter" / "adapter_config.json").is_file()
    failures = TrajectoryStore(tmp_path / "failures.jsonl")
    failures.append(traj("never", False))
    result = CliRunner().invoke(app, ["train", "-d", str(failures.path), "--out", str(tmp_path / "none"),
                                      "--profile", "smoke"])
    assert result.exit_code == 1 and "0 weighted trajectories" in result.output


def test_the_champion_is_the_first_round_or_a_strictly_better_one():
    from a3t.evaluate import gate_score, is_new_champion

    assert is_new_champion(0.0, None) and is_new_champion(0.25, 0.2)
    assert not is_new_champion(0.2, 0.2) and not is_new_champion(0.1, 0.2)
    seen, unseen = (success_rates([make_trajectory("t", won)], 1) for won in (True, False))
    by_split = {"valid_seen": seen, "valid_unseen": unseen}
    assert gate_score(load_config(profile="smoke"), by_split) == ("valid_unseen", 0.0)  # the held-out split
    assert gate_score(load_config(), by_split) == ("valid_seen", 1.0)  # the CPU default gates on valid_seen
    assert gate_score(load_config(overrides=["env.name=webshop"]), {}) == ("test", 0.0)  # no valid_seen; not evaluated


def test_a_continued_round_trains_at_learning_rate_continued(tmp_path, monkeypatch):
    """A round that goes on from the last adapter trains at train.learning_rate_continued; round 0
    (and a round from the base model) at train.learning_rate."""
    import a3t.train
    from a3t.pipeline import train_policy

    calls = []
    monkeypatch.setattr(a3t.train, "train_adapter",
                        lambda examples, base, out, t, epochs, init_adapter=None, device="cpu":
                        calls.append((t.learning_rate, init_adapter)) or {})
    cfg = load_config(profile="smoke", overrides=["train.from_base_each_round=false", "train.learning_rate=1e-3",
                                                  "train.learning_rate_continued=3e-4"])
    data = [traj("won", True)]
    train_policy(cfg, data, tmp_path / "r0", 0)
    train_policy(cfg, data, tmp_path / "r1", 1, previous=tmp_path / "r0" / "adapter")
    base = load_config(profile="smoke", overrides=["train.learning_rate_continued=3e-4"])  # from the base each round
    train_policy(base, data, tmp_path / "b1", 1, previous=tmp_path / "r0" / "adapter")
    assert calls == [(1e-3, None), (3e-4, tmp_path / "r0" / "adapter"), (base.train.learning_rate, None)]
