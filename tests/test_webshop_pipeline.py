"""WebShop in the a3t pipeline (env.name=webshop): the config, the prompts, rollouts and
annotation of the oracle's walkthroughs, training data, metrics, and one round through the CLI.

The shop is the smoke profile's small generated catalogue (200 products, 20 train and 4 test
goals); the model is the tiny random Mistral where a real model is needed, else stubs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from a3t.agent.actre import ActReAnnotator, ActReRequest, action_first_transcript, actre_chat  # noqa: E402
from a3t.agent.examples import webshop_example  # noqa: E402
from a3t.agent.react import WEBSHOP_SYSTEM, example_text, parse_turn, react_chat  # noqa: E402
from a3t.annotate import webshop_walkthrough_tasks  # noqa: E402
from a3t.config import ConfigError, load_config  # noqa: E402
from a3t.data import build_examples, tokenize_trajectory  # noqa: E402
from a3t.envs import explore_action, make_env, shop_site  # noqa: E402
from a3t.envs.webshop import WebShopEnv, webshop_site  # noqa: E402
from a3t.envs.webshop_server import WebShopServerEnv  # noqa: E402
from a3t.llm.base import Completion  # noqa: E402
from a3t.evaluate import success_rates  # noqa: E402
from a3t.envs.spec import webshop_tasks  # noqa: E402
from a3t.pipeline import RoundSummary, Workspace, train_tasks  # noqa: E402
from a3t.envs.base import Task  # noqa: E402
from a3t.rollout import rollout  # noqa: E402
from a3t.trajectory import Trajectory, TrajectoryStore  # noqa: E402
from test_webshop_server import server, site  # noqa: E402,F401  (a WebShop-shaped HTTP server on 127.0.0.1)
from factories import make_trajectory  # noqa: E402

SMOKE = load_config(profile="smoke", overrides=["env.name=webshop"])


class StubLLM:
    """Scripted answers ``answer(chat) -> text``, cut by the stop rule as a backend would."""

    adapter = None

    def __init__(self, answer, name="stub"):
        self.answer, self.name, self.chats = answer, name, []

    def complete(self, chats, sampling, stop=None, sessions=None):
        out = []
        for chat in chats:
            self.chats.append(chat)
            text = self.answer(chat) + "\n"
            cut = stop(text) if stop else None
            out.append(Completion(text=text[:cut] if cut is not None else text, prompt_tokens=1, completion_tokens=1,
                                  stopped=True))
        return out

    def release(self, sessions):
        pass


def _actre_stub() -> ActReAnnotator:
    def answer(chat):
        return "Thought: reason for " + re.findall(r"^Action: (.*)$", chat[-2]["content"], re.M)[-1]
    return ActReAnnotator(StubLLM(answer, name="actre-stub"))


# --------------------------------------------------------------------------- config


def test_one_setting_switches_to_webshop_and_alfworld_stays_as_it_was():
    alfworld = load_config(profile="paper")
    assert alfworld.env.name == "alfworld" and alfworld.env.max_steps == 50
    assert load_config().env.max_steps == 12  # the CPU default's short episodes (small games)
    assert alfworld.eval.splits == ["valid_seen", "valid_unseen"]
    webshop = load_config(overrides=["env.name=webshop"])
    assert webshop.env.max_steps == 15 and webshop.eval.splits == ["test"]  # ReAct's harness; WebShop's test goals
    assert load_config(overrides=["env.name=webshop", "env.max_steps=9"]).env.max_steps == 9
    profile = load_config(profile="webshop")
    assert profile.env.name == "webshop"
    assert (profile.rollout.retry_min, profile.rollout.retry_max, profile.rollout.stop_at_first_success) == (3, 20, True)
    paper = load_config(profile="paper-webshop")
    assert paper.env.name == "webshop" and paper.rollout.retry_max == 20 and paper.train.epochs_first_round == 10


@pytest.mark.parametrize("overrides, message", [
    (["env.name=webshop", "eval.splits=[valid_unseen]"], "eval.splits: valid_unseen is not a split of webshop"),
    (["eval.splits=[test]"], "eval.splits: test is not a split of alfworld"),
    (["env.name=webshop", "webshop.server_url=http://127.0.0.1:3000"], "set pipeline.annotate_walkthroughs=0"),
    (["env.name=shop"], "env.name: Input should be 'alfworld' or 'webshop'"),
    (["webshop.observation_format=html"], "webshop.observation_format: Input should be 'sep' or 'react'"),
    (["webshop.products=10"], "webshop: products: 10 products cannot carry 1500 train and 500 test goals"),
    (["webshop.items_path=items.json"], "webshop: WebShop's own catalogue needs both items_path"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


# --------------------------------------------------------------------------- environments and tasks


def test_tasks_and_envs_of_the_local_shop_and_of_a_server():
    tasks = train_tasks(SMOKE, Workspace(".", "x"))
    # smoke: pipeline.train_tasks=4, after the 2 goals whose walkthroughs round 0 annotates
    assert [t.task_id for t in tasks] == [f"train/{i}" for i in range(2, 6)]
    assert all(t.game is None and t.shop == SMOKE.webshop for t in tasks)
    env = make_env(tasks[0], SMOKE.env, 6)
    assert isinstance(env, WebShopEnv) and env.site is shop_site(SMOKE.webshop) and env.max_steps == 6
    assert env.observation_format == "react"
    with pytest.raises(ValueError, match="no split 'valid_unseen'"):
        webshop_tasks(SMOKE.webshop, "valid_unseen")
    server = SMOKE.webshop.model_copy(update={"server_url": "http://127.0.0.1:3000"})
    (task,) = webshop_tasks(server, "test", 1)
    assert task.task_id == "fixed_0"
    env = make_env(task, SMOKE.env, 15)
    assert isinstance(env, WebShopServerEnv) and env.session == "fixed_0" and env.base_url == "http://127.0.0.1:3000"
    with pytest.raises(ValueError, match="no oracle walkthroughs"):
        webshop_walkthrough_tasks(server, ["fixed_0"])


def test_exploration_is_dispatched_per_environment():
    import random

    env = make_env(webshop_tasks(SMOKE.webshop, "train", 1)[0], SMOKE.env, 15)
    env.reset()
    rng = random.Random(0)
    assert explore_action(env, rng).startswith("search[")  # built from the instruction on the search page
    assert env.step(explore_action(env, rng)).valid
    assert explore_action(env, rng).startswith("click[")


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("fmt", ["react", "sep"])
def test_the_webshop_example_is_what_the_shop_shows_and_wins(fmt):
    """The example's pages are the environment's own, in either format, and its purchase scores 1."""
    example = webshop_example(fmt)
    env = WebShopEnv(webshop_site(seed=2024), "train/2", observation_format=fmt)
    assert env.reset().observation == example.observation
    for _, action, observation in example.steps:
        step = env.step(action)
        assert step.observation == observation
    assert step.reward == 1.0 and step.won


@pytest.mark.parametrize("fmt", ["react", "sep"])
def test_webshop_prompts(fmt):
    system = react_chat("fashion", "WebShop ...", [], webshop=fmt)[0]["content"]
    assert system.startswith("You are an agent shopping in a web shop")
    assert example_text(webshop_example(fmt)) in system and "household" not in system
    request = ActReRequest("fashion", "WebShop ...", [], "click[Buy Now]", webshop=fmt)
    actre = actre_chat(request, "put")
    assert actre[0]["content"].startswith("You explain the actions of an agent shopping in a web shop")
    example = webshop_example(fmt)
    assert action_first_transcript(example.observation, example.steps) in actre[0]["content"]
    assert actre[1]["content"].endswith("\nAction: click[Buy Now]") and actre[2]["content"] == "Thought:"
    # ALFWorld's prompts are unchanged by default.
    assert "household" in react_chat("pick_and_place_simple", "obs", [])[0]["content"]
    assert WEBSHOP_SYSTEM not in react_chat("pick_and_place_simple", "obs", [])[0]["content"]


@pytest.mark.parametrize("text, action", [
    ("Thought: I buy it.\nAction: click[Buy Now]", "click[Buy Now]"),
    ("Thought: open it.\nAction: Click [B06P0N4E7C].", "click[B06P0N4E7C]"),
    ("Thought: search.\n**Action:** `search[ Detachable Hood Jacket ]`", "search[Detachable Hood Jacket]"),
    ("Thought: go.\nAction: Go to Cabinet 1", "go to cabinet 1"),  # ALFWorld commands are still lower-cased
])
def test_webshop_actions_keep_the_case_of_their_argument(text, action):
    assert parse_turn(text).action == action


# --------------------------------------------------------------------------- rollouts and annotation


def test_annotated_oracle_walkthroughs_replay_to_reward_one(tmp_path):
    ids = [t.task_id for t in webshop_tasks(SMOKE.webshop, "train", 3)]
    tasks = webshop_walkthrough_tasks(SMOKE.webshop, ids)
    annotator = _actre_stub()
    store = TrajectoryStore(tmp_path / "annotated.jsonl")
    once = SMOKE.rollout.model_copy(update={"retry_max": 0})
    stats = rollout(tasks, store, None, annotator, once, load_config(overrides=["env.name=webshop"]).env)
    records = {t.task_id: t for t in store.read()}
    assert stats.episodes == stats.successes == 3 and set(records) == set(ids)
    for task in tasks:
        t = records[task.task_id]
        assert t.env == "webshop" and t.game == "" and t.source == "annotated"
        assert t.reward == 1.0 and t.success and t.terminal_reason == "won"
        assert [s.action for s in t.steps] == list(task.script)
        assert all(s.thought == f"reason for {s.action}" for s in t.steps)
    chats = annotator.llm.chats
    assert len(chats) == sum(len(t.script) for t in tasks)
    assert all("shopping in a web shop" in chat[0]["content"] for chat in chats)


def test_a_partial_purchase_keeps_its_real_valued_reward(tmp_path):
    """Buying another product than the goal's ends the episode with WebShop's fractional reward."""
    site = shop_site(SMOKE.webshop)
    goal = site.catalog.goal("train/0")
    other = next(p for p in site.search(site.catalog.product(goal.asin).title)
                 if p.asin != goal.asin and p.category == site.catalog.product(goal.asin).category)
    (oracle,) = webshop_walkthrough_tasks(SMOKE.webshop, ["train/0"])
    script = (oracle.script[0], f"click[{other.asin}]", "click[Buy Now]")
    store = TrajectoryStore(tmp_path / "t.jsonl")
    once = SMOKE.rollout.model_copy(update={"retry_max": 0})
    rollout([Task("train/0", None, script, SMOKE.webshop)], store, None, _actre_stub(), once, SMOKE.env)
    (t,) = store.read()
    assert 0.0 < t.reward < 1.0 and not t.success and t.terminal_reason == "purchased"


def test_webshop_server_url_plays_the_servers_goals(tmp_path, server, site):
    """With webshop.server_url the rollout plays the server's sessions through the client: scripted
    (the server's reward) and explored."""
    from a3t.envs.webshop import walkthrough

    cfg = load_config(profile="smoke", overrides=["env.name=webshop", f"webshop.server_url={server}",
                                                  "pipeline.annotate_walkthroughs=0"])
    tasks = webshop_tasks(cfg.webshop, "test", 2)
    scripted = [Task(t.task_id, None, tuple(walkthrough(site, site.catalog.goal(f"test/{i}"))), cfg.webshop)
                for i, t in enumerate(tasks)]
    once = cfg.rollout.model_copy(update={"retry_max": 0, "p_explore": 1.0})
    records = []
    for name, played in (("annotated", scripted), ("explored", tasks)):  # one store per kind: same task ids
        store = TrajectoryStore(tmp_path / f"{name}.jsonl")
        rollout(played, store, None, _actre_stub(), once, cfg.env.model_copy(update={"max_steps": 15}))
        records += list(store.read())
    assert sorted(t.task_id for t in records) == ["fixed_0", "fixed_0", "fixed_1", "fixed_1"]
    assert all(t.env == "webshop" for t in records)
    assert [t.reward for t in records if t.source == "annotated"] == [1.0, 1.0]
    explored = [t for t in records if t.source == "explored"]
    assert len(explored) == 2 and all(s.explored and s.valid and s.thought for t in explored for s in t.steps)


@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_model_rollout_of_webshop_tasks(tmp_path, tiny_model_dir):
    from a3t.llm.transformers_llm import TransformersLLM
    from a3t.llm.base import Sampling

    llm = TransformersLLM(tiny_model_dir)
    annotator = ActReAnnotator(llm, sampling=Sampling(temperature=0.0, max_new_tokens=6))
    tasks = webshop_tasks(SMOKE.webshop, "train", 3)
    cfg = SMOKE.rollout.model_copy(update={"p_explore": 0.5, "retry_max": 0, "max_new_tokens": 8, "seed": 1})
    out = tmp_path / "rollout.jsonl"
    stats = rollout(tasks, TrajectoryStore(out), llm, annotator, cfg, SMOKE.env.model_copy(update={"max_steps": 4}))
    lines = out.read_text().splitlines()
    records = [Trajectory.model_validate_json(line) for line in lines]
    assert stats.episodes == len(records) == 3 and all(json.loads(x)["schema_version"] == 1 for x in lines)
    assert {r.task_id for r in records} == {t.task_id for t in tasks}
    explored = [s for r in records for s in r.steps if s.explored]
    assert explored and all(s.thought for s in explored)  # ActRe wrote each explored step's thought
    assert any(s.valid for s in explored)  # exploration samples the shop's valid actions
    for r in records:
        assert r.env == "webshop" and isinstance(r.reward, float) and 0.0 <= r.reward <= 1.0
        assert r.success == (r.reward >= 1.0) and len(r.steps) <= 4
        assert r.initial_observation.startswith("WebShop \nInstruction:")  # the react page format


# --------------------------------------------------------------------------- training data and metrics


def _webshop_trajectory(reward: float, attempt: int = 0, task_id: str = "train/0") -> Trajectory:
    example = webshop_example("react")
    from a3t.trajectory import StepRecord

    steps = [StepRecord(thought=th, action=a, observation=o, explored=(i == 1)) for i, (th, a, o) in
             enumerate(example.steps)]
    return make_trajectory(task_id, reward >= 1.0, attempt, env="webshop", game="", task_type="fashion",
                           task="i'm looking for a jacket", source="explored", initial_observation=example.observation,
                           steps=steps, reward=reward, terminal_reason="won" if reward >= 1.0 else "purchased")


def test_a_webshop_trajectory_renders_with_the_webshop_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = _webshop_trajectory(1.0)
    e = tokenize_trajectory(tokenizer, t, 1.0, "put", True, 4096, "react")
    text = tokenizer.decode(e.input_ids)
    assert "You are an agent shopping in a web shop" in text and "household" not in text
    assert sum(e.loss_mask) > 0
    learnt = tokenizer.decode([i for i, m in zip(e.input_ids, e.loss_mask) if m])
    assert "click[Buy Now]" in learnt and "Your score (min 0.0, max 1.0): 1.0" in learnt
    assert "shopping in a web shop" not in learnt  # never the instruction or the example
    # raw: the real-valued reward weighs the trajectories; a partial purchase gets a weight too.
    examples = build_examples([t, _webshop_trajectory(0.5, attempt=1)], tokenizer, "raw", page_format="react")
    assert [round(x.weight, 3) for x in examples] == [1.25, 0.25]  # (r - mean) + r, mean 0.75
    assert [x.weight for x in build_examples([t, _webshop_trajectory(0.5, attempt=1)], tokenizer, "pg")] == [1.5, -0.5]


def test_webshop_score_and_success_rates():
    trajectories = [_webshop_trajectory(1.0, 0, "test/0"), _webshop_trajectory(0.5, 0, "test/1"),
                    _webshop_trajectory(0.75, 1, "test/1"), _webshop_trajectory(0.0, 0, "test/2"),
                    _webshop_trajectory(1.0, 1, "test/2")]
    rates = success_rates(trajectories, attempts=2)
    assert rates.success == pytest.approx(1 / 3) and rates.success_within_k == pytest.approx(2 / 3)
    assert rates.score == pytest.approx(100 * 1.5 / 3)  # 100 x mean first-attempt reward
    assert rates.score_within_k == pytest.approx(100 * 2.75 / 3)  # each goal's best reward within 2 attempts


def test_round_metrics_and_plot_have_the_test_split(tmp_path):
    from a3t.orchestration import tracking
    from a3t.orchestration.steps import round_metrics, versioned_paths

    rates = success_rates([_webshop_trajectory(0.5, 0, "test/0")], 2)
    summary = RoundSummary(data={"collected": {"policy": 1}, "train_set": {"policy": 1}}, train={"loss_per_epoch": [1.0]},
                           rollout_tokens_per_s=1.0, wall_s=1.0, eval={"test": rates})
    metrics = round_metrics(summary)
    assert metrics["test/score"] == 50.0 and metrics["test/success"] == 0.0
    assert metrics["test/success_within_2"] == 0.0 and metrics["test/score_within_2"] == 50.0
    assert metrics["test/success/fashion"] == 0.0
    history = [{"round": k, "metrics": {"test/success": 0.2 * k, "test/success/fashion": 0.1 * k}} for k in range(3)]
    png = tracking.plot_success(history, tmp_path / "p.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    ws = Workspace(tmp_path, "c")
    assert versioned_paths(SMOKE, ws) == [ws.trajectories]  # WebShop versions no games


# --------------------------------------------------------------------------- one round through the CLI


def test_one_webshop_round_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # read this workspace's store below
    ws = tmp_path / "workspace"
    ws.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI="", PREFECT_API_URL="")
    args = ["round", "--profile", "smoke", "env.name=webshop", "eval.tasks=2", "pipeline.train_tasks=2"]
    done = subprocess.run([sys.executable, "-m", "a3t", *args], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    data = ws / "data" / "trajectories" / "default" / "round_0"
    annotated = list(TrajectoryStore(data / "annotated.jsonl").read())
    assert len(annotated) == 2 and all(t.env == "webshop" and t.success for t in annotated)
    played = list(TrajectoryStore(data / "rollout-0.jsonl").read())
    assert {t.task_id for t in played} == {"train/2", "train/3"} and all(t.env == "webshop" for t in played)
    assert not (ws / "data" / "games").exists() and not (ws / "data" / "games.dvc").exists()
    assert (ws / "data" / "trajectories.dvc").is_file()
    summary = json.loads((ws / "data" / "runs" / "default" / "round_0" / "round.json").read_text())
    assert list(summary["eval"]) == ["test"] and summary["eval"]["test"]["tasks"] == 2
    assert 0.0 <= summary["eval"]["test"]["score"] <= 100.0
    assert "test score" in done.stdout
    from a3t.orchestration import tracking

    (history,) = tracking.round_history(ws, "default")
    assert {"test/score", "test/success", "test/success_within_2", "test/score_within_2"} <= set(history["metrics"])
