"""The steps of a self-improvement round, as plain functions over a workspace.

Round k: (round 0: ActRe-annotated walkthroughs) → the policy plays the train tasks (ALFWorld
games, or WebShop goals with ``env.name=webshop``; first attempts) → failed tasks are retried
with A3T exploration → the training set is filtered from every round so far → (versioned by
DVC) → a QLoRA adapter is trained → it is evaluated. Each step reads the files the previous one wrote and is safe to rerun: stores
skip finished episodes, training resumes from its last checkpoint and returns at once when
its adapter is there, and the round is finished when ``round.json`` is written. The Prefect
tasks in ``a3t/orchestration/steps.py`` wrap one function each; nothing here imports Prefect or MLflow.

Workspace layout (relative to the workspace root, the directory ``a3t run`` runs in)::

    data/games/                                 ALFWorld games (DVC-tracked; WebShop has none)
    data/trajectories/<campaign>/round_<k>/     the dataset (DVC-tracked): annotated.jsonl,
                                                rollout-<shard>.jsonl, train_set.jsonl
    data/runs/<campaign>/round_<k>/             not versioned: train/ (adapter, checkpoints),
                                                eval/<split>.jsonl, round.json
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from a3t.config import Config, RolloutConfig
from a3t.envs.spec import env_spec
from a3t.evaluate import Decision, SplitRates, gate_score, gate_split, is_new_champion, rate_text
from a3t.progress import rollout_bar
from a3t.trajectory import Trajectory, TrajectoryStore

if TYPE_CHECKING:
    from a3t.envs.base import Task

TRAIN_SET = "train_set.jsonl"
# A round's stages in the order they run; the flow records each one's wall time (MLflow: time/<stage>_s).
STAGES = ("annotate", "rollout", "explore", "filter", "version", "train", "eval")


class PlayStats(BaseModel):
    """The episodes of one rollout shard, or of the walkthrough annotation."""

    episodes: int = 0
    successes: int = 0
    already_stored: int = 0  # skipped: in the store from an earlier run
    completion_tokens: int = 0
    tokens_per_s: float = 0.0
    file: str = ""
    # How ActRe fared on the explored and annotated steps (a3t.agent.actre); None: not counted.
    actre_accepted: int | None = None
    actre_rejected: int | None = None
    actre_fallbacks: int | None = None


class DataStats(BaseModel):
    """What a round collected and what its training set holds (the filter)."""

    file: str = ""  # the round's train_set.jsonl
    collected: dict[str, int] = Field(default_factory=dict)  # this round's trajectories by source
    collected_successes: int = 0
    train_set: dict[str, int] = Field(default_factory=dict)  # the training set by source
    train_set_size: int = 0
    train_set_rounds: list[int] = Field(default_factory=list)
    rollout_wins: int = 0  # the campaign's rollout successes so far, this round's included
    replays_walkthroughs: bool = True  # pipeline.stop_replaying_walkthroughs_at not reached


class TrainStats(BaseModel):
    """The trainer's statistics (a3t.train.train_adapter writes more, kept as they are)."""

    model_config = ConfigDict(extra="allow")
    examples: int = 0
    loss_per_epoch: list[float] = Field(default_factory=list)
    skipped: str | None = None  # why nothing was trained


class RoundSummary(BaseModel):
    """A finished round (``round.json``): what it played, versioned, trained and scored. The table
    a3t prints, the MLflow metrics and the champion rule all read this."""

    round: int = 0
    campaign: str = ""
    annotate: PlayStats | None = None  # None: no walkthroughs annotated this round
    rollout: list[PlayStats] = Field(default_factory=list)  # one per shard, rollout then explore
    rollout_tokens_per_s: float = 0.0
    data: DataStats = Field(default_factory=DataStats)
    version: dict[str, Any] = Field(default_factory=dict)  # the DVC tag, commit and hashes
    train: TrainStats = Field(default_factory=TrainStats)
    eval: dict[str, SplitRates] = Field(default_factory=dict)
    wall_s: float = 0.0
    time_s: dict[str, float] = Field(default_factory=dict)  # seconds per stage (STAGES)
    tracking: dict[str, str] = Field(default_factory=dict)  # the MLflow runs: campaign_run, round_run
    registered: dict[str, Any] | None = None  # the adapter's model version, and whether it is the champion
    decision: Decision = Field(default_factory=Decision)  # the champion gate's (a3t.evaluate.judge_round)


