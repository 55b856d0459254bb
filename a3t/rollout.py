"""The rollout engine: many episodes at once, every model call one batch, A3T exploration.

Each turn, every active episode either asks the policy (batched over episodes, reusing
each episode's encoded history) or explores: with probability ``p_explore``, or after
``forced_explore_after_invalid`` invalid actions in a row, its action is sampled from the
admissible actions and ActRe writes the thought (batched too). Scripted episodes (``a3t
annotate``) take their actions from a list and get every thought from ActRe. Finished
episodes are appended to the TrajectoryStore at once; a rerun skips stored ones.

The action line is the model's own text (``action_mode="free"``, the paper), or
(``"constrained"``) the thought is written first and the action is then decoded under a
constraint to exactly one of the state's admissible actions (a3t.envs.action_choices). An
episode whose state offers no action at all ends there (terminal reason
``no_admissible_action``) with a warning.

Failed tasks are retried: when a task's first attempt fails, its attempt k >= 1 runs if
k <= retry_max and (k <= retry_min, or not stop_at_first_success, or no attempt of the
task has succeeded yet).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from a3t.agent.actre import ActReAnnotator, ActReRequest
from a3t.agent.react import format_turn, parse_turn, react_chat
from a3t.config import EnvConfig, RolloutConfig
from a3t.envs import action_choices, explore_action, make_env, usable_actions
from a3t.envs.base import Reset, Task, TerminalReason, TextEnv
from a3t.llm.base import LLM, Chat, Sampling, stop_after_action_line, stop_after_thought
from a3t.trajectory import StepRecord, Trajectory, TrajectoryStore

log = logging.getLogger("a3t.rollout")
ActionMode = Literal["free", "constrained"]


def task_for(game: Path) -> Task:
    """A task named by its game's path below json_2.1.1 (or the trial folder's name)."""
    parts = game.parent.parts
    task_id = "/".join(parts[parts.index("json_2.1.1") + 1 :]) if "json_2.1.1" in parts else game.parent.name
    return Task(task_id=task_id, game=game)


@dataclass
class RolloutStats:
    episodes: int = 0
    successes: int = 0
    skipped: int = 0  # already in the store
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_s: float = 0.0
    env_s: float = 0.0
    actre_accepted: int = 0  # ActRe reasons that passed its checks (a3t.agent.actre)
    actre_rejected: int = 0  # ActRe samples rejected and asked again
    actre_fallbacks: int = 0  # explored steps whose every ActRe try was rejected
    started: float = field(default_factory=time.perf_counter)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.perf_counter() - self.started, 1e-9)


@dataclass
class _Episode:
    task: Task
    attempt: int
    env: TextEnv
    first: Reset
    rng: random.Random
    steps: list[StepRecord] = field(default_factory=list)
    invalid_in_a_row: int = 0
    started: float = field(default_factory=time.perf_counter)
    llm_s: float = 0.0
    env_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def episode_id(self) -> str:
        return f"{self.task.task_id}#a{self.attempt}"


class _Scheduler:
    """Which (task, attempt) to play next, given what the store already holds."""

    def __init__(self, tasks: list[Task], store: TrajectoryStore, round_: int, cfg: RolloutConfig):
        self.cfg, self.round = cfg, round_
        self.done: dict[str, dict[int, bool]] = {t.task_id: {} for t in tasks}
        for t in store.read(on_error="skip"):
            if t.round == round_ and t.task_id in self.done:
                self.done[t.task_id][t.attempt] = t.success
        self.tasks = {t.task_id: t for t in tasks}
        self.in_flight: set[str] = set()
        self.queue: list[tuple[Task, int]] = []
        for task in tasks:
            self._plan(task.task_id)

    def _wanted(self, task_id: str, attempt: int) -> bool:
        if attempt == 0:
            return True
        results = self.done[task_id]
        if attempt > self.cfg.retry_max or not results or results.get(0, True):
            return False  # retries only follow a failed first attempt
        if attempt <= self.cfg.retry_min:
            return True
        return not (self.cfg.stop_at_first_success and any(results.values()))

    def _plan(self, task_id: str) -> None:
        """Queue the task's next attempt that is neither stored nor running."""
        attempt = 0
        while attempt in self.done[task_id]:
            attempt += 1
        if task_id not in self.in_flight and self._wanted(task_id, attempt):
            self.queue.append((self.tasks[task_id], attempt))
            self.in_flight.add(task_id)  # one attempt of a task at a time: retries depend on results

    def skipped(self) -> int:
        return sum(len(r) for r in self.done.values())

    def pop(self) -> tuple[Task, int] | None:
        return self.queue.pop(0) if self.queue else None

    def finished(self, task_id: str, attempt: int, success: bool) -> None:
        self.done[task_id][attempt] = success
        self.in_flight.discard(task_id)
        self._plan(task_id)


