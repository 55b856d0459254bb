"""What the pipeline needs to know about an environment: one object per environment.

The pipeline, evaluation, the CLI and the flows ask ``env_spec(cfg.env.name)`` for a split's
tasks, the walkthroughs round 0 annotates, the splits to evaluate and the held-out one, what is
versioned, and whether there are games to generate, instead of testing the environment's name.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from a3t.config import Config, WebShopConfig
    from a3t.envs.base import PageFormat, Task


def spread_over_task_types(games: list[Path], n: int | None) -> list[Path]:
    """The first n games taking each task type in turn (games are sorted by task folder,
    whose name starts with the task type), so a small n still covers every type."""
    by_type: dict[str, list[Path]] = defaultdict(list)
    for game in games:
        by_type[game.parent.parent.name.split("-")[0]].append(game)
    queues = [list(q) for _, q in sorted(by_type.items())]
    picked = []
    while queues and (n is None or len(picked) < n):
        queues = [q for q in queues if q]
        for q in queues:
            if n is not None and len(picked) >= n:
                break
            picked.append(q.pop(0))
    return picked


class AlfWorldSpec:
    name = "alfworld"
    # ReAct and A3T give ALFWorld 50 steps (the paper profiles set it); the CPU default gives 12,
    # enough for generated small games (<= 10 steps by plan) and within the budget of `a3t run`.
    default_max_steps = 12
    splits = ("train", "valid_seen", "valid_unseen")
    eval_splits = ("valid_seen", "valid_unseen")
    held_out_split = "valid_unseen"  # the champion's split: games of rooms never trained in
    scored = False  # the reward is 0 or 1: success rates say it all
    has_games = True  # generated into the workspace (games.root) and versioned with the data

    def tasks(self, cfg: Config, games_root: Path, split: str, limit: int | None = None) -> list[Task]:
        """The first ``limit`` games of a split under ``games_root``, spread over task types (sorted
        games are grouped by type: the first N would all be of one)."""
        from a3t.envs.alfworld import find_games
        from a3t.rollout import task_for

        return [task_for(g) for g in spread_over_task_types(find_games(games_root, split), limit)]

    def walkthroughs(self, cfg: Config, games_root: Path, split: str, count: int | None) -> list[Task]:
        """The planner's walkthroughs of the first ``count`` games, with ``pipeline.walkthrough_detours``
        searches first (a3t.annotate)."""
        from a3t.annotate import walkthrough_tasks
        from a3t.envs.alfworld import find_games

        games = spread_over_task_types(find_games(games_root, split), count)
        return walkthrough_tasks(games, cfg.env.phrasing, cfg.pipeline.walkthrough_detours, cfg.env.max_steps,
                                 cfg.rollout.seed)

    def versioned_paths(self, cfg: Config, root: Path, trajectories: Path) -> list[Path]:
        """The trajectories, and the games when they live in the workspace (not $ALFWORLD_DATA)."""
        games = root / cfg.games.root
        return [games, trajectories] if games.resolve().is_relative_to(root.resolve()) else [trajectories]

    def check(self, cfg: Config) -> None:
        """Settings that contradict each other for this environment (none for ALFWorld)."""

    def page_format(self, configured: PageFormat) -> PageFormat | None:
        """How the prompt renders pages: ALFWorld has none."""
        return None


def webshop_tasks(shop: WebShopConfig, split: str, limit: int | None = None) -> list[Task]:
    """The first ``limit`` goals of a WebShop split: the local shop's (<split>/<index>), or the
    WebShop server's sessions (fixed_<index>) when ``shop.server_url`` is set."""
    from a3t.envs import shop_site
    from a3t.envs.base import Task
    from a3t.envs.webshop_server import server_task_ids

    try:
        ids = server_task_ids(split, limit) if shop.server_url else shop_site(shop).catalog.task_ids(split)[:limit]
    except KeyError as e:  # an unknown split: the message names the splits there are
        raise ValueError(e.args[0]) from None
    return [Task(task_id, None, shop=shop) for task_id in ids]


class WebShopSpec:
    name = "webshop"
    default_max_steps = 15  # ReAct's WebShop harness
    splits = ("train", "test")
    eval_splits = ("test",)
    held_out_split = "test"
    scored = True  # WebShop's score (100 x the mean reward) beside the success rate, as the paper's table
    has_games = False  # the shop is built in process from its settings

    def tasks(self, cfg: Config, games_root: Path | None, split: str, limit: int | None = None) -> list[Task]:
        return webshop_tasks(cfg.webshop, split, limit)

    def walkthroughs(self, cfg: Config, games_root: Path | None, split: str, count: int | None) -> list[Task]:
        """The oracle's walkthroughs of the first ``count`` goals (a3t.annotate)."""
        from a3t.annotate import webshop_walkthrough_tasks

        return webshop_walkthrough_tasks(cfg.webshop, [t.task_id for t in self.tasks(cfg, None, split, count)])

    def versioned_paths(self, cfg: Config, root: Path, trajectories: Path) -> list[Path]:
        """The trajectories only: the generated shop is rebuilt from its settings (logged with the
        config); WebShop's own files and server are the user's."""
        return [trajectories]

    def page_format(self, configured: PageFormat) -> PageFormat | None:
        return configured

    def check(self, cfg: Config) -> None:
        if cfg.webshop.server_url and cfg.pipeline.annotate_walkthroughs:
            raise ValueError("pipeline.annotate_walkthroughs: a WebShop server keeps its goals to itself, so there "
                             "is no oracle walkthrough to annotate; set pipeline.annotate_walkthroughs=0")


_SPECS = {"alfworld": AlfWorldSpec(), "webshop": WebShopSpec()}
ENV_NAMES = tuple(_SPECS)


def env_spec(name: str) -> AlfWorldSpec | WebShopSpec:
    """The environment called ``name`` (``env.name``)."""
    return _SPECS[name]