@dataclass(frozen=True)
class Workspace:
    root: Path
    campaign: str

    @classmethod
    def of(cls, cfg: Config, root: str | Path = ".") -> Workspace:
        return cls(Path(root), cfg.pipeline.campaign)

    def path(self, p: str | Path) -> Path:
        """A config path: absolute as given, relative to the workspace root otherwise."""
        return Path(p) if Path(p).is_absolute() else self.root / p

    @property
    def trajectories(self) -> Path:
        return self.root / "data" / "trajectories"

    def round_data(self, k: int) -> Path:
        return self.trajectories / self.campaign / f"round_{k}"

    def round_run(self, k: int) -> Path:
        return self.root / "data" / "runs" / self.campaign / f"round_{k}"

    def adapter(self, k: int) -> Path:
        return self.round_run(k) / "train" / "adapter"

    def finished_rounds(self) -> list[int]:
        """Rounds whose results are there, and their data unless the champion gate rejected them
        (``a3t rollback`` removes later rounds' data: they are redone; a rejected round's data
        goes with the gate's rollback, and the round stays on record)."""
        runs = self.root / "data" / "runs" / self.campaign
        done = [int(p.parent.name.split("_")[1]) for p in runs.glob("round_*/round.json")]
        rejected = self.rejected_rounds()
        return sorted(k for k in done if self.round_data(k).is_dir() or k in rejected)

    def rejected_rounds(self) -> set[int]:
        """Rounds the champion gate rejected: their adapters never play again."""
        runs = self.root / "data" / "runs" / self.campaign
        return {int(p.parent.name.split("_")[1]) for p in runs.glob("round_*/round.json")
                if RoundSummary.model_validate_json(p.read_text()).decision.verdict == "rejected"}

    def next_round(self) -> int:
        """The first round not finished: a crashed round is resumed, a finished one never redone."""
        finished = set(self.finished_rounds())
        k = 0
        while k in finished:
            k += 1
        return k

    def round_summary(self, k: int) -> RoundSummary:
        return RoundSummary.model_validate_json((self.round_run(k) / "round.json").read_text())

    def finish_round(self, k: int, summary: RoundSummary) -> None:
        _write_atomic(self.round_run(k) / "round.json", summary.model_dump_json(indent=2))


def remove_rounds_after(ws: Workspace, round_: int) -> list[int]:
    """Delete the unversioned results (adapters, checkpoints, eval episodes) of the rounds
    after ``round_``: after a rollback they belong to abandoned rounds, and the next run
    redoes round ``round_ + 1`` from the restored dataset."""
    runs = ws.root / "data" / "runs" / ws.campaign
    later = sorted(int(p.name.split("_")[1]) for p in runs.glob("round_*") if int(p.name.split("_")[1]) > round_)
    for k in later:
        shutil.rmtree(ws.round_run(k))
    return later


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_agents(cfg: Config, adapter: str | Path | None = None, need_policy: bool = True):
    """The policy LLM (with ``adapter``; None when not needed) and the ActRe annotator: the
    policy's LLM unless ``actre`` names another (as in the paper, the same model)."""
    from a3t.agent.actre import ActReAnnotator
    from a3t.llm import load_llm
    from a3t.llm.base import Sampling

    llm_cfg = cfg.llm.model_copy(update={"adapter": str(adapter)} if adapter else {})
    policy = load_llm(llm_cfg) if need_policy or cfg.actre is None else None
    actre_llm = load_llm(cfg.actre) if cfg.actre is not None else policy
    sampling = Sampling(temperature=0.0, max_new_tokens=cfg.rollout.actre_max_new_tokens)
    annotator = ActReAnnotator(actre_llm, phrasing=cfg.env.phrasing, sampling=sampling, tries=cfg.agent.actre_tries)
    return (policy if need_policy else None), annotator


def train_tasks(cfg: Config, ws: Workspace, round_: int | None = None) -> list[Task]:
    """The train tasks a round plays: ``pipeline.train_tasks`` train games (spread over task types)
    or WebShop train goals, those after the ones whose walkthroughs round 0 annotates (their
    successes are in the data already: playing them again would teach little new). With
    ``pipeline.new_train_tasks_each_round``, the playing rounds take consecutive blocks of them,
    from the start again once the split runs out."""
    first, n = cfg.pipeline.annotate_walkthroughs, cfg.pipeline.train_tasks
    spec, root = env_spec(cfg.env.name), ws.path(cfg.games.root)
    if n is None:
        return spec.tasks(cfg, root, "train", None)[first:]
    block = 0
    if cfg.pipeline.new_train_tasks_each_round and round_ is not None:
        block = max(round_ - (0 if cfg.pipeline.play_round_0 else 1), 0)  # the first playing round takes block 0
    tasks = spec.tasks(cfg, root, "train", first + (block + 1) * n)[first:]
    start = block * n % max(len(tasks), 1)
    return (tasks[start:] + tasks[:start])[:n]


