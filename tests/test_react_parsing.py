"""The ReAct turn format: parse_turn / format_turn, the policy chat, ActRe's parse_reason
and the stop rules that end a generated turn."""

from __future__ import annotations

import random

import pytest

from a3t.agent.actre import parse_reason
from a3t.agent.examples import EXAMPLES, example_for
from a3t.agent.react import ParsedTurn, example_text, format_turn, parse_turn, react_chat
from a3t.llm.base import stop_after_action_line, stop_after_first_line
from a3t.trajectory import StepRecord

# --------------------------------------------------------------------------- parse_turn


def test_parse_good_turn():
    assert parse_turn("Thought: x\nAction: go to fridge 1") == ParsedTurn(thought="x", action="go to fridge 1")
    assert parse_turn("Thought: x\nAction: go to fridge 1\n") == ParsedTurn("x", "go to fridge 1")


@pytest.mark.parametrize(
    "text, action",
    [
        ("THOUGHT: x\nACTION: go to fridge 1", "go to fridge 1"),
        ("thought: x\naction: go to fridge 1", "go to fridge 1"),
        ("Thought: x\nAction: Go To Fridge 1", "go to fridge 1"),
        ("Thought: x\n**Action:** `Go To Fridge 1`", "go to fridge 1"),
        ("Thought: x\nAction: go to fridge 1.", "go to fridge 1"),
        ("Thought: x\nAction:   go   to fridge 1  ", "go to fridge 1"),
        ('Thought: x\nAction: "go to fridge 1"', "go to fridge 1"),
        ("Thought: x\nAction 1: go to fridge 1", "go to fridge 1"),
        ("Thought: x\n> Action: go to fridge 1", "go to fridge 1"),
        ("Thought: x\nAction： go to fridge 1", "go to fridge 1"),  # full-width colon
        ("Thought: x\nAction: put apple 1 in/on fridge 1", "put apple 1 in/on fridge 1"),
    ],
)
def test_parse_messy_action(text, action):
    parsed = parse_turn(text)
    assert parsed.action == action
    assert parsed.thought == "x"


def test_parse_extra_text_before_and_after():
    text = ("Sure, here is my next step.\n\nThought: the apple may be cold already\n"
            "Action: go to fridge 1\nObservation: You arrive at fridge 1.\nThe end.")
    assert parse_turn(text) == ParsedTurn("the apple may be cold already", "go to fridge 1")


def test_parse_several_action_lines_takes_the_last():
    text = "Thought: x\nAction: go to fridge 1\nObservation: ok\nAction: open fridge 1"
    assert parse_turn(text).action == "open fridge 1"


def test_parse_missing_thought_uses_text_before_the_action():
    assert parse_turn("I should check the   fridge.\nAction: go to fridge 1") == ParsedTurn(
        "I should check the fridge.", "go to fridge 1")
    assert parse_turn("Action: go to fridge 1") == ParsedTurn("", "go to fridge 1")


@pytest.mark.parametrize(
    "text, thought",
    [("", ""), ("blah", "blah"), ("Thought: only", "only"), ("   \n\n ", ""), ("Thought:", ""),
     ("Action:", ""), ("Thought: x\nAction:   ", "x"), ("Actions: go to fridge 1", "Actions: go to fridge 1"),
     ("Reaction: go to fridge 1", "Reaction: go to fridge 1")],
)
def test_parse_garbage_gives_no_action(text, thought):
    parsed = parse_turn(text)
    assert parsed.action == ""
    assert parsed.thought == thought


_FRAGMENTS = ["Thought", "thought", "Action", "ACTION", "action 2", ":", "：", "**", "`", "\"", "'", ".", "\n", "\r\n",
              " ", "\t", "go to fridge 1", "put apple 1 in/on fridge 1", "é", "東京", "🙂", "\x00", "\\", "(", "[",
              "$", "^", "*", "?", "Observation:", "> ", "\u2028", "\x0b"]


