"""The training set: loss masks from the chat template, loading with quarantine, examples.

Trajectories are written by hand (ALFWorld-like text) and rendered with the tiny Mistral's
real v3 tokenizer and its ChatML-like template ("[INST] obs [/INST]reply</s>").
"""

from __future__ import annotations

import itertools
import json

import pytest

from a3t.agent.react import format_turn, react_chat
from a3t.data import build_examples, load_trajectories, tokenize_trajectory, turn_spans
from a3t.envs.alfworld_gen import TASK_TYPES
from a3t.filter import filter_trajectories
from a3t.trajectory import StepRecord, TrajectoryStore
from factories import make_trajectory

INITIAL = (
    "-= Welcome to TextWorld, ALFRED! =-\n\n"
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
    "a drawer 1, and a sinkbasin 1.\n\nYour task is to: put a clean mug in cabinet."
)
STEPS = [
    StepRecord(
        thought="To solve the task, I need to find and take a mug, then clean it with sinkbasin, then put it in cabinet. "
        "First I need to find a mug. A mug is more likely to appear in countertop (1), drawer (1).",
        action="go to countertop 1",
        observation="You arrive at countertop 1. On the countertop 1, you see a mug 1, and a spatula 2.",
    ),
    StepRecord(
        thought="Now I find a mug (1). Next, I need to take it.",
        action="take mug 1 from countertop 1",
        observation="You pick up the mug 1 from the countertop 1.",
        explored=True,
    ),
    StepRecord(
        thought="I should open the fridge.",
        action="open fridge 1",
        observation="Nothing happens.",
        valid=False,
    ),
]


def make_traj(task_id="clean/trial_0", success=True, n=0, steps=STEPS, task_type="pick_clean_then_place_in_recep"):
    assert task_type in TASK_TYPES
    return make_trajectory(task_id, success, attempt=n, task_type=task_type, task="put a clean mug in cabinet",
                           source="explored" if any(s.explored for s in steps) else "policy",
                           initial_observation=INITIAL, steps=list(steps))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def runs(example, tokenizer):
    """The decoded text of each contiguous run of loss tokens."""
    out = []
    for in_loss, group in itertools.groupby(zip(example.input_ids, example.loss_mask), key=lambda x: x[1]):
        if in_loss:
            out.append(tokenizer.decode([i for i, _ in group]))
    return out


def expected_runs(steps, observations: bool):
    out = []
    for s in steps:
        out.append(format_turn(s.thought, s.action) + "</s>")
        if observations:
            out.append(s.observation)
    return out


