"""Prefect tasks of a self-improvement round: each wraps one library call.

They take the config and the workspace root and return plain data. Every library call
is safe to rerun (stores skip finished episodes, training resumes, versioning and
registration are idempotent), so a crashed flow rerun resumes at its first unfinished
step: the files are the checkpoints, and no Prefect result cache is needed.
Tasks that call an LLM get ``pipeline.llm_task_retries`` retries from the flow.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from a3t import evaluate as evaluation
from a3t import pipeline, versioning
from a3t.config import Config
from a3t.envs.spec import env_spec
from a3t.evaluate import Decision
from a3t.orchestration import tracking
from a3t.pipeline import RoundSummary, Workspace

# No log_prints: Fast Downward prints its translation log on every game load (it captures
# stdout to drop it, which Prefect's print capture would bypass).
step = task(cache_policy=NO_CACHE)


def _ws(cfg: Config, root: str) -> Workspace:
    return Workspace.of(cfg, root)


@step(name="prepare workspace")
def prepare_workspace(cfg: Config, root: str) -> list[str]:
    """Make the workspace a git + DVC repository, and stop if versioned data was changed by hand."""
    ws = _ws(cfg, root)
    versioning.ensure_workspace(ws.root)
    tracked = versioned_paths(cfg, ws)
    versioning.check_clean(ws.root, tracked, allow=[ws.round_data(ws.next_round())])
    return [str(p) for p in tracked]


def versioned_paths(cfg: Config, ws: Workspace) -> list[Path]:
    """The trajectories, and ALFWorld's games when they live in the workspace (not $ALFWORLD_DATA).
    WebShop's shop is not versioned: the generated one is rebuilt from its settings (logged with
    the config), WebShop's own files and server are the user's."""
    return env_spec(cfg.env.name).versioned_paths(cfg, ws.root, ws.trajectories)


@step(name="generate games")
def generate_games(cfg: Config, root: str) -> dict[str, int]:
    """ALFWorld's games (the flows skip this step for WebShop)."""
    from a3t.envs.alfworld_gen import generate_configured_games

    g = cfg.games
    made = generate_configured_games(g, _ws(cfg, root).path(g.root), f"games ({g.size}, seed {g.seed})")
    return {"games": sum(made["games"].values()), "new": sum(made["new"].values())}


@step(name="annotate walkthroughs")
def annotate_walkthroughs(cfg: Config, root: str, round_: int) -> dict:
    return pipeline.annotate_walkthroughs(cfg, _ws(cfg, root), round_)


@step(name="rollout")
def rollout_shard(cfg: Config, root: str, round_: int, shard: int) -> dict:
    return pipeline.play_train_games(cfg, _ws(cfg, root), round_, shard)


@step(name="explore failures")
def explore_failures(cfg: Config, root: str, round_: int, shard: int) -> dict:
    return pipeline.play_train_games(cfg, _ws(cfg, root), round_, shard, retries=True)


@step(name="filter")
def filter_trajectories(cfg: Config, root: str, round_: int) -> dict:
    return pipeline.build_training_set(cfg, _ws(cfg, root), round_)


@step(name="version dataset")
def version_dataset(cfg: Config, root: str, round_: int) -> dict:
    ws = _ws(cfg, root)
    version = versioning.version_dataset(
        ws.root, versioned_paths(cfg, ws), ws.campaign, round_,
        message=f"a3t: dataset of campaign {ws.campaign}, round {round_}", remote=cfg.pipeline.dvc_remote,
    )
    return {"tag": version.tag, "commit": version.commit, "hashes": {str(k): v for k, v in version.hashes.items()}}


@step(name="restore dataset")
def restore_dataset(cfg: Config, root: str, tag: str, force: bool = False) -> dict:
    ws = _ws(cfg, root)
    version = versioning.rollback(ws.root, tag, versioned_paths(cfg, ws), force=force)
    return {"tag": version.tag, "commit": version.commit, "hashes": {str(k): v for k, v in version.hashes.items()}}


@step(name="abandon later rounds")
def abandon_later_rounds(cfg: Config, root: str, round_: int) -> list[int]:
    """Remove the unversioned results of rounds after ``round_`` and mark their MLflow runs."""
    ws = _ws(cfg, root)
    removed = pipeline.remove_rounds_after(ws, round_)
    tracking.abandon_rounds_after(ws.root, ws.campaign, round_)
    return removed


@step(name="train")
def train(cfg: Config, root: str, round_: int) -> dict:
    return pipeline.train_round(cfg, _ws(cfg, root), round_)


@step(name="evaluate")
def evaluate(cfg: Config, root: str, round_: int, split: str) -> dict:
    return evaluation.evaluate_round(cfg, _ws(cfg, root), round_, split).model_dump(mode="json")


@step(name="evaluate policy")
def evaluate_policy(cfg: Config, games_root: str, split: str, adapter: str | None, store: str) -> dict:
    return evaluation.evaluate_policy(cfg, Path(games_root), split, Path(adapter) if adapter else None,
                                      Path(store)).model_dump(mode="json")


@step(name="start tracking")
def start_tracking(cfg: Config, root: str, round_: int) -> tuple[str, str]:
    """The campaign's MLflow run and round k's nested run (found again on a rerun)."""
    ws = _ws(cfg, root)
    config = cfg.model_dump(mode="json")
    parent = tracking.campaign_run(ws.root, ws.campaign, config)
    return parent, tracking.round_run(ws.root, ws.campaign, round_, parent, config)


