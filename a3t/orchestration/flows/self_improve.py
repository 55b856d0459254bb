"""The self-improvement flow (ALFWorld or WebShop, by ``env.name``): rounds of rollout → ActRe exploration → filter → DVC version →
QLoRA training → evaluation → champion gate → MLflow, from the first unfinished round of the campaign.

The gate (a3t.evaluate.judge_round) rejects a round whose held-out success fell below the
champion's (``pipeline.regression_tolerance``); with ``pipeline.on_regression=rollback`` the
dataset goes back to the champion's DVC tag and the next round starts from its data and adapter.
Each run publishes the campaign's rounds as a Prefect table artifact.

A rerun after a crash resumes the unfinished round at its first unfinished step; a
scheduled run (``a3t serve``) adds ``more_rounds`` rounds after the last finished one.
One run at a time per workspace (a lock).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

from prefect import flow, get_run_logger
from prefect.futures import wait

from a3t.config import Config, PipelineConfig, load_config
from a3t.envs.spec import env_spec
from a3t.orchestration import steps
from a3t.pipeline import STAGES, RoundSummary, Workspace
from a3t.versioning import WorkspaceBusy, WorkspaceError, workspace_lock


@flow(name="a3t-self-improve")
def self_improve(
    config_file: str | None = None,
    profile: str = "default",
    overrides: list[str] | None = None,
    workspace: str = ".",
    more_rounds: int | None = None,
) -> list[RoundSummary]:
    """Run the campaign up to ``pipeline.rounds`` rounds, or ``more_rounds`` more than are
    finished. Returns the summaries of the rounds this run finished."""
    cfg = load_config(config_file, overrides or [], profile)
    ws = Workspace.of(cfg, workspace)
    with _held(cfg, ws) as held:
        if not held:
            return []
        steps.prepare_workspace(cfg, workspace)
        if env_spec(cfg.env.name).has_games:  # WebShop's shop is built in process, from its settings
            steps.generate_games(cfg, workspace)
        first = ws.next_round()
        last = cfg.pipeline.rounds if more_rounds is None else first + more_rounds
        summaries = []
        try:
            for k in range(first, last):
                summaries.append(run_round(cfg, workspace, k))
                if _regression_stop(cfg, summaries[-1]):
                    break
        finally:
            steps.publish_table(cfg, workspace)
        if summaries:
            steps.end_tracking(cfg, workspace, summaries[-1].tracking["campaign_run"])
            if stop := _regression_stop(cfg, summaries[-1]):
                raise stop
        return summaries


@flow(name="a3t-round")
def one_round(
    config_file: str | None = None,
    profile: str = "default",
    overrides: list[str] | None = None,
    workspace: str = ".",
    round_: int | None = None,
) -> RoundSummary | None:
    """Round ``round_`` of the campaign (default: the next); it needs the rounds before it
    finished. A finished round is not run again: its summary is returned."""
    cfg = load_config(config_file, overrides or [], profile)
    ws = Workspace.of(cfg, workspace)
    with _held(cfg, ws) as held:
        if not held:
            return None
        k = ws.next_round() if round_ is None else round_
        if k in ws.finished_rounds():
            return ws.round_summary(k)
        if k > ws.next_round():
            raise WorkspaceError(f"round {k} needs round {ws.next_round()} finished first (campaign {ws.campaign})")
        steps.prepare_workspace(cfg, workspace)
        if env_spec(cfg.env.name).has_games:
            steps.generate_games(cfg, workspace)
        try:
            summary = run_round(cfg, workspace, k)
        finally:
            steps.publish_table(cfg, workspace)
        if stop := _regression_stop(cfg, summary):
            raise stop
        return summary


class RegressionStop(RuntimeError):
    """A round was rejected and ``pipeline.on_regression=stop``: this run ends as failed."""


def _regression_stop(cfg: Config, summary: RoundSummary) -> RegressionStop | None:
    if summary.decision.verdict != "rejected" or cfg.pipeline.on_regression != "stop":
        return None
    return RegressionStop(f"round {summary.round} rejected ({summary.decision.reason}); its dataset was rolled "
                          f"back, and pipeline.on_regression=stop ends this run: the next run continues from "
                          f"champion round {summary.decision.champion_round}")


@contextmanager
def _held(cfg: Config, ws: Workspace):
    """The workspace's lock for this run: True while held; False when another run holds it and
    ``pipeline.when_busy=skip`` (logged); else that run's WorkspaceBusy error, or a wait."""
    with ExitStack() as stack:
        try:
            stack.enter_context(workspace_lock(ws.root, wait=cfg.pipeline.when_busy == "wait"))
        except WorkspaceBusy as busy:
            if cfg.pipeline.when_busy != "skip":
                raise
            get_run_logger().warning(f"skipped (pipeline.when_busy=skip): {busy}")
            yield False
            return
        yield True


