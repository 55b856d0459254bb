"""The environment API every a3t part uses (ALFWorld and WebShop).

Scalar, not batched: one episode per object. Parallelism lives in the rollout engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from a3t.config import WebShopConfig

# ALFWorld: how the put-action reads: "put X in/on Y" (ReAct-era games) or "move X to Y" (alfworld >= 0.4).
Phrasing = Literal["put", "move"]
# WebShop: how a page reads: ReAct's harness ("react") or WebShop's text mode with [SEP] ("sep").
PageFormat = Literal["sep", "react"]


def convert_action(action: str, phrasing: Phrasing) -> str:
    """Translate one command between "move X to Y" and "put X in/on Y"."""
    if phrasing == "put":
        return re.sub(r"^move (.+) to (.+)$", r"put \1 in/on \2", action)
    return re.sub(r"^put (.+) in/on (.+)$", r"move \1 to \2", action)


class TerminalReason(str, Enum):
    WON = "won"
    STEP_LIMIT = "step_limit"
    PURCHASED = "purchased"  # WebShop: bought a product that is not a full match (0 <= reward < 1)
    NO_ACTION = "no_admissible_action"  # the state offered no action: the rollout ends the episode


@dataclass(frozen=True)
class Task:
    """One task to play: an ALFWorld game or a WebShop goal."""

    task_id: str  # ALFWorld: the game relative to its data root, e.g. train/<task>/<trial>; WebShop: the goal
    game: Path | None  # ALFWorld: the game file; None for WebShop
    script: tuple[str, ...] | None = None  # actions to annotate instead of asking the policy
    shop: WebShopConfig | None = None  # WebShop: the shop the goal is on (local or a server); None for ALFWorld

    @property
    def env(self) -> str:
        """The environment the task is played in (``env.name``)."""
        return "alfworld" if self.shop is None else "webshop"

    @property
    def page_format(self) -> PageFormat | None:
        """WebShop: how its pages read (its prompts show their example so); None for ALFWorld."""
        return None if self.shop is None else self.shop.observation_format


@dataclass(frozen=True)
class Reset:
    observation: str  # the first observation, the task text included
    task: str  # the task alone, e.g. "put a clean mug in coffeemachine"
    task_type: str


@dataclass(frozen=True)
class Step:
    observation: str
    reward: float
    done: bool
    won: bool
    valid: bool  # False when the action was not admissible (the engine answers "Nothing happens.")


class TextEnv(Protocol):
    max_steps: int

    def reset(self) -> Reset: ...

    def step(self, action: str) -> Step: ...

    @property
    def admissible_actions(self) -> list[str]: ...

    @property
    def steps_taken(self) -> int: ...

    @property
    def invalid_actions(self) -> int: ...

    @property
    def terminal_reason(self) -> TerminalReason | None: ...