@step(name="champion gate")
def judge(cfg: Config, root: str, round_: int, evals: dict[str, dict]) -> Decision:
    """Accept round k, or reject it (or keep it, marked) when it regressed against the champion."""
    rates = {split: evaluation.SplitRates.model_validate(r) for split, r in evals.items()}
    return pipeline.judge(cfg, _ws(cfg, root), round_, rates)


@step(name="roll back rejected rounds")
def roll_back_rejected(cfg: Config, root: str) -> dict | None:
    """The dataset back to the champion round's DVC tag (checked by hash) when the gate rejected a
    round whose data is still there; their MLflow runs and model versions marked. None: nothing to do."""
    ws = _ws(cfg, root)
    todo = pipeline.rounds_to_roll_back(cfg, ws)
    if todo is None:
        return None
    champion, rounds = todo
    version = versioning.rollback(ws.root, ws.round_summary(champion).version["tag"], versioned_paths(cfg, ws))
    for k in rounds:
        summary = ws.round_summary(k)
        if run_id := summary.tracking.get("round_run"):
            tracking.record_decision(ws.root, run_id, k, summary.decision)
    tracking.reject_versions_after(ws.root, ws.campaign, champion)
    return {"champion_round": champion, "rolled_back": rounds, "tag": version.tag, "commit": version.commit}


@step(name="register")
def register(cfg: Config, root: str, round_: int, run_id: str, parent_id: str, summary: RoundSummary) -> dict:
    """Round k's metrics, artifacts, the gate's decision and (unless rejected) its adapter version
    in MLflow; champion moves on improvement."""
    ws = _ws(cfg, root)
    tracking.log_round_metrics(ws.root, run_id, parent_id, round_, round_metrics(summary))
    files = sorted(ws.round_data(round_).glob("*.jsonl"))
    trained = ws.adapter(round_).is_dir()  # a round with nothing to learn from trains no adapter
    tracking.log_round_artifacts(ws.root, run_id, ws.adapter(round_) if trained else None, files,
                                 cfg.pipeline.trajectory_sample)
    tracking.log_success_plot(ws.root, ws.campaign, run_id, parent_id)
    tracking.record_decision(ws.root, run_id, round_, summary.decision)
    version, champion = None, False
    if trained and summary.decision.verdict != "rejected":
        split, score = evaluation.gate_score(cfg, summary.eval)
        version, champion = tracking.register_adapter(ws.root, ws.campaign, run_id, round_, score,
                                                      score_name=tracking.success_key(split))
    tracking.finish_run(ws.root, run_id)
    return {"model_version": version, "champion": champion}


def round_metrics(summary: RoundSummary) -> dict[str, float]:
    """The flat metrics of a round summary (logged with step=round)."""
    metrics = {f"trajectories/{source}": n for source, n in summary.data.collected.items()}
    metrics |= {f"train_set/{source}": n for source, n in summary.data.train_set.items()}
    metrics["trajectories/rollout_wins"] = summary.data.rollout_wins  # so far (stop_replaying_walkthroughs_at)
    if summary.train.loss_per_epoch:
        metrics["train/loss"] = summary.train.loss_per_epoch[-1]
    metrics["rollout/tokens_per_s"] = summary.rollout_tokens_per_s
    metrics["round/wall_s"] = summary.wall_s
    metrics["round/rejected"] = float(summary.decision.verdict == "rejected")  # the champion gate's
    metrics |= {f"time/{stage}_s": seconds for stage, seconds in summary.time_s.items()}
    # ActRe's verdicts over the round's rollouts and walkthrough annotation, when they count them.
    played = summary.rollout + ([summary.annotate] if summary.annotate else [])
    for name in ("accepted", "rejected", "fallbacks"):
        counts = [getattr(p, f"actre_{name}") for p in played]
        if any(n is not None for n in counts):
            metrics[f"actre/{name}"] = sum(n or 0 for n in counts)
    for split, rates in summary.eval.items():
        metrics |= evaluation.split_metrics(split, rates)
    return metrics


@step(name="end tracking")
def end_tracking(cfg: Config, root: str, run_id: str, status: str = "FINISHED") -> None:
    tracking.finish_run(_ws(cfg, root).root, run_id, status)


@step(name="finish round")
def finish_round(cfg: Config, root: str, round_: int, summary: RoundSummary) -> None:
    _ws(cfg, root).finish_round(round_, summary)


@step(name="publish round table")
def publish_table(cfg: Config, root: str) -> None:
    """The campaign's rounds (pipeline.campaign_rows) as this flow run's Prefect table artifact,
    under a key per campaign, so that the UI's Artifacts page keeps every night's version."""
    from prefect.artifacts import create_table_artifact

    ws = _ws(cfg, root)
    key = "a3t-" + re.sub(r"[^a-z0-9-]+", "-", ws.campaign.lower()) + "-rounds"
    champion = pipeline.champion_round(cfg, ws)
    create_table_artifact(pipeline.campaign_rows(cfg, ws), key=key,
                          description=f"a3t campaign {ws.campaign} in {ws.root.resolve()}: champion round {champion}")
