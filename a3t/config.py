"""One configuration object for every a3t command: YAML file + ``key=value`` overrides.

Each field says what it is for; defaults that come from the A3T paper or ReAct say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GamesConfig(_Section):
    root: Path = Field(
        Path("data/games"),
        description="Where games live, in the official ALFWorld layout (<root>/json_2.1.1/<split>/...). "
        "Point it at $ALFWORLD_DATA to use the official games.",
    )
    seed: int = Field(0, description="Seed of the game generator: the same seed gives the same games.")
    size: Literal["small", "alfworld"] = Field(
        "small",
        description="Room size of generated games: 'small' (<= 8 receptacles, short prompts for CPU models) "
        "or 'alfworld' (every receptacle of the floor plan and many objects, like the official games).",
    )
    train: int = Field(30, ge=0, description="Number of generated train games (5 per task type).")
    valid_seen: int = Field(12, ge=0, description="Number of generated valid_seen games (train floor plans).")
    valid_unseen: int = Field(
        12, ge=0, description="Number of generated valid_unseen games (floor plans that train never uses)."
    )
    plan_timeout_s: float = Field(
        20.0, gt=0, description="Seconds the planner may spend on one game before the game is re-sampled."
    )
    workers: int = Field(2, ge=1, description="Processes that generate games in parallel.")

    def counts(self) -> dict[str, int]:
        return {"train": self.train, "valid_seen": self.valid_seen, "valid_unseen": self.valid_unseen}


class EnvConfig(_Section):
    phrasing: Literal["put", "move"] = Field(
        "put",
        description="How the put-action reads: 'put X in/on Y' (ReAct-era games, the paper's prompts and "
        "trajectories) or 'move X to Y' (alfworld >= 0.4).",
    )
    max_steps: int = Field(50, ge=1, description="Step limit of an episode (ReAct and A3T: 50 for ALFWorld).")


class Config(_Section):
    games: GamesConfig = Field(default_factory=GamesConfig, description="Game generation and location.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="The ALFWorld environment.")


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is a value, not a section")
        tree = node
    tree[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            _set(tree, key.strip(), yaml.safe_load(value) if value else "")
        except yaml.YAMLError:
            _set(tree, key.strip(), value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        source = " + ".join(([str(path)] if path is not None else []) + (["overrides"] if overrides else [])) or "config"
        problems = []
        for err in e.errors():
            where = ".".join(str(part) for part in err["loc"])
            problem = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {problem} (got {err['input']!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
