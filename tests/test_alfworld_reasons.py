"""The plan's reasons (ActRe's fallback, and the walkthroughs' thoughts with
pipeline.walkthrough_reasons=plan) and the walkthroughs that search before they follow the plan."""

import random

import pytest

from a3t.annotate import searching_walkthrough, walkthrough_tasks
from a3t.envs.alfworld import AlfWorldEnv, find_games, load_game
from a3t.envs.alfworld_reasons import Goal, parse_goal, plan_reason


@pytest.mark.parametrize("task, goal", [
    ("put a clean mug in coffeemachine", Goal("mug", "coffeemachine", modifier="clean")),
    ("heat some egg and put it in garbagecan.", Goal("egg", "garbagecan", modifier="hot")),
    ("cool some lettuce and put it in fridge", Goal("lettuce", "fridge", modifier="cool")),
    ("put a hot cup in sinkbasin", Goal("cup", "sinkbasin", modifier="hot")),
    ("find two pencil and put them in desk", Goal("pencil", "desk", count=2)),
    ("put two cup in sinkbasin", Goal("cup", "sinkbasin", count=2)),
    ("put some book on shelf", Goal("book", "shelf")),
    ("look at cd under the desklamp", Goal("cd", lamp="desklamp")),
    ("examine the laptop with the floorlamp", Goal("laptop", lamp="floorlamp")),
])
def test_every_task_type_parses(task, goal):
    assert parse_goal(task) == goal


def test_a_sentence_of_no_task_type_gives_no_reason():
    assert parse_goal("buy a jacket") is None
    assert plan_reason("buy a jacket", [], "go to desk 1") is None


def test_reasons_follow_the_state_of_a_heat_task():
    task = "heat some apple and put it in garbagecan"
    episode = [
        ("go to cabinet 1", "You arrive at cabinet 1. The cabinet 1 is closed."),
        ("open cabinet 1", "You open the cabinet 1. The cabinet 1 is open. In it, you see a cup 1."),
        ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a apple 1, and a egg 2."),
        ("take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1."),
        ("go to microwave 1", "You arrive at microwave 1. The microwave 1 is closed."),
        ("heat apple 1 with microwave 1", "You heat the apple 1 using the microwave 1."),
        ("go to garbagecan 1", "You arrive at garbagecan 1. On the garbagecan 1, you see nothing."),
        ("put apple 1 in/on garbagecan 1", "You put the apple 1 in/on the garbagecan 1."),
    ]
    reasons = [plan_reason(task, episode[:k], action) for k, (action, _) in enumerate(episode)]
    assert reasons == [
        "I need a apple. I check the cabinet 1.",
        "I need a apple. I open the cabinet 1 to look inside.",
        "I need a apple. None there, I check the countertop 1.",
        "I need a apple. Here is one, I take the apple 1.",
        "I have the apple 1 to heat and put in the garbagecan. I go to the microwave 1 to heat it.",
        "I have the apple 1 to heat and put in the garbagecan. I heat the apple 1 with the microwave 1.",
        "I have the hot apple 1 for the garbagecan. I go to the garbagecan 1.",
        "I have the hot apple 1 for the garbagecan. I put the apple 1 in/on the garbagecan 1.",
    ]


def test_reasons_count_the_objects_of_a_two_object_task():
    task = "put two cup in sinkbasin"
    done = [("go to cabinet 1", "You arrive at cabinet 1. On the cabinet 1, you see a cup 1, and a cup 2."),
            ("take cup 1 from cabinet 1", "You pick up the cup 1 from the cabinet 1."),
            ("go to sinkbasin 1", "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing.")]
    assert plan_reason(task, done, "put cup 1 in/on sinkbasin 1") == (
        "I have the cup 1 for the sinkbasin. I put the cup 1 in/on the sinkbasin 1. One more to go.")
    done.append(("put cup 1 in/on sinkbasin 1", "You put the cup 1 in/on the sinkbasin 1."))
    # The sinkbasin now holds the first cup, so "None there" would be false: a plain check.
    assert plan_reason(task, done, "go to cabinet 1") == "I need a second cup. I check the cabinet 1."


