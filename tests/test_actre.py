"""ActRe: the prompt, the annotator (batched, with a fallback reason), and how an explored
step looks in the policy's chat: exactly like a policy turn."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from a3t.agent.actre import ActReAnnotator, ActReRequest, actre_chat, parse_reason  # noqa: E402
from a3t.agent.examples import example_for  # noqa: E402
from a3t.agent.react import example_text, format_turn, parse_turn, react_chat  # noqa: E402
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
OBS = "You are in the middle of a room.\n\nYour task is to: put a cool apple in countertop."

REQUESTS = [
    ActReRequest("pick_cool_then_place_in_recep", OBS, STEPS, "go to fridge 1"),
    ActReRequest("pick_and_place_simple", "You are in the middle of a room.\n\nYour task is to: put a pen in desk.",
                 [], "go to desk 1"),
    ActReRequest("pick_two_obj_and_place", OBS, STEPS[:1], "put apple 1 in/on countertop 1"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    from a3t.llm.transformers_llm import TransformersLLM

    return TransformersLLM(tiny_model_dir)


class _EmptyLLM:
    """A stub of the LLM protocol, ONLY to unit-test the annotator's fallback: it answers
    the given texts in turn (a model that writes no reason)."""

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
    assert [m["role"] for m in chat] == ["system", "user"]
    assert example_text(example_for("pick_cool_then_place_in_recep", phrasing)) in chat[0]["content"]
    question = chat[1]["content"]
    assert question.startswith(f"Observation: {OBS}\nThought: I look for the apple.\nAction: go to countertop 1\n")
    assert "Action: take apple 1 from countertop 1\nObservation: You pick up the apple 1" in question
    assert "\nNext action: go to fridge 1\n" in question


# --------------------------------------------------------------------------- the annotator


def test_annotator_gives_one_reason_per_request_with_the_tiny_model(tiny_llm):
    annotator = ActReAnnotator(tiny_llm, sampling=Sampling(temperature=0.0, max_new_tokens=8))
    answers = annotator.reasons(REQUESTS)
    assert len(answers) == len(REQUESTS)
    fallbacks = 0
    for request, (reason, completion) in zip(REQUESTS, answers):
        assert isinstance(completion, Completion)
        assert reason and reason == reason.strip() and "\n" not in reason
        assert completion.prompt_tokens > 0 and 0 < completion.completion_tokens <= 8
        if parse_reason(completion.text):
            assert reason == parse_reason(completion.text)
        else:
            fallbacks += 1
            assert reason == f"I will {request.action} next."
    assert annotator.fallbacks == fallbacks
    # the batch does not change a request's answer (greedy): alone it reads the same
    alone = annotator.reasons(REQUESTS[1:2])
    assert alone[0][0] == answers[1][0]


def test_annotator_fallback_when_the_model_writes_nothing(tiny_llm):
    annotator = ActReAnnotator(tiny_llm, sampling=Sampling(temperature=0.0, max_new_tokens=0))
    answers = annotator.reasons(REQUESTS)
    assert [reason for reason, _ in answers] == [f"I will {r.action} next." for r in REQUESTS]
    assert all(c.text == "" and c.completion_tokens == 0 for _, c in answers)
    assert annotator.fallbacks == 3
    annotator.reasons(REQUESTS[:2])
    assert annotator.fallbacks == 5


def test_annotator_fallback_counts_only_empty_reasons():
    llm = _EmptyLLM(["Thought:", "Thought: the fridge cools things.\nAction: go to fridge 1", "\n  \n"])
    annotator = ActReAnnotator(llm)
    answers = annotator.reasons(REQUESTS)
    assert [reason for reason, _ in answers] == [
        "I will go to fridge 1 next.", "the fridge cools things.", "I will put apple 1 in/on countertop 1 next."]
    assert annotator.fallbacks == 2
    chats, sampling, stop, sessions = llm.calls[0]
    assert stop is stop_after_first_line
    assert sampling.temperature == 0.0  # greedy by default
    assert chats == [actre_chat(r, "put") for r in REQUESTS]
    assert annotator.reasons([]) == [] and len(llm.calls) == 1  # nothing asked, no call


# --------------------------------------------------------------------------- explored steps in the policy chat


def test_explored_step_in_the_policy_chat_is_a_policy_turn(games_root, tiny_model_dir, tmp_path):
    """Tiny model as policy and ActRe; a spy (the real model, recording its inputs) sees
    each policy chat. Every earlier step, explored or not, is rendered as format_turn."""
    from a3t.llm.transformers_llm import TransformersLLM

    class Spy(TransformersLLM):
        def complete(self, chats, sampling, stop=None, sessions=None):
            out = super().complete(chats, sampling, stop, sessions)
            self.calls.append((chats, stop, out))
            return out

    spy = Spy(tiny_model_dir)
    spy.calls = []
    annotator = ActReAnnotator(spy, sampling=Sampling(temperature=0.0, max_new_tokens=8))
    store = TrajectoryStore(tmp_path / "t.jsonl")
    cfg = RolloutConfig(parallel_episodes=1, p_explore=0.5, retry_max=0, max_new_tokens=8, seed=1)
    rollout([task_for(find_games(games_root, "valid_unseen")[0])], store, spy, annotator, cfg, EnvConfig(max_steps=5))
    (trajectory,) = list(store.read())
    steps = trajectory.steps
    assert any(s.explored for s in steps) and any(not s.explored for s in steps[:-1])

    actre_reasons = []
    for chats, stop, out in spy.calls:
        if stop is stop_after_first_line:
            actre_reasons += [parse_reason(c.text) or None for c in out]
    explored = [s for s in steps if s.explored]
    assert len(actre_reasons) == len(explored)
    for step, reason in zip(explored, actre_reasons):
        assert step.thought == (reason or f"I will {step.action} next.")
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
