"""Trajectory records and the JSONL store they live in.

One JSON object per episode, one line per object. An episode is appended whole, in a
single write, when it ends; a rerun skips episodes whose id is already in the file, so
a crash loses at most the episodes in flight and never duplicates one. A line that a
crash cut short (the last line, without its newline) is moved to a quarantine file
beside the store when the store is next opened, so nothing is silently dropped.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from a3t.envs.base import TerminalReason

SCHEMA_VERSION = 1
Source = Literal["policy", "explored", "annotated"]


class StepRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thought: str
    action: str
    observation: str = Field(description="What the environment answered to the action.")
    explored: bool = Field(False, description="The action was sampled (A3T exploration), the thought written by ActRe.")
    valid: bool = Field(True, description="The action was admissible.")


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    episode_id: str = Field(description="Unique per store: task, round and attempt.")
    env: Literal["alfworld", "webshop"] = Field("alfworld", description="The environment the episode was played in.")
    task_id: str = Field(description="ALFWorld: the game, relative to the games root; WebShop: the goal "
                         "(<split>/<index>, or fixed_<index> on a WebShop server). Groups a task's attempts.")
    game: str = Field("", description="ALFWorld: path of the game file; WebShop: empty.")
    task_type: str
    task: str
    round: int = 0
    attempt: int = Field(0, description="0 for the first attempt at a task, k for its k-th retry.")
    source: Source
    initial_observation: str
    steps: list[StepRecord]
    reward: float
    success: bool = Field(description="Binarized reward: ALFWorld won; WebShop reward == 1.")
    terminal_reason: TerminalReason = Field(description="Why the episode ended: won, step_limit, purchased "
                                            "(WebShop), no_admissible_action.")
    model: str
    adapter: str | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds: wall, llm, env.")
    tokens: dict[str, int] = Field(default_factory=dict, description="prompt and completion tokens.")
    weight: float | None = Field(None, description="Set by the filter (a3t.filter) in a round's train_set.jsonl: "
                                 "the factor on this trajectory's log-likelihood under the round's loss.")
    baseline: float | None = Field(None, description="Set by the filter: the mean reward of this task's "
                                   "trajectories (all rounds), which the weight was computed against.")


class TrajectoryFileError(ValueError):
    """A line of a trajectory file that is not a valid record; the message has file:line."""


class TrajectoryWriteError(OSError):
    """An episode could not be written (the disk is full, say); the store's file is unchanged."""


class TrajectoryStore:
    """Append-only JSONL file of Trajectory records, keyed by episode_id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.quarantine = self.path.with_name(self.path.name + ".quarantine")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_tail()
        self._ids = {t.episode_id for t in self.read(on_error="skip")}

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def append(self, trajectory: Trajectory) -> bool:
        """Write one episode; False (and nothing written) if its id is already stored."""
        if trajectory.episode_id in self._ids:
            return False
        line = (trajectory.model_dump_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):  # one write of one whole line, or none
                    raise OSError(errno.ENOSPC, "only part of the line was written")
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, size)  # no torn line: the file is what it was
                raise TrajectoryWriteError(
                    f"{self.path}: episode {trajectory.episode_id} not written ({e.strerror or e}); the file "
                    f"holds the {len(self._ids)} episodes it held, and a rerun resumes after them"
                ) from e
        finally:
            os.close(fd)
        self._ids.add(trajectory.episode_id)
        return True

    def read(self, on_error: Literal["raise", "skip", "quarantine"] = "raise") -> Iterator[Trajectory]:
        """Every record in file order. A bad line raises (with file:line), is skipped, or is
        copied to the quarantine file and skipped."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield Trajectory.model_validate_json(line)
                except ValidationError as e:
                    problem = e.errors()[0]
                    where = ".".join(str(p) for p in problem["loc"]) or "line"
                    message = f"{self.path}:{number}: not a trajectory record ({where}: {problem['msg']})"
                    if on_error == "raise":
                        raise TrajectoryFileError(message) from None
                    if on_error == "quarantine":
                        self._quarantine(line, message)

    def _quarantine(self, line: str, reason: str) -> None:
        entry = json.dumps({"reason": reason, "line": line.rstrip("\n")}) + "\n"
        if self.quarantine.exists() and entry in self.quarantine.read_text(encoding="utf-8"):
            return  # reported by an earlier read
        with self.quarantine.open("a", encoding="utf-8") as f:
            f.write(entry)

    def _repair_torn_tail(self) -> None:
        """A crash during a write can leave a last line without its newline: move it aside."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        number = data.count(b"\n") + 1
        self._quarantine(data[start:].decode("utf-8", errors="replace"), f"{self.path}:{number}: cut short by a crash")
        with self.path.open("r+b") as f:
            f.truncate(start)