def test_an_explored_action_gets_a_plain_reason_that_is_true():
    task = "put a clean mug in cabinet"
    holding = [("go to desk 1", "You arrive at desk 1. On the desk 1, you see a mug 2."),
               ("take mug 2 from desk 1", "You pick up the mug 2 from the desk 1.")]
    assert plan_reason(task, holding, "go to bed 1") == "I have the mug 2 to clean and put in the cabinet. I go to the bed 1."
    assert plan_reason(task, holding, "examine mug 2").endswith(". I look closely at the mug 2.")
    assert plan_reason(task, [], "look") == "I need a mug. I look around to see where I am."
    assert plan_reason(task, [], "take pen 1 from desk 1") == "I need a mug. I take the pen 1 from the desk 1."
    assert plan_reason("look at cd under the desklamp", [("take cd 1 from desk 1", "You pick up the cd 1 from the desk 1.")],
                       "use desklamp 1") == "I have the cd 1, I need the desklamp. I turn on the desklamp 1."


def test_searching_walkthrough_looks_elsewhere_first_and_still_wins(games_root):
    games = find_games(games_root, "train")
    searched = 0
    for seed, game in enumerate(games):
        plan = load_game(game).walkthrough
        script = searching_walkthrough(game, "put", detours=2, max_steps=len(plan) + 4, rng=random.Random(seed))
        assert script[-len(plan):] == plan and len(script) <= len(plan) + 4
        detour = script[: len(script) - len(plan)]
        searched += bool(detour)
        env = AlfWorldEnv(game)
        first = env.reset()
        goal = parse_goal(first.task)
        for action in detour:  # the search finds none of the task's objects
            step = env.step(action)
            assert step.valid and f"{goal.object} " not in step.observation.replace(first.task, "")
        for action in plan:
            step = env.step(action)
        assert step.won
    assert searched, "some walkthrough got a search"


def test_walkthrough_tasks_with_detours_are_seeded(games_root):
    games = find_games(games_root, "train")[:3]
    first = walkthrough_tasks(games, "put", search_detours=2, max_steps=12, seed=3)
    assert first == walkthrough_tasks(games, "put", search_detours=2, max_steps=12, seed=3)
    assert [t.script[-1] for t in first] == [load_game(g).walkthrough[-1] for g in games]


def test_round_0_annotates_searching_walkthroughs_with_the_plans_reasons(tmp_path, games_root, tiny_model_dir,
                                                                          monkeypatch):
    """pipeline.walkthrough_reasons=plan: every thought is the plan's reason, no LLM is asked, and
    every walkthrough (with its search) still wins."""
    from a3t import pipeline
    from a3t.config import load_config
    from a3t.llm.transformers_llm import TransformersLLM

    asked = []
    monkeypatch.setattr(TransformersLLM, "complete", lambda self, chats, *a, **k: asked.append(chats) or [])
    cfg = load_config(profile="smoke", overrides=[
        f"llm.model={tiny_model_dir}", f"games.root={games_root}", "pipeline.annotate_walkthroughs=6",
        "pipeline.walkthrough_reasons=plan", "pipeline.walkthrough_detours=2", "env.max_steps=14"])
    ws = pipeline.Workspace.of(cfg, tmp_path)
    stats = pipeline.annotate_walkthroughs(cfg, ws, 0)
    assert stats["episodes"] == stats["successes"] == 6 and not asked
    assert stats["actre_accepted"] == 0 and stats["actre_fallbacks"] > 0
    trajectories = list(pipeline.TrajectoryStore(ws.round_data(0) / "annotated.jsonl").read())
    assert any(t.steps[0].action != load_game(t.game).walkthrough[0] for t in trajectories), "some search first"
    for t in trajectories:
        played = [(s.action, s.observation) for s in t.steps]
        assert [s.thought for s in t.steps] == [plan_reason(t.task, played[:k], a) for k, (a, _) in enumerate(played)]
