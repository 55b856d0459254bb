"""benchmarks/gpu.py: skipped cleanly without CUDA; with --tiny its whole code path (4-bit load,
our trainer and, with the bench extra, TRL's, the engine's rollout) runs on the CPU and reports every figure."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def run(*args):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip is for machines without CUDA")
def test_without_cuda_the_benchmark_is_skipped_with_a_note():
    fig = run()
    assert fig["bench"] == "gpu" and "no CUDA" in fig["skipped"]


def test_tiny_runs_training_and_rollout_on_the_cpu():
    fig = run("--tiny", "--seq-lens", "32", "--steps", "1", "--turns", "1")
    assert fig["train_ours_tok_s_32"] > 0
    if all(importlib.util.find_spec(m) for m in ("trl", "datasets")):  # the bench extra
        assert fig["train_trl_tok_s_32"] > 0
    else:
        assert "trl_skipped" in fig
    assert fig["train_ours_peak_mib_32"] > 0
    assert fig["rollout_tokens"] > 0 and fig["rollout_tok_s"] > 0