def test_parse_turn_never_raises_on_any_text():
    """A property test without hypothesis (not installed): random texts built from the
    pieces that matter to the parser, plus random unicode."""
    rng = random.Random(0)
    for _ in range(3000):
        if rng.random() < 0.8:
            text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, 20)))
        else:
            text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 40)))
        parsed = parse_turn(text)
        assert isinstance(parsed.thought, str) and isinstance(parsed.action, str)
        assert "\n" not in parsed.action and parsed.action == parsed.action.strip()
        assert parsed.action == parsed.action.lower()
        assert "\n" not in parsed.thought and parsed.thought == parsed.thought.strip()


def test_parse_multiline_thought_is_kept_whole():
    text = "Thought: I need a cold apple.\nIt is probably in the fridge.\nAction: go to fridge 1"
    assert parse_turn(text).thought == "I need a cold apple. It is probably in the fridge."


def test_parse_several_turns_pairs_the_last_thought_with_the_last_action():
    text = "Thought: a\nAction: go to fridge 1\nObservation: ok\nThought: b\nAction: open fridge 1"
    assert parse_turn(text) == ParsedTurn("b", "open fridge 1")


def test_parse_markdown_thought_has_no_markup():
    assert parse_turn("**Thought:** x\n**Action:** `go to fridge 1`") == ParsedTurn("x", "go to fridge 1")


def test_parse_bold_label_with_colon_outside():
    assert parse_turn("**Thought**: x\n**Action**: go to fridge 1").action == "go to fridge 1"


# --------------------------------------------------------------------------- format_turn


@pytest.mark.parametrize(
    "thought, action",
    [("x", "go to fridge 1"), ("I need the apple 1, then the fridge.", "put apple 1 in/on fridge 1"),
     ("", "look"), ("Thought: nested label", "inventory"), ("a: b", "take apple 1 from countertop 1")],
)
def test_format_parse_round_trip(thought, action):
    text = format_turn(thought, action)
    assert text == f"Thought: {thought}\nAction: {action}"
    assert parse_turn(text) == ParsedTurn(thought, action)
    assert parse_turn(text + "\n") == ParsedTurn(thought, action)


def test_parse_format_parse_is_stable():
    for text in ["THOUGHT: x  y\n**Action:** `Go To Fridge 1.`", "I go.\nAction: look", "blah", "Action: LOOK"]:
        first = parse_turn(text)
        assert parse_turn(format_turn(first.thought, first.action)) == first


# --------------------------------------------------------------------------- react_chat


def _steps():
    return [
        StepRecord(thought="t1", action="go to fridge 1", observation="You arrive at fridge 1."),
        StepRecord(thought="t2", action="open fridge 1", observation="You open the fridge 1.", explored=True),
        StepRecord(thought="t3", action="fly", observation="Nothing happens.", valid=False),
    ]


@pytest.mark.parametrize("task_type", sorted(EXAMPLES))
def test_react_chat_has_the_example_of_the_task_type(task_type):
    chat = react_chat(task_type, "You are in a room.\n\nYour task is to: x.", [])
    system = chat[0]["content"]
    assert chat[0]["role"] == "system"
    assert example_text(example_for(task_type)) in system
    for other in EXAMPLES:
        if other != task_type:
            assert EXAMPLES[other].observation not in system
    assert chat[1] == {"role": "user", "content": "You are in a room.\n\nYour task is to: x."}
    assert len(chat) == 2


def test_react_chat_phrasings():
    put = react_chat("pick_and_place_simple", "obs", [], "put")[0]["content"]
    move = react_chat("pick_and_place_simple", "obs", [], "move")[0]["content"]
    assert "put X in/on Y" in put and "move X to Y" not in put
    assert "Action: put keychain 2 in/on drawer 5" in put
    assert "You put the keychain 2 in/on the drawer 5." in put
    assert "move X to Y" in move and "in/on" not in move
    assert "Action: move keychain 2 to drawer 5" in move
    assert "You move the keychain 2 to the drawer 5." in move
    for task_type in EXAMPLES:  # every example converts fully
        assert "in/on" not in react_chat(task_type, "obs", [], "move")[0]["content"]


