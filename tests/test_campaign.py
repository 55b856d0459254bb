"""End to end: `a3t run --profile smoke` (tiny random model, real games, Prefect, DVC, MLflow)
in a fresh git workspace, killed mid-rollout and mid-training and rerun, a second run refused
while one holds the workspace, then a rollback and the next round redone from it.

Every phase is the real CLI in a subprocess; a phase is killed with SIGKILL (no cleanup
runs), so what survives is what a crash leaves. The tests run in file order and share the
workspace: each one checks the state the previous ones left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CAMPAIGN = "default"


@pytest.fixture(scope="module")
def ws(ws):
    (ws / "notes.txt").write_text("a user's own file, never committed or touched\n")
    return ws


# The smoke campaign, with round 0 trained for 4 epochs: the kill point "an epoch checkpointed"
# then leaves epochs to go (with smoke's 2, a fast machine finished the last one before the kill).
RUN = ("run", "--profile", "smoke", "train.epochs_first_round=4")


def a3t(ws: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "a3t", *args], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the run's whole process group as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def round_data(ws: Path, k: int) -> Path:
    return ws / "data" / "trajectories" / CAMPAIGN / f"round_{k}"


def round_run(ws: Path, k: int) -> Path:
    return ws / "data" / "runs" / CAMPAIGN / f"round_{k}"


def episode_ids(ws: Path) -> list[str]:
    """file:episode id of every stored episode (ids are unique per store: an annotated
    walkthrough and the policy's first attempt at the same game share one)."""
    ids = []
    for f in sorted((ws / "data" / "trajectories").rglob("*.jsonl")):
        if f.name != "train_set.jsonl":
            ids += [f"{f.relative_to(ws)}:{json.loads(line)['episode_id']}" for line in f.read_text().splitlines()]
    return ids


def test_killed_mid_rollout_and_mid_training_then_resumed(ws, env):
    # 1. Killed while round 0's policy rollout is writing episodes.
    run = a3t(ws, env, *RUN)
    kill_when(run, lambda: lines(round_data(ws, 0) / "rollout-0.jsonl") >= 1)
    before = episode_ids(ws)
    assert before

    # 2. Rerun, killed mid-training (epoch 1 of 2 checkpointed, the adapter not yet written); meanwhile
    #    a second run in the same workspace is refused at once.
    run = a3t(ws, env, *RUN)
    time.sleep(3)
    second = a3t(ws, env, *RUN)  # watched while the first one trains: the tiny model trains in seconds
    train = round_run(ws, 0) / "train"
    kill_when(run, lambda: any((train / "checkpoints").glob("checkpoint-*/trainer_state.json")))
    assert not (train / "adapter" / "train_stats.json").exists(), "killed after training, not during"
    refused, _ = second.communicate(timeout=120)
    assert second.returncode != 0
    assert "another a3t run" in refused
    assert set(before) <= set(episode_ids(ws))  # nothing lost

    # 3. Rerun to the end.
    out = finish(a3t(ws, env, *RUN))
    assert "a3t ui" in out and f"a3t/{CAMPAIGN}/round-1" in out
    assert "time per stage" in out  # where each round's time went
    times = json.loads((ws / "data" / "runs" / CAMPAIGN / "round_1" / "round.json").read_text())["time_s"]
    assert {"rollout", "explore", "filter", "version", "train", "eval"} <= set(times)
    assert all(seconds > 0 for seconds in times.values())
    ids = episode_ids(ws)
    assert len(ids) == len(set(ids)), "an episode was stored twice"
    assert set(before) <= set(ids)
    stats = json.loads((train / "adapter" / "train_stats.json").read_text())
    assert stats["resumed_from"], "training did not resume from its checkpoint"


def test_each_round_is_tagged_and_committed_alone(ws):
    tags = subprocess.run(["git", "tag", "-l", f"a3t/{CAMPAIGN}/*"], cwd=ws, capture_output=True, text=True).stdout
    assert tags.split() == [f"a3t/{CAMPAIGN}/round-0", f"a3t/{CAMPAIGN}/round-1"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True).stdout
    assert "?? notes.txt" in status  # the user's file: untracked, untouched
    committed = subprocess.run(["git", "log", "--name-only", "--format="], cwd=ws, capture_output=True, text=True).stdout
    assert "notes.txt" not in committed and "data/trajectories.dvc" in committed


def test_second_round_trained_on_both_rounds(ws):
    """Round 1's training set is every trajectory of rounds 0 and 1 with a non-zero weight (smoke: pg)."""
    from a3t.data import load_trajectories
    from a3t.filter import reward_of, task_baselines, trajectory_weight

    kept = [json.loads(line)["episode_id"] for line in (round_data(ws, 1) / "train_set.jsonl").read_text().splitlines()]
    played = load_trajectories([f for k in (0, 1) for f in sorted(round_data(ws, k).glob("*.jsonl"))
                                if f.name != "train_set.jsonl"])
    assert {t.round for t in played} == {0, 1}
    baselines = task_baselines(played, "pg")
    expected = [t.episode_id for t in played if trajectory_weight(reward_of(t, "pg"), baselines[t.task_id], "pg")]
    assert kept == expected and any(t.startswith("r0/") for t in kept)
    stats = json.loads((round_run(ws, 1) / "train" / "adapter" / "train_stats.json").read_text())
    assert stats["examples"] == len(kept)


def _mlflow(ws):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")


def test_mlflow_has_one_run_per_round_with_metrics_per_step(ws):
    client = _mlflow(ws)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    rounds = [r for r in runs if "a3t.round" in r.data.tags]
    assert sorted(int(r.data.tags["a3t.round"]) for r in rounds) == [0, 1]  # resumed, not duplicated
    parent = next(r for r in runs if "a3t.round" not in r.data.tags)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in rounds)
    for key in ("valid_unseen/success", "valid_seen/success", "trajectories/annotated", "train/loss"):
        history = client.get_metric_history(parent.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    assert parent.data.params["pipeline.campaign"] == CAMPAIGN
    artifacts = {a.path for a in client.list_artifacts(rounds[0].info.run_id)}
    assert {"adapter", "trajectories"} <= artifacts
    versions = client.search_model_versions(f"name='a3t-{CAMPAIGN}'")
    assert len(versions) == 2


def test_status_shows_the_rounds_and_the_champion_without_starting_anything(ws, env):
    out = finish(a3t(ws, env, "status", "--profile", "smoke", f"pipeline.campaign={CAMPAIGN}"), timeout=120)
    assert f"campaign {CAMPAIGN}: rounds" in out and f"a3t/{CAMPAIGN}/round-1" in out
    assert "last round: 1, accepted" in out
    assert "champion: round " in out and "no run holds this workspace" in out
    assert "Prefect" not in out  # nothing started


def test_eval_command_evaluates_a_rounds_adapter_as_the_pipeline_does(ws, env):
    adapter = round_run(ws, 1) / "train" / "adapter"
    out = finish(a3t(ws, env, "eval", "--profile", "smoke", f"pipeline.campaign={CAMPAIGN}", "--adapter", str(adapter),
                     "eval.splits=[valid_unseen]"))
    assert "valid_unseen" in out and "first attempt [95% CI]" in out
    played = ws / "data" / "runs" / "eval" / "train" / "valid_unseen.jsonl"
    assert lines(played) >= 2  # the smoke profile's 2 valid_unseen games, first attempts and retries


def test_rollback_then_the_next_round_is_redone(ws, env):
    from a3t.versioning import dataset_hash

    finish(a3t(ws, env, "rollback", f"a3t/{CAMPAIGN}/round-0", "--profile", "smoke"))
    assert not round_data(ws, 1).exists() and not round_run(ws, 1).exists()
    tagged = subprocess.run(["git", "show", f"a3t/{CAMPAIGN}/round-0:data/trajectories.dvc"], cwd=ws,
                            capture_output=True, text=True, check=True).stdout
    assert dataset_hash(ws / "data" / "trajectories") in tagged

    finish(a3t(ws, env, *RUN))
    assert (round_run(ws, 1) / "round.json").exists()
    client = _mlflow(ws)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    round1 = [r for r in runs if r.data.tags.get("a3t.round") == "1"]
    assert len(round1) == 2 and sum(r.data.tags.get("a3t.rolled_back") == "true" for r in round1) == 1