def rollout(
    tasks: list[Task],
    store: TrajectoryStore,
    policy: LLM | None,
    annotator: ActReAnnotator,
    cfg: RolloutConfig,
    env_cfg: EnvConfig,
    round_: int = 0,
    on_progress: Callable[[RolloutStats], None] | None = None,
    action_mode: ActionMode = "free",
    with_example: bool = True,
) -> RolloutStats:
    """Play every task (and its retries) into ``store``; returns the counts of this call.
    ``with_example``: the policy's prompt shows the 1-shot example (a3t.agent.react.react_chat)."""
    scheduler = _Scheduler(tasks, store, round_, cfg)
    stats = RolloutStats(skipped=scheduler.skipped())
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    active: list[_Episode] = []
    turn = 0
    counted = (annotator.accepted, annotator.rejected, annotator.fallbacks)  # the annotator may serve several calls
    while True:
        while len(active) < cfg.parallel_episodes and (job := scheduler.pop()):
            active.append(_start(*job, cfg, env_cfg, round_))
        if not active:
            break
        turn += 1

        def end(episode: _Episode, reward: float, won: bool, reason: TerminalReason | None = None) -> None:
            active.remove(episode)
            trajectory = _finish(episode, reward, won, round_, policy, annotator, reason)
            store.append(trajectory)
            if policy is not None:
                policy.release([episode.episode_id])
            annotator.llm.release([_actre_session(episode)])
            scheduler.finished(episode.task.task_id, episode.attempt, trajectory.success)
            stats.episodes += 1
            stats.successes += trajectory.success

        for episode in [e for e in active if e.task.script is None and not usable_actions(e.env)]:
            log.warning("%s: the state offers no admissible action; the episode ends after %d steps",
                        episode.episode_id, len(episode.steps))
            end(episode, 0.0, False, TerminalReason.NO_ACTION)
        choices = _choose_actions(active, policy, annotator, sampling, cfg, turn, stats, action_mode, with_example)
        for episode, (thought, action, explored) in zip(list(active), choices):
            t0 = time.perf_counter()
            step = episode.env.step(action)
            episode.env_s += time.perf_counter() - t0
            stats.env_s += time.perf_counter() - t0
            episode.steps.append(StepRecord(thought=thought, action=action, observation=step.observation,
                                            explored=explored, valid=step.valid))
            episode.invalid_in_a_row = 0 if step.valid else episode.invalid_in_a_row + 1
            if step.done:
                end(episode, step.reward, step.won)
        stats.actre_accepted, stats.actre_rejected, stats.actre_fallbacks = (
            now - before for now, before in zip((annotator.accepted, annotator.rejected, annotator.fallbacks), counted))
        if on_progress:
            on_progress(stats)
    return stats


def _start(task: Task, attempt: int, cfg: RolloutConfig, env_cfg: EnvConfig, round_: int) -> _Episode:
    # A scripted episode ends with its script (a step limit) if the script does not win.
    max_steps = min(env_cfg.max_steps, len(task.script)) if task.script is not None else env_cfg.max_steps
    env = make_env(task, env_cfg, max_steps)
    first = env.reset()
    # Each episode has its own RNG, so its exploration does not depend on batching order.
    rng = random.Random(f"{cfg.seed}:{round_}:{task.task_id}:{attempt}")
    return _Episode(task=task, attempt=attempt, env=env, first=first, rng=rng)


def _policy_chat(episode: _Episode, with_example: bool) -> Chat:
    """WebShop's prompt for a WebShop goal, else ALFWorld's in the game's phrasing."""
    first, webshop = episode.first, episode.task.page_format
    if webshop is not None:
        return react_chat(first.task_type, first.observation, episode.steps, webshop=webshop, with_example=with_example)
    return react_chat(first.task_type, first.observation, episode.steps, episode.env.phrasing,
                      with_example=with_example)


THOUGHT_START = "Thought:"


def _whole_reply(text: str, started: bool) -> str:
    """The reply with the start written for the model; a backend that answered with a reply of
    its own (a server without continuation) already has its label."""
    if not started or re.match(r"[^\w\n]*thought", text, re.IGNORECASE):
        return text
    return THOUGHT_START + text