@pytest.mark.parametrize("observations", [True, False])
@pytest.mark.parametrize("task_type", ["pick_clean_then_place_in_recep", "look_at_obj_in_light"])
def test_loss_mask_covers_exactly_the_turns(tokenizer, observations, task_type):
    t = make_traj(task_type=task_type)
    e = tokenize_trajectory(tokenizer, t, 1.0, "put", observations, max_length=4096)
    ids, mask = e.input_ids, e.loss_mask
    assert len(ids) == len(mask) and any(mask) and set(mask) <= {0, 1}
    assert e.weight == 1.0 and e.episode_id == t.episode_id

    # the tokens are the chat rendered by the template, as the rollout prompt was
    text = tokenizer.apply_chat_template(react_chat(t.task_type, t.initial_observation, t.steps, "put"), tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids

    # decoding each run of loss tokens gives back exactly the turns (and the observations)
    assert runs(e, tokenizer) == expected_runs(t.steps, observations)

    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    inst, end_inst = tokenizer.convert_tokens_to_ids("[INST]"), tokenizer.convert_tokens_to_ids("[/INST]")
    assert inst != tokenizer.unk_token_id and end_inst != tokenizer.unk_token_id
    # every agent turn ends with its end-of-turn token, and it is in the loss
    eos_positions = [i for i, x in enumerate(ids) if x == eos]
    assert len(eos_positions) == len(t.steps)
    assert all(mask[i] == 1 for i in eos_positions)
    # the turn starts right after [/INST]: that first token is in the loss too
    end_inst_positions = [i for i, x in enumerate(ids) if x == end_inst]
    assert len(end_inst_positions) == len(t.steps) + 1
    for i in end_inst_positions[:-1]:
        assert mask[i + 1] == 1
    # the template's markers, BOS, the system prompt with its example and the first observation: never
    assert all(mask[i] == 0 for i, x in enumerate(ids) if x in (inst, end_inst, bos))
    first_turn = end_inst_positions[0] + 1
    assert not any(mask[:first_turn])
    # after the last turn's </s>: only the last observation (if at all)
    tail = mask[eos_positions[-1] + 1 :]
    assert any(tail) == observations


def test_observations_add_only_observation_tokens(tokenizer):
    t = make_traj()
    with_obs = tokenize_trajectory(tokenizer, t, 1.0, "put", True, 4096)
    without = tokenize_trajectory(tokenizer, t, 1.0, "put", False, 4096)
    assert with_obs.input_ids == without.input_ids
    assert all(a >= b for a, b in zip(with_obs.loss_mask, without.loss_mask))
    extra = [x for x, a, b in zip(with_obs.input_ids, with_obs.loss_mask, without.loss_mask) if a and not b]
    obs_tokens = sum(len(tokenizer(s.observation, add_special_tokens=False).input_ids) for s in t.steps)
    assert abs(len(extra) - obs_tokens) <= len(t.steps)  # up to one boundary token of difference each


def test_turn_spans_mark_agent_turns(tokenizer):
    t = make_traj()
    chat = react_chat(t.task_type, t.initial_observation, t.steps, "put")
    text, spans = turn_spans(tokenizer, chat, observations=True)
    got = [(text[a:b], is_turn) for a, b, is_turn in spans]
    want = []
    for s in t.steps:
        want += [(format_turn(s.thought, s.action) + "</s>", True), (s.observation, False)]
    assert got == want
    _, turns_only = turn_spans(tokenizer, chat, observations=False)
    assert [s for s in spans if s[2]] == turns_only


def test_move_phrasing_renders_the_move_example(tokenizer):
    t = make_traj()
    put = tokenize_trajectory(tokenizer, t, 1.0, "put", True, 4096)
    move = tokenize_trajectory(tokenizer, t, 1.0, "move", True, 4096)
    assert put.input_ids != move.input_ids  # the instruction and the example differ
    assert runs(move, tokenizer) == runs(put, tokenizer)


def test_max_length_keeps_the_start(tokenizer):
    t = make_traj()
    full = tokenize_trajectory(tokenizer, t, 1.0, "put", True, 4096)
    eos = tokenizer.eos_token_id
    # cut in the middle of the second turn
    second_eos = [i for i, x in enumerate(full.input_ids) if x == eos][1]
    cut = second_eos - 3
    short = tokenize_trajectory(tokenizer, t, 1.0, "put", True, cut)
    assert len(short.input_ids) == len(short.loss_mask) == cut
    assert short.input_ids == full.input_ids[:cut]
    assert short.loss_mask == full.loss_mask[:cut]
    assert short.input_ids[0] == tokenizer.bos_token_id
    # shorter than the trajectory is a no-op above
    assert tokenize_trajectory(tokenizer, t, 1.0, "put", True, len(full.input_ids)).input_ids == full.input_ids


def test_no_example_without_loss_tokens_after_truncation(tokenizer):
    t = make_traj()
    full = tokenize_trajectory(tokenizer, t, 1.0, "put", True, 4096)
    prompt_length = full.loss_mask.index(1)  # the system prompt, the example and the first observation
    try:
        examples = build_examples([t], tokenizer, variant="sft", max_length=prompt_length)
    except ValueError:
        return  # refusing is fine
    assert all(any(e.loss_mask) for e in examples)  # so is dropping; an example that trains nothing is not


# --- loading with quarantine -----------------------------------------------------------


def test_load_trajectories_quarantines_bad_lines(tmp_path):
    good = [make_traj(n=i) for i in range(3)]
    lines = [good[0].model_dump_json()]
    lines.append('{"episode_id": "oops", "task_id": 3}')  # line 2: malformed record
    whole = good[1].model_dump_json()
    lines.append(whole[: len(whole) // 2])  # line 3: truncated in the middle of the file
    lines.append(good[2].model_dump_json())  # line 4: good
    path = tmp_path / "round0.jsonl"
    torn = make_traj(n=9).model_dump_json()
    path.write_text("\n".join(lines) + "\n" + torn[: len(torn) // 3])  # line 5: torn tail, no newline

    other = tmp_path / "round1.jsonl"
    other.write_text(make_traj(n=7).model_dump_json() + "\nnot json at all\n")

    loaded = load_trajectories([path, other])  # nothing raised
    assert [t.episode_id for t in loaded] == [good[0].episode_id, good[2].episode_id, make_traj(n=7).episode_id]
    assert loaded[0] == good[0]

    reasons = [json.loads(x) for x in (tmp_path / "round0.jsonl.quarantine").read_text().splitlines()]
    where = sorted(r["reason"].split(": ")[0] for r in reasons)
    assert where == [f"{path}:2", f"{path}:3", f"{path}:5"]
    kept = {r["reason"].split(": ")[0]: r["line"] for r in reasons}
    assert kept[f"{path}:2"] == lines[1]
    assert kept[f"{path}:3"] == lines[2]
    assert kept[f"{path}:5"] == torn[: len(torn) // 3]

    reasons1 = [json.loads(x) for x in (tmp_path / "round1.jsonl.quarantine").read_text().splitlines()]
    assert [r["reason"].split(": ")[0] for r in reasons1] == [f"{other}:2"]
    assert reasons1[0]["line"] == "not json at all"


def test_load_trajectories_of_a_missing_file_is_empty(tmp_path):
    assert load_trajectories([tmp_path / "none.jsonl"]) == []


# --- examples --------------------------------------------------------------------------

SHORT = STEPS[:2]


def test_build_examples_pg_drops_weight_zero(tokenizer):
    ts = [make_traj("a", True, 0, SHORT)] + [make_traj("a", False, i, SHORT) for i in (1, 2, 3)]
    ts += [make_traj("b", False, 0, SHORT), make_traj("b", False, 1, SHORT)]  # no success: weight 0
    ts += [make_traj("c", True, 0, SHORT)]  # only successes: weight 1
    examples = build_examples(ts, tokenizer, variant="pg", observations=True, max_length=2048)
    assert [e.episode_id for e in examples] == [t.episode_id for t in ts if t.task_id != "b"]
    assert [e.weight for e in examples] == pytest.approx([1.75, -0.25, -0.25, -0.25, 1.0])
    assert all(any(e.loss_mask) for e in examples)


def test_build_examples_sft_keeps_only_successes(tokenizer):
    ts = [make_traj("a", True, 0, SHORT), make_traj("a", False, 1, SHORT), make_traj("b", False, 0, SHORT)]
    examples = build_examples(ts, tokenizer, variant="sft", observations=False, max_length=2048)
    assert [(e.episode_id, e.weight) for e in examples] == [(ts[0].episode_id, 1.0)]
    assert runs(examples[0], tokenizer) == expected_runs(SHORT, observations=False)


def test_build_examples_raw(tokenizer):
    ts = [make_traj("w", False, 0, SHORT).model_copy(update={"reward": 0.5}), make_traj("w", True, 1, SHORT)]
    examples = build_examples(ts, tokenizer, variant="raw", max_length=2048)
    assert [e.weight for e in examples] == pytest.approx([0.25, 1.25])


def test_build_examples_of_a_training_set_use_its_recorded_weights(tokenizer, tmp_path):
    ts = [make_traj("w", True, 0, SHORT)] + [make_traj("w", False, i, SHORT).model_copy(update={"reward": r})
                                            for i, r in ((1, 0.5), (2, 0.25), (3, 0.25))]
    store = TrajectoryStore(tmp_path / "train_set.jsonl")
    for t in filter_trajectories(ts, "raw"):
        store.append(t)
    examples = build_examples(load_trajectories([store.path]), tokenizer, variant="raw", max_length=2048)
    assert [e.weight for e in examples] == pytest.approx([1.5, 0.5])


def test_build_examples_of_only_failures_is_empty(tokenizer):
    ts = [make_traj("b", False, i, SHORT) for i in range(2)]
    assert build_examples(ts, tokenizer, variant="pg") == []
    assert build_examples(ts, tokenizer, variant="sft") == []
