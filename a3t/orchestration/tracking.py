"""MLflow tracking of self-improvement campaigns: one parent run per campaign, one nested
run per round, the round's adapter registered as a model version.

Everything goes through ``MlflowClient`` with explicit run ids, never the fluent active-run
API: the HF Trainer fails when a fluent run is active (transformers #15663), and a round
may run in another process than the one that opened its campaign (mlflow #2194).

Store: ``<workspace>/mlflow/mlflow.db`` (SQLite) and ``<workspace>/mlflow/artifacts/``, or the
server named by ``MLFLOW_TRACKING_URI`` when the user set it.

Runs are found again by their tags, so a flow killed mid-round and rerun reuses the round's
run instead of opening a second one:
  parent   a3t.kind=campaign  a3t.campaign=<name>                         run name <campaign>
  round    a3t.kind=round     a3t.campaign=<name>  a3t.round=<k>          run name round-<k>,
           nested under the parent (mlflow.parentRunId).
``a3t rollback`` to round k marks the runs of rounds > k ``a3t.rolled_back=true`` (status
KILLED, name "round-<k> (rolled back)"); lookups skip them, so the next run of round k+1 gets
a new run. The champion gate tags each round run ``a3t.decision`` (accepted, rejected, kept),
``a3t.decision_reason`` and ``a3t.champion_round``; a rejected run is named "round-<k>
(rejected)", stays FINISHED (the round is on record, not redone) and registers no model version.

Metric names (step = round, on the round run and on the parent, whose charts then show
the campaign's curves):
  <split>/success, <split>/success/<task_type>, <split>/success_within_<k>, <split>/score,
  <split>/score_within_<k>   (split: ALFWorld's valid_seen and valid_unseen, WebShop's test; task
  type: WebShop's product category; score: 100 x the mean reward, WebShop's score);
  trajectories/policy|explored|annotated; train/loss; rollout/tokens_per_s; round/wall_s.

Registered model ``<experiment>-<campaign>`` (``a3t-<campaign>``): one version per round,
source the round run's ``adapter`` artifact, tags a3t.round and a3t.score (first-attempt
success on the held-out split: ALFWorld valid_unseen, WebShop test). Aliases: ``challenger``
is the latest round's version; ``champion`` moves only when a round's score is strictly higher
than the champion's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# MLflow starts its telemetry client (which phones home) when it is imported: switch it off
# first, unless the user decided otherwise. If something imported MLflow earlier, the client
# is re-initialised below with this setting. The UI server started from this process
# (`a3t ui`) inherits it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The UI server's job executor starts worker processes for GenAI jobs (a3t has none): they
# double its start-up time and outlive it when only its main process is stopped.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
_MLFLOW_IMPORTED_BEFORE = "mlflow" in sys.modules

import mlflow.telemetry  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, Run, RunTag  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from a3t.config import CAMPAIGN_NAME  # noqa: E402
from a3t.evaluate import Decision, is_new_champion  # noqa: E402
from a3t.trajectory import Trajectory, TrajectoryStore  # noqa: E402

if _MLFLOW_IMPORTED_BEFORE:
    mlflow.telemetry.set_telemetry_client()

log = logging.getLogger(__name__)

EXPERIMENT = "a3t"
SPLITS = ("valid_unseen", "valid_seen", "test")  # ALFWorld's evaluation splits, then WebShop's
CHAMPION = "champion"
CHALLENGER = "challenger"

TAG_KIND = "a3t.kind"
TAG_CAMPAIGN = "a3t.campaign"
TAG_ROUND = "a3t.round"
TAG_SCORE = "a3t.score"
TAG_ROLLED_BACK = "a3t.rolled_back"
TAG_DECISION = "a3t.decision"
TAG_CHANGED = "a3t.changed."  # + param key: a value that differs from the logged (immutable) param
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI

# Ignores the whole folder, itself included, so that nothing of the store shows up in a user's
# `git status` (a3t's own repo commits its README.md and this file, which git then keeps).
_GITIGNORE = "# The MLflow store (SQLite + artifacts) is a workspace file, never committed.\n*\n"
_TRUNCATED = "... (truncated; full config in config.json)"
_CAMPAIGN_NAME = re.compile(CAMPAIGN_NAME)


class TrackingError(ValueError):
    """Input that the tracking functions cannot use; the message names what and where."""


# --- store -------------------------------------------------------------------------------


def store_dir(workspace: str | Path) -> Path:
    return Path(workspace).resolve() / "mlflow"


def tracking_uri(workspace: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a shared MLflow server), else the workspace's SQLite
    store ``sqlite:///<workspace>/mlflow/mlflow.db``; creates ``mlflow/`` and its .gitignore."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = store_dir(workspace)
    store.mkdir(parents=True, exist_ok=True)
    gitignore = store / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(_GITIGNORE)
    return f"sqlite:///{store / 'mlflow.db'}"


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _client(workspace: str | Path) -> MlflowClient:
    # The model registry defaults to the tracking store (or MLFLOW_REGISTRY_URI).
    return MlflowClient(tracking_uri=tracking_uri(workspace))


# MLflow's UI opens an experiment by its kind: untagged, it guesses GenAI and opens on an empty
# traces overview; "custom_model_development" (what the UI itself writes when a user picks
# "Machine learning") opens on the runs, where the rounds and their comparison are.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: MlflowClient, workspace: str | Path, name: str, create: bool = True) -> str | None:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if not create:
            return None
        # Artifacts beside the database, so that `a3t ui` serves them; a server decides its own.
        location = str(store_dir(workspace) / "artifacts" / name) if _is_local(tracking_uri(workspace)) else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # another process created it first
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted: restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or use another experiment"
        )
    if create and experiment.tags.keys().isdisjoint(EXPERIMENT_KIND):  # made by an older a3t; a user's choice stays
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


# --- params ------------------------------------------------------------------------------


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested keys joined by '.'; strings as they are, other values as JSON (``true``, ``null``,
    ``[1, 2]``: what a ``key=value`` override takes back); values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(_TRUNCATED)] + _TRUNCATED
        flat[name] = text
    return flat


def _as_dict(config: Mapping[str, Any] | BaseModel) -> Mapping[str, Any]:
    return config.model_dump(mode="json") if isinstance(config, BaseModel) else config


def _log_config(client: MlflowClient, run: Run, config: Mapping[str, Any]) -> None:
    """Log the config's params that the run lacks. A param is immutable in MLflow: a value
    that differs from the logged one (the config changed between two runs of the flow) goes
    to the tag ``a3t.changed.<key>`` instead, with a warning. The whole config, untruncated and
    typed, goes to ``config.json`` (the latest call's)."""
    logged = run.data.params
    flat = flatten_config(config)
    new = [Param(k, v) for k, v in flat.items() if k not in logged]
    changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
    tags = [RunTag(TAG_CHANGED + k, v[:MAX_TAG_VAL_LENGTH]) for k, v in changed.items()]
    if new or tags:
        client.log_batch(run.info.run_id, params=new, tags=tags)
    client.log_text(run.info.run_id, json.dumps(config, indent=2, default=str), "config.json")
    if changed:
        log.warning(
            "run %s: config changed since it was first logged (%s); the new values are in its tags %s<key>",
            run.info.run_id,
            ", ".join(f"{k}: {logged[k]} -> {v}" for k, v in changed.items()),
            TAG_CHANGED,
        )


# --- runs --------------------------------------------------------------------------------


def _check_campaign(campaign: str) -> None:
    if not isinstance(campaign, str) or not _CAMPAIGN_NAME.fullmatch(campaign):
        raise TrackingError(
            f"campaign name {campaign!r}: use letters, digits, '_', '.' and '-' (it names MLflow runs and a model)"
        )


def _check_round(round_: int) -> None:
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise TrackingError(f"round {round_!r}: must be an integer >= 0")


def _search(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> list[Run]:
    """Active (not deleted) runs with these tags, oldest first."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], where, max_results=10_000, order_by=["attributes.start_time ASC"])


def _is_rolled_back(run: Run) -> bool:
    return run.data.tags.get(TAG_ROLLED_BACK) == "true"


def _round_runs(
    client: MlflowClient, experiment_id: str, campaign: str, parent_run_id: str | None = None
) -> dict[int, Run]:
    """The live (not rolled back) run of each round, by round. Should a round have two (two
    flows racing), the oldest wins, as it does every time."""
    tags = {TAG_CAMPAIGN: campaign, TAG_KIND: "round"}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    runs: dict[int, Run] = {}
    for run in _search(client, experiment_id, tags):
        if not _is_rolled_back(run):
            runs.setdefault(int(run.data.tags[TAG_ROUND]), run)
    return runs


def _resume(client: MlflowClient, run: Run) -> None:
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")


def campaign_run(
    workspace: str | Path, campaign: str, config: Mapping[str, Any] | BaseModel, experiment: str = EXPERIMENT
) -> str:
    """Find or create the campaign's parent run (status RUNNING) and log the config (a dict or
    the pydantic config) as params; returns its run id."""
    _check_campaign(campaign)
    config = _as_dict(config)
    client = _client(workspace)
    experiment_id = _experiment_id(client, workspace, experiment)
    runs = _search(client, experiment_id, {TAG_CAMPAIGN: campaign, TAG_KIND: "campaign"})
    if runs:
        run = runs[0]
        _resume(client, run)
    else:
        run = client.create_run(experiment_id, run_name=campaign, tags={TAG_CAMPAIGN: campaign, TAG_KIND: "campaign"})
    _log_config(client, run, config)
    return run.info.run_id


def _parent(client: MlflowClient, parent_run_id: str, campaign: str) -> Run:
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    if tags.get(TAG_KIND) != "campaign" or tags.get(TAG_CAMPAIGN) != campaign:
        raise TrackingError(f"run {parent_run_id} is not the parent run of campaign {campaign!r} (see campaign_run)")
    return parent


def round_run(
    workspace: str | Path, campaign: str, round_: int, parent_run_id: str, config: Mapping[str, Any] | BaseModel
) -> str:
    """Find the live run of this round (a rerun after a crash resumes it) or create it, nested
    under the campaign's run; log the round's config as params and config.json. Returns its id."""
    _check_campaign(campaign)
    _check_round(round_)
    config = _as_dict(config)
    client = _client(workspace)
    parent = _parent(client, parent_run_id, campaign)
    experiment_id = parent.info.experiment_id
    run = _round_runs(client, experiment_id, campaign, parent_run_id).get(round_)
    if run is None:
        tags = {PARENT_TAG: parent_run_id, TAG_CAMPAIGN: campaign, TAG_KIND: "round", TAG_ROUND: str(round_)}
        run = client.create_run(experiment_id, run_name=f"round-{round_}", tags=tags)
    else:
        _resume(client, run)
    _log_config(client, run, config)
    return run.info.run_id


def finish_run(workspace: str | Path, run_id: str, status: str = "FINISHED") -> None:
    """End a round's (or the campaign's) run: FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise TrackingError(f"run status {status!r}: use FINISHED, FAILED or KILLED")
    _client(workspace).set_terminated(run_id, status=status)