def _choose_actions(active, policy, annotator, sampling, cfg: RolloutConfig, turn: int, stats: RolloutStats,
                    action_mode: ActionMode, with_example: bool):
    """(thought, action, explored) for every active episode: one policy batch (constrained: one for
    the thoughts, one for the actions), one ActRe batch."""
    choices: list[tuple[str, str, bool] | None] = [None] * len(active)
    asks, explores = [], []
    for i, ep in enumerate(active):
        if ep.task.script is not None:
            explores.append((i, ep.task.script[len(ep.steps)], False))
        elif ep.rng.random() < cfg.p_explore or ep.invalid_in_a_row >= cfg.forced_explore_after_invalid:
            explores.append((i, explore_action(ep.env, ep.rng), True))
        else:
            asks.append(i)
    if asks:
        # The reply is started with "Thought:" for the model: small models otherwise echo the
        # observation instead of answering in the ReAct format (SmolLM2-135M did, every turn).
        start = [{"role": "assistant", "content": THOUGHT_START}] if cfg.start_with_thought else []
        chats = [_policy_chat(active[i], with_example) + start for i in asks]
        seeded = Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens, seed=cfg.seed * 100_003 + turn)
        sessions = [active[i].episode_id for i in asks]
        stop = stop_after_action_line if action_mode == "free" else stop_after_thought
        t0 = time.perf_counter()
        completions = policy.complete(chats, seeded, stop, sessions=sessions)
        _account(stats, [active[i] for i in asks], completions, time.perf_counter() - t0)
        parsed = [parse_turn(_whole_reply(c.text, cfg.start_with_thought)) for c in completions]
        if action_mode == "free":
            actions = [p.action for p in parsed]
        else:
            actions = _constrained_actions([active[i] for i in asks], chats, [p.thought for p in parsed], policy,
                                           seeded, sessions, stats)
        for i, p, action in zip(asks, parsed, actions):
            choices[i] = (p.thought, action, False)
    if explores:
        requests = [ActReRequest(active[i].first.task_type, active[i].first.observation, active[i].steps, action,
                                 active[i].task.page_format)
                    for i, action, _ in explores]
        t0 = time.perf_counter()
        answers = annotator.reasons(requests, sessions=[_actre_session(active[i]) for i, _, _ in explores])
        _account(stats, [active[i] for i, _, _ in explores], [c for _, c in answers], time.perf_counter() - t0)
        for (i, action, explored), (reason, _) in zip(explores, answers):
            choices[i] = (reason, action, explored)
    return choices


def _constrained_actions(episodes, chats, thoughts, policy, sampling: Sampling, sessions, stats) -> list[str]:
    """The action of each episode after its thought, decoded under the constraint of its state:
    one of the admissible actions, or a search whose key words are free text (WebShop)."""
    starts, options = zip(*(action_choices(e.env) for e in episodes))
    chats = [chat[:-1] + [{"role": "assistant", "content": f"{format_turn(thought, '').rstrip()}{' ' + start if start else ''}"}]
             for chat, thought, start in zip(chats, thoughts, starts)]
    seeded = Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                      seed=None if sampling.seed is None else sampling.seed + 1)
    t0 = time.perf_counter()
    completions = policy.complete(chats, seeded, stop_after_search, sessions=sessions, choices=list(options))
    _account(stats, episodes, completions, time.perf_counter() - t0)
    return [c.text if choices is not None else f"{start}{c.text.split(']')[0].strip()}]"
            for c, start, choices in zip(completions, starts, options)]


def stop_after_search(text: str) -> int | None:
    """The key words of a search end at its "]" (or the line)."""
    end = min((i for i in (text.find("]"), text.find("\n")) if i >= 0), default=-1)
    return end + 1 if end >= 0 else None


def _actre_session(episode: _Episode) -> str:
    return f"{episode.episode_id}/actre"


def _account(stats: RolloutStats, episodes, completions, seconds: float) -> None:
    stats.llm_s += seconds
    for episode, completion in zip(episodes, completions):
        episode.llm_s += seconds  # the wall time the episode waited for its batch
        episode.prompt_tokens += completion.prompt_tokens
        episode.completion_tokens += completion.completion_tokens
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens


def _finish(episode: _Episode, reward: float, won: bool, round_: int, policy, annotator,
            reason: TerminalReason | None = None) -> Trajectory:
    if episode.task.script is not None:
        source = "annotated"
    elif any(step.explored for step in episode.steps):
        source = "explored"
    else:
        source = "policy"
    model = policy if policy is not None else annotator.llm
    return Trajectory(
        episode_id=f"r{round_}/{episode.episode_id}",
        env=episode.task.env,
        task_id=episode.task.task_id,
        game="" if episode.task.game is None else str(episode.task.game),
        task_type=episode.first.task_type,
        task=episode.first.task,
        round=round_,
        attempt=episode.attempt,
        source=source,
        initial_observation=episode.first.observation,
        steps=episode.steps,
        reward=reward,
        success=won,
        terminal_reason=reason or episode.env.terminal_reason,
        model=model.name,
        adapter=model.adapter,
        timings={"wall": time.perf_counter() - episode.started, "llm": episode.llm_s, "env": episode.env_s},
        tokens={"prompt": episode.prompt_tokens, "completion": episode.completion_tokens},
    )