def eval_games_root(cfg: Config, ws: Workspace) -> Path:
    """eval.games_root, else the official data when $ALFWORLD_DATA holds it, else games.root.
    (Importing alfworld sets ALFWORLD_DATA to an empty cache folder: look for the data itself.)"""
    if cfg.eval.games_root is not None:
        return ws.path(cfg.eval.games_root)
    official = os.environ.get("ALFWORLD_DATA")
    if official and (Path(official) / "json_2.1.1").is_dir():
        return Path(official)
    return ws.path(cfg.games.root)


def annotate_walkthroughs(cfg: Config, ws: Workspace, round_: int) -> dict:
    """ActRe writes the thoughts of the planner walkthroughs of the first
    ``pipeline.annotate_walkthroughs`` train games (spread over task types), or of an oracle's
    walkthroughs of as many WebShop train goals."""
    tasks = env_spec(cfg.env.name).walkthroughs(cfg, ws.path(cfg.games.root), "train", cfg.pipeline.annotate_walkthroughs)
    store = TrajectoryStore(ws.round_data(round_) / "annotated.jsonl")
    return _stats(annotate(cfg, tasks, store, round_, f"round {round_}: annotate walkthroughs"), store)


def annotate(cfg: Config, tasks: list[Task], store: TrajectoryStore, round_: int, label: str = "annotate"):
    """Play each task's scripted actions once and write their thoughts: the plan's reasons
    (``pipeline.walkthrough_reasons=plan``) or ActRe's. Returns the rollout statistics."""
    from a3t.rollout import rollout

    _, annotator = load_agents(cfg, need_policy=False)
    if cfg.pipeline.walkthrough_reasons == "plan":
        annotator.tries = 0  # every thought is the plan's reason (ActRe's fallback): no LLM call
    once = cfg.rollout.model_copy(update={"retry_max": 0})  # a script is played once
    with rollout_bar(label, len(tasks)) as show:
        return rollout(tasks, store, None, annotator, once, cfg.env, round_=round_, on_progress=show)


def play_train_games(cfg: Config, ws: Workspace, round_: int, shard: int = 0, retries: bool = False) -> dict:
    """The policy (round k's: the base model in round 0, else round k-1's adapter) plays its
    shard of the train games with A3T exploration: the first attempts, or (``retries``) the
    retries of the tasks whose first attempt failed. Both write the shard's store."""
    from a3t.rollout import rollout

    tasks = train_tasks(cfg, ws, round_)[shard :: cfg.pipeline.rollout_shards]
    store = TrajectoryStore(ws.round_data(round_) / f"rollout-{shard}.jsonl")
    adapter = policy_adapter(ws, round_ - 1)
    policy, annotator = load_agents(cfg, adapter=adapter)
    rollout_cfg = stage_rollout_config(cfg.rollout, retries)
    label = f"round {round_}: {'retry failed tasks' if retries else 'play train games'}"
    if cfg.pipeline.rollout_shards > 1:
        label += f" (shard {shard})"
    with rollout_bar(label, len(tasks)) as show:
        stats = rollout(tasks, store, policy, annotator, rollout_cfg, cfg.env, round_=round_, on_progress=show,
                        action_mode=cfg.agent.action_mode, with_example=shows_example(cfg, adapter))
    return _stats(stats, store)


def stage_rollout_config(rollout_cfg: RolloutConfig, retries: bool) -> RolloutConfig:
    """The rollout settings of a round's stage: the first plays (no retry; greedy and without
    exploration under ``rollout.greedy_first_attempt``) or the retries of the failed tasks."""
    if retries:
        return rollout_cfg
    greedy = {"temperature": 0.0, "p_explore": 0.0} if rollout_cfg.greedy_first_attempt else {}
    return rollout_cfg.model_copy(update={"retry_max": 0} | greedy)


def shows_example(cfg: Config, adapter: str | Path | None) -> bool:
    """Whether the policy's prompt shows the 1-shot example: always, or (agent.example=untrained) to
    the prompted base model only; training renders a trained policy's prompt (adapter set)."""
    return cfg.agent.example == "always" or adapter is None


def policy_round(ws: Workspace, round_: int) -> int | None:
    """The round whose adapter is the policy after round k: the latest round <= k that trained one
    (a round whose data had no success trains none) and was not rejected by the champion gate, or
    None for the base model."""
    rejected = ws.rejected_rounds()
    for k in range(round_, -1, -1):
        if k not in rejected and (ws.adapter(k) / "adapter_config.json").is_file():
            return k
    return None


