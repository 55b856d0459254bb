"""benchmarks/rollout_speed.py compares like with like: under greedy decoding the engine and its
naive loop (same prompt, stop rules and action mode) play identical episodes."""

import importlib.util
from pathlib import Path

import pytest

from a3t.config import EnvConfig, RolloutConfig
from a3t.envs.alfworld import find_games
from a3t.llm.models import load_model
from a3t.llm.transformers_llm import TransformersLLM


def _benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "rollout_speed.py"
    spec = importlib.util.spec_from_file_location("rollout_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["free", "constrained"])
def test_the_engine_and_the_naive_loop_play_the_same_episodes(tiny_model_dir, games_root, one_torch_thread, mode):
    bench = _benchmark()
    model, tokenizer = load_model(tiny_model_dir)
    games = find_games(games_root, "train")[:3]
    env_cfg = EnvConfig(max_steps=3)
    cfg = RolloutConfig(parallel_episodes=3, p_explore=0.0, forced_explore_after_invalid=4, temperature=0.0,
                        max_new_tokens=12, retry_max=0)
    ours = bench.run_ours(games, TransformersLLM(model=model, tokenizer=tokenizer), cfg, env_cfg, None, mode)
    naive = bench.run_naive(games, model, tokenizer, 12, env_cfg, mode)
    assert ours["env_steps"] == naive["env_steps"] == 9
    assert bench.agreement(ours, naive) == {"actions_agree": 1.0, "thoughts_agree": 1.0, "tokens_agree": 1.0,
                                            "exact": True}
