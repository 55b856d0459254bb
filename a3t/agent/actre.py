"""ActRe: the same LLM prompted the other way round. Given the episode so far and the
action that was taken next, it writes the reason, which becomes the step's thought.

Used for A3T's explored (randomly sampled) actions, and to turn any action sequence
(planner walkthroughs, recorded episodes) into full ReAct trajectories (``a3t annotate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from a3t.agent.examples import PageFormat, example_for, webshop_example
from a3t.agent.react import example_text, transcript
from a3t.envs.alfworld import Phrasing
from a3t.llm.base import LLM, Chat, Completion, Sampling, stop_after_first_line
from a3t.trajectory import StepRecord

SYSTEM = """You explain the actions of an agent {setting}.
You see the agent's task, what happened so far, and the action the agent takes next.
Answer with one line that gives the agent's reason for taking that action now:
Thought: <the reason>

Here is an example of a solved task with the agent's thoughts.

{example}"""

QUESTION = """{history}
Next action: {action}
Write the agent's thought that leads to this action."""


@dataclass(frozen=True)
class ActReRequest:
    task_type: str
    initial_observation: str
    steps: list[StepRecord]  # the episode before the action
    action: str
    webshop: PageFormat | None = None  # a WebShop episode: its page format; None: ALFWorld


def actre_chat(request: ActReRequest, phrasing: Phrasing) -> Chat:
    """The ActRe chat of a request: WebShop's example for a WebShop episode, else the ALFWorld
    example of its task type in ``phrasing``."""
    if request.webshop is not None:
        setting, example = "shopping in a web shop", webshop_example(request.webshop)
    else:
        setting, example = "in a household", example_for(request.task_type, phrasing)
    system = SYSTEM.format(setting=setting, example=example_text(example))
    history = transcript(request.initial_observation, request.steps)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": QUESTION.format(history=history, action=request.action)},
    ]


def parse_reason(text: str) -> str:
    """The reason without the "Thought:" label, whitespace collapsed as in policy
    thoughts; "" if the model wrote none."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        if sep and head.strip(" *_`>").lower() in ("thought", "reason"):
            line = rest
        return " ".join(line.strip(" *_`").split())
    return ""


class ActReAnnotator:
    """Writes the thought for a chosen action, in a batch."""

    def __init__(self, llm: LLM, phrasing: Phrasing = "put", sampling: Sampling | None = None):
        self.llm = llm
        self.phrasing = phrasing
        # Greedy by default: the reason should be the model's most likely explanation.
        self.sampling = sampling or Sampling(temperature=0.0, max_new_tokens=64)
        self.fallbacks = 0  # reasons the model failed to give

    def reasons(
        self, requests: list[ActReRequest], sessions: list[str] | None = None
    ) -> list[tuple[str, Completion]]:
        """The reason for each request's action, with the completion it came from. Name a
        session per episode: its next request shares the history, which is then not
        encoded again."""
        if not requests:
            return []
        chats = [actre_chat(r, self.phrasing) for r in requests]
        completions = self.llm.complete(chats, self.sampling, stop_after_first_line, sessions=sessions)
        out = []
        for request, completion in zip(requests, completions):
            reason = parse_reason(completion.text)
            if not reason:
                # An empty thought would break the turn format; say plainly what is done.
                self.fallbacks += 1
                reason = f"I will {request.action} next."
            out.append((reason, completion))
        return out