def policy_adapter(ws: Workspace, round_: int) -> Path | None:
    """The policy's adapter after round k (``policy_round``), or None for the base model. Round k
    plays with ``policy_adapter(ws, k - 1)``."""
    k = policy_round(ws, round_)
    return None if k is None else ws.adapter(k)


def _stats(stats, store: TrajectoryStore) -> dict:
    return {"episodes": stats.episodes, "successes": stats.successes, "already_stored": stats.skipped,
            "completion_tokens": stats.completion_tokens, "tokens_per_s": stats.tokens_per_s, "file": str(store.path),
            # How ActRe fared on the explored and annotated steps (its checks: a3t.agent.actre).
            "actre_accepted": stats.actre_accepted, "actre_rejected": stats.actre_rejected,
            "actre_fallbacks": stats.actre_fallbacks}


def build_training_set(cfg: Config, ws: Workspace, round_: int) -> dict:
    """Round k's training set: every trajectory of rounds 0..k of the campaign whose weight
    under ``train.loss`` is not zero (successes, and failures of tasks that also have a
    success: their baseline makes them negative examples), written to ``train_set.jsonl``
    with its weight and baseline (a3t.filter). The annotated walkthroughs are left out once
    the rollouts have won ``pipeline.stop_replaying_walkthroughs_at`` times."""
    from a3t.data import load_trajectories
    from a3t.filter import filter_trajectories

    files = [f for k in range(round_ + 1) for f in sorted(ws.round_data(k).glob("*.jsonl")) if f.name != TRAIN_SET]
    trajectories = load_trajectories(files)
    rollouts = [t for t in trajectories if t.source != "annotated"]
    wins = sum(t.success for t in rollouts)
    enough = cfg.pipeline.stop_replaying_walkthroughs_at
    replays_walkthroughs = enough is None or wins < enough
    kept = filter_trajectories(trajectories if replays_walkthroughs else rollouts, cfg.train.loss)
    out = ws.round_data(round_) / TRAIN_SET
    _write_atomic(out, "".join(t.model_dump_json() + "\n" for t in kept))
    this_round = [t for t in trajectories if t.round == round_]
    return {
        "file": str(out),
        "collected": _by_source(this_round),
        "collected_successes": sum(t.success for t in this_round),
        "train_set": _by_source(kept),
        "train_set_size": len(kept),
        "train_set_rounds": sorted({t.round for t in kept}),
        "rollout_wins": wins,
        "replays_walkthroughs": replays_walkthroughs,
    }


def _by_source(trajectories: list[Trajectory]) -> dict[str, int]:
    counts = {"policy": 0, "explored": 0, "annotated": 0}
    for t in trajectories:
        counts[t.source] += 1
    return counts


def train_round(cfg: Config, ws: Workspace, round_: int) -> dict:
    """Train round k's adapter on its training set (from the base model, or from round k-1's
    adapter when train.from_base_each_round is false). Returns the training statistics; a
    finished adapter is not trained again; ``train.own_process``: in a child process."""
    stats_file = ws.adapter(round_) / "train_stats.json"
    if stats_file.is_file():
        return json.loads(stats_file.read_text())
    args = (cfg, ws.round_data(round_) / TRAIN_SET, ws.adapter(round_).parent, round_, policy_adapter(ws, round_ - 1))
    if not cfg.train.own_process:
        return _train_on_file(*args)
    return in_child_process(_train_on_file, *args, what=f"round {round_}'s training")