def task_runner(cfg: PipelineConfig):
    """Prefect's thread pool, or a local Dask / Ray cluster of ``task_workers`` processes
    (set DASK_SCHEDULER_ADDRESS-style options through the runners' own settings to use a
    remote cluster)."""
    if cfg.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ImportError("pipeline.task_runner=dask needs prefect-dask: pip install 'a3t[dask]'") from None
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.task_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if cfg.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ImportError("pipeline.task_runner=ray needs prefect-ray: pip install 'a3t[ray]'") from None
        return RayTaskRunner(init_kwargs={"num_cpus": cfg.task_workers, "include_dashboard": False})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max(cfg.rollout_shards, 1))


def run_round(cfg: Config, workspace: str, k: int) -> RoundSummary:
    """One round, step after step (rollout shards run concurrently on the task runner)."""
    steps.roll_back_rejected(cfg, workspace)  # one a crash left undone
    parent_id, run_id = steps.start_tracking(cfg, workspace, k)
    try:
        return _round_steps(cfg, workspace, k, parent_id, run_id)
    except Exception:
        steps.end_tracking(cfg, workspace, run_id, "FAILED")  # a rerun finds and reopens it
        raise


@contextmanager
def _timed(times: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - start


def _round_steps(cfg: Config, workspace: str, k: int, parent_id: str, run_id: str) -> RoundSummary:
    started = time.perf_counter()
    times: dict[str, float] = {}  # this run's seconds per stage (a resumed round: what was left to do)
    llm_step = {"retries": cfg.pipeline.llm_task_retries, "retry_delay_seconds": 5}
    annotated = None
    if k == 0 and cfg.pipeline.annotate_walkthroughs > 0:
        with _timed(times, "annotate"):
            annotated = steps.annotate_walkthroughs.with_options(**llm_step)(cfg, workspace, k)
    played = []
    play = k > 0 or cfg.pipeline.play_round_0
    for stage, step in (("rollout", steps.rollout_shard), ("explore", steps.explore_failures)) if play else ():
        with _timed(times, stage):
            futures = [step.with_options(**llm_step).submit(cfg, workspace, k, shard)
                       for shard in range(cfg.pipeline.rollout_shards)]
            wait(futures)
            played += [f.result() for f in futures]
    with _timed(times, "filter"):
        data = steps.filter_trajectories(cfg, workspace, k)
    with _timed(times, "version"):
        version = steps.version_dataset(cfg, workspace, k)
    with _timed(times, "train"):
        train = steps.train(cfg, workspace, k)
    with _timed(times, "eval"):
        evals = {split: steps.evaluate.with_options(**llm_step)(cfg, workspace, k, split) for split in cfg.eval.splits}
    decision = steps.judge(cfg, workspace, k, evals)
    tokens = sum(p["completion_tokens"] for p in played)
    seconds = sum(p["completion_tokens"] / p["tokens_per_s"] for p in played if p["tokens_per_s"] > 0)
    summary = RoundSummary(
        round=k, campaign=cfg.pipeline.campaign, annotate=annotated, rollout=played,
        rollout_tokens_per_s=tokens / seconds if seconds else 0.0, data=data, version=version, train=train,
        eval=evals, wall_s=time.perf_counter() - started,
        time_s={stage: times[stage] for stage in STAGES if stage in times},
        tracking={"campaign_run": parent_id, "round_run": run_id}, decision=decision,
    )
    summary.registered = steps.register(cfg, workspace, k, run_id, parent_id, summary)
    steps.finish_round(cfg, workspace, k, summary)
    rolled = steps.roll_back_rejected(cfg, workspace) if decision.verdict == "rejected" else None
    _log_decision(summary, rolled)
    return summary


def _log_decision(summary: RoundSummary, rolled: dict | None) -> None:
    """The gate's decision on a round, as one line of the run's log."""
    d, k = summary.decision, summary.round
    if d.verdict == "accepted":
        against = "the first round" if d.champion_round is None else f"champion round {d.champion_round}"
        get_run_logger().info(f"round {k}: accepted (compared with {against})")
    elif d.verdict == "kept":
        get_run_logger().warning(f"round {k}: kept despite a regression (pipeline.on_regression=keep): {d.reason}")
    else:
        back = f"; dataset rolled back to {rolled['tag']}" if rolled else ""
        get_run_logger().warning(f"round {k}: rejected: {d.reason}{back}; the next round starts from round "
                                 f"{d.champion_round}'s data and adapter")