def test_react_chat_turns_alternate():
    steps = _steps()
    chat = react_chat("pick_cool_then_place_in_recep", "first", steps)
    roles = [m["role"] for m in chat]
    assert roles == ["system", "user"] + ["assistant", "user"] * len(steps)
    for i, step in enumerate(steps):
        assert chat[2 + 2 * i]["content"] == format_turn(step.thought, step.action)
        assert chat[3 + 2 * i]["content"] == step.observation
    assert chat[1]["content"] == "first"


# --------------------------------------------------------------------------- parse_reason


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Thought: because", "because"),
        ("thought:because", "because"),
        ("THOUGHT :  because it is cold  ", "because it is cold"),
        ("reason: x", "x"),
        ("Reason: x\nAction: go to fridge 1", "x"),
        ("\n\n  Thought: y\n", "y"),
        ("just a sentence", "just a sentence"),
        ("Note: keep it", "Note: keep it"),
        ("", ""),
        ("   \n\n", ""),
        ("Thought:", ""),
    ],
)
def test_parse_reason(text, reason):
    assert parse_reason(text) == reason


# --------------------------------------------------------------------------- stop rules


def test_stop_after_action_line():
    text = "Thought: x\nAction: go to fridge 1\nObservation: ..."
    cut = stop_after_action_line(text)
    assert text[:cut] == "Thought: x\nAction: go to fridge 1\n"
    assert stop_after_action_line("Thought: x\nAction: go to fri") is None  # the line is not finished
    assert stop_after_action_line("Thought: x\n") is None
    assert stop_after_action_line("Thought: x\nAction:   \n") is None  # an empty action goes on
    assert stop_after_action_line("") is None
    assert stop_after_action_line("thought: x\nACTION: look\n") == len("thought: x\nACTION: look\n")


@pytest.mark.parametrize("line", ["**Action:** `go to fridge 1`", "Action 1: go to fridge 1", "> Action: go to fridge 1"])
def test_stop_rule_stops_at_every_action_line_parse_turn_reads(line):
    text = f"Thought: x\n{line}\nObservation: You arrive.\nThought: y\nAction: open fridge 1\n"
    cut = stop_after_action_line(text)
    assert cut == len(f"Thought: x\n{line}\n")
    assert parse_turn(text[:cut]).action == "go to fridge 1"


def test_stop_after_action_line_agrees_with_parse_turn():
    text = "THOUGHT: x\nAction: Go to fridge 1.\nObservation: ...\nThought: y\nAction: open fridge 1\n"
    assert parse_turn(text[: stop_after_action_line(text)]) == ParsedTurn("x", "go to fridge 1")


def test_stop_after_first_line():
    text = "Thought: because it is cold\nAction: go to fridge 1\n"
    assert text[: stop_after_first_line(text)] == "Thought: because it is cold\n"
    blank_first = "\n\n  Thought: y\nmore"
    assert blank_first[: stop_after_first_line(blank_first)] == "\n\n  Thought: y\n"
    assert parse_reason(blank_first[: stop_after_first_line(blank_first)]) == "y"
    assert stop_after_first_line("Thought: not finished") is None
    assert stop_after_first_line("   \n\n") is None
    assert stop_after_first_line("") is None


def test_a_turn_ends_where_the_model_starts_inventing_an_observation():
    assert stop_after_action_line("Thought: go.\nObservation: You arrive") == len("Thought: go.\n")
    assert stop_after_action_line("Observation: You are in the middle") == 0
    assert stop_after_action_line("Thought: go.\nObs") is None  # not a label yet
    # An action line before the invented observation still ends the turn after itself.
    text = "Thought: go.\nAction: go to desk 1\nObservation: You arrive"
    assert stop_after_action_line(text) == len("Thought: go.\nAction: go to desk 1\n")
