"""Constrained actions: the in-process engine decodes a constrained row under a token trie of its
choices, so it only ever writes one of them (greedy, sampled, batched, drafts on and off), and
greedy decoding gives what plain ``generate`` gives with the same trie as its prefix constraint.
The rollout in ``constrained`` mode takes every policy action from the admissible ones."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from a3t.agent.react import react_chat  # noqa: E402
from a3t.config import EnvConfig, RolloutConfig  # noqa: E402
from a3t.envs.alfworld import AlfWorldEnv, find_games  # noqa: E402
from a3t.llm.base import Sampling, stop_after_thought  # noqa: E402
from a3t.llm.transformers_llm import TransformersLLM  # noqa: E402
from a3t.rollout import rollout, task_for  # noqa: E402
from a3t.trajectory import TrajectoryStore  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOM = "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a fridge 1, a sinkbasin 1."
WORDS = ["go to", "take", "open", "close", "put", "examine", "cabinet", "fridge", "apple", "mug", "1", "2", "10",
         "in/on", "from", "sinkbasin", "look", "inventory"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return TransformersLLM(tiny_model_dir)


def _chat(task: str, thought: str = "I go on.") -> list[dict]:
    chat = react_chat("pick_and_place_simple", f"{ROOM}\n\nYour task is to: {task}", [])
    return chat + [{"role": "assistant", "content": f"Thought: {thought}\nAction:"}]


def _reference(llm: TransformersLLM, chat, choices) -> str:
    """Plain generate() with the trie as its prefix constraint (the transformers way)."""
    text = llm.render(chat)
    ids = llm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    trie = llm._trie(chat, text, ids[0].tolist(), choices)
    n = ids.shape[1]

    def allowed(_, sequence):
        node = trie.walk(trie.root, sequence[n:].tolist())
        return trie.allowed(node) if node else [llm._pad_id]

    with torch.inference_mode():
        out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=trie.longest, do_sample=False,
                                 prefix_allowed_tokens_fn=allowed, pad_token_id=llm._pad_id)
    node = trie.walk(trie.root, out[0, n:].tolist())
    return node[None]


choice_sets = st.lists(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join), min_size=1, max_size=8, unique=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(choice_sets, min_size=1, max_size=4), temperature=st.sampled_from([0.0, 1.0]),
       drafts=st.sampled_from([0, 4]), seed=st.integers(0, 10), lanes=st.sampled_from([1, 2]))
def test_constrained_rows_only_write_one_of_their_choices(llm, sets, temperature, drafts, seed, lanes):
    llm.draft_tokens, llm.lanes = drafts, lanes
    chats = [_chat(f"put a apple in fridge {i}.") for i in range(len(sets))] + [_chat("look around.")]
    out = llm.complete(chats, Sampling(temperature=temperature, max_new_tokens=3, seed=seed),
                       choices=sets + [None])  # the last row is free and stops at its length limit
    for completion, choices in zip(out, sets):
        assert completion.text in choices and completion.stopped
    assert not out[-1].stopped and out[-1].completion_tokens == 3


@pytest.mark.parametrize("drafts, lanes", [(0, 1), (4, 1), (4, 2)])
def test_greedy_constrained_equals_generate_with_the_same_trie(llm, drafts, lanes):
    llm.draft_tokens, llm.lanes = drafts, lanes
    sets = [["go to cabinet 1", "go to fridge 1", "go to sinkbasin 1", "look", "inventory"],
            ["take apple 1 from cabinet 1", "take apple 10 from cabinet 1", "take mug 2 from fridge 1"],
            ["examine cabinet 1", "close fridge 1"]]
    chats = [_chat("put a apple in fridge.", t) for t in ("I look around.", "I take the apple.", "I check.")]
    out = llm.complete(chats, Sampling(temperature=0.0, max_new_tokens=2), sessions=["a", "b", "c"], choices=sets)
    assert [c.text for c in out] == [_reference(llm, chat, s) for chat, s in zip(chats, sets)]


def test_constrained_chat_needs_choices_and_an_assistant_message(llm):
    with pytest.raises(ValueError, match="at least one choice"):
        llm.complete([_chat("x")], Sampling(), choices=[[]])
    with pytest.raises(ValueError, match="ends with the assistant message"):
        llm.complete([_chat("x")[:-1]], Sampling(), choices=[["look"]])


@pytest.mark.parametrize("text, thought", [(" I go to the fridge.\nAction: go to fridge 1", "I go to the fridge."),
                                           (" I go.\n\nmore", "I go."), ("\nAction: look\n", ""),
                                           (" I go.\nObservation: You arrive", "I go.")])
def test_stop_after_thought(text, thought):
    assert text[: stop_after_thought(text)].strip() == thought
    assert stop_after_thought(" still thinking") is None


def _constrained_rollout(tmp_path, games, policy, steps=3):
    cfg = RolloutConfig(parallel_episodes=2, p_explore=0.0, retry_max=0, max_new_tokens=8, seed=0)
    from a3t.agent.actre import ActReAnnotator

    store = TrajectoryStore(tmp_path / "c.jsonl")
    rollout([task_for(g) for g in games], store, policy, ActReAnnotator(policy), cfg, EnvConfig(max_steps=steps),
            action_mode="constrained")
    return list(store.read())


def test_constrained_rollout_takes_only_admissible_actions(tmp_path, games_root, llm):
    """A random tiny model never writes an admissible command by itself; constrained, every one is."""
    llm.draft_tokens = 4
    trajectories = _constrained_rollout(tmp_path, find_games(games_root, "valid_unseen"), llm)
    steps = [s for t in trajectories for s in t.steps]
    assert len(steps) == 6 and all(s.valid and not s.explored for s in steps)
    assert all(s.action and s.action != "help" for s in steps)


def test_a_state_without_admissible_actions_ends_the_episode(tmp_path, games_root, llm, monkeypatch, caplog):
    monkeypatch.setattr(AlfWorldEnv, "admissible_actions", property(lambda self: ["help"] if self.steps_taken else
                                                                    ["look"]))
    with caplog.at_level(logging.WARNING, logger="a3t.rollout"):
        (t,) = _constrained_rollout(tmp_path, find_games(games_root, "valid_unseen")[:1], llm)
    assert len(t.steps) == 1 and t.terminal_reason == "no_admissible_action" and not t.success
    assert "no admissible action" in caplog.text
