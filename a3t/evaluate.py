"""Evaluate: how often a policy wins held-out tasks, with the evidence to compare rounds.

A policy (base model + adapter) plays a split's tasks: a greedy first attempt without
exploration, then up to ``eval.attempts - 1`` sampled retries of each failed task, stopping at
its first success. The result (``SplitRates``) is the first-attempt success and the success
within k attempts, overall and per task type, each with its 95% Wilson interval, and WebShop's
score. The champion is the round with the best first-attempt success on the gate's split
(``pipeline.gate_split``, else ``held_out_split`` of a3t.envs.spec): the binarized objective A3T
trains for.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, model_validator

from a3t.config import Config
from a3t.envs.spec import env_spec
from a3t.progress import rollout_bar
from a3t.stats import wilson_interval
from a3t.trajectory import Trajectory, TrajectoryStore

if TYPE_CHECKING:
    from a3t.pipeline import Workspace

class Rates(BaseModel):
    tasks: int  # tasks played
    successes: int  # tasks won at the first attempt
    success: float  # first-attempt success rate
    success_ci: tuple[float, float]  # its 95% Wilson interval
    success_within_k: float  # success within k attempts
    success_within_k_ci: tuple[float, float]

    @model_validator(mode="before")
    @classmethod
    def _older_summaries(cls, data):
        # Round summaries written before a3t kept the counts and intervals: from the rates and tasks.
        if isinstance(data, dict) and "tasks" in data:
            data = dict(data)
            data.setdefault("successes", round(data["success"] * data["tasks"]))
            for key in ("success", "success_within_k"):
                data.setdefault(f"{key}_ci", wilson_interval(round(data[key] * data["tasks"]), data["tasks"]))
        return data


class SplitRates(Rates):
    k: int  # attempts per task (eval.attempts)
    score: float  # 100 x the mean reward of the first attempts (WebShop's score; ALFWorld: 0 or 1 each)
    score_within_k: float  # 100 x the mean of each task's best reward within k attempts
    per_type: dict[str, Rates]  # by task type (WebShop: product category)


def success_rates(trajectories: list[Trajectory], attempts: int) -> SplitRates:
    """The rates of a split's episodes (attempt 0 is the first; attempts beyond k do not count)."""
    tasks: dict[str, dict] = {}
    for t in trajectories:
        task = tasks.setdefault(t.task_id, {"type": t.task_type, "first": False, "within": False,
                                            "reward": 0.0, "best": 0.0})
        if t.attempt == 0:
            task["first"], task["reward"] = t.success, t.reward
        if t.attempt < attempts:
            task["within"] = task["within"] or t.success
            task["best"] = max(task["best"], t.reward)

    def mean(group: list[dict], key: str) -> float:
        return sum(g[key] for g in group) / len(group) if group else 0.0

    def rates(group: list[dict]) -> dict:
        first, within = sum(g["first"] for g in group), sum(g["within"] for g in group)
        return {"tasks": len(group), "successes": first,
                "success": mean(group, "first"), "success_ci": wilson_interval(first, len(group)),
                "success_within_k": mean(group, "within"),
                "success_within_k_ci": wilson_interval(within, len(group))}

    by_type: dict[str, list[dict]] = defaultdict(list)
    for task in tasks.values():
        by_type[task["type"]].append(task)
    every = list(tasks.values())
    return SplitRates(k=attempts, **rates(every), score=100 * mean(every, "reward"),
                      score_within_k=100 * mean(every, "best"),
                      per_type={kind: Rates(**rates(group)) for kind, group in sorted(by_type.items())})


def evaluate_policy(
    cfg: Config, games_root: Path, split: str, adapter: Path | None, store_path: Path, round_: int = 0
) -> SplitRates:
    """The policy (base model + ``adapter``) on a split's games (WebShop: goals; ``games_root`` is
    ALFWorld's). Episodes go to ``store_path``; a rerun resumes from it."""
    from a3t.pipeline import load_agents, shows_example
    from a3t.rollout import rollout

    tasks = env_spec(cfg.env.name).tasks(cfg, games_root, split, cfg.eval.tasks)
    store = TrajectoryStore(store_path)
    policy, annotator = load_agents(cfg, adapter=adapter)
    plain = {"p_explore": 0.0, "forced_explore_after_invalid": 10**9, "retry_min": 0, "stop_at_first_success": True}
    first = cfg.rollout.model_copy(update=plain | {"temperature": 0.0, "retry_max": 0})
    retries = cfg.rollout.model_copy(update=plain | {"temperature": cfg.eval.temperature,
                                                     "retry_max": cfg.eval.attempts - 1})
    for label, rollout_cfg in (("first attempts", first), (f"within {cfg.eval.attempts}", retries)):
        with rollout_bar(f"evaluate {split}, {label}", len(tasks)) as show:
            rollout(tasks, store, policy, annotator, rollout_cfg, cfg.env, round_=round_, on_progress=show,
                    action_mode=cfg.agent.action_mode, with_example=shows_example(cfg, adapter))
    ids = {t.task_id for t in tasks}
    return success_rates([t for t in store.read(on_error="skip") if t.task_id in ids], cfg.eval.attempts)


