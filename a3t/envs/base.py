"""The environment API every a3t part uses (ALFWorld and WebShop).

Scalar, not batched: one episode per object. Parallelism lives in the rollout engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class TerminalReason(str, Enum):
    WON = "won"
    STEP_LIMIT = "step_limit"
    PURCHASED = "purchased"  # WebShop: bought a product that is not a full match (0 <= reward < 1)
    NO_ACTION = "no_admissible_action"  # the state offered no action: the rollout ends the episode


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
