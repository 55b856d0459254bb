"""The in-process backend's cache: greedy outputs of the batched engine (sessions, shared
prefixes, preallocated buffers, rows leaving the decode batch, prefill in length groups)
equal plain un-batched ``generate`` on the whole prompt, with the tiny model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from a3t.agent.react import react_chat  # noqa: E402
from a3t.llm import transformers_llm  # noqa: E402
from a3t.llm.base import Sampling, stop_after_action_line  # noqa: E402
from a3t.llm.transformers_llm import (  # noqa: E402
    TransformersLLM,
    _common_prefix,
    _draft,
    _groups,
    _shared_prefixes,
)
from a3t.trajectory import StepRecord  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = Sampling(temperature=0.0, max_new_tokens=10)
ROOM = "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a fridge 1, a sinkbasin 1."


def _chats(steps: int = 0) -> list[list[dict]]:
    """Policy chats of 5 episodes: two task types share an example, the tasks differ, one
    history is longer (its new text is much longer than the others')."""
    tasks = [("pick_and_place_simple", "put a apple in fridge."), ("pick_and_place_simple", "put a mug in cabinet."),
             ("pick_heat_then_place_in_recep", "heat some egg and put it in fridge."),
             ("pick_heat_then_place_in_recep", "heat some potato and put it in cabinet."),
             ("look_at_obj_in_light", "examine the book with the desklamp.")]
    chats = []
    for i, (task_type, task) in enumerate(tasks):
        history = [StepRecord(thought=f"I look around, {k}.", action="look", observation=ROOM * (1 + 3 * (i == 4)))
                   for k in range(steps)]
        chats.append(react_chat(task_type, f"{ROOM}\n\nYour task is to: {task}", history))
    return chats


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return TransformersLLM(tiny_model_dir)


def _reference(llm: TransformersLLM, chat, sampling: Sampling, stop=None) -> str:
    """One chat alone, whole prompt, plain generate(); then the stop rule on the text."""
    ids = llm.tokenizer(llm.render(chat), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                                 do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
    tokens = []
    for token in out[0, ids.shape[1] :].tolist():
        if token in llm._end_ids:
            break
        tokens.append(token)
        text = llm.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = stop(text) if stop else None
        if cut is not None:
            return text[:cut]
    return llm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_batched_sessions_equal_generate_alone(tiny_model_dir):
    llm = TransformersLLM(tiny_model_dir)
    sessions = [f"e{i}" for i in range(5)]
    for steps in (0, 1, 2):  # the chats grow: later calls start from each session's cache
        chats = _chats(steps)
        out = llm.complete(chats, GREEDY, sessions=sessions)
        assert [c.text for c in out] == [_reference(llm, chat, GREEDY) for chat in chats]
        full = [len(llm.tokenizer(llm.render(chat), add_special_tokens=False)["input_ids"]) for chat in chats]
        assert all(0 < c.prompt_tokens < n for c, n in zip(out, full))  # every row reused a cache
    llm.release(sessions)
    assert llm._sessions == {}


def test_a_continued_reply_reuses_the_tokens_it_generated(tiny_model_dir):
    """A session keeps the keys/values of what its row generated: the next call, the reply
    continued (as the action after a thought), encodes only the tokens past them, and still
    gets the text of generate alone."""
    llm = TransformersLLM(tiny_model_dir)
    sessions = [f"e{i}" for i in range(5)]
    chats = [chat + [{"role": "assistant", "content": "Thought:"}] for chat in _chats(1)]
    first = llm.complete(chats, GREEDY, sessions=sessions)
    prompts = [llm.tokenizer(llm.render(chat), add_special_tokens=False)["input_ids"] for chat in chats]
    kept = [llm._sessions[s].ids for s in sessions]
    assert all(ids[: len(p)] == p and len(ids) > len(p) for ids, p in zip(kept, prompts))
    follow = [chat[:-1] + [{"role": "assistant", "content": f"Thought:{c.text}\nAction:"}]
              for chat, c in zip(chats, first)]
    out = llm.complete(follow, GREEDY, sessions=sessions)
    assert [c.text for c in out] == [_reference(llm, chat, GREEDY) for chat in follow]
    ids = [llm.tokenizer(llm.render(chat), add_special_tokens=False)["input_ids"] for chat in follow]
    reused = [_common_prefix(k, i, len(i) - 1) for k, i in zip(kept, ids)]
    assert [c.prompt_tokens for c in out] == [len(i) - n for i, n in zip(ids, reused)]
    assert sum(n > len(p) for n, p in zip(reused, prompts)) >= 3  # most rows reused generated tokens


def test_rows_split_over_lanes_get_their_text_alone(tiny_model_dir):
    """Two lanes (threads, a batch each): every row still gets the text it gets alone, in its
    place, and keeps its session; a call of one row runs in the caller's thread."""
    llm = TransformersLLM(tiny_model_dir, lanes=2)
    sessions = [f"e{i}" for i in range(5)]
    for steps in (0, 1):
        chats = _chats(steps)
        out = llm.complete(chats, GREEDY, sessions=sessions)
        assert [c.text for c in out] == [_reference(llm, chat, GREEDY) for chat in chats]
        assert list(llm._sessions) == sessions  # in row order, whichever lane finished first
    (one,) = llm.complete(_chats(2)[:1], GREEDY, sessions=["e0"])
    assert one.text == _reference(llm, _chats(2)[0], GREEDY)


def test_shared_prefix_is_encoded_once_and_reused(tiny_model_dir):
    llm = TransformersLLM(tiny_model_dir)
    chats = _chats()
    out = llm.complete(chats, GREEDY, sessions=[f"e{i}" for i in range(5)])
    assert [c.text for c in out] == [_reference(llm, chat, GREEDY) for chat in chats]
    prompts = [llm.tokenizer(llm.render(chat), add_special_tokens=False)["input_ids"] for chat in chats]
    shared = {len(p.ids) for p in llm._prefixes}
    # the system prompt for all, and each example for its two tasks
    assert _common_prefix(prompts[0], prompts[4], 10**6) in shared
    assert _common_prefix(prompts[0], prompts[1], 10**6) in shared
    assert _common_prefix(prompts[2], prompts[3], 10**6) in shared
    assert out[1].prompt_tokens == len(prompts[1]) - _common_prefix(prompts[0], prompts[1], 10**6)

    # a new episode (no session) of a known task type starts from the shared prefix
    llm.release([f"e{i}" for i in range(5)])
    chat = react_chat("pick_heat_then_place_in_recep", f"{ROOM}\n\nYour task is to: heat some bread.", [])
    ids = llm.tokenizer(llm.render(chat), add_special_tokens=False)["input_ids"]
    (c,) = llm.complete([chat], GREEDY, sessions=["new"])
    assert c.prompt_tokens == len(ids) - _common_prefix(ids, prompts[2], 10**6)
    assert c.text == _reference(llm, chat, GREEDY)


def test_shared_prefixes_are_bounded(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(transformers_llm, "SHARED_PREFIXES", 2)
    llm = TransformersLLM(tiny_model_dir)
    llm.complete(_chats(), GREEDY)
    assert len(llm._prefixes) == 2


def test_finished_rows_leave_the_decode_batch(llm, monkeypatch):
    """Rows stop at different steps (the stop rule, an end token, the length limit): each
    still gets the text it gets alone, and the decode batch shrinks as they finish."""
    sampling = Sampling(temperature=0.0, max_new_tokens=12)
    chats = _chats(1)
    alone = [_reference(llm, chat, sampling) for chat in chats]
    # a word that some rows write and others do not: those rows stop right after it
    marker = next(w for text in alone for w in text.split()[1:] if not all(w in a for a in alone))

    def stop(text):
        return text.index(marker) + len(marker) if marker in text else None

    rows: list[int] = []
    original = llm._forward
    monkeypatch.setattr(llm, "_forward", lambda ids, *args, **kwargs: (rows.append(ids.shape[0]), original(ids, *args, **kwargs))[1])
    out = llm.complete(chats, sampling, stop=stop)
    assert [c.text for c in out] == [_reference(llm, chat, sampling, stop) for chat in chats]
    assert any(c.stopped for c in out) and not all(c.stopped for c in out)
    assert min(rows) < len(chats)  # some decode forwards ran without the finished rows


def test_stop_rule_and_end_token(llm):
    chats = _chats(1)
    out = llm.complete(chats, GREEDY, stop=stop_after_action_line)
    assert [c.text for c in out] == [_reference(llm, chat, GREEDY, stop_after_action_line) for chat in chats]
    for c in out:
        assert c.stopped == (c.completion_tokens < GREEDY.max_new_tokens or stop_after_action_line(c.text) is not None)


def test_seeded_sampling_repeats(llm):
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3)
    first = [c.text for c in llm.complete(_chats(), sampling)]
    assert first == [c.text for c in llm.complete(_chats(), sampling)]


def test_no_new_tokens(llm):
    out = llm.complete(_chats(), Sampling(max_new_tokens=0))
    assert all(c.text == "" and c.completion_tokens == 0 for c in out)


def test_drafts_give_the_same_text_in_fewer_forwards(tiny_model_dir):
    """Prompt-lookup drafts change how many forwards a turn takes, never its greedy text
    (the random tiny model soon repeats itself, so drafts are accepted)."""
    sampling = Sampling(temperature=0.0, max_new_tokens=40)
    chats = _chats(1)
    texts, taken = {}, {}
    for draft_tokens in (0, 4):
        llm = TransformersLLM(tiny_model_dir, draft_tokens=draft_tokens)
        picks = []

        def spy(*args, verify=llm._verify):
            out = verify(*args)
            picks.extend(out)
            return out

        llm._verify = spy
        texts[draft_tokens] = [c.text for c in llm.complete(chats, sampling, sessions=[str(i) for i in range(5)])]
        taken[draft_tokens] = max(len(p) for p in picks)
    assert texts[0] == texts[4] == [_reference(llm, chat, sampling) for chat in chats]
    assert taken[0] == 1 and taken[4] > 1  # some forward gave a row more than one token


def test_draft_is_what_followed_the_last_tokens():
    assert _draft([5, 6, 7, 8, 9, 5, 6, 7], budget=3) == [8, 9, 5]
    assert _draft([5, 6, 7, 8, 1, 6, 7, 2, 6, 7], budget=2) == [2, 6]  # the latest occurrence
    assert _draft([1, 2, 3, 4], budget=3) == []  # the last token never occurred before
    assert _draft([1, 9, 2, 9], budget=5) == [2, 9]  # up to the end of the context
    assert _draft([1, 9, 1, 9], budget=0) == [] and _draft([4], budget=3) == []


def test_sampled_drafts_keep_the_distribution(llm):
    """With a draft, a token is still drawn from the model's (temperature) distribution."""
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    sampling = Sampling(temperature=0.7, max_new_tokens=8)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[llm._verify(logits, [[1]], sampling, generator)[0][0]] += 1
    assert torch.allclose(counts / 4000, torch.softmax(logits[0, 0] / 0.7, -1), atol=0.03)
    # top_p: tokens outside the nucleus are never drawn, drafted or not
    counts.zero_()
    for _ in range(500):
        counts[llm._verify(logits, [[3]], Sampling(temperature=0.7, top_p=0.6), generator)[0][0]] += 1
    assert counts[0] == 500


def test_groups_by_length():
    assert _groups([10, 300, 20, 290, 150], slack=64) == [[1, 3], [4], [2, 0]]
    assert _groups([5], slack=64) == [[0]]


def test_shared_prefixes_form_a_tree():
    system, ex_a, ex_b = list(range(100)), list(range(1000, 1100)), list(range(2000, 2100))
    prompts = [system + ex_a + [1], system + ex_b + [2], system + ex_a + [3], system + ex_b + [4], [7] * 50]
    assert _shared_prefixes(prompts, [0] * 5, min_shared=64) == [system, system + ex_a, system + ex_b]
    # rows that already have the system prompt cached only gain the examples
    assert _shared_prefixes(prompts, [100] * 4 + [0], min_shared=64) == [system + ex_a, system + ex_b]
    # too short a gain: nothing
    assert _shared_prefixes(prompts, [150] * 4 + [0], min_shared=64) == []
    assert _shared_prefixes([system + [1]], [0], min_shared=64) == []
