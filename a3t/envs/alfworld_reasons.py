"""Plain, true reasons for ALFWorld actions, read off the task and the episode so far.

ActRe's last resort (a3t.agent.actre): when every reason the LLM wrote for an action was
rejected, the step's thought is the one this module writes. It says where the agent stands
in its task and why the action serves it ("I have the apple 1. I go to the microwave 1 to
heat it."), so a policy trained on it learns thoughts that carry the plan's state, not a
restated task. The state comes from ALFWorld's own observation sentences (what the agent
holds, what it has cleaned, heated or cooled, where it has looked), and the goal from the
task sentence of the six task types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The task sentences of ALFWorld's six task types (alfworld's goal library, as generated games
# and the official games word them). Each gives the object, the receptacle, and what must be
# done to the object first (clean / hot / cool), or the lamp to look under.
_GOALS = (
    (re.compile(r"^put (?:a|an|some) (clean|hot|cool) (\w+) (?:in|on) (\w+)$"), "modifier", "object", "target"),
    (re.compile(r"^(clean|heat|cool) (?:a|an|some) (\w+) and put it (?:in|on) (\w+)$"), "modifier", "object", "target"),
    (re.compile(r"^(?:put|find) two (\w+) (?:and put them )?(?:in|on) (\w+)$"), "object", "target"),
    (re.compile(r"^put (?:a|an|some) (\w+) (?:in|on) (\w+)$"), "object", "target"),
    (re.compile(r"^look at (\w+) under the (\w+)$"), "object", "lamp"),
    (re.compile(r"^examine the (\w+) with the (\w+)$"), "object", "lamp"),
)
# What a receptacle does to an object, and the task words for it.
_TOOLS = {"clean": "sinkbasin", "hot": "microwave", "cool": "fridge"}
_VERB = {"clean": "clean", "hot": "heat", "cool": "cool"}
_MODIFIER = {"clean": "clean", "heat": "hot", "hot": "hot", "cool": "cool"}


@dataclass(frozen=True)
class Goal:
    object: str  # the kind of object, e.g. "apple"
    target: str = ""  # the kind of receptacle it goes in/on; "" for looking at it under a lamp
    modifier: str = ""  # "clean", "hot" or "cool": done to the object before it is put
    lamp: str = ""  # "desklamp" / "floorlamp": looked under
    count: int = 1  # objects to put (two for "put two ...")


def parse_goal(task: str) -> Goal | None:
    """The goal of an ALFWorld task sentence ("heat some apple and put it in garbagecan"), or None."""
    task = task.strip().rstrip(".").lower()
    for pattern, *names in _GOALS:
        match = pattern.match(task)
        if match:
            values = dict(zip(names, match.groups()))
            if "modifier" in values:
                values["modifier"] = _MODIFIER[values["modifier"]]
            return Goal(**values, count=2 if " two " in f" {task} " else 1)
    return None


@dataclass
class _State:
    holding: str = ""  # the object in hand, e.g. "apple 1"
    done_to: set[str] = field(default_factory=set)  # objects cleaned / heated / cooled
    placed: int = 0  # goal objects put in/on a target receptacle
    at: str = ""  # the receptacle the agent stands at
    looked: list[str] = field(default_factory=list)  # receptacles visited, in order


def _kind(name: str) -> str:
    return name.rsplit(" ", 1)[0]


def _state(goal: Goal, steps) -> _State:
    """Replay the episode's observations: ALFWorld reports every change in a fixed sentence."""
    state = _State()
    for action, observation in steps:
        if m := re.match(r"You arrive at (?:loc \d+|(\w+ \d+))", observation):
            state.at = m.group(1) or ""
            state.looked.append(state.at)
        elif m := re.match(r"You pick up the (\w+ \d+)", observation):
            state.holding = m.group(1)
        elif m := re.match(r"You (?:put|move) the (\w+ \d+) (?:in/on|to) the (\w+ \d+)", observation):
            if _kind(m.group(1)) == goal.object and _kind(m.group(2)) == goal.target:
                state.placed += 1
            state.holding = ""
        elif m := re.match(r"You (?:clean|heat|cool) the (\w+ \d+)", observation):
            state.done_to.add(m.group(1))
    return state


