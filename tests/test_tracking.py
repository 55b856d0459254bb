import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from a3t.trajectory import Trajectory, TrajectoryStore
from a3t.orchestration import tracking
from factories import make_trajectory

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "games": {"seed": 0, "train": 30},
    "llm": {"model": "default", "adapter": None},
    "train": {"lr": 1e-4, "targets": ["q_proj", "v_proj"]},
}


@pytest.fixture(autouse=True)
def local_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """A store whose tables exist: creating them (MLflow's migrations) takes ~2 s, a copy ~0."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def workspace(tmp_path, empty_store):
    (tmp_path / "mlflow").mkdir()
    shutil.copy(empty_store, tmp_path / "mlflow" / "mlflow.db")
    return tmp_path


def client(workspace) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.tracking_uri(workspace))


def fake_adapter(folder: Path, content: bytes = b"weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(content)
    return folder


def trajectory(i: int, success: bool, source: str = "policy") -> Trajectory:
    return make_trajectory(f"task{i % 3}", success, episode_id=f"ep{i}", source=source)


def round_runs(workspace, campaign="c1") -> list:
    c = client(workspace)
    where = f"tags.`a3t.campaign` = '{campaign}' and tags.`a3t.kind` = 'round'"
    runs = c.search_runs([c.get_experiment_by_name("a3t").experiment_id], where)
    return sorted(runs, key=lambda r: r.info.start_time)


def test_store_lives_in_the_workspace_and_a_set_uri_wins(tmp_path, monkeypatch):
    uri = tracking.tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    # The store ignores itself whole: nothing of it shows in a user's `git status`.
    assert (tmp_path / "mlflow" / ".gitignore").read_text().splitlines()[-1] == "*"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:1"
    with pytest.raises(tracking.TrackingError, match="open that server's UI"):
        tracking.ui_command(tmp_path)


def test_the_experiment_opens_on_its_runs_and_the_rounds_compare_side_by_side(workspace):
    assert tracking.comparison_url(workspace, "c1", "http://ui") is None  # no round yet
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    rounds = [tracking.round_run(workspace, "c1", k, parent, CONFIG) for k in (0, 1)]
    experiment = client(workspace).get_experiment_by_name("a3t")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    url = tracking.comparison_url(workspace, "c1", "http://ui")
    assert url.startswith("http://ui/#/compare-runs?runs=") and all(run in url for run in rounds)
    assert f"experiments=%5B%22{experiment.experiment_id}%22%5D" in url
    # An experiment made before the tag gets it; a kind a user picked in the UI stays.
    c = client(workspace)
    c.delete_experiment_tag(experiment.experiment_id, "mlflow.experimentKind")
    tracking.campaign_run(workspace, "c1", CONFIG)
    assert c.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    c.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "finetuning")
    tracking.campaign_run(workspace, "c1", CONFIG)
    assert c.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == "finetuning"


def test_flatten_config():
    nested = {"b": {"c": 1}, "flag": True, "none": None, "list": [1, "x"], "empty": {}}
    flat = tracking.flatten_config({"a": nested, "s": "text", "long": "x" * 7000})
    assert flat["a.b.c"] == "1" and flat["a.flag"] == "true" and flat["a.none"] == "null"
    assert flat["a.list"] == '[1, "x"]' and flat["a.empty"] == "{}" and flat["s"] == "text"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("(truncated; full config in config.json)")


def test_reruns_find_one_run_per_round(workspace):
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    rounds = [tracking.round_run(workspace, "c1", k, parent, CONFIG) for k in (0, 1)]
    # A flow killed mid-round and rerun: same parent, same round runs.
    assert tracking.campaign_run(workspace, "c1", CONFIG) == parent
    assert [tracking.round_run(workspace, "c1", k, parent, CONFIG) for k in (0, 1)] == rounds
    runs = round_runs(workspace)
    assert [r.info.run_id for r in runs] == rounds
    assert [r.info.run_name for r in runs] == ["round-0", "round-1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs)
    assert runs[0].data.params["train.lr"] == "0.0001" and runs[0].data.params["llm.adapter"] == "null"
    assert json.loads(Path(client(workspace).download_artifacts(rounds[0], "config.json")).read_text()) == CONFIG
    # Another campaign gets its own runs.
    assert tracking.campaign_run(workspace, "c2", CONFIG) != parent
    # Terminated, then resumed by a rerun.
    tracking.finish_run(workspace, rounds[1], "FAILED")
    tracking.round_run(workspace, "c1", 1, parent, CONFIG)
    assert client(workspace).get_run(rounds[1]).info.status == "RUNNING"


def test_a_changed_config_value_is_recorded_not_fatal(workspace, caplog):
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    tracking.round_run(workspace, "c1", 0, parent, CONFIG)
    changed = {**CONFIG, "train": {**CONFIG["train"], "lr": 2e-4}, "new": 1}
    assert tracking.campaign_run(workspace, "c1", changed) == parent
    run = client(workspace).get_run(parent)
    assert json.loads(Path(client(workspace).download_artifacts(parent, "config.json")).read_text())["new"] == 1
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["new"] == "1"
    assert run.data.tags["a3t.changed.train.lr"] == "0.0002"
    assert "train.lr: 0.0001 -> 0.0002" in caplog.text
    round_1 = tracking.round_run(workspace, "c1", 1, parent, changed)
    assert client(workspace).get_run(round_1).data.params["train.lr"] == "0.0002"


def test_metrics_per_round_on_round_and_parent_runs(workspace):
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    runs = [tracking.round_run(workspace, "c1", k, parent, CONFIG) for k in (0, 1)]
    for k, run in enumerate(runs):
        metrics = {
            "valid_unseen/success": 0.25 * (k + 1), "valid_unseen/success/pick_and_place_simple": 0.5,
            "trajectories/explored": 3 + k, "train/loss": 1.5 - k, "round/wall_s": 60.0,
        }  # fmt: skip
        tracking.log_round_metrics(workspace, run, parent, k, metrics)
        tracking.log_round_metrics(workspace, run, parent, k, metrics)  # a rerun: nothing twice
    c = client(workspace)
    history = c.get_metric_history(parent, "valid_unseen/success")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.5)]
    assert [(m.step, m.value) for m in c.get_metric_history(runs[1], "train/loss")] == [(1, 0.5)]
    rounds = tracking.round_history(workspace, "c1")
    assert [(h["round"], h["metrics"]["trajectories/explored"]) for h in rounds] == [(0, 3), (1, 4)]
    with pytest.raises(tracking.TrackingError, match="'train/loss' of round 0: 'nan-ish' is not a number"):
        tracking.log_round_metrics(workspace, runs[0], parent, 0, {"train/loss": "nan-ish"})
    with pytest.raises(tracking.TrackingError, match="as the run of round 0: its tags say"):
        tracking.log_round_metrics(workspace, runs[1], parent, 0, {"train/loss": 1.0})


def test_artifacts_sample_and_plot(workspace, tmp_path):
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    run = tracking.round_run(workspace, "c1", 0, parent, CONFIG)
    store = TrajectoryStore(tmp_path / "rollout.jsonl")
    for i, success in enumerate([False, False, True, False, True, True, True]):
        store.append(trajectory(i, success))
    adapter = fake_adapter(tmp_path / "out" / "adapter")
    tracking.log_round_artifacts(workspace, run, adapter, [store.path], sample=4)
    metrics = {"valid_unseen/success": 0.5, "valid_seen/success/pick_and_place_simple": 1.0}
    tracking.log_round_metrics(workspace, run, parent, 0, metrics)
    tracking.log_success_plot(workspace, "c1", run, parent)
    c = client(workspace)
    files = {f.path for f in c.list_artifacts(run, "adapter")}
    assert files == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    sample = Path(c.download_artifacts(run, "trajectories/sample.jsonl")).read_text().splitlines()
    assert [json.loads(line)["episode_id"] for line in sample] == ["ep2", "ep4", "ep0", "ep1"]
    for target in (parent, run):
        png = Path(c.download_artifacts(target, "plots/success_rate.png")).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    with pytest.raises(tracking.TrackingError, match="no adapter_config.json"):
        tracking.log_round_artifacts(workspace, run, tmp_path, [])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tracking.log_round_artifacts(workspace, run, None, [tmp_path / "missing.jsonl"])


def test_sample_fills_up_with_the_other_kind(tmp_path):
    store = TrajectoryStore(tmp_path / "t.jsonl")
    for i, success in enumerate([True, False, True, True, True]):
        store.append(trajectory(i, success))
    assert [t.episode_id for t in tracking.sample_trajectories([store.path], 4)] == ["ep0", "ep2", "ep3", "ep1"]


def test_plot_without_evaluations(tmp_path):
    png = tracking.plot_success([{"round": 0, "run_id": "x", "metrics": {"train/loss": 1.0}}], tmp_path / "p.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def round_summary(rollout=(), annotate=None):
    """A round summary as a3t/orchestration/flows/self_improve.py writes it, by hand: 6 of 24 valid_unseen games won."""
    ci, ci_within = [0.119992, 0.448998], [0.314271, 0.685729]
    rates = {"k": 4, "tasks": 24, "successes": 6, "success": 0.25, "success_ci": ci,
             "success_within_k": 0.5, "success_within_k_ci": ci_within, "score": 25.0, "score_within_k": 50.0,
             "per_type": {"pick": {"tasks": 24, "successes": 6, "success": 0.25, "success_ci": ci,
                                   "success_within_k": 0.5, "success_within_k_ci": ci_within}}}
    return {"data": {"collected": {"policy": 3}, "train_set": {"policy": 2}}, "train": {"loss_per_epoch": [1.0]},
            "rollout_tokens_per_s": 10.0, "wall_s": 60.0, "rollout": list(rollout), "annotate": annotate,
            "eval": {"valid_unseen": rates}}


def round_metrics(summary: dict) -> dict[str, float]:
    from a3t.orchestration.steps import round_metrics
    from a3t.pipeline import RoundSummary

    return round_metrics(RoundSummary.model_validate(summary))


def test_round_metrics_log_the_intervals_and_actre_counts():
    shards = [{"episodes": 4, "actre_accepted": 3, "actre_rejected": 1, "actre_fallbacks": 0},
              {"episodes": 2, "actre_accepted": 2, "actre_rejected": 0, "actre_fallbacks": 1}]
    annotate = {"episodes": 5, "actre_accepted": 10, "actre_rejected": 2, "actre_fallbacks": 1}
    metrics = round_metrics(round_summary(shards, annotate))
    assert metrics["valid_unseen/tasks"] == 24 and metrics["valid_unseen/success"] == 0.25
    assert (metrics["valid_unseen/success_ci_low"], metrics["valid_unseen/success_ci_high"]) == (0.119992, 0.448998)
    assert metrics["valid_unseen/success_within_4_ci_low"] == 0.314271
    assert metrics["valid_unseen/success_within_4_ci_high"] == 0.685729
    assert (metrics["actre/accepted"], metrics["actre/rejected"], metrics["actre/fallbacks"]) == (15, 3, 2)
    # Rollouts that count no ActRe verdicts (and a round without annotation) log none.
    bare = round_metrics(round_summary([{"episodes": 4}]))
    assert not any(name.startswith("actre/") for name in bare)
    assert not any(name.startswith("time/") for name in bare)  # a summary without stage times logs none
    timed = round_metrics(round_summary() | {"time_s": {"train": 12.5, "eval": 3.0}})
    assert (timed["time/train_s"], timed["time/eval_s"]) == (12.5, 3.0)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())


def test_plot_draws_the_intervals(tmp_path):
    rounds = [{"valid_unseen/success": 0.25, "valid_unseen/success/pick": 0.25},
              {"valid_unseen/success": 0.5, "valid_unseen/success/pick": 0.5}]
    plain = tracking.plot_success([{"round": k, "metrics": m} for k, m in enumerate(rounds)], tmp_path / "a.png")
    intervals = [{"valid_unseen/success_ci_low": m["valid_unseen/success"] - 0.1,
                  "valid_unseen/success_ci_high": m["valid_unseen/success"] + 0.2} for m in rounds]
    history = [{"round": k, "metrics": m | ci} for k, (m, ci) in enumerate(zip(rounds, intervals))]
    history[0]["metrics"].pop("valid_unseen/success_ci_high")  # a round logged without: no bar, no error
    barred = tracking.plot_success(history, tmp_path / "b.png")
    assert barred.read_bytes().startswith(b"\x89PNG") and barred.read_bytes() != plain.read_bytes()


def campaign_with_rounds(workspace, tmp_path, scores):
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    results = []
    for k, score in enumerate(scores):
        run = tracking.round_run(workspace, "c1", k, parent, CONFIG)
        tracking.log_round_artifacts(workspace, run, fake_adapter(tmp_path / f"round_{k}", f"w{k}".encode()))
        results.append((run, *tracking.register_adapter(workspace, "c1", run, k, score)))
    return parent, results


def aliases(workspace) -> dict:
    return {k: str(v) for k, v in client(workspace).get_registered_model("a3t-c1").aliases.items()}


def test_champion_moves_only_on_improvement(workspace, tmp_path):
    _, results = campaign_with_rounds(workspace, tmp_path, [0.3, 0.5, 0.4])
    assert [(version, champion) for _, version, champion in results] == [("1", True), ("2", True), ("3", False)]
    assert aliases(workspace) == {"champion": "2", "challenger": "3"}
    version = client(workspace).get_model_version("a3t-c1", "2")
    assert version.tags["a3t.round"] == "1" and version.tags["a3t.score"] == "0.5"
    assert (Path(version.source) / "adapter_model.safetensors").read_bytes() == b"w1"
    # A rerun registers nothing new; an equal score does not take the title.
    run_1 = results[1][0]
    assert tracking.register_adapter(workspace, "c1", run_1, 1, 0.5) == ("2", True)
    assert tracking.register_adapter(workspace, "c1", results[2][0], 2, 0.5) == ("3", False)
    assert len(client(workspace).search_model_versions("name = 'a3t-c1'")) == 3
    with pytest.raises(tracking.TrackingError, match="round 2"):
        tracking.register_adapter(workspace, "c1", run_1, 2, 0.9)
    with pytest.raises(tracking.TrackingError, match="finite"):
        tracking.register_adapter(workspace, "c1", run_1, 1, float("nan"))


def test_rollback_abandons_later_rounds(workspace, tmp_path):
    parent, results = campaign_with_rounds(workspace, tmp_path, [0.3, 0.5, 0.4])
    for k, (run, _, _) in enumerate(results):
        tracking.log_round_metrics(workspace, run, parent, k, {"valid_unseen/success": [0.3, 0.5, 0.4][k]})
    abandoned = tracking.abandon_rounds_after(workspace, "c1", 0)
    assert abandoned == [results[1][0], results[2][0]]
    assert tracking.abandon_rounds_after(workspace, "c1", 0) == []  # done already
    c = client(workspace)
    for run_id in abandoned:
        run = c.get_run(run_id)
        assert run.data.tags["a3t.rolled_back"] == "true" and run.info.status == "KILLED"
        assert run.info.run_name.endswith("(rolled back)")
    assert [h["round"] for h in tracking.round_history(workspace, "c1")] == [0]
    assert aliases(workspace) == {"champion": "1", "challenger": "1"}
    assert c.get_model_version("a3t-c1", "2").tags["a3t.rolled_back"] == "true"
    # The next run of round 1 is a new run, and the new round 1 must beat round 0 again.
    new_1 = tracking.round_run(workspace, "c1", 1, parent, CONFIG)
    assert new_1 not in abandoned
    with pytest.raises(tracking.TrackingError, match="rolled back"):
        tracking.log_round_metrics(workspace, abandoned[0], parent, 1, {"train/loss": 1.0})
    tracking.log_round_artifacts(workspace, new_1, fake_adapter(tmp_path / "new_1"))
    assert tracking.register_adapter(workspace, "c1", new_1, 1, 0.35) == ("4", True)
    # Rolling back everything drops the aliases.
    tracking.abandon_rounds_after(workspace, "c1", -1)
    assert aliases(workspace) == {}
    assert tracking.round_history(workspace, "c1") == []


def test_bad_names_and_missing_adapter(workspace):
    with pytest.raises(tracking.TrackingError, match="campaign name 'a b'"):
        tracking.campaign_run(workspace, "a b", CONFIG)
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    with pytest.raises(tracking.TrackingError, match="round -1"):
        tracking.round_run(workspace, "c1", -1, parent, CONFIG)
    with pytest.raises(tracking.TrackingError, match="not the parent run of campaign 'c2'"):
        tracking.round_run(workspace, "c2", 0, parent, CONFIG)
    run = tracking.round_run(workspace, "c1", 0, parent, CONFIG)
    with pytest.raises(tracking.TrackingError, match="no adapter artifact"):
        tracking.register_adapter(workspace, "c1", run, 0, 0.5)
    assert tracking.abandon_rounds_after(workspace, "c1", -1) == [run]  # nothing registered: runs only


def test_no_telemetry_and_no_network(tmp_path):
    """Importing and using the module opens no connection and starts no telemetry client,
    in a process that does not look like a test run (MLflow skips telemetry in those)."""
    script = """