def _check_round_run(run: Run, round_: int, campaign: str | None = None, parent_run_id: str | None = None) -> None:
    """The pipeline passes run ids around: catch one that belongs to another round, campaign or
    parent, or that a rollback abandoned, before anything is logged to it."""
    tags = run.data.tags
    expected = {TAG_KIND: "round", TAG_ROUND: str(round_), TAG_CAMPAIGN: campaign, PARENT_TAG: parent_run_id}
    wrong = {k: tags.get(k) for k, v in expected.items() if v is not None and tags.get(k) != v}
    what = f"run {run.info.run_id} as the run of round {round_}" + (f" of campaign {campaign!r}" if campaign else "")
    if wrong:
        raise TrackingError(f"{what}: its tags say {wrong}")
    if _is_rolled_back(run):
        raise TrackingError(f"{what}: it was rolled back (round_run gives the round's new run)")


# --- metrics -----------------------------------------------------------------------------


def success_key(split: str, task_type: str | None = None) -> str:
    """``valid_unseen/success`` or ``valid_unseen/success/<task_type>``: the names the plot reads."""
    return f"{split}/success" if task_type is None else f"{split}/success/{task_type}"


def log_round_metrics(
    workspace: str | Path, run_id: str, parent_run_id: str, round_: int, metrics: Mapping[str, float]
) -> None:
    """Log ``metrics`` at step ``round_`` on the round's run and on the campaign's run. A value
    the round's run already has (a rerun) is not logged twice."""
    _check_round(round_)
    values: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            if isinstance(value, (bool, str)):
                raise TypeError
            values[name] = float(value)
        except (TypeError, ValueError):
            raise TrackingError(f"metric {name!r} of round {round_}: {value!r} is not a number") from None
    client = _client(workspace)
    run = client.get_run(run_id)
    _check_round_run(run, round_, parent_run_id=parent_run_id)
    now = int(time.time() * 1000)
    todo = [Metric(k, v, now, round_) for k, v in values.items() if run.data.metrics.get(k) != v]
    # Parent first: a round run that has a value implies the parent has it too.
    for target in (parent_run_id, run_id):
        if todo:
            client.log_batch(target, metrics=todo)