def plan_reason(task: str, steps, action: str) -> str | None:
    """The reason for ``action`` after ``steps`` ((action, observation) pairs) in the ALFWorld
    task ``task``; None if the task sentence is not one of ALFWorld's.

    Every reason starts with where the agent stands ("I need a apple.", "I have the apple 1 to
    heat and put in the garbagecan.", "I have the hot apple 1 for the garbagecan.") and then
    says why this action. The first part stays the same from step to step until the task moves
    on, so a small policy trained on these thoughts copies it from its last thought and makes
    each decision next to what it needs (is an apple in what I see?) instead of looking back to
    the task sentence, which it does badly. Short on purpose: the policy writes one every step."""
    goal = parse_goal(task)
    if goal is None:
        return None
    s = _state(goal, steps)
    have = s.holding if s.holding and _kind(s.holding) == goal.object else ""
    last = steps[-1][1] if steps else ""
    if not have:
        where = f"I need a {'second ' if goal.count == 2 and s.placed else ''}{goal.object}."
    elif goal.lamp:
        where = f"I have the {have}, I need the {goal.lamp}."
    elif goal.modifier and have not in s.done_to:
        where = f"I have the {have} to {_VERB[goal.modifier]} and put in the {goal.target}."
    else:
        where = f"I have the {goal.modifier + ' ' if goal.modifier else ''}{have} for the {goal.target}."
    why = _why(goal, s, have, last, action)
    return f"{where} {why}" if why else None


def _why(goal: Goal, s: _State, have: str, last: str, action: str) -> str | None:
    if m := re.match(r"go to (\w+ \d+)$", action):
        place = m.group(1)
        if have and goal.modifier and have not in s.done_to and _kind(place) == _TOOLS[goal.modifier]:
            return f"I go to the {place} to {_VERB[goal.modifier]} it."
        if not have and s.looked and not re.search(rf"\b{goal.object} \d", last):
            return f"None there, I check the {place}."
        return f"I go to the {place}." if have and not goal.lamp else f"I check the {place}."
    if m := re.match(r"open (\w+ \d+)$", action):
        return f"I open the {m.group(1)}." if have else f"I open the {m.group(1)} to look inside."
    if m := re.match(r"close (\w+ \d+)$", action):
        return f"I close the {m.group(1)}."
    if m := re.match(r"take (\w+ \d+) from (\w+ \d+)$", action):
        if _kind(m.group(1)) == goal.object:
            return f"Here is one, I take the {m.group(1)}."
        return f"I take the {m.group(1)} from the {m.group(2)}."
    if m := re.match(r"(clean|heat|cool) (\w+ \d+) with (\w+ \d+)$", action):
        return f"I {m.group(1)} the {m.group(2)} with the {m.group(3)}."
    if m := re.match(r"(?:put (\w+ \d+) in/on|move (\w+ \d+) to) (\w+ \d+)$", action):
        thing, place = m.group(1) or m.group(2), m.group(3)
        done = f"I put the {thing} in/on the {place}." if m.group(1) else f"I move the {thing} to the {place}."
        if goal.count == 2 and not s.placed and _kind(thing) == goal.object and _kind(place) == goal.target:
            return f"{done} One more to go."
        return done
    if m := re.match(r"use (\w+ \d+)$", action):
        return f"I turn on the {m.group(1)}."
    if m := re.match(r"examine (\w+ \d+)$", action):
        return f"I look closely at the {m.group(1)}."
    if action == "inventory":
        return "I check what I am carrying."
    if action == "look":
        return "I look around to see where I am."
    return None
