"""ActRe: the prompt, the checks a reason must pass, the annotator (batched; rejected rows asked
again, then a fallback reason), and how an explored step looks in the policy's chat: exactly
like a policy turn."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from a3t.agent.actre import (  # noqa: E402
    RESAMPLE_TEMPERATURE,
    ActReAnnotator,
    ActReRequest,
    action_first_transcript,
    actre_chat,
    fallback_reason,
    parse_reason,
    rejection,
)
from a3t.agent.examples import example_for  # noqa: E402
from a3t.agent.react import format_turn, parse_turn, react_chat  # noqa: E402
from a3t.config import EnvConfig, RolloutConfig  # noqa: E402
from a3t.envs.alfworld import find_games  # noqa: E402
from a3t.llm.base import Completion, Sampling, stop_after_first_line  # noqa: E402
from a3t.rollout import rollout, task_for  # noqa: E402
from a3t.trajectory import StepRecord, TrajectoryStore  # noqa: E402

STEPS = [
    StepRecord(thought="I look for the apple.", action="go to countertop 1",
               observation="You arrive at countertop 1. On the countertop 1, you see a apple 1."),
    StepRecord(thought="There it is.", action="take apple 1 from countertop 1",
               observation="You pick up the apple 1 from the countertop 1.", explored=True),
]
OBS = ("You are in the middle of a room. Looking quickly around you, you see a cabinet 2, a cabinet 1, a countertop 1, "
       "a fridge 1, and a sinkbasin 1.\n\nYour task is to: put a cool apple in countertop.")

REQUESTS = [
    ActReRequest("pick_cool_then_place_in_recep", OBS, STEPS, "go to fridge 1"),
    ActReRequest("pick_and_place_simple", "You are in the middle of a room.\n\nYour task is to: put a pen in desk.",
                 [], "go to desk 1"),
    ActReRequest("pick_two_obj_and_place", OBS, STEPS[:1], "put apple 1 in/on countertop 1"),
]
GOOD = ["Now I have the apple 1. I go to the fridge 1 to cool it.", "A pen is often on a desk, so I check it.",
        "The apple 1 is here, so I put it on the countertop 1."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    from a3t.llm.transformers_llm import TransformersLLM

    return TransformersLLM(tiny_model_dir)


class _ScriptedLLM:
    """A stub of the LLM protocol, ONLY to unit-test the annotator's checks and re-asks: it
    answers the given texts in turn and records every call."""

    name, adapter = "stub", None

    def __init__(self, texts):
        self.texts = list(texts)
        self.calls = []

    def complete(self, chats, sampling, stop=None, sessions=None):
        self.calls.append((chats, sampling, stop, sessions))
        out = []
        for _ in chats:
            text = self.texts.pop(0)
            cut = stop(text) if stop else None
            out.append(Completion(text=text[:cut] if cut is not None else text, prompt_tokens=3,
                                  completion_tokens=len(text), stopped=cut is not None))
        return out

    def release(self, sessions):
        pass


# --------------------------------------------------------------------------- the prompt


@pytest.mark.parametrize("phrasing", ["put", "move"])
def test_actre_chat(phrasing):
    chat = actre_chat(REQUESTS[0], phrasing)
    assert [m["role"] for m in chat] == ["system", "user", "assistant"]
    example = example_for("pick_cool_then_place_in_recep", phrasing)
    system = chat[0]["content"]
    assert action_first_transcript(example.observation, example.steps) in system
    # the example shows each action first and its reason after it, as ActRe is asked
    first_thought, first_action, first_observation = example.steps[0]
    assert f"Action: {first_action}\nThought: {first_thought}\nObservation: {first_observation}" in system
    assert ("in/on" in system) == (phrasing == "put")
    question = chat[1]["content"]
    assert question.startswith(f"Observation: {OBS}\nAction: go to countertop 1\nThought: I look for the apple.\n")
    assert ("Action: take apple 1 from countertop 1\nThought: There it is.\nObservation: You pick up the apple 1"
            in question)
    assert question.endswith("\nObservation: You pick up the apple 1 from the countertop 1.\nAction: go to fridge 1")
    # the reply is started for the model, which only writes the reason
    assert chat[2] == {"role": "assistant", "content": "Thought:"}


def test_actre_chat_of_a_first_step():
    chat = actre_chat(REQUESTS[1], "put")
    assert chat[1]["content"] == f"Observation: {REQUESTS[1].initial_observation}\nAction: go to desk 1"


# --------------------------------------------------------------------------- the checks

WEBSHOP = ActReRequest("fashion", "WebShop [SEP] Instruction: [SEP] a jacket in size 7 [SEP] Search", [],
                       "search[jacket size 7]", webshop="sep")


@pytest.mark.parametrize("request_, reason, why", [
    (REQUESTS[0], "", "empty"),
    # observation echoes: an observation's (or a label's) start, the action itself, or its 3-grams
    (REQUESTS[0], "Observation: You are in the middle of a room.", "echo"),
    (REQUESTS[0], "You arrive at countertop 1.", "echo"),
    (REQUESTS[0], "Action: go to fridge 1", "echo"),
    (REQUESTS[0], "Go to fridge 1.", "echo"),
    (REQUESTS[0], "I pick up the apple 1 from the countertop 1", "echo"),  # the last observation: 7 of 8 3-grams
    (REQUESTS[0], "a cabinet 2, a cabinet 1, a countertop 1, a fridge 1", "echo"),  # the room of the first one
    (REQUESTS[0], "You need to cool the apple 1.", "echo"),  # the environment's voice, not the agent's
    (REQUESTS[0], "You're in the middle of a room.", "echo"),
    (REQUESTS[0], "i look for the apple", "echo"),  # an earlier thought, word for word
    (REQUESTS[0], "I look for the fridge.", None),  # an earlier thought's frame, for this action
    (REQUESTS[0], "I need to put a cool apple in countertop.", None),  # the task sentence may be restated
    (REQUESTS[0], "I pick up the apple 1, then I cool it in the fridge 1 as the task says.", None),  # 3 of 14 3-grams
    # another action: a command on an object the action does not name
    (REQUESTS[0], "I will go to cabinet 1 now.", "other action"),
    (REQUESTS[0], "I go to the fridge 1, then take the apple 1 out.", "other action"),
    (REQUESTS[0], "Now I have the apple 1. I go to the fridge 1 to cool it.", None),
    (REQUESTS[0], "I opened cabinet 1 before; the fridge 1 cools things.", None),  # past tense: no command
    # ... or things this episode has not shown
    (REQUESTS[0], "The drawer 3 is closed.", "other action"),  # no drawer 3 in the room
    (REQUESTS[0], "There is a pot here. I take it.", "other action"),  # the example's pot
    (REQUESTS[0], "Pots are cold.", "other action"),
    (REQUESTS[2], "The apple 1 is here, so I put it on the countertop 1.", None),
    (REQUESTS[1], "A pen is often on a desk, so I check the desk 1.", None),
    # WebShop: the echo rules only ("size 7" is an option, not an object)
    (WEBSHOP, "I search for a jacket in size 7.", None),
    (WEBSHOP, "WebShop [SEP] Instruction: a jacket", "echo"),
])
def test_rejection_rules(request_, reason, why):
    assert rejection(request_, reason) == why


@pytest.mark.parametrize("request_", REQUESTS + [WEBSHOP])
def test_fallback_reason_passes_the_checks(request_):
    assert rejection(request_, fallback_reason(request_)) is None


def test_fallback_reason_is_the_plans_reason():
    assert fallback_reason(REQUESTS[0]) == "I have the apple 1 to cool and put in the countertop. I go to the fridge 1 to cool it."
    assert fallback_reason(REQUESTS[1]) == "I need a pen. I check the desk 1."
    odd = ActReRequest("x", "You are in a room.\n\nYour task is to: juggle three balls.", [], "look")
    assert fallback_reason(odd) == "To juggle three balls, I look next."  # not one of ALFWorld's task sentences
    assert fallback_reason(WEBSHOP) == "I will search[jacket size 7] next."


@pytest.mark.parametrize("reason, why", [
    ("I need to find a glass of juice in the kitchen.", "ungrounded"),  # neither was ever shown
    ("The closet is where the apple 1 is.", "ungrounded"),
    ("I have the apple 1 and it is not cool yet, so I go to the fridge 1.", None),
    ("The apple 1 is often cold in the fridge 1, so I bring it there.", None),
])
def test_a_reason_speaks_only_of_what_the_episode_showed(reason, why):
    assert rejection(REQUESTS[0], reason) == why


# --------------------------------------------------------------------------- the annotator


def test_annotator_accepts_good_reasons_at_the_first_try():
    llm = _ScriptedLLM([f"Thought: {g}\nAction: x" for g in GOOD])
    annotator = ActReAnnotator(llm)
    answers = annotator.reasons(REQUESTS, sessions=["a", "b", "c"])
    assert [reason for reason, _ in answers] == GOOD
    assert (annotator.accepted, annotator.rejected, annotator.fallbacks) == (3, 0, 0)
    ((chats, sampling, stop, sessions),) = llm.calls
    assert chats == [actre_chat(r, "put") for r in REQUESTS] and sessions == ["a", "b", "c"]
    assert stop is stop_after_first_line
    assert sampling.temperature == 0.0  # greedy by default
    assert annotator.reasons([]) == [] and len(llm.calls) == 1  # nothing asked, no call


def test_annotator_asks_only_the_rejected_rows_again():
    llm = _ScriptedLLM([
        GOOD[0], "Observation: You are in the middle of a room.", "",  # try 1: rows 2 and 3 rejected
        "go to desk 1", GOOD[2],  # try 2: row 2 rejected again
        GOOD[1],  # try 3
    ])
    annotator = ActReAnnotator(llm, sampling=Sampling(temperature=0.0, max_new_tokens=20))
    answers = annotator.reasons(REQUESTS, sessions=["a", "b", "c"])
    assert [reason for reason, _ in answers] == GOOD
    chats = [actre_chat(r, "put") for r in REQUESTS]
    assert [(c, s) for c, _, _, s in llm.calls] == [
        (chats, ["a", "b", "c"]), (chats[1:], ["b", "c"]), (chats[1:2], ["b"])]
    samplings = [sampling for _, sampling, _, _ in llm.calls]
    assert samplings[0].temperature == 0.0
    # later tries sample, each with its own seed, within the same token budget
    assert [s.temperature for s in samplings[1:]] == [RESAMPLE_TEMPERATURE] * 2
    assert len({s.seed for s in samplings[1:]}) == 2
    assert {s.max_new_tokens for s in samplings} == {20}
    assert (annotator.accepted, annotator.rejected, annotator.fallbacks) == (3, 3, 0)
    # a request's completion is the one its reason came from, charged with all its tries' tokens
    assert [c.text for _, c in answers] == [GOOD[0], GOOD[1], GOOD[2]]
    assert [c.prompt_tokens for _, c in answers] == [3, 9, 6]
    assert answers[1][1].completion_tokens == len("Observation: You are in the middle of a room.") + len(
        "go to desk 1") + len(GOOD[1])


def test_annotator_falls_back_after_the_last_try():
    llm = _ScriptedLLM(["Thought:", "You arrive at countertop 1.", GOOD[1],  # rows 1 and 3 rejected
                        "\n  \n", "Go to cabinet 1."])  # and again
    annotator = ActReAnnotator(llm, tries=2)
    answers = annotator.reasons(REQUESTS[:3:2] + REQUESTS[1:2])  # rows: 1, 3, 2
    assert [reason for reason, _ in answers] == [
        fallback_reason(REQUESTS[0]), fallback_reason(REQUESTS[2]), GOOD[1]]
    assert [len(chats) for chats, _, _, _ in llm.calls] == [3, 2]  # two tries, no third
    assert (annotator.accepted, annotator.rejected, annotator.fallbacks) == (1, 4, 2)
    assert answers[1][1].text == "Go to cabinet 1."  # the last try's completion
    # the counters add up over calls
    llm.texts.append(GOOD[1])
    annotator.reasons(REQUESTS[1:2])
    assert (annotator.accepted, annotator.rejected, annotator.fallbacks) == (2, 4, 2)


def test_annotator_with_one_try_never_asks_again():
    llm = _ScriptedLLM(["", GOOD[1], ""])
    annotator = ActReAnnotator(llm, tries=1)
    answers = annotator.reasons(REQUESTS)
    assert len(llm.calls) == 1
    assert [reason for reason, _ in answers] == [fallback_reason(REQUESTS[0]), GOOD[1], fallback_reason(REQUESTS[2])]
    assert (annotator.accepted, annotator.rejected, annotator.fallbacks) == (1, 2, 2)


def test_annotator_gives_one_reason_per_request_with_the_tiny_model(tiny_llm):
    annotator = ActReAnnotator(tiny_llm, sampling=Sampling(temperature=0.0, max_new_tokens=8), tries=1)
    answers = annotator.reasons(REQUESTS)
    assert len(answers) == len(REQUESTS)
    for request, (reason, completion) in zip(REQUESTS, answers):
        assert isinstance(completion, Completion)
        assert reason and reason == reason.strip() and "\n" not in reason
        assert completion.prompt_tokens > 0 and 0 < completion.completion_tokens <= 8
        parsed = parse_reason(completion.text)
        assert reason == (parsed if rejection(request, parsed) is None else fallback_reason(request))
    assert annotator.accepted + annotator.fallbacks == len(REQUESTS) == annotator.accepted + annotator.rejected
    # the batch does not change a request's answer (greedy): alone it reads the same
    alone = annotator.reasons(REQUESTS[1:2])
    assert alone[0][0] == answers[1][0]


def test_annotator_falls_back_when_the_tiny_model_writes_nothing(tiny_llm):
    annotator = ActReAnnotator(tiny_llm, sampling=Sampling(temperature=0.0, max_new_tokens=0))
    answers = annotator.reasons(REQUESTS)
    assert [reason for reason, _ in answers] == [fallback_reason(r) for r in REQUESTS]
    assert all(c.text == "" and c.completion_tokens == 0 for _, c in answers)
    assert (annotator.accepted, annotator.rejected, annotator.fallbacks) == (0, 9, 3)


# --------------------------------------------------------------------------- explored steps in the policy chat


def test_explored_step_in_the_policy_chat_is_a_policy_turn(games_root, tiny_model_dir, tmp_path):
    """Tiny model as policy and ActRe; a spy (the real model, recording its inputs) sees
    each policy chat. Every earlier step, explored or not, is rendered as format_turn."""
    from a3t.llm.transformers_llm import TransformersLLM

    class Spy(TransformersLLM):
        def complete(self, chats, sampling, stop=None, sessions=None, **kw):
            out = super().complete(chats, sampling, stop, sessions, **kw)
            self.calls.append((chats, stop, out))
            return out

    spy = Spy(tiny_model_dir)
    spy.calls = []
    # One try: each explored step has one ActRe completion (re-asks are tested above).
    annotator = ActReAnnotator(spy, sampling=Sampling(temperature=0.0, max_new_tokens=8), tries=1)
    store = TrajectoryStore(tmp_path / "t.jsonl")
    cfg = RolloutConfig(parallel_episodes=1, p_explore=0.5, retry_max=0, max_new_tokens=8, seed=1)
    rollout([task_for(find_games(games_root, "valid_unseen")[0])], store, spy, annotator, cfg, EnvConfig(max_steps=5))
    (trajectory,) = list(store.read())
    steps = trajectory.steps
    assert any(s.explored for s in steps) and any(not s.explored for s in steps[:-1])

    actre_reasons = []
    for chats, stop, out in spy.calls:
        if stop is stop_after_first_line:
            actre_reasons += [parse_reason(c.text) for c in out]
    explored = [(k, s) for k, s in enumerate(steps) if s.explored]
    assert len(actre_reasons) == len(explored)
    for (k, step), reason in zip(explored, actre_reasons):
        request = ActReRequest(trajectory.task_type, trajectory.initial_observation, steps[:k], step.action)
        assert step.thought == (reason if rejection(request, reason) is None else fallback_reason(request))
        assert step.valid and step.thought

    policy_chats = [chats[0] for chats, stop, _ in spy.calls if stop is not stop_after_first_line]
    assert len(policy_chats) == sum(not s.explored for s in steps)
    for chat in policy_chats:
        # The policy's reply is started for it ("Thought:", rollout.start_with_thought).
        assert chat[-1] == {"role": "assistant", "content": "Thought:"}
        chat = chat[:-1]
        k = (len(chat) - 2) // 2  # steps before this call
        assert chat == react_chat(trajectory.task_type, trajectory.initial_observation, steps[:k])
        for i, step in enumerate(steps[:k]):
            rendered = chat[2 + 2 * i]
            assert rendered == {"role": "assistant", "content": format_turn(step.thought, step.action)}
            # read back like any policy turn (up to whitespace)
            reparsed = parse_turn(rendered["content"])
            assert reparsed.action == step.action
            assert reparsed.thought == " ".join(step.thought.split())


def test_actre_reason_round_trips_like_a_policy_thought():
    reason = parse_reason("Thought: the fridge  cools\tthings")
    parsed = parse_turn(format_turn(reason, "go to fridge 1"))
    assert (parsed.thought, parsed.action) == (reason, "go to fridge 1")
