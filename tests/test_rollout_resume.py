"""Crash safety of `a3t rollout`: SIGKILL a run mid-way, rerun it, and every (task, attempt)
is stored exactly once, every line a valid record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

from a3t.envs.alfworld import find_games
from a3t.rollout import task_for
from a3t.trajectory import Trajectory

GAMES = 4
RETRY_MAX = 1


def _lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_rollout_resumes_without_duplicates(tmp_path, games_root, tiny_model_dir):
    out = tmp_path / "rollout.jsonl"
    command = [
        sys.executable, "-m", "a3t", "rollout",
        f"llm.model={tiny_model_dir}", f"games.root={games_root}",
        "rollout.parallel_episodes=2", "env.max_steps=2", "rollout.max_new_tokens=8",
        "rollout.actre_max_new_tokens=8", "rollout.p_explore=0", f"rollout.retry_max={RETRY_MAX}",
        "--limit", str(GAMES), "--out", str(out),
    ]
    # one torch thread: on a busy two-core machine two threads make the tiny model several times slower
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1")
    tasks = [task_for(g).task_id for g in find_games(games_root, "train")[:GAMES]]
    expected_max = GAMES * (RETRY_MAX + 1)

    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while first.poll() is None and _lines(out) < 1:
                assert time.monotonic() < deadline, "no trajectory written in 300 s"
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait(60)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    log_text = (tmp_path / "first.log").read_text(errors="replace")
    assert first.returncode == -signal.SIGKILL, log_text[-3000:]
    killed_at = _lines(out)
    assert 1 <= killed_at < expected_max  # killed mid-way

    # A crash while writing leaves a torn last line: the rerun must set it aside.
    torn = out.read_text().splitlines()[0][:80]
    with out.open("a") as f:
        f.write(torn)

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=400)
    assert second.returncode == 0, (second.stdout + second.stderr).decode(errors="replace")[-3000:]

    raw = out.read_text()
    assert raw.endswith("\n")
    records = [Trajectory.model_validate_json(line) for line in raw.splitlines()]  # every line parses
    ids = [r.episode_id for r in records]
    assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
    pairs = Counter((r.task_id, r.attempt) for r in records)
    assert all(n == 1 for n in pairs.values()), pairs
    assert {task for task, _ in pairs} == set(tasks)
    for task in tasks:
        attempts = sorted(a for t, a in pairs if t == task)
        assert attempts == list(range(len(attempts)))  # no gaps
        results = {r.attempt: r.success for r in records if r.task_id == task}
        # the retry rule: retries follow a failure, up to retry_max, until a success
        last = attempts[-1]
        assert last == RETRY_MAX or results[last], (task, results)
        assert not any(results[a] for a in attempts[:-1])
    assert killed_at < len(records) <= expected_max
    quarantined = [json.loads(line) for line in (tmp_path / "rollout.jsonl.quarantine").read_text().splitlines()]
    assert [q["line"] for q in quarantined] == [torn] and "cut short by a crash" in quarantined[0]["reason"]
