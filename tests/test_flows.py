"""The Prefect side of the pipeline beyond `a3t run`: rollout shards on a local 2-worker Dask
cluster, and `a3t serve` registering a scheduled deployment with a Prefect server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                MLFLOW_TRACKING_URI="", PREFECT_API_URL="")


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "workspace"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.mark.slow  # about a minute: a local Dask cluster of 2 processes, each loading the model
def test_one_round_with_rollout_shards_on_a_local_dask_cluster(ws, env):
    pytest.importorskip("prefect_dask")
    args = ["round", "--profile", "smoke", "--round", "0", "pipeline.task_runner=dask", "pipeline.rollout_shards=2",
            "pipeline.task_workers=2", "pipeline.annotate_walkthroughs=0", "eval.splits=[valid_unseen]"]
    done = subprocess.run([sys.executable, "-m", "a3t", *args], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "DaskTaskRunner" in done.stdout + done.stderr or "dask" in (done.stdout + done.stderr).lower()
    data = ws / "data" / "trajectories" / "default" / "round_0"
    shards = [data / "rollout-0.jsonl", data / "rollout-1.jsonl"]
    played = [json.loads(line)["task_id"] for f in shards for line in f.read_text().splitlines()]
    assert all(f.stat().st_size for f in shards)  # both shards played
    first = [line for f in shards for line in f.read_text().splitlines() if json.loads(line)["attempt"] == 0]
    assert len(first) == 4 == len(set(played))  # smoke: 4 train games, split over the 2 shards, none twice
    assert (ws / "data" / "runs" / "default" / "round_0" / "round.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_registers_a_cron_deployment_that_adds_rounds(ws, env):
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "a3t", "serve", "--profile", "smoke", "--cron", "0 3 * * *",
                              "--port", str(port)], cwd=ws, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        deployments = []
        while not deployments:
            assert serve.poll() is None, serve.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no deployment registered"
            time.sleep(1)
            try:
                deployments = httpx.post(f"http://127.0.0.1:{port}/api/deployments/filter", json={}, timeout=5).json()
            except httpx.HTTPError:
                continue
        (deployment,) = deployments
        assert deployment["name"] == "a3t-default"
        assert deployment["parameters"]["more_rounds"] == 1
        assert deployment["parameters"]["workspace"] == str(ws)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    finally:
        serve.terminate()
        serve.wait(timeout=60)


HOLDER = """
import sys, time
from a3t.versioning import workspace_lock
with workspace_lock(sys.argv[1], command="a3t run (last night's)"):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_run_that_finds_the_workspace_busy_skips_when_told(ws, env):
    """pipeline.when_busy=skip: a scheduled run that overlaps the last one adds nothing and says so."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = subprocess.run([sys.executable, "-m", "a3t", "run", "--profile", "smoke", "pipeline.when_busy=skip"],
                              cwd=ws, env=env, capture_output=True, text=True, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        assert "skipped (pipeline.when_busy=skip)" in out and "a3t run (last night's)" in out
        assert not (ws / "data" / "runs").exists()  # nothing written
        refused = subprocess.run([sys.executable, "-m", "a3t", "run", "--profile", "smoke"], cwd=ws, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "holds the lock on workspace" in refused.stdout + refused.stderr
    finally:
        holder.kill()
        holder.wait()


def _serve(model_dir, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "a3t.llm.server", str(model_dir), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert "serving" in server.stdout.readline()
    return server


@pytest.mark.slow  # about 2.5 minutes
def test_the_llm_server_killed_mid_rollout_and_restarted_loses_and_repeats_no_episode(ws, env, tiny_model_dir):
    """A night's LLM server dies mid-rollout: the rollout task fails, Prefect retries it once the
    server is back, and the round finishes with each train game played once."""
    port = _free_port()
    server = _serve(tiny_model_dir, port)
    # No client retries: the task retry is what recovers; the round's model is the served one;
    # one game at a time, so that the kill after the first stored game is mid-rollout.
    args = ["round", "--profile", "smoke", "--round", "0", "llm.backend=openai", f"llm.model={tiny_model_dir}",
            f"llm.base_url=http://127.0.0.1:{port}/v1", "llm.max_retries=0", "pipeline.llm_task_retries=3",
            "pipeline.annotate_walkthroughs=0", "eval.splits=[valid_unseen]", "rollout.parallel_episodes=1"]
    run = subprocess.Popen([sys.executable, "-m", "a3t", *args], cwd=ws, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    store = ws / "data" / "trajectories" / "default" / "round_0" / "rollout-0.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (store.exists() and store.read_text().count("\n") >= 1):
            assert run.poll() is None and time.monotonic() < deadline, "the rollout never wrote an episode"
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # mid-rollout: 1 of its 4 games stored
        server.wait()
        time.sleep(3)
        server = _serve(tiny_model_dir, port)
        out, _ = run.communicate(timeout=600)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, out[-4000:]
    retried = [line for line in out.splitlines() if "Retry 1/3" in line]
    assert any("Task run 'rollout-" in line and "LLMServerError" in line for line in retried), out[-4000:]
    episodes = [json.loads(line) for line in store.read_text().splitlines()]
    ids = [e["episode_id"] for e in episodes]
    assert len(ids) == len(set(ids)), "an episode was stored twice"
    assert len({e["task_id"] for e in episodes if e["attempt"] == 0}) == 4  # smoke: every train game's first attempt
    assert (ws / "data" / "runs" / "default" / "round_0" / "round.json").is_file()
