"""What every LLM backend offers the agent: batched chat completion with a stop rule.

A chat is a list of OpenAI-style messages ``{"role": ..., "content": ...}``. A stop rule
looks at the text generated so far and says where the useful part ends (or that it has
not ended yet), so that generation stops at the end of the action line, not at
``max_new_tokens``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Chat = list[dict[str, str]]
StopRule = Callable[[str], "int | None"]  # text so far -> index to cut at, or None to go on


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str  # the generated text, cut by the stop rule
    prompt_tokens: int  # tokens of the chat that the backend had to encode for this call
    completion_tokens: int  # tokens generated
    stopped: bool  # True if the stop rule (or an end-of-turn token) ended it, not the length limit


class LLM(Protocol):
    name: str  # model id, recorded in every trajectory
    adapter: str | None  # adapter id or path, recorded in every trajectory

    def complete(
        self,
        chats: list[Chat],
        sampling: Sampling,
        stop: StopRule | None = None,
        sessions: list[str] | None = None,
        choices: list[list[str] | None] | None = None,
    ) -> list[Completion]:
        """Complete each chat with one assistant turn. ``sessions`` names the episode of each
        chat: a backend may keep a session's encoded history and encode only what was added
        since its last call. ``release`` forgets sessions.

        ``choices[i]`` (constrained decoding): the completion of chat i is exactly one of these
        texts, each continuing the chat's last (assistant) message after one space, as in
        "Action:" + " go to desk 1"; the completion's text is the choice itself, without the
        space, and the stop rule does not apply to it. None (for the call or a chat): free text."""
        ...

    def release(self, sessions: list[str]) -> None: ...


# A chat whose last message is the assistant's is continued from that message's text: the
# completion is only what follows (Hugging Face's continue_final_message).


def label(name: str) -> str:
    """Regex of a line's label as models write it: "Action:", "ACTION 1:", "**Action:**",
    "**Action**:", "> Action:". Group 1 is the rest of the line. Shared by the stop rule
    and the agent's parser so that generation stops at every line the parser reads."""
    return rf"^[^\w\n]*{name}[ \t]*\d*[ \t]*[*_`]*[ \t]*[:：][*_`]*[ \t]*([^\n]*)$"


ACTION_LINE = re.compile(label("action"), re.IGNORECASE | re.MULTILINE)
# A line labelled "Observation:" (begun, not necessarily finished) in a policy turn.
_OBSERVATION_START = re.compile(r"^[^\w\n]*observation[ \t]*\d*[ \t]*[*_`]*[ \t]*[:：]", re.IGNORECASE | re.MULTILINE)


def stop_after_action_line(text: str) -> int | None:
    """ReAct turns end with the action line: cut right after the newline of the first
    action line that names an action. A model that starts writing an "Observation:" line
    is inventing the environment's answer: the turn ends before it (small models do this
    instead of acting, and would otherwise run to max_new_tokens every turn)."""
    observation = _OBSERVATION_START.search(text)
    for match in ACTION_LINE.finditer(text):
        if observation is not None and observation.start() < match.start():
            break
        if match.group(1).strip(" \t*_`'\"") and match.end() < len(text):  # its newline is there
            return match.end() + 1
    return observation.start() if observation is not None else None


def stop_after_thought(text: str) -> int | None:
    """A thought whose action is chosen next (constrained actions): it ends at the end of its
    line, or where the model starts an "Action:" or "Observation:" line."""
    labels = [m.start() for m in (ACTION_LINE.search(text), _OBSERVATION_START.search(text)) if m]
    if labels:
        return min(labels)
    match = re.search(r"\S[^\n]*\n", text)
    return match.end() - 1 if match else None


def stop_after_first_line(text: str) -> int | None:
    """ActRe answers with one reason: cut at the end of its first non-empty line."""
    match = re.search(r"\S[^\n]*\n", text)
    return match.end() if match else None