def evaluate_round(cfg: Config, ws: Workspace, round_: int, split: str) -> SplitRates:
    """The policy after round k on a split (the games of ``eval_games_root``, or WebShop's goals);
    episodes kept in the round's ``eval/<split>.jsonl``."""
    from a3t.pipeline import eval_games_root, policy_adapter

    return evaluate_policy(cfg, eval_games_root(cfg, ws), split, policy_adapter(ws, round_),
                           ws.round_run(round_) / "eval" / f"{split}.jsonl", round_)


def gate_split(cfg: Config) -> str:
    """The split the champion gate judges on: ``pipeline.gate_split`` where the environment has
    it, else the environment's held-out split."""
    spec = env_spec(cfg.env.name)
    return cfg.pipeline.gate_split if cfg.pipeline.gate_split in spec.eval_splits else spec.held_out_split


def gate_split_problem(cfg: Config) -> str | None:
    """Why a campaign cannot gate on ``pipeline.gate_split`` (it names a split that ``eval.splits``
    leaves out), or None. Only campaigns gate: ``a3t eval`` of one split is fine."""
    split = cfg.pipeline.gate_split
    if split is None or gate_split(cfg) != split or split in cfg.eval.splits:
        return None
    return f"pipeline.gate_split: {split} is not evaluated (eval.splits: {', '.join(cfg.eval.splits)})"


def gate_score(cfg: Config, rates_by_split: dict[str, SplitRates]) -> tuple[str, float]:
    """The gate's split and the first-attempt success on it (0 if not evaluated)."""
    split = gate_split(cfg)
    return split, rates_by_split[split].success if split in rates_by_split else 0.0


def is_new_champion(score: float, champion_score: float | None) -> bool:
    """A round becomes the champion when there is none yet or it is strictly better (a tie keeps
    the earlier, cheaper-to-reach round)."""
    return champion_score is None or score > champion_score


class Decision(BaseModel):
    """What the champion gate made of a round: accepted, rejected (its data rolled back to the
    champion's, its adapter never played again) or kept despite a regression
    (``pipeline.on_regression=keep``). Round summaries written before the gate read as accepted."""

    verdict: Literal["accepted", "rejected", "kept"] = "accepted"
    reason: str = ""
    champion_round: int | None = None  # the champion it was compared with; None: there was none


def regressed(rates: Rates, champion: Rates, tolerance: float | None) -> bool:
    """Whether ``rates`` fell below the champion's first-attempt success by more than
    ``tolerance`` (a fraction), or, with None, by more than the noise: the two 95% intervals
    do not overlap."""
    if tolerance is None:
        return rates.success_ci[1] < champion.success_ci[0]
    return champion.success - rates.success > tolerance + 1e-9  # 1e-9: a drop of exactly the tolerance passes


def judge_round(
    split: str, rates: SplitRates | None, champion_round: int | None, champion: SplitRates | None,
    tolerance: float | None, on_regression: str,
) -> Decision:
    """The champion gate: a round that regressed against the champion on the gate's ``split``
    is rejected (``on_regression`` rollback or stop) or kept (keep); any other is accepted."""
    if champion_round is None or champion is None or rates is None or not regressed(rates, champion, tolerance):
        return Decision(champion_round=champion_round)
    margin = "beyond both 95% intervals" if tolerance is None else f"by more than {tolerance:.1%}"
    reason = (f"{split} first-attempt success {rate_text(rates.successes, rates.tasks, rates.success_ci)} fell "
              f"below champion round {champion_round}'s "
              f"{rate_text(champion.successes, champion.tasks, champion.success_ci)} {margin}")
    return Decision(verdict="kept" if on_regression == "keep" else "rejected", reason=reason,
                    champion_round=champion_round)


def rate_text(successes: int, tasks: int, ci: tuple[float, float]) -> str:
    """``3/24 = 12.5% [4.3–31.0]``: a rate with its counts and 95% interval."""
    return f"{successes}/{tasks} = {successes / tasks if tasks else 0:.1%} [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def split_metrics(split: str, rates: SplitRates) -> dict[str, float]:
    """A split's rates as flat metric names: ``<split>/success``, ``/success_within_<k>``, their
    ``_ci_low`` / ``_ci_high``, ``/score``, ``/score_within_<k>``, ``/tasks``, and per task type."""
    k = rates.k
    metrics = {f"{split}/tasks": rates.tasks, f"{split}/success": rates.success,
               f"{split}/success_within_{k}": rates.success_within_k,
               f"{split}/score": rates.score, f"{split}/score_within_{k}": rates.score_within_k}
    # The 95% interval says whether a round's change is more than the noise of a small split.
    for name, ci in (("success", rates.success_ci), (f"success_within_{k}", rates.success_within_k_ci)):
        metrics[f"{split}/{name}_ci_low"], metrics[f"{split}/{name}_ci_high"] = ci
    for kind, r in rates.per_type.items():
        metrics[f"{split}/success/{kind}"] = r.success
        metrics[f"{split}/success_within_{k}/{kind}"] = r.success_within_k
    return metrics
