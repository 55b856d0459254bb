"""The training set rendered to tokens: each weighted trajectory (a3t.filter) becomes one example.

A trajectory is rendered with
the model's own chat template exactly as the rollout prompt was (a3t.agent.react: the
prompt of the environment the trajectory says it was played in), and
its tokens get a loss mask built from character spans of the rendered turns: the
agent's turns always (content and the end-of-turn token), observations by a setting
(the paper keeps them), never the instruction, the example or the template's headers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from a3t.agent.react import react_chat
from a3t.envs.base import PageFormat, Phrasing
from a3t.envs.spec import env_spec
from a3t.filter import LossVariant, filter_trajectories
from a3t.trajectory import Trajectory, TrajectoryStore


def load_trajectories(paths: Iterable[str | Path]) -> list[Trajectory]:
    """Every record of every file, in order. A malformed line is reported with file:line
    in ``<file>.quarantine`` (once) and skipped; a last line cut short by a crash is moved
    there when the file is opened."""
    records = []
    for path in paths:
        records += list(TrajectoryStore(path).read(on_error="quarantine"))
    return records


@dataclass
class Example:
    """One tokenized trajectory: its weight is spread over its loss tokens."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is in the loss
    weight: float
    episode_id: str


def turn_spans(tokenizer, chat: list[dict[str, str]], observations: bool) -> tuple[str, list[tuple[int, int, bool]]]:
    """The rendered chat and the character spans that go into the loss, each marked with
    whether it is an agent turn. Relies on the template rendering a chat as a prefix of
    any longer chat (checked), so each message's text is the difference of two renderings."""
    spans = []
    previous = ""
    for k in range(1, len(chat) + 1):
        text = tokenizer.apply_chat_template(chat[:k], tokenize=False)
        if not text.startswith(previous):
            raise ValueError("the chat template does not render a chat as a prefix of a longer one; "
                             "a3t needs that to build loss masks from token ids")
        message = chat[k - 1]
        start = text.find(message["content"], len(previous))
        if start < 0:
            raise ValueError(f"message {k - 1} ({message['role']}) is not in the rendered chat")
        if message["role"] == "assistant":
            # The reply and the template's end-of-turn marker after it, not a trailing newline.
            spans.append((start, len(text.rstrip()), True))
        elif message["role"] == "user" and observations and k > 2:
            # Observations the environment returned: the first user message holds the
            # task's first observation, which the model is given, not asked to predict.
            spans.append((start, start + len(message["content"]), False))
        previous = text
    return previous, spans


def tokenize_trajectory(
    tokenizer, t: Trajectory, weight: float, phrasing: Phrasing, observations: bool, max_length: int,
    page_format: PageFormat = "react", with_example: bool = True,
) -> Example:
    """``phrasing`` renders ALFWorld trajectories' prompt, ``page_format`` WebShop's; ``with_example``:
    the prompt shows the 1-shot example (as the policy that will be trained is to see it)."""
    chat = react_chat(t.task_type, t.initial_observation, t.steps, phrasing,
                      webshop=env_spec(t.env).page_format(page_format), with_example=with_example)
    text, spans = turn_spans(tokenizer, chat, observations)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    mask = [0] * len(ids)
    for start, end, is_turn in spans:
        covered = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if is_turn and (not covered or offsets[covered[-1]][1] < end):
            raise ValueError(f"{t.episode_id}: the tokens of an agent turn do not reach its end-of-turn marker")
        for i in covered:
            mask[i] = 1
    # Too long: keep the start (the prompt and the first turns); the cut turns are not learnt.
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise ValueError(f"{t.episode_id}: empty loss mask (within max_length={max_length} tokens, "
                         f"the prompt is {len(text)} characters: raise train.max_length)")
    return Example(ids, mask, weight, t.episode_id)


def build_examples(
    trajectories: list[Trajectory],
    tokenizer,
    variant: LossVariant = "pg",
    observations: bool = True,
    phrasing: Phrasing = "put",
    max_length: int = 4096,
    page_format: PageFormat = "react",
    with_example: bool = True,
) -> list[Example]:
    """Tokenized examples of the trajectories the filter keeps (a3t.filter: weight not 0). Records of a
    round's train_set.jsonl carry their weight; others are weighed here, as one set.
    ALFWorld trajectories are rendered in ``phrasing``, WebShop's with pages in ``page_format``."""
    return [tokenize_trajectory(tokenizer, t, t.weight, phrasing, observations, max_length, page_format, with_example)
            for t in filter_trajectories(trajectories, variant)]