import json, socket, sys
attempts = []
def hook(event, args):
    if event == "socket.getaddrinfo":
        attempts.append(repr(args[0]))
    if event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        attempts.append(repr(args[1]))
sys.addaudithook(hook)
from a3t.orchestration import tracking
import mlflow.telemetry
ws = sys.argv[1]
parent = tracking.campaign_run(ws, "net", {"a": 1})
run = tracking.round_run(ws, "net", 0, parent, {"a": 1})
tracking.log_round_metrics(ws, run, parent, 0, {"valid_unseen/success": 0.5})
print(json.dumps({"client": repr(mlflow.telemetry.get_telemetry_client()), "attempts": attempts}))
"""
    ci_markers = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if k not in ci_markers}
    argv = [sys.executable, "-c", script, str(tmp_path)]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"client": "None", "attempts": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1
    with opener.open(url, timeout=5) as response:
        return response.status, response.read()


def test_ui_serves_runs_and_artifacts(workspace, tmp_path):
    """`a3t ui`'s server answers on 127.0.0.1 with the runs and their artifacts (it starts in
    5-15 s on 2 busy cores), and stops with its process group."""
    parent = tracking.campaign_run(workspace, "c1", CONFIG)
    run = tracking.round_run(workspace, "c1", 0, parent, CONFIG)
    tracking.log_round_artifacts(workspace, run, fake_adapter(tmp_path / "adapter"))
    port = free_port()
    argv = tracking.ui_command(workspace, port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    server = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                assert get(f"{base}/health") == (200, b"OK")
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI did not answer within 120 s"
                time.sleep(0.5)
        status, home = get(base + "/")
        assert status == 200 and b"<html" in home.lower()
        status, body = get(f"{base}/ajax-api/2.0/mlflow/runs/get?run_id={run}")
        assert json.loads(body)["run"]["info"]["run_name"] == "round-0"
        status, body = get(f"{base}/get-artifact?path=adapter/adapter_model.safetensors&run_uuid={run}")
        assert body == b"weights"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
            assert group_ends(server.pid), "processes of the MLflow UI outlived it"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)


def group_ends(pgid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