def in_child_process(fn, *args, what: str):
    """``fn(*args)`` in a fresh Python process (its exceptions raised here); ``what`` names it in
    the error when the process ends without an answer. Spawned, not forked: a fork would copy
    the parent's OpenMP threads' state and its locks."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        try:
            return child.submit(fn, *args).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"{what}: its process ended abruptly (killed? out of memory?); a rerun resumes from the "
                "last checkpoint"
            ) from None


def _train_on_file(cfg: Config, train_set: Path, out: Path, round_: int, previous: Path | None) -> dict:
    from a3t.data import load_trajectories

    return train_policy(cfg, load_trajectories([train_set]), out, round_, previous=previous)


def train_policy(cfg: Config, trajectories: list, out: Path, round_: int, previous: Path | None = None) -> dict:
    """An adapter in ``out`` (``adapter/``, ``checkpoints/``; a rerun resumes) trained on the
    trajectories under ``train.loss``: a training set's records with their weights, other
    trajectories weighed by the filter. Round 0 trains ``epochs_first_round``; ``previous`` is
    continued when ``train.from_base_each_round`` is false (at ``train.learning_rate_continued``). Returns the training statistics;
    with nothing of non-zero weight, trains nothing and says so. ``a3t train`` and the
    pipeline's train step both call this."""
    from transformers import AutoTokenizer

    from a3t.data import build_examples
    from a3t.llm.models import resolve_model_path
    from a3t.train import train_adapter

    base = resolve_model_path(cfg.llm.model)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    t = cfg.train
    examples = build_examples(trajectories, tokenizer, t.loss, t.observations_in_loss, cfg.env.phrasing,
                              t.max_length, cfg.webshop.observation_format,
                              with_example=shows_example(cfg, adapter="trained"))
    if not examples:
        # Nothing succeeded yet: a round keeps the policy it played with (policy_adapter).
        return {"examples": 0, "loss_per_epoch": [], "skipped": "no trajectory with a non-zero weight to train on"}
    epochs = t.epochs_first_round if round_ == 0 else t.epochs_later_rounds
    start = None if t.from_base_each_round else previous
    if start is not None and t.learning_rate_continued is not None:
        t = t.model_copy(update={"learning_rate": t.learning_rate_continued})
    return train_adapter(examples, base, out, t, epochs, init_adapter=start, device=cfg.llm.device)


def champion_round(cfg: Config, ws: Workspace) -> int | None:
    """The finished, not rejected round with the best first-attempt success on the gate's split
    (the earliest on ties: a3t.evaluate.is_new_champion); None before any round finished."""
    best, best_score = None, None
    for k in ws.finished_rounds():
        summary = ws.round_summary(k)
        if summary.decision.verdict == "rejected":
            continue
        _, score = gate_score(cfg, summary.eval)
        if is_new_champion(score, best_score):
            best, best_score = k, score
    return best


def judge(cfg: Config, ws: Workspace, round_: int, rates: dict[str, SplitRates]) -> Decision:
    """The champion gate on round k's evaluation, against the champion of the rounds before it."""
    from a3t.evaluate import judge_round

    split = gate_split(cfg)
    champion = champion_round(cfg, ws)
    champion_rates = ws.round_summary(champion).eval.get(split) if champion is not None else None
    p = cfg.pipeline
    return judge_round(split, rates.get(split), champion, champion_rates, p.regression_tolerance, p.on_regression)


def rounds_to_roll_back(cfg: Config, ws: Workspace) -> tuple[int, list[int]] | None:
    """After the gate rejected a round whose data is still there: the champion round whose dataset
    the workspace goes back to, and the rounds whose data goes with the rollback (the rejected
    ones, and accepted rounds after the champion; those are marked rejected here, with why).
    None when there is nothing to roll back. Safe to call again after a crash."""
    finished = ws.finished_rounds()
    pending = [k for k in ws.rejected_rounds() if ws.round_data(k).is_dir()]
    if not pending:
        return None
    champion = champion_round(cfg, ws)
    if champion is None:
        raise ValueError(f"campaign {ws.campaign}: round {max(pending)} was rejected but no round is its champion")
    last = max(pending)
    for k in finished:
        if champion < k < last and ws.round_data(k).is_dir():
            summary = ws.round_summary(k)
            if summary.decision.verdict != "rejected":
                summary.decision = Decision(verdict="rejected", champion_round=champion,
                                            reason=f"rolled back with round {last} to champion round {champion}")
                ws.finish_round(k, summary)
    return champion, [k for k in finished if k > champion and ws.round_data(k).is_dir()]


def campaign_rows(cfg: Config, ws: Workspace) -> list[dict[str, str]]:
    """One row per finished round, as text: the gate's decision, each split's first-attempt success
    and success within k with their 95% intervals, the training set, the DVC tag and the MLflow
    run. ``a3t status`` prints them; each flow run publishes them as a Prefect table artifact."""
    rows = []
    for k in ws.finished_rounds():
        s = ws.round_summary(k)
        row = {"round": str(k), "decision": s.decision.verdict}
        for split in cfg.eval.splits:
            r = s.eval.get(split)
            row[f"{split} 1st"] = rate_text(r.successes, r.tasks, r.success_ci) if r else "-"
            within = round(r.success_within_k * r.tasks) if r else 0
            row[f"{split} ≤{cfg.eval.attempts}"] = rate_text(within, r.tasks, r.success_within_k_ci) if r else "-"
        row["train set"] = str(s.data.train_set_size)
        row["DVC tag"] = s.version.get("tag", "-")
        row["MLflow run"] = s.tracking.get("round_run", "-")
        row["why"] = s.decision.reason
        rows.append(row)
    return rows
