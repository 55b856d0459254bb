"""Text environments behind one scalar API (a3t.envs.base.TextEnv), and the one place where an
episode's environment is built and its A3T exploration sampled, whichever environment it is.

Environment modules are imported when first needed: ALFWorld's engine (textworld) is slow to import
and WebShop's search index needs bm25s, and a run uses one of them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from a3t.config import EnvConfig, WebShopConfig
    from a3t.envs.base import Task, TextEnv
    from a3t.envs.webshop import WebShopSite


def shop_site(shop: WebShopConfig) -> WebShopSite:
    """The local shop of a webshop section (built once per process): WebShop's own files, or the
    generated catalogue."""
    from a3t.envs.webshop import webshop_site

    def text(path):
        return None if path is None else str(path)

    return webshop_site(text(shop.items_path), text(shop.attributes_path), text(shop.human_instructions_path),
                        shop.seed, shop.products, shop.train_goals, shop.test_goals)


def make_env(task: Task, env_cfg: EnvConfig, max_steps: int) -> TextEnv:
    """The environment of one episode: the task's ALFWorld game, or its WebShop goal on the local
    shop or on the WebShop server that the task's shop names."""
    if task.shop is None:
        from a3t.envs.alfworld import AlfWorldEnv

        return AlfWorldEnv(task.game, phrasing=env_cfg.phrasing, max_steps=max_steps)
    if task.shop.server_url:
        from a3t.envs.webshop_server import WebShopServerEnv

        return WebShopServerEnv(task.shop.server_url, session=task.task_id, max_steps=max_steps,
                                observation_format=task.shop.observation_format,
                                timeout_s=task.shop.server_timeout_s)
    from a3t.envs.webshop import WebShopEnv

    return WebShopEnv(shop_site(task.shop), task.task_id, max_steps=max_steps,
                      observation_format=task.shop.observation_format)


def action_choices(env: TextEnv) -> tuple[str, list[str] | None]:
    """What a constrained action is chosen from: (the start written for the model, the choices).
    ALFWorld: the admissible commands (without "help", which only prints the command list);
    WebShop: the clickables as click[...], or, on the search page, any search: the action starts
    "search[" and the model writes the key words (choices None: free text up to "]")."""
    from a3t.envs.webshop import BrowserEnv

    if isinstance(env, BrowserEnv) and env.has_search_bar:
        return "search[", None
    return "", usable_actions(env)


def usable_actions(env: TextEnv) -> list[str]:
    """The actions worth taking in the state: the admissible ones without ALFWorld's "help"."""
    return [a for a in env.admissible_actions if a != "help"]


def explore_action(env: TextEnv, rng: random.Random) -> str:
    """A3T's exploration: an action sampled from the environment's valid ones. ALFWorld: an
    admissible command ("help" only prints the command list: sampling it wastes a step);
    WebShop: a search built from the instruction on the search page, else a clickable."""
    from a3t.envs.webshop import BrowserEnv
    from a3t.envs.webshop import explore_action as explore_webshop

    if isinstance(env, BrowserEnv):
        return explore_webshop(env, rng)
    return rng.choice(usable_actions(env))
