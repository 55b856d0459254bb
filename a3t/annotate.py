"""Action sequences to annotate with ActRe: planner walkthroughs (WebShop: an oracle's) or a
user's recorded episodes.

The rollout engine plays each sequence as a scripted episode: every thought comes from
ActRe, and the replay through the environment says whether the sequence wins.
"""

from __future__ import annotations

import json
from pathlib import Path

from a3t.config import WebShopConfig
from a3t.envs.alfworld import GameFileError, Phrasing, convert_action, load_game
from a3t.rollout import Task, task_for


def walkthrough_tasks(games: list[Path], phrasing: Phrasing) -> list[Task]:
    """One scripted task per game, from the walkthrough stored in the game file."""
    tasks = []
    for game in games:
        walkthrough = load_game(game, phrasing).walkthrough
        if not walkthrough:
            raise GameFileError(f"{game}: no walkthrough stored to annotate")
        tasks.append(Task(task_for(game).task_id, game, tuple(walkthrough)))
    return tasks


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