# --- artifacts ---------------------------------------------------------------------------


def sample_trajectories(files: Iterable[str | Path], n: int) -> list[Trajectory]:
    """The first ceil(n/2) successes and the first failures up to n, in file order (fewer of
    one kind: more of the other). Deterministic, so a rerun logs the same sample."""
    successes: list[Trajectory] = []
    failures: list[Trajectory] = []
    for path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"trajectory file {path} does not exist")
        for trajectory in TrajectoryStore(path).read():
            kind = successes if trajectory.success else failures
            if len(kind) < n:
                kind.append(trajectory)
            if len(successes) >= n and len(failures) >= n:
                break
    n_success = min(len(successes), max(math.ceil(n / 2), n - len(failures)))
    return successes[:n_success] + failures[: n - n_success]


def log_round_artifacts(
    workspace: str | Path,
    run_id: str,
    adapter_dir: str | Path | None,
    trajectory_files: Iterable[str | Path] = (),
    sample: int = 20,
) -> None:
    """The adapter folder as ``adapter/`` (what register_adapter registers) and a sample of
    the trajectories as ``trajectories/sample.jsonl``. A rerun overwrites them."""
    client = _client(workspace)
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise TrackingError(f"adapter folder {adapter_dir}: no adapter_config.json (not a peft adapter)")
        client.log_artifacts(run_id, str(adapter_dir), "adapter")
    trajectory_files = list(trajectory_files)
    if trajectory_files and sample > 0:
        lines = "".join(t.model_dump_json() + "\n" for t in sample_trajectories(trajectory_files, sample))
        client.log_text(run_id, lines, "trajectories/sample.jsonl")


