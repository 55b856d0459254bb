"""Action sequences to annotate with ActRe: planner walkthroughs (WebShop: an oracle's) or a
user's recorded episodes.

The rollout engine plays each sequence as a scripted episode: every thought comes from
ActRe, and the replay through the environment says whether the sequence wins.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from a3t.config import WebShopConfig
from a3t.envs.alfworld import AlfWorldEnv, GameFileError, load_game
from a3t.envs.alfworld_reasons import parse_goal
from a3t.envs.base import Phrasing, Task, convert_action
from a3t.rollout import task_for


def walkthrough_tasks(games: list[Path], phrasing: Phrasing, search_detours: int = 0, max_steps: int = 50,
                      seed: int = 0) -> list[Task]:
    """One scripted task per game, from the walkthrough stored in the game file; with
    ``search_detours``, up to that many searches of other receptacles first (searching_walkthrough)."""
    tasks = []
    for game in games:
        walkthrough = load_game(game, phrasing).walkthrough
        if not walkthrough:
            raise GameFileError(f"{game}: no walkthrough stored to annotate")
        if search_detours:
            rng = random.Random(f"{seed}:{task_for(game).task_id}")
            walkthrough = searching_walkthrough(game, phrasing, search_detours, max_steps, rng)
        tasks.append(Task(task_for(game).task_id, game, tuple(walkthrough)))
    return tasks


def searching_walkthrough(game: Path, phrasing: Phrasing, detours: int, max_steps: int, rng: random.Random,
                          tries: int = 8) -> list[str]:
    """The planner's walkthrough with a search before it: the planner knows where the object is
    and goes straight there, so a policy that learns only from its walkthroughs never sees a
    receptacle without the object, and says "Here is a pen" wherever it looks. This one first
    looks in 0 to ``detours`` other receptacles of the room (opening the closed ones) that do
    not hold an object of the task's kind, then follows the plan. Played through the game to
    check it still wins within ``max_steps``; the plain walkthrough if no sampled search does."""
    plan = load_game(game, phrasing).walkthrough or []
    env = AlfWorldEnv(game, phrasing=phrasing, max_steps=10**6)
    first = env.reset()
    goal = parse_goal(first.task)
    receptacles = re.findall(r"\ban? (\w+ \d+)", first.observation.split("Your task is to:")[0])
    places = [r for r in receptacles if plan and f"go to {r}" != plan[0]]
    for _ in range(tries if goal and places else 0):
        count = rng.randint(0, min(detours, len(places)))
        if count == 0:
            return plan
        script, clean = [], True
        for place in rng.sample(places, count):
            observation = env.step(f"go to {place}").observation
            script.append(f"go to {place}")
            if f"{place} is closed" in observation:
                observation = env.step(f"open {place}").observation
                script.append(f"open {place}")
            clean = clean and not re.search(rf"\b{goal.object} \d", observation)  # found one: not a search
        won = False
        for action in plan:
            step = env.step(action)
            won = step.won
        if clean and won and len(script) + len(plan) <= max_steps:
            return script + plan
        env.reset()
    return plan


def webshop_walkthrough_tasks(shop: WebShopConfig, task_ids: list[str]) -> list[Task]:
    """One scripted task per WebShop goal of the local shop: an oracle's actions (search the goal
    product's title, click it, choose the goal's options, buy), which win with reward 1."""
    from a3t.envs import shop_site
    from a3t.envs.webshop import walkthrough

    if shop.server_url:
        raise ValueError("a WebShop server keeps its goals to itself: there are no oracle walkthroughs to annotate "
                         "(unset webshop.server_url to annotate the local shop's)")
    site = shop_site(shop)
    return [Task(task_id, None, tuple(walkthrough(site, site.catalog.goal(task_id))), shop) for task_id in task_ids]


def recorded_tasks(path: Path, phrasing: Phrasing) -> list[Task]:
    """Tasks from a JSONL file of recorded episodes: {"game": PATH, "actions": [...]} per line.
    Relative game paths are read from the file's folder. Errors name file:line."""
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            game, actions = Path(record["game"]), record["actions"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{path}:{number}: expected {{"game": PATH, "actions": [...]}} ({e})') from None
        if not isinstance(actions, list) or not actions or not all(isinstance(a, str) for a in actions):
            raise ValueError(f"{path}:{number}: actions must be a non-empty list of strings")
        game = game if game.is_absolute() else path.parent / game
        load_game(game, phrasing)  # a missing or broken game fails here, with its name
        base = task_for(game).task_id
        tasks.append(Task(f"{base}/recorded{number}", game, tuple(convert_action(a, phrasing) for a in actions)))
    return tasks
