"""The ReAct prompt (system instruction + a 1-shot example of the task's type, or WebShop's
example + the episode as chat turns) and the parser of the model's turns.

A turn is two lines, ``Thought: ...`` then ``Action: ...``. Every assistant turn in a
chat, whether the policy wrote it or ActRe synthesized it, is rendered by ``format_turn``,
so the two are indistinguishable in format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from a3t.agent.examples import Example, example_for, webshop_example
from a3t.envs.base import PageFormat, Phrasing
from a3t.llm.base import ACTION_LINE, Chat, label
from a3t.trajectory import StepRecord

_COMMANDS = {
    "put": "go to X, open X, close X, take X from Y, put X in/on Y, clean X with Y, heat X with Y, cool X with Y, "
    "use X, examine X, look, inventory",
    "move": "go to X, open X, close X, take X from Y, move X to Y, clean X with Y, heat X with Y, cool X with Y, "
    "use X, examine X, look, inventory",
}

SYSTEM = """You are an agent in a household. You solve the task you are given by acting in the room.
Each turn you see the result of your last action and answer with exactly two lines:
Thought: <your reasoning about what to do next>
Action: <one command>
Commands: {commands}. Name things exactly as you see them, e.g. "cabinet 1".{example}"""

WEBSHOP_SYSTEM = """You are an agent shopping in a web shop. You buy the product that the instruction describes.
Each turn you see the page your last action led to and answer with exactly two lines:
Thought: <your reasoning about what to do next>
Action: <one action>
Actions: search[<key words>] on the search page; click[<text>] for a button, a product's id or an option value \
shown on the page, e.g. click[Next >] or click[Buy Now]. Choose the options the instruction asks for before you buy.\
{example}"""

EXAMPLE_INTRO = "\n\nHere is an example of a solved task.\n\n"


def transcript(initial_observation: str, steps, action_first: bool = False) -> str:
    """A text transcript: Observation / Thought / Action lines (``action_first``: Action before
    Thought, the order in which ActRe sees a step). ``steps`` are (thought, action, observation)
    triples or StepRecords."""
    lines = [f"Observation: {initial_observation}"]
    for step in steps:
        thought, action, observation = (
            (step.thought, step.action, step.observation) if isinstance(step, StepRecord) else step
        )
        turn = [f"Thought: {thought}", f"Action: {action}"]
        lines += (turn[::-1] if action_first else turn) + [f"Observation: {observation}"]
    return "\n".join(lines)


def format_turn(thought: str, action: str) -> str:
    return f"Thought: {thought}\nAction: {action}"


def example_text(example: Example) -> str:
    return transcript(example.observation, example.steps)


def react_chat(task_type: str, initial_observation: str, steps: list[StepRecord], phrasing: Phrasing = "put",
               webshop: PageFormat | None = None, with_example: bool = True) -> Chat:
    """The policy's chat: instruction and (``with_example``) the 1-shot example, then the episode so
    far as turns. ALFWorld's prompt in ``phrasing``, or (``webshop``: its page format) WebShop's."""
    if webshop is not None:
        template, example = WEBSHOP_SYSTEM, webshop_example(webshop)
    else:
        template, example = SYSTEM, example_for(task_type, phrasing)
    system = template.format(commands=_COMMANDS[phrasing],
                             example=EXAMPLE_INTRO + example_text(example) if with_example else "")
    chat = [{"role": "system", "content": system}, {"role": "user", "content": initial_observation}]
    for step in steps:
        chat.append({"role": "assistant", "content": format_turn(step.thought, step.action)})
        chat.append({"role": "user", "content": step.observation})
    return chat


@dataclass(frozen=True)
class ParsedTurn:
    thought: str
    action: str  # "" when no action could be read: the environment counts it invalid


_THOUGHT = re.compile(label("thought"), re.IGNORECASE | re.MULTILINE)


_WEBSHOP_ACTION = re.compile(r"^(search|click)\s*\[(.*)\]$", re.IGNORECASE)


def clean_action(text: str) -> str:
    """Commands are lower case without quotes, markup or a final period. A WebShop action keeps
    the case of its argument, as the page shows it ("click[Buy Now]", "click[B06P0N4E7C]")."""
    action = text.strip().strip("`*\"' ").strip()
    action = re.sub(r"\s+", " ", action).rstrip(".").strip()
    webshop = _WEBSHOP_ACTION.match(action)
    if webshop:
        return f"{webshop.group(1).lower()}[{webshop.group(2).strip()}]"
    return action.lower()


def parse_turn(text: str) -> ParsedTurn:
    """Read a model's turn. Tolerates case, markup, extra text and a missing thought; a
    turn without an action line gives action "" (an invalid action, never an exception).
    With several thought/action pairs, the last action and the thought written for it."""
    labels = list(ACTION_LINE.finditer(text))
    actions = [m for m in labels if clean_action(m.group(1))]
    if not actions:  # an empty "Action:" line still ends the thought
        return ParsedTurn(thought=_thought(text[: labels[0].start()] if labels else text), action="")
    last = actions[-1]
    # The thought for this action is written after the previous action line, if any.
    since = actions[-2].end() if len(actions) > 1 else 0
    return ParsedTurn(thought=_thought(text[since : last.start()]), action=clean_action(last.group(1)))


def _thought(text: str) -> str:
    """The text after the last "Thought:" label (all its lines), else the whole text."""
    labels = list(_THOUGHT.finditer(text))
    thought = text[labels[-1].start(1) :] if labels else text
    return " ".join(thought.strip(" \t\n*_`").split())
