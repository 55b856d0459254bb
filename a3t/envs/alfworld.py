"""ALFWorld through its real engine: textworld's PddlEnv with alfworld's wrappers.

Games are read from the official layout
``<root>/json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/game.tw-pddl`` with the
task type from the ``traj_data.json`` beside each game, so the 134 official valid_unseen
games play with no conversion when ``ALFWORLD_DATA`` points at them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
from textworld.envs import PddlEnv

from a3t.envs import textworld_cache
from a3t.envs.base import Phrasing, Reset, Step, TerminalReason, convert_action

textworld_cache.install()  # the engine parses the same texts every step: once is enough

# alfworld 0.4 says "move X to Y"; the ReAct-era games, prompts and the A3T paper's
# trajectories say "put X in/on Y". The grammar is text, so a game can be switched to
# either phrasing when it is loaded. Each pair is (alfworld >= 0.4, ReAct era).
_PHRASES = (
    ('template :: "move {o} to {r}";', 'template :: "put {o} in/on {r}";'),
    ("You move the {o.name} to the {r.name}.", "You put the {o.name} in/on the {r.name}."),
    ("move (object) to (receptacle):  place", "put (object) in/on (receptacle): place"),
)
_REQUIRED_KEYS = ("pddl_domain", "grammar", "pddl_problem")


class GameFileError(ValueError):
    """A game file that is missing, not JSON, or whose PDDL or metadata is unusable."""


@dataclass(frozen=True)
class GameFile:
    path: Path
    task_type: str
    data: dict  # the game.tw-pddl document, grammar already in the requested phrasing
    walkthrough: list[str] | None  # the stored plan, in the requested phrasing


def set_phrasing(grammar: str, phrasing: Phrasing) -> str:
    """Rewrite a game's grammar so its put-action reads in the given phrasing."""
    for move, put in _PHRASES:
        grammar = grammar.replace(put, move) if phrasing == "move" else grammar.replace(move, put)
    return grammar


def load_game(path: str | Path, phrasing: Phrasing = "put") -> GameFile:
    """Read and check a game.tw-pddl and its traj_data.json; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GameFileError(f"{path}: game file not found") from None
    except json.JSONDecodeError as e:
        raise GameFileError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise GameFileError(f"{path}: not a text file ({e.reason})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), str) for k in _REQUIRED_KEYS):
        raise GameFileError(f"{path}: not a game file (needs the text fields {', '.join(_REQUIRED_KEYS)})")
    traj_path = path.parent / "traj_data.json"
    try:
        task_type = json.loads(traj_path.read_text())["task_type"]
    except FileNotFoundError:
        raise GameFileError(f"{traj_path}: traj_data.json not found beside the game") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GameFileError(f"{traj_path}: no task_type in it ({e})") from None
    data = dict(data, grammar=set_phrasing(data["grammar"], phrasing))
    walkthrough = data.get("walkthrough")
    if walkthrough is not None:
        walkthrough = [convert_action(a, phrasing) for a in walkthrough]
    return GameFile(path=path, task_type=task_type, data=data, walkthrough=walkthrough)


def find_games(root: str | Path, split: str) -> list[Path]:
    """The solvable games of one split under an ALFWorld data root, in a stable order."""
    split_dir = Path(root) / "json_2.1.1" / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such split directory (expected the official ALFWorld layout)")
    games = []
    for game in sorted(split_dir.glob("*/*/game.tw-pddl")):
        # ALFWorld skips these kinds of ALFRED trials; so do we (alfred_tw_env.py).
        if "movable" in game.parent.parent.name or "Sliced" in game.parent.parent.name:
            continue
        try:
            solvable = json.loads(game.read_text()).get("solvable", True)
        except json.JSONDecodeError:
            solvable = True  # let load_game report the broken file when it is played
        if solvable:
            games.append(game)
    return games


def _engine(request_walkthrough: bool = False) -> textworld.Environment:
    infos = textworld.EnvInfos(won=True, admissible_commands=True, policy_commands=request_walkthrough)
    return AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))


class AlfWorldEnv:
    """One ALFWorld game behind the a3t environment API (a3t.envs.base.TextEnv)."""

    def __init__(self, game: str | Path | GameFile, phrasing: Phrasing = "put", max_steps: int = 50):
        # max_steps: ReAct and A3T give an ALFWorld episode 50 steps.
        self.game = game if isinstance(game, GameFile) else load_game(game, phrasing)
        self.phrasing = phrasing
        self.max_steps = max_steps
        self._env = _engine()
        try:
            self._env.load(self.game.data)
        except (Exception, SystemExit) as e:  # Fast Downward's translator exits on bad PDDL
            raise GameFileError(f"{self.game.path}: the PDDL does not parse ({type(e).__name__}: {e})") from None
        self._state = None
        self._steps = 0
        self._invalid = 0
        self._reason: TerminalReason | None = None

    @property
    def admissible_actions(self) -> list[str]:
        return list(self._state["admissible_commands"]) if self._state is not None else []

    @property
    def steps_taken(self) -> int:
        return self._steps

    @property
    def invalid_actions(self) -> int:
        return self._invalid

    @property
    def terminal_reason(self) -> TerminalReason | None:
        return self._reason

    def reset(self) -> Reset:
        self._state = self._env.reset()
        self._steps, self._invalid, self._reason = 0, 0, None
        # Drop the "-= Welcome to TextWorld, ALFRED! =-" banner, as the ReAct prompts do.
        observation = self._state["feedback"].split("\n\n", 1)[-1].strip()
        match = re.search(r"Your task is to: (.*?)\.?$", observation)
        return Reset(observation=observation, task=match.group(1) if match else "", task_type=self.game.task_type)

    def step(self, action: str) -> Step:
        if self._state is None or self._reason is not None:
            raise RuntimeError("step() before reset() or after the episode ended")
        action = action.strip()
        valid = action in self._state["admissible_commands"]
        self._state, _, _ = self._env.step(action)  # an inadmissible action: "Nothing happens."
        self._steps += 1
        self._invalid += not valid
        won = bool(self._state["won"])
        if won:
            self._reason = TerminalReason.WON
        elif self._steps >= self.max_steps:
            self._reason = TerminalReason.STEP_LIMIT
        return Step(
            observation=self._state["feedback"].strip(),
            reward=1.0 if won else 0.0,
            done=self._reason is not None,
            won=won,
            valid=valid,
        )


@dataclass(frozen=True)
class WalkthroughResult:
    game: Path
    task_type: str
    won: bool
    steps: int
    error: str = ""  # why the game could not be played, if it could not


def play_walkthrough(game: str | Path, phrasing: Phrasing = "put", max_steps: int = 50) -> WalkthroughResult:
    """Play a game by its stored walkthrough; a broken game gives an error result, not an exception."""
    try:
        env = AlfWorldEnv(game, phrasing=phrasing, max_steps=max_steps)
    except GameFileError as e:
        return WalkthroughResult(Path(game), "", won=False, steps=0, error=str(e))
    if not env.game.walkthrough:
        return WalkthroughResult(Path(game), env.game.task_type, False, 0, error=f"{game}: no walkthrough stored")
    env.reset()
    step = None
    for action in env.game.walkthrough:
        step = env.step(action)
        if step.done:
            break
    return WalkthroughResult(Path(game), env.game.task_type, won=step.won, steps=env.steps_taken)