def round_history(workspace: str | Path, campaign: str, experiment: str = EXPERIMENT) -> list[dict[str, Any]]:
    """``[{"round": k, "run_id": ..., "metrics": {name: latest value}}]`` of the campaign's live
    (not rolled back) round runs, by round."""
    _check_campaign(campaign)
    client = _client(workspace)
    experiment_id = _experiment_id(client, workspace, experiment, create=False)
    if experiment_id is None:
        return []
    runs = _round_runs(client, experiment_id, campaign)
    return [{"round": k, "run_id": runs[k].info.run_id, "metrics": dict(runs[k].data.metrics)} for k in sorted(runs)]


def plot_success(history: list[dict[str, Any]], out_png: str | Path) -> Path:
    """PNG of the success rate per round, overall and per task type, one panel per split; error
    bars on the rates whose 95% interval was logged (``<rate>_ci_low`` / ``_ci_high``)."""
    # The object API renders with Agg and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A panel per evaluated split (ALFWorld's two, or WebShop's test); ALFWorld's before any evaluation.
    splits = [s for s in SPLITS if any(success_key(s) in h["metrics"] for h in history)] or list(SPLITS[:2])
    per_task = tuple(success_key(split) + "/" for split in splits)
    task_types = sorted({k.rsplit("/", 1)[1] for h in history for k in h["metrics"] if k.startswith(per_task)})
    colors = {t: f"C{i % 10}" for i, t in enumerate(task_types)}
    fig = Figure(figsize=(6 * len(splits), 5), layout="constrained")
    with_bars = False
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for ax, split in zip(axes, splits):
        lines = [(success_key(split), "overall", {"color": "black", "linewidth": 2.5})]
        lines += [(success_key(split, t), t, {"color": colors[t], "linewidth": 1.2}) for t in task_types]
        drawn = False
        for key, label, style in lines:
            points = [(h["round"], h["metrics"][key]) for h in history if key in h["metrics"]]
            if points:
                ax.plot(*zip(*points), marker="o", label=label, **style)
                drawn = True
            # A round's gain smaller than the bars is not evidence (rounds logged before the
            # intervals have none).
            low, high = f"{key}_ci_low", f"{key}_ci_high"
            with_ci = [h for h in history if {key, low, high} <= h["metrics"].keys()]
            if with_ci:
                m = [h["metrics"] for h in with_ci]
                ax.errorbar([h["round"] for h in with_ci], [v[key] for v in m],
                            yerr=[[v[key] - v[low] for v in m], [v[high] - v[key] for v in m]],
                            fmt="none", ecolor=style["color"], capsize=4, alpha=0.6)
                with_bars = True
        if not drawn:
            ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=split, xlabel="round", ylim=(-0.03, 1.03))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate")
    fig.suptitle("Success rate at the first attempt, per round" + (" (bars: 95% interval)" if with_bars else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # one legend for both panels; a task type may appear in one split only
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def log_success_plot(
    workspace: str | Path, campaign: str, run_id: str, parent_run_id: str, experiment: str = EXPERIMENT
) -> None:
    """Plot the campaign's live rounds and log the PNG as ``plots/success_rate.png`` on the
    campaign's run (replacing the previous round's) and on the round's run."""
    client = _client(workspace)
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_success(round_history(workspace, campaign, experiment), Path(tmp) / "success_rate.png")
        for target in (run_id, parent_run_id):
            client.log_artifact(target, str(png), "plots")


# --- model registry ----------------------------------------------------------------------


def model_name(campaign: str, experiment: str = EXPERIMENT) -> str:
    return f"{experiment}-{campaign}"


def _score(version: ModelVersion) -> float:
    # A version registered by hand, without a score, is beaten by any scored round.
    return float(version.tags.get(TAG_SCORE, "-inf"))


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def champion(workspace: str | Path, campaign: str, experiment: str = EXPERIMENT) -> dict[str, Any] | None:
    """The campaign's champion adapter: ``{"version", "round", "score"}``; None before any round
    registered one. Reads the store, starts nothing."""
    _check_campaign(campaign)
    client = _client(workspace)
    name = model_name(campaign, experiment)
    try:
        version = _aliases(client, name).get(CHAMPION)
    except MlflowException:  # no registered model yet
        return None
    if version is None:
        return None
    v = client.get_model_version(name, version)
    return {"version": version, "round": int(v.tags.get(TAG_ROUND, -1)), "score": _score(v)}


def register_adapter(
    workspace: str | Path, campaign: str, run_id: str, round_: int, score: float,
    score_name: str = "valid_unseen/success",
) -> tuple[str, bool]:
    """Register the round run's ``adapter`` artifact as a version of ``a3t-<campaign>`` (once:
    a rerun finds the version and updates its score). ``challenger`` points at it; ``champion``
    moves to it when there is none or ``score`` (the metric ``score_name``: valid_unseen success,
    or WebShop's test success) is strictly higher than the champion's. Returns (version, whether
    it is the champion now)."""
    _check_campaign(campaign)
    _check_round(round_)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise TrackingError(f"score {score!r} of round {round_}: must be a finite number")
    client = _client(workspace)
    run = client.get_run(run_id)
    _check_round_run(run, round_, campaign=campaign)
    name = model_name(campaign, client.get_experiment(run.info.experiment_id).name)
    try:
        client.create_registered_model(name, description=f"LoRA adapters of a3t campaign {campaign!r}, one per round")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    of_run = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    found = [v for v in of_run if v.tags.get(TAG_ROUND) == str(round_)]
    if found:
        version = min(found, key=lambda v: int(v.version)).version
        client.set_model_version_tag(name, version, TAG_SCORE, str(score))
    else:
        if not client.list_artifacts(run_id, "adapter"):
            raise TrackingError(f"run {run_id} (round {round_}) has no adapter artifact: log_round_artifacts first")
        version = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/adapter",
            run_id=run_id,
            tags={TAG_CAMPAIGN: campaign, TAG_ROUND: str(round_), TAG_SCORE: str(score)},
            description=f"round {round_}: {score_name} {score:.4f}",
        ).version
    version = str(version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    champion = _aliases(client, name).get(CHAMPION)
    best = None if champion is None else _score(client.get_model_version(name, champion))
    if champion != version and is_new_champion(score, best):
        client.set_registered_model_alias(name, CHAMPION, version)
        champion = version
    return version, champion == version


# --- rollback ----------------------------------------------------------------------------


def abandon_rounds_after(
    workspace: str | Path, campaign: str, round_: int, experiment: str = EXPERIMENT
) -> list[str]:
    """After ``a3t rollback`` to round ``round_``: mark the live runs of later rounds rolled back
    (tag, status KILLED, name and note), and their model versions; move ``champion`` back to the
    best remaining version and ``challenger`` to the latest one (or drop an alias with no version
    left). Returns the run ids abandoned now. Pass -1 to abandon every round."""
    _check_campaign(campaign)
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < -1:
        raise TrackingError(f"round {round_!r}: must be an integer >= -1")
    client = _client(workspace)
    experiment_id = _experiment_id(client, workspace, experiment, create=False)
    if experiment_id is None:
        return []
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    abandoned = []
    for k, run in sorted(_round_runs(client, experiment_id, campaign).items()):
        if k <= round_:
            continue
        note = f"Rolled back to round {round_} on {when}: the next run of round {k} is a new run."
        tags = [RunTag(TAG_ROLLED_BACK, "true"), RunTag("a3t.rolled_back_to", str(round_)), RunTag(NOTE_TAG, note)]
        client.log_batch(run.info.run_id, tags=tags)
        client.update_run(run.info.run_id, status="KILLED", name=f"round-{k} (rolled back)")
        abandoned.append(run.info.run_id)
    for parent in _search(client, experiment_id, {TAG_CAMPAIGN: campaign, TAG_KIND: "campaign"}):
        # Its metric history keeps the abandoned rounds' points; this says why.
        client.set_tag(parent.info.run_id, "a3t.last_rollback", f"to round {round_} on {when}")
    _roll_back_versions(client, model_name(campaign, experiment), round_)
    return abandoned


def record_decision(workspace: str | Path, run_id: str, round_: int, decision: Decision) -> None:
    """The champion gate's decision on a round's run: tags, and for a rejected round its name and
    note say so (the comparison view then shows it beside the champion)."""
    client = _client(workspace)
    tags = [RunTag(TAG_DECISION, decision.verdict), RunTag(f"{TAG_DECISION}_reason", decision.reason[:MAX_TAG_VAL_LENGTH]),
            RunTag("a3t.champion_round", "" if decision.champion_round is None else str(decision.champion_round))]
    if decision.verdict != "accepted":
        tags.append(RunTag(NOTE_TAG, f"Round {round_} {decision.verdict} by the champion gate: {decision.reason}"))
    client.log_batch(run_id, tags=tags)
    if decision.verdict == "rejected":
        client.update_run(run_id, name=f"round-{round_} (rejected)")


def reject_versions_after(workspace: str | Path, campaign: str, round_: int, experiment: str = EXPERIMENT) -> None:
    """After the gate rolled the dataset back to champion round ``round_``: the model versions of
    later rounds are marked rolled back, and the aliases move back to live versions."""
    _check_campaign(campaign)
    _roll_back_versions(_client(workspace), model_name(campaign, experiment), round_)


def _roll_back_versions(client: MlflowClient, name: str, round_: int) -> None:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return  # no adapter registered yet
    live = []
    for v in versions:
        if v.tags.get(TAG_ROLLED_BACK) == "true":
            continue
        if int(v.tags.get(TAG_ROUND, -1)) > round_:
            client.set_model_version_tag(name, v.version, TAG_ROLLED_BACK, "true")
        else:
            live.append(v)
    aliases = _aliases(client, name)
    live_ids = {str(v.version) for v in live}
    # Best score, the earliest version on ties: the one the strict-improvement rule would have kept.
    best = max(live, key=lambda v: (_score(v), -int(v.version)), default=None)
    latest = max(live, key=lambda v: (int(v.tags.get(TAG_ROUND, -1)), int(v.version)), default=None)
    for alias, target in ((CHAMPION, best), (CHALLENGER, latest)):
        if aliases.get(alias) is None or aliases[alias] in live_ids:
            continue
        if target is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(target.version))


# --- UI ----------------------------------------------------------------------------------


def comparison_url(workspace: str | Path, campaign: str, ui: str, experiment: str = EXPERIMENT) -> str | None:
    """The MLflow UI page (``ui``: its base URL) that shows the campaign's live round runs side by
    side (MLflow's "compare runs": metrics, parameters, charts); with one round, that round's run;
    None before the first round."""
    from urllib.parse import quote

    history = round_history(workspace, campaign, experiment)
    if not history:
        return None
    experiment_id = _experiment_id(_client(workspace), workspace, experiment, create=False)
    if len(history) == 1:
        return f"{ui}/#/experiments/{experiment_id}/runs/{history[0]['run_id']}"
    runs = json.dumps([h["run_id"] for h in history])
    return f"{ui}/#/compare-runs?runs={quote(runs)}&experiments={quote(json.dumps([experiment_id]))}"


def ui_command(workspace: str | Path, port: int = 5000) -> list[str]:
    """argv of the MLflow UI server on 127.0.0.1:<port> for the workspace's store and artifacts
    (run it from this process's environment). A remote ``MLFLOW_TRACKING_URI`` has its own UI:
    an error says where."""
    uri = tracking_uri(workspace)
    if uri.startswith(("http://", "https://", "databricks")):
        raise TrackingError(f"MLFLOW_TRACKING_URI is {uri}: open that server's UI in a browser instead")
    artifacts = store_dir(workspace) / "artifacts"
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        # Where experiments created in the UI keep artifacts; a3t's own experiments say it themselves.
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip

