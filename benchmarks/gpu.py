"""The paper profile's model size on a CUDA GPU: a 7B Mistral in 4-bit nf4, trained and rolled out as a3t does.

The model has Mistral-7B-v0.2's shape with random weights (no download: model hubs are out of
reach), built once on the GPU in bfloat16 with the Mistral v3 tokenizer (32768 tokens: 768 more
than v0.2's) by ``a3t.llm.models.build_random_mistral``, then loaded the way the paper profile
loads Mistral-7B-Instruct-v0.2: ``a3t.llm.models.load_model`` in 4-bit nf4, bfloat16 compute.

- Training: a step of a3t's trainer (``A3TTrainer``) and of TRL's ``SFTTrainer`` on a fresh LoRA
  (r 16, q_proj/v_proj, paged AdamW) at 2048 and 4096 tokens per sequence, batch 1 x
  accumulation 2, through ``train_speed.run_trainer`` (the same harness as the CPU trainer
  benchmark): tokens/s over the timed steps after a warm-up step, and peak GPU memory
  (``torch.cuda.max_memory_allocated``) against the 4-bit base alone.
- Rollout: the in-process engine (``TransformersLLM``: batched rows, KV reuse across turns,
  prompt-lookup drafts) playing the paper profile's ``rollout.parallel_episodes`` sessions of
  ``--turns`` ReAct turns at once, greedy, the paper profile's ``rollout.max_new_tokens`` and stop
  rule, the 1-shot prompt of each ALFWorld task type and its worked example's observations as the
  environment's answers: generated tokens/s. Random weights seldom write an action line, so a
  turn mostly runs to max_new_tokens: the engine's throughput, not a campaign's turn lengths.

Without CUDA it prints a note and ``{"bench": "gpu", "skipped": ...}``, and exits 0. ``--tiny``
runs the same code on the tiny random Mistral on the CPU: a check of this script (CI runs it),
whose figures mean nothing.

Run:  python benchmarks/gpu.py [--tiny] [--seq-lens 2048,4096] [--steps 3] [--turns 6]
TRL's side needs the ``bench`` extra (trl, datasets); without it only a3t's trainer runs and the
JSON says ``"trl_skipped"``. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # train_speed, beside this file

# Mistral-7B-v0.2's config.json (mistralai/Mistral-7B-Instruct-v0.2): the paper's model size.
MISTRAL_7B_V02 = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-5, hidden_act="silu",
)


def random_rows(n: int, seq_len: int, vocab: int, seed: int) -> list:
    """Random token ids; the first quarter (a prompt) outside the loss; pg-like weights."""
    from a3t.data import Example

    rng = random.Random(seed)
    prompt = seq_len // 4
    weights = [1.5, -0.5, 1.0, -0.5]
    return [
        Example([rng.randrange(3, vocab) for _ in range(seq_len)], [0] * prompt + [1] * (seq_len - prompt),
                weights[i % len(weights)], f"random{i}")
        for i in range(n)
    ]


def train_figures(folder: Path, device: str, seq_lens: list[int], steps: int, kinds: tuple[str, ...]) -> dict:
    """tokens/s and peak memory of each trainer in ``kinds`` ("ours", "trl") at each sequence length."""
    import torch
    from train_speed import run_trainer

    from a3t.llm.models import load_model

    t = time.perf_counter()
    model, tokenizer = load_model(folder, load_in_4bit=True, dtype="bfloat16", device=device, trainable=True)
    out: dict = {"train_load_s": time.perf_counter() - t, "runs": {}}
    if device == "cuda":
        out["base_mem_mib"] = torch.cuda.memory_allocated() / 2**20
    spec = {"device": device, "seed": 0, "batch_size": 1, "accumulation": 2, "steps": steps}
    for i, seq_len in enumerate(seq_lens):
        rows = random_rows(spec["accumulation"] * (steps + 1), seq_len, model.config.vocab_size, seed=i)
        for kind in kinds:
            if i == 0:  # one-time costs (cuBLAS workspaces, kernel compiles) count in no timed run
                run_trainer(kind, model, tokenizer, rows, spec, warm_up_only=True)
            print(f"training {kind} at {seq_len} tokens ...", file=sys.stderr, flush=True)
            r = run_trainer(kind, model, tokenizer, rows, spec)
            out["runs"][f"{kind}@{seq_len}"] = {k: r[k] for k in ("tokens_s", "peak_mem_mib", "peak_mem_delta_mib",
                                                                  "steps", "tokens", "error") if k in r}
            if device == "cuda":
                torch.cuda.empty_cache()
    del model
    return out


def rollout_figures(folder: Path, device: str, sessions: int, turns: int, max_new_tokens: int,
                    draft_tokens: int) -> dict:
    """Generated tokens/s of the engine over ``turns`` turns of ``sessions`` ReAct episodes."""
    import torch

    from a3t.agent.examples import example_for
    from a3t.agent.react import format_turn, parse_turn, react_chat
    from a3t.envs.alfworld_gen import TASK_TYPES
    from a3t.llm.base import Sampling, stop_after_action_line
    from a3t.llm.transformers_llm import TransformersLLM

    t = time.perf_counter()
    llm = TransformersLLM(folder, load_in_4bit=True, dtype="bfloat16", device=device, draft_tokens=draft_tokens)
    load_s = time.perf_counter() - t
    types = [TASK_TYPES[i % len(TASK_TYPES)] for i in range(sessions)]
    examples = [example_for(task_type) for task_type in types]
    chats = [react_chat(task_type, example.observation, []) for task_type, example in zip(types, examples)]
    ids = [f"session_{i}" for i in range(sessions)]
    greedy = Sampling(temperature=0.0, max_new_tokens=max_new_tokens)
    llm.complete([chats[0][:2]], Sampling(temperature=0.0, max_new_tokens=4))  # warm-up, untimed
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens = prompt_tokens = 0
    sync()
    t = time.perf_counter()
    for turn in range(turns):
        replies = llm.complete(chats, greedy, stop=stop_after_action_line, sessions=ids)
        for chat, example, reply in zip(chats, examples, replies):
            parsed = parse_turn(reply.text)
            observation = example.steps[turn % len(example.steps)][2]
            chat += [{"role": "assistant", "content": format_turn(parsed.thought, parsed.action)},
                     {"role": "user", "content": observation}]
            tokens += reply.completion_tokens
            prompt_tokens += reply.prompt_tokens
    sync()
    wall = time.perf_counter() - t
    return {"rollout_load_s": load_s, "rollout_sessions": sessions, "rollout_turns": turns,
            "rollout_max_new_tokens": max_new_tokens, "rollout_draft_tokens": draft_tokens,
            "rollout_tokens": tokens, "rollout_prompt_tokens": prompt_tokens, "rollout_wall_s": wall,
            "rollout_tok_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random Mistral on the CPU instead (checks the script; figures mean nothing)")
    parser.add_argument("--seq-lens", help="training sequence lengths (default 2048,4096; --tiny 64,128)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per training run, after a warm-up")
    parser.add_argument("--turns", type=int, default=6, help="ReAct turns of each rollout session")
    args = parser.parse_args()

    import torch

    from a3t.config import load_config
    from a3t.llm.models import TINY_MISTRAL_SHAPE, build_random_mistral

    if not args.tiny and not torch.cuda.is_available():
        note = "no CUDA GPU (torch.cuda.is_available() is False): the GPU benchmark is skipped"
        print(note, file=sys.stderr)
        print(json.dumps({"bench": "gpu", "skipped": note}))
        return
    device = "cpu" if args.tiny else "cuda"
    seq_lens = [int(x) for x in (args.seq_lens or ("64,128" if args.tiny else "2048,4096")).split(",")]
    paper = load_config(profile="paper")
    fig: dict = {"bench": "gpu", "device": "cpu (--tiny)" if args.tiny else torch.cuda.get_device_name(0),
                 "model": "tiny random Mistral" if args.tiny else "Mistral-7B-v0.2 shape, random weights, nf4"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="a3t-gpu-bench-") as tmp:
        t = time.perf_counter()
        folder = build_random_mistral(Path(tmp) / "model", TINY_MISTRAL_SHAPE if args.tiny else MISTRAL_7B_V02,
                                      dtype="float32" if args.tiny else "bfloat16", device=device)
        if device == "cuda":
            torch.cuda.empty_cache()
        fig["build_s"] = time.perf_counter() - t
        kinds = ("ours", "trl")
        if not all(importlib.util.find_spec(m) for m in ("trl", "datasets")):
            kinds = ("ours",)
            fig["trl_skipped"] = "trl or datasets is not installed (pip install -e '.[bench]')"
            print(fig["trl_skipped"], file=sys.stderr)
        train = train_figures(folder, device, seq_lens, args.steps, kinds)
        if device == "cuda":
            torch.cuda.empty_cache()
        fig.update(rollout_figures(folder, device, paper.rollout.parallel_episodes, args.turns,
                                   paper.rollout.max_new_tokens, paper.llm.draft_tokens))
    fig["train_load_s"] = train["train_load_s"]
    if "base_mem_mib" in train:
        fig["base_mem_mib"] = train["base_mem_mib"]
    print(f"{fig['model']} on {fig['device']}", file=sys.stderr)
    for key, r in train["runs"].items():
        kind, seq_len = key.split("@")
        if "error" in r:
            fig[f"train_{kind}_{seq_len}_error"] = r["error"]
            print(f"  train {kind} at {seq_len} tokens: {r['error']}", file=sys.stderr)
            continue
        fig[f"train_{kind}_tok_s_{seq_len}"] = r["tokens_s"]
        fig[f"train_{kind}_peak_mib_{seq_len}"] = r["peak_mem_mib"]
        print(f"  train {kind} at {seq_len} tokens: {r['tokens_s']:.0f} tokens/s, peak memory "
              f"{r['peak_mem_mib']:.0f} MiB (+{r['peak_mem_delta_mib']:.0f} over the base)", file=sys.stderr)
    print(f"  rollout: {fig['rollout_sessions']} sessions x {fig['rollout_turns']} turns, "
          f"{fig['rollout_tokens']} tokens in {fig['rollout_wall_s']:.1f} s = {fig['rollout_tok_s']:.0f} tokens/s",
          file=sys.stderr)
    fig["wall_s"] = time.perf_counter() - started
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
