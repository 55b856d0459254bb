"""The rollout engine: A3T exploration, retries, the records it writes, scripted
(annotated) episodes, and one end-to-end run with the tiny model.

The engine's decision rules are unit-tested with stub LLMs (small classes implementing
the LLM protocol with fixed answers); the annotation and end-to-end tests use the real
tiny model in process."""

from __future__ import annotations

import itertools
import json
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from a3t.agent.actre import ActReAnnotator  # noqa: E402
from a3t.annotate import recorded_tasks, walkthrough_tasks  # noqa: E402
from a3t.config import EnvConfig, RolloutConfig  # noqa: E402
from a3t.envs.alfworld import GameFileError, find_games, load_game  # noqa: E402
from a3t.llm.base import Completion, Sampling, stop_after_action_line, stop_after_first_line  # noqa: E402
from a3t.envs.base import Task  # noqa: E402
from a3t.rollout import _Scheduler, rollout, task_for  # noqa: E402
from a3t.trajectory import Trajectory, TrajectoryStore  # noqa: E402
from factories import make_trajectory  # noqa: E402

LOOK = "Thought: I look around.\nAction: look"
INVALID = "Thought: I try something.\nAction: jump around"


class StubLLM:
    """The LLM protocol with scripted answers: ``answer(chat, session) -> text``. The stop
    rule is applied as a backend would. Records every call and every release."""

    adapter = None

    def __init__(self, answer, name="stub"):
        self.answer = answer if callable(answer) else (lambda chat, session: answer)
        self.name = name
        self.calls: list[tuple[list, list | None]] = []
        self.released: list[str] = []

    def complete(self, chats, sampling, stop=None, sessions=None):
        self.calls.append((chats, sessions))
        out = []
        for chat, session in zip(chats, sessions or [None] * len(chats)):
            text = self.answer(chat, session)
            cut = stop(text + "\n") if stop else None
            text = (text + "\n")[:cut] if cut is not None else text
            out.append(Completion(text=text, prompt_tokens=sum(len(m["content"]) for m in chat) // 4,
                                  completion_tokens=max(1, len(text) // 4), stopped=True))
        return out

    def release(self, sessions):
        self.released += sessions


def _actre_stub(phrasing="put"):
    """ActRe stub: 'Thought: <numbers of its own> I want to <the action>'. The numbers differ at every
    call, so its reasons never read as copies of earlier ones (ActRe's echo check), and every word
    is one the episode showed or a plain one (its grounding check)."""
    calls = itertools.count()

    def answer(chat, session):
        action = re.findall(r"^Action: (.*)$", chat[-2]["content"], re.MULTILINE)[-1]  # the one to explain
        n = next(calls)
        return f"Thought: {' '.join(str(8 * n + i) for i in range(8))} I want to {action}"
    return ActReAnnotator(StubLLM(answer, name="actre-stub"), phrasing=phrasing)


def _cfg(**kw):
    base = dict(parallel_episodes=2, p_explore=0.0, retry_max=0, seed=0)
    return RolloutConfig(**(base | kw))


def _content(t: Trajectory) -> dict:
    return t.model_dump(exclude={"timings"})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unseen(games_root):
    return find_games(games_root, "valid_unseen")


@pytest.fixture(scope="module")
def place_game(unseen):
    """A valid_unseen game whose walkthrough puts something somewhere."""
    return next(g for g in unseen if any(a.startswith("put ") for a in load_game(g).walkthrough))


@pytest.fixture(scope="module")
def short_game(unseen):
    """The valid_unseen game with the shortest walkthrough."""
    return min(unseen, key=lambda g: len(load_game(g).walkthrough))


def _run(tmp_path, tasks, policy, cfg, env_cfg, annotator=None, name="t.jsonl", round_=0):
    store = TrajectoryStore(tmp_path / name)
    stats = rollout(tasks, store, policy, annotator or _actre_stub(), cfg, env_cfg, round_=round_)
    return list(store.read()), stats


# --------------------------------------------------------------------------- (a) exploration


def test_exploration_share_is_p_explore(tmp_path, unseen):
    tasks = [task_for(g) for g in unseen]
    trajectories, stats = _run(tmp_path, tasks, StubLLM(LOOK), _cfg(p_explore=0.3, seed=3), EnvConfig(max_steps=60))
    steps = [s for t in trajectories for s in t.steps]
    assert len(trajectories) == 2 and stats.episodes == 2
    assert len(steps) >= 50
    share = sum(s.explored for s in steps) / len(steps)
    assert abs(share - 0.3) < 0.12, share
    for s in steps:
        assert s.valid  # "look" is always admissible; explored actions are admissible ones
        if s.explored:
            assert s.action != "help" and s.thought.endswith(f" I want to {s.action}")
        else:
            assert (s.thought, s.action) == ("I look around.", "look")


def test_same_seed_same_trajectories_whatever_the_batching(tmp_path, unseen):
    tasks = [task_for(g) for g in unseen]
    env_cfg = EnvConfig(max_steps=8)
    a, _ = _run(tmp_path, tasks, StubLLM(LOOK), _cfg(p_explore=0.3, seed=7), env_cfg, name="a.jsonl")
    b, _ = _run(tmp_path, tasks, StubLLM(LOOK), _cfg(p_explore=0.3, seed=7, parallel_episodes=1), env_cfg,
                name="b.jsonl")
    c, _ = _run(tmp_path, tasks, StubLLM(LOOK), _cfg(p_explore=0.3, seed=8), env_cfg, name="c.jsonl")
    key = lambda t: t.episode_id  # noqa: E731
    assert [_content(t) for t in sorted(a, key=key)] == [_content(t) for t in sorted(b, key=key)]
    assert [t.steps for t in sorted(a, key=key)] != [t.steps for t in sorted(c, key=key)]
    assert any(s.explored for t in a for s in t.steps)


@pytest.mark.parametrize("after", [3, 2])
def test_forced_exploration_after_invalid_actions(tmp_path, short_game, after):
    cfg = _cfg(p_explore=0.0, forced_explore_after_invalid=after)
    (t,), _ = _run(tmp_path, [task_for(short_game)], StubLLM(INVALID), cfg, EnvConfig(max_steps=12))
    pattern = [(i + 1) % (after + 1) == 0 for i in range(12)]
    if t.success:  # a random action cannot win this game in so few valid steps; say so if it does
        pytest.fail("an explored action won the game")
    assert [s.explored for s in t.steps] == pattern
    assert [s.valid for s in t.steps] == pattern
    assert all(s.action == "jump around" and s.observation == "Nothing happens." for s in t.steps if not s.explored)
    assert t.source == "explored"


def test_p_explore_one_explores_every_step(tmp_path, short_game):
    policy = StubLLM(LOOK)
    (t,), _ = _run(tmp_path, [task_for(short_game)], policy, _cfg(p_explore=1.0), EnvConfig(max_steps=6))
    assert all(s.explored for s in t.steps) and t.source == "explored"
    assert policy.calls == []  # the policy is never asked


# --------------------------------------------------------------------------- (b) retries


def _walkthrough_policy(game, win_attempts):
    """Plays the game's walkthrough on the attempts named, else looks around."""
    walkthrough = load_game(game).walkthrough

    def answer(chat, session):
        attempt = int(session.rsplit("#a", 1)[1])
        k = (len(chat) - 2) // 2
        if attempt in win_attempts and k < len(walkthrough):
            return f"Thought: step {k} of the plan.\nAction: {walkthrough[k]}"
        return LOOK
    return answer


def test_retries_of_a_task_that_never_wins(tmp_path, unseen):
    tasks = [task_for(g) for g in unseen]
    policy = StubLLM(LOOK)
    cfg = _cfg(retry_max=2, stop_at_first_success=True)
    trajectories, stats = _run(tmp_path, tasks, policy, cfg, EnvConfig(max_steps=2))
    for task in tasks:
        mine = [t for t in trajectories if t.task_id == task.task_id]
        assert sorted(t.attempt for t in mine) == [0, 1, 2]
        assert {t.episode_id for t in mine} == {f"r0/{task.task_id}#a{k}" for k in range(3)}
        assert not any(t.success for t in mine)
    assert stats.episodes == 6 and stats.successes == 0 and stats.skipped == 0
    assert sorted(policy.released) == sorted(t.episode_id.removeprefix("r0/") for t in trajectories)


def test_retry_min_runs_even_after_a_success(tmp_path, short_game):
    policy = StubLLM(_walkthrough_policy(short_game, win_attempts={1}))
    cfg = _cfg(retry_min=2, retry_max=3, stop_at_first_success=True)
    trajectories, stats = _run(tmp_path, [task_for(short_game)], policy, cfg, EnvConfig(max_steps=8))
    assert [(t.attempt, t.success) for t in trajectories] == [(0, False), (1, True), (2, False)]
    assert stats.successes == 1 and trajectories[1].source == "policy"
    assert trajectories[1].terminal_reason == "won" and trajectories[0].terminal_reason == "step_limit"


_PLANS = itertools.count()


def _plan(cfg, outcomes, stored=(), round_=0, tmp_path=None):
    """The attempts the scheduler plays for one task, given each attempt's outcome and the
    (attempt, success, round) already stored."""
    store = TrajectoryStore(tmp_path / f"plan{next(_PLANS)}.jsonl")
    task = Task("train/x/trial", tmp_path / "game.tw-pddl")
    for attempt, success, r in stored:
        store.append(_record(task.task_id, attempt, success, r))
    scheduler = _Scheduler([task], store, round_, cfg)
    played = []
    while job := scheduler.pop():
        _, attempt = job
        assert scheduler.pop() is None  # one attempt of a task at a time
        played.append(attempt)
        scheduler.finished(task.task_id, attempt, outcomes.get(attempt, False))
    return played


def _record(task_id, attempt, success, round_=0):
    return make_trajectory(task_id, success, attempt, round_, steps=[])


@pytest.mark.parametrize(
    "retry_min, retry_max, stop, outcomes, played",
    [
        (0, 2, True, {}, [0, 1, 2]),  # never wins: every retry
        (0, 0, True, {}, [0]),
        (0, 3, True, {0: True}, [0]),  # first attempt wins: no retries at all
        (2, 3, True, {0: True}, [0]),  # retry_min too: retries follow a failed first attempt only
        (0, 3, True, {1: True}, [0, 1]),  # stop at the first success
        (0, 3, False, {1: True}, [0, 1, 2, 3]),
        (2, 3, True, {1: True}, [0, 1, 2]),  # retry_min runs even after a success
        (3, 3, True, {1: True}, [0, 1, 2, 3]),
        (5, 2, True, {1: True}, [0, 1, 2]),  # retry_max caps retry_min
    ],
)
def test_scheduler_retry_rule(tmp_path, retry_min, retry_max, stop, outcomes, played):
    cfg = _cfg(retry_min=retry_min, retry_max=retry_max, stop_at_first_success=stop)
    assert _plan(cfg, outcomes, tmp_path=tmp_path) == played


def test_scheduler_resumes_from_the_store(tmp_path):
    cfg = _cfg(retry_max=3)
    assert _plan(cfg, {}, stored=[(0, False, 0), (1, False, 0)], tmp_path=tmp_path) == [2, 3]
    assert _plan(cfg, {}, stored=[(0, False, 0), (1, True, 0)], tmp_path=tmp_path) == []
    assert _plan(cfg, {}, stored=[(0, True, 0)], tmp_path=tmp_path) == []
    # another round's records do not count
    assert _plan(cfg, {}, stored=[(0, True, 1)], tmp_path=tmp_path) == [0, 1, 2, 3]
    assert _plan(cfg, {2: True}, stored=[(0, False, 1)], round_=1, tmp_path=tmp_path) == [1, 2]


def test_rollout_rerun_skips_stored_episodes(tmp_path, short_game):
    tasks = [task_for(short_game)]
    cfg = _cfg(retry_max=1)
    first, stats = _run(tmp_path, tasks, StubLLM(LOOK), cfg, EnvConfig(max_steps=2))
    policy = StubLLM(LOOK)
    again, stats = _run(tmp_path, tasks, policy, cfg, EnvConfig(max_steps=2))
    assert [t.episode_id for t in again] == [t.episode_id for t in first] and len(first) == 2
    assert stats.episodes == 0 and stats.skipped == 2 and policy.calls == []


@pytest.mark.parametrize("phrasing", ["put", "move"])
def test_walkthrough_task_that_wins_gets_no_retries(tmp_path, place_game, phrasing):
    tasks = walkthrough_tasks([place_game], phrasing)
    assert tasks[0].script == tuple(load_game(place_game, phrasing).walkthrough)
    annotator = _actre_stub(phrasing)  # as `a3t annotate` builds it: the env's phrasing
    trajectories, stats = _run(tmp_path, tasks, None, _cfg(retry_max=2), EnvConfig(max_steps=50, phrasing=phrasing),
                               annotator=annotator)
    assert [(t.attempt, t.success, t.source) for t in trajectories] == [(0, True, "annotated")]
    assert stats.episodes == 1 and stats.successes == 1
    assert [s.action for s in trajectories[0].steps] == list(tasks[0].script)
    assert any(s.action.startswith(f"{phrasing} ") for s in trajectories[0].steps)
    # ActRe's example and the episode's history read in one phrasing
    actre_chats = [chat for chats, _ in annotator.llm.calls for chat in chats]
    assert len(actre_chats) == len(tasks[0].script)
    assert all(("in/on" in chat[0]["content"] + chat[1]["content"]) == (phrasing == "put") for chat in actre_chats)


# --------------------------------------------------------------------------- (c) the records


def test_source_tokens_timings_and_ids(tmp_path, unseen, short_game):
    store = TrajectoryStore(tmp_path / "all.jsonl")
    tasks = [task_for(g) for g in unseen]
    annotator = _actre_stub()
    env_cfg = EnvConfig(max_steps=3)
    rollout([task_for(short_game)], store, StubLLM(LOOK, name="pol"), annotator, _cfg(p_explore=0.0, retry_max=1),
            env_cfg)
    rollout(tasks, store, StubLLM(LOOK, name="pol"), annotator, _cfg(p_explore=1.0), env_cfg, round_=1)
    rollout(walkthrough_tasks([short_game], "put"), store, None, annotator, _cfg(), EnvConfig(max_steps=50), round_=2)
    trajectories = list(store.read())
    assert len(trajectories) == 2 + 2 + 1
    assert len({t.episode_id for t in trajectories}) == len(trajectories) == len(store)
    by_round = {r: [t for t in trajectories if t.round == r] for r in (0, 1, 2)}
    assert {t.source for t in by_round[0]} == {"policy"} and all(not s.explored for t in by_round[0] for s in t.steps)
    assert {t.source for t in by_round[1]} == {"explored"}
    assert {t.source for t in by_round[2]} == {"annotated"}
    assert {t.model for t in by_round[0] + by_round[1]} == {"pol"} and by_round[2][0].model == "actre-stub"
    for t in trajectories:
        assert t.episode_id == f"r{t.round}/{t.task_id}#a{t.attempt}"
        assert t.task_id.startswith("valid_unseen/") and t.game.endswith("game.tw-pddl")
        assert t.task and t.task in t.initial_observation
        assert t.tokens["prompt"] > 0 and t.tokens["completion"] > 0
        assert set(t.timings) == {"wall", "llm", "env"}
        assert t.timings["wall"] >= t.timings["env"] > 0 and t.timings["llm"] > 0
        assert t.timings["wall"] >= t.timings["llm"]
        assert t.adapter is None


# --------------------------------------------------------------------------- (d) annotation


@pytest.fixture(scope="module")
def tiny_annotator(tiny_model_dir):
    from a3t.llm.transformers_llm import TransformersLLM

    return ActReAnnotator(TransformersLLM(tiny_model_dir), sampling=Sampling(temperature=0.0, max_new_tokens=3))


def test_annotate_walkthroughs_of_every_task_type(tmp_path, games_root, tiny_annotator, tiny_model_dir):
    games = find_games(games_root, "train")
    tasks = walkthrough_tasks(games, "put")
    assert len({load_game(g).task_type for g in games}) == 6
    store = TrajectoryStore(tmp_path / "annotated.jsonl")
    stats = rollout(tasks, store, None, tiny_annotator, _cfg(parallel_episodes=6, retry_max=0), EnvConfig(max_steps=50))
    trajectories = {t.task_id: t for t in store.read()}
    assert stats.episodes == stats.successes == 6
    for task in tasks:
        t = trajectories[task.task_id]
        assert t.success and t.reward == 1.0 and t.source == "annotated" and t.terminal_reason == "won"
        assert [s.action for s in t.steps] == list(task.script) == load_game(task.game).walkthrough
        assert all(s.thought.strip() and s.valid and not s.explored for s in t.steps)
        assert t.model == tiny_model_dir.name and t.tokens["prompt"] > 0


def test_recorded_tasks(tmp_path, unseen, place_game):
    short_game = place_game
    put = load_game(short_game, "put").walkthrough
    move = load_game(short_game, "move").walkthrough
    assert put != move and any(a.startswith("put ") for a in put)
    other = next(g for g in unseen if g != short_game)
    episodes = tmp_path / "rec" / "episodes.jsonl"
    episodes.parent.mkdir()
    rel = os.path.relpath(short_game, episodes.parent)
    lines = [json.dumps({"game": rel, "actions": move}), "",
             json.dumps({"game": str(other), "actions": ["look", "inventory"]}),
             json.dumps({"game": rel, "actions": put[:-1]})]
    episodes.write_text("\n".join(lines) + "\n")

    tasks = recorded_tasks(episodes, "put")
    base = task_for(short_game).task_id
    assert [t.task_id for t in tasks] == [f"{base}/recorded1", f"{task_for(other).task_id}/recorded3",
                                          f"{base}/recorded4"]
    assert tasks[0].script == tuple(put) and tasks[2].script == tuple(put[:-1])
    assert tasks[0].game.resolve() == short_game.resolve()
    assert recorded_tasks(episodes, "move")[0].script == tuple(move)

    trajectories, _ = _run(tmp_path, tasks, None, _cfg(), EnvConfig(max_steps=50))
    result = {t.task_id: t for t in trajectories}
    assert result[tasks[0].task_id].success and result[tasks[0].task_id].source == "annotated"
    looked = result[tasks[1].task_id]
    assert not looked.success and [s.action for s in looked.steps] == ["look", "inventory"]
    cut = result[tasks[2].task_id]  # a script that stops short ends with it
    assert not cut.success and cut.terminal_reason == "step_limit" and len(cut.steps) == len(put) - 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "expected"),
        ('{"actions": ["look"]}', "expected"),
        ('{"game": "g"}', "expected"),
        ("[1, 2]", "expected"),
        ("42", "expected"),
        ('{"game": "GAME", "actions": "look"}', "non-empty list of strings"),
        ('{"game": "GAME", "actions": []}', "non-empty list of strings"),
        ('{"game": "GAME", "actions": ["look", 3]}', "non-empty list of strings"),
    ],
)
def test_recorded_tasks_errors_name_file_and_line(tmp_path, short_game, line, message):
    episodes = tmp_path / "episodes.jsonl"
    good = json.dumps({"game": str(short_game), "actions": ["look"]})
    episodes.write_text(good + "\n\n" + line.replace("GAME", str(short_game)) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{episodes}:3:")) as info:
        recorded_tasks(episodes, "put")
    assert message in str(info.value)


def test_recorded_tasks_missing_game(tmp_path):
    episodes = tmp_path / "episodes.jsonl"
    episodes.write_text(json.dumps({"game": "nowhere/game.tw-pddl", "actions": ["look"]}) + "\n")
    with pytest.raises(GameFileError, match="nowhere/game.tw-pddl"):
        recorded_tasks(episodes, "put")


# --------------------------------------------------------------------------- (e) end to end


def test_tiny_model_end_to_end(tmp_path, unseen, tiny_model_dir, tiny_annotator):
    from a3t.llm.transformers_llm import TransformersLLM

    policy = TransformersLLM(tiny_model_dir)
    out = tmp_path / "rollout.jsonl"
    cfg = _cfg(parallel_episodes=2, p_explore=0.5, retry_max=0, max_new_tokens=8, seed=0)
    stats = rollout([task_for(g) for g in unseen], TrajectoryStore(out), policy, tiny_annotator, cfg,
                    EnvConfig(max_steps=3))
    lines = out.read_text().splitlines()
    assert len(lines) >= 2 and stats.episodes == len(lines)
    records = [Trajectory.model_validate_json(line) for line in lines]
    assert all(json.loads(line)["schema_version"] == 1 for line in lines)
    assert len({r.episode_id for r in records}) == len(records)
    assert {r.task_id for r in records} == {task_for(g).task_id for g in unseen}
    for r in records:
        assert len(r.steps) == 3 and r.source in ("policy", "explored")
        assert r.model == tiny_model_dir.name
        assert r.tokens["prompt"] > 0 and r.tokens["completion"] > 0
        assert all(s.thought for s in r.steps if s.explored)
    assert policy._sessions == {}  # finished episodes release their cached history
    assert stats.completion_tokens > 0 and stats.llm_s > 0


def test_stub_applies_the_stop_rule():
    """The stub behaves like a backend: the policy's turn is cut after its action line."""
    stub = StubLLM("Thought: a\nAction: look\nObservation: hallucinated")
    (c,) = stub.complete([[{"role": "user", "content": "x"}]], Sampling(), stop_after_action_line)
    assert c.text == "Thought: a\nAction: look\n"
    (c,) = stub.complete([[{"role": "user", "content": "x"}]], Sampling(), stop_after_first_line)
    assert c.text == "Thought: a\n"
