"""How fast a3t's rollout engine plays episodes with a real LLM, against the naive loop.

Measured in one run, on the same generated games, with the same model, seed, greedy
decoding, prompt, stop rules, ``max_new_tokens`` and step limit, in each action mode
(``--action-mode``, default both: ``free``, then ``constrained``):

1. ours: ``a3t.rollout.rollout()`` with ``parallel_episodes`` episodes at once (every
   policy call one batch, each episode's KV cache reused between turns, prefixes shared by
   several episodes encoded once, prompt-lookup drafts checked in the decode forwards:
   ``--draft-tokens 0`` turns those off; greedy text is the same either way; ``--lanes 2`` splits
   each call's rows over two threads, as the CPU default profile does). The A3T rollout
   settings, except: p_explore=0 and forced exploration off (so both sides only ask the
   policy, never ActRe), temperature 0, and no retries of failed games (both sides play
   each game once);
2. naive: one episode at a time; each turn the whole history is rendered with
   ``tokenizer.apply_chat_template`` (the reply started with "Thought:", as ours does) and
   completed by a plain ``model.generate(do_sample=False)`` cut by a StoppingCriteria with
   ours' stop rule; a constrained action is then one more ``generate`` with a
   ``prefix_allowed_tokens_fn`` over the admissible actions' tokens. The loop a first
   implementation would write (no KV reuse, no batching);
3. the ceiling: tokens/s of ONE batched decode forward (batch = parallel episodes, one
   new token per row, a KV cache as long as the typical context our rollouts reached),
   i.e. the most decode throughput this model can give on this machine; our tokens/s
   (overall, and over decode forwards only) as a fraction of it.

4. on a CPU with native bfloat16 (AVX512-BF16) and ``--dtype float32``: ours again with the model
   in bfloat16 (the CPU default profile's ``llm.dtype=auto``), its tokens/s against ours in
   float32 and the share of steps where it took the same action (bfloat16 is not exact against
   float32; ``--no-bf16`` skips this).

Greedy decoding is deterministic, so both sides must play the same episodes: the run checks
that every thought, action and episode's token count is identical, and exits with status 1
if not. That holds in float32 (the default ``--dtype``); in bfloat16 a batch's rounding differs
from one row's, and greedy picks between near-ties can flip.

Our engine's time is split into prefill forwards, decode forwards, the rest of the LLM
call (render, tokenize, cache assembly, stop rule: Python), env steps, env start-up
(load + reset) and the rest (rollout bookkeeping, store writes).

``--quick`` (2 steps, 8 new tokens a turn) is a smoke test: its time goes mostly to encoding
the first prompt of each game (~600-900 tokens), which neither batching nor KV reuse speeds
up. The full run (6 steps, 96 tokens) shows the engine's gains.

The machine may be shared: cpu/wall of each side is reported, and a run whose process did
not get its cores is flagged "contended" (with 2 torch threads on 2 busy cores, a decode
forward can get 10-40x slower; ``--threads 1`` is then the steadier measurement).

Run:  python benchmarks/rollout_speed.py [--quick] [--model PATH] [--parallel N] [--steps N]
      [--max-new-tokens N] [--threads N] [--draft-tokens N] [--lanes N] [--action-mode M] [--dtype D]
      [--games DIR] [--profile FILE] [--no-bf16]
The last line of stdout is one JSON object with the figures (DESIGN.md §5).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging as hf_logging

import a3t.rollout as rollout_module
from a3t.agent.actre import ActReAnnotator
from a3t.agent.react import format_turn, parse_turn, react_chat
from a3t.config import EnvConfig, RolloutConfig
from a3t.envs import action_choices
from a3t.envs.alfworld import AlfWorldEnv
from a3t.envs.alfworld_gen import game_jobs, generate_games
from a3t.envs.base import Task
from a3t.llm.base import Sampling, stop_after_action_line, stop_after_thought
from a3t.llm.models import compute_dtype, default_model_path, load_model
from a3t.llm.transformers_llm import DRAFT_TOKENS, TransformersLLM, _Batch
from a3t.rollout import THOUGHT_START, _whole_reply, rollout
from a3t.trajectory import StepRecord, TrajectoryStore

console = Console(stderr=True)  # progress and tables on stderr; stdout ends with the JSON


class _Clock:
    """Wall and process CPU seconds of a phase: cpu/wall < number of threads means the
    process did not get its cores (the machine is shared)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    @contextmanager
    def __call__(self):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c


def make_games(root: Path, count: int, seed: int) -> list[Path]:
    # Small rooms (a3t's default for CPU models); the same seed gives the same games, and a
    # game already in ``root`` is not generated again.
    jobs = game_jobs(root, {"train": count}, seed=seed, size="small", plan_timeout_s=20)
    return sorted(path for _, path, _ in generate_games(jobs, workers=min(2, os.cpu_count() or 1)))


# --------------------------------------------------------------------------- ours


def run_ours(games, llm: TransformersLLM, cfg: RolloutConfig, env_cfg: EnvConfig, profile: str | None,
             action_mode: str) -> dict:
    forwards: list[tuple[str, int, int, float]] = []  # (phase, rows, new tokens per row, seconds)
    phase = ["prefill"]  # prefill forwards encode prompts (and shared prefixes); decode ones one token a row
    answers = [0]  # rows asked for a completion: each gets its first token from a prefill forward
    original_forward, original_decode, original_complete = llm._forward, llm._decode, llm.complete

    def timed_forward(input_ids, *args, **kwargs):
        t = time.perf_counter()
        logits = original_forward(input_ids, *args, **kwargs)
        forwards.append((phase[0], input_ids.shape[0], input_ids.shape[1], time.perf_counter() - t))
        return logits

    def timed_decode(*args):
        phase[0] = "decode"
        try:
            return original_decode(*args)
        finally:
            phase[0] = "prefill"

    def counted_complete(chats, *args, **kwargs):
        answers[0] += len(chats)
        return original_complete(chats, *args, **kwargs)

    starts = _Clock()
    original_start = rollout_module._start

    def timed_start(*args, **kwargs):
        with starts():
            return original_start(*args, **kwargs)

    turns: list[float] = []
    last = [time.perf_counter()]

    def on_progress(_stats):
        now = time.perf_counter()
        turns.append(now - last[0])
        last[0] = now

    tasks = [Task(task_id=f"g{i}", game=Path(game)) for i, game in enumerate(games)]
    annotator = ActReAnnotator(llm, phrasing=env_cfg.phrasing)  # never asked: p_explore=0, forced off
    clock = _Clock()
    # instance attributes: instrument this object only
    llm._forward, llm._decode, llm.complete = timed_forward, timed_decode, counted_complete
    rollout_module._start = timed_start
    profiler = cProfile.Profile() if profile else None
    try:
        with tempfile.TemporaryDirectory(prefix="a3t-rollout-speed-") as tmp:
            store = TrajectoryStore(Path(tmp) / "rollout.jsonl")
            with clock():
                last[0] = time.perf_counter()
                if profiler:
                    profiler.enable()
                stats = rollout(tasks, store, llm, annotator, cfg, env_cfg, on_progress=on_progress,
                                action_mode=action_mode)
                if profiler:
                    profiler.disable()
            trajectories = {t.task_id: t for t in store.read()}
    finally:
        del llm._forward, llm._decode, llm.complete
        rollout_module._start = original_start
    if profiler:
        profiler.dump_stats(profile)

    if annotator.fallbacks or any(s.explored for t in trajectories.values() for s in t.steps):
        print("warning: ours explored (ActRe was asked): the comparison is not policy-only", file=sys.stderr)
    prefill = [f[1:] for f in forwards if f[0] == "prefill"]
    decode = [f[1:] for f in forwards if f[0] == "decode"]
    prefill_s = sum(s for _, _, s in prefill)
    decode_s = sum(s for _, _, s in decode)
    steps = sum(len(t.steps) for t in trajectories.values())
    return {
        "wall_s": clock.wall,
        "cpu_s": clock.cpu,
        "env_steps": steps,
        "completion_tokens": stats.completion_tokens,
        "prompt_tokens_encoded": stats.prompt_tokens,
        "prefill_s": prefill_s,
        "prefill_calls": len(prefill),
        "prefill_padded_tokens": sum(r * n for r, n, _ in prefill),
        "answer_rows": answers[0],
        "decode_s": decode_s,
        "decode_forwards": len(decode),
        "decode_step_median_s": statistics.median(s for _, _, s in decode) if decode else 0.0,
        # Row-forwards: each asked row once in a prefill forward, then once per decode forward it was in.
        "row_slots": answers[0] + sum(rows for rows, _, _ in decode),
        "llm_other_s": stats.llm_s - prefill_s - decode_s,  # render, tokenize, assemble/extract cache, pick, stop rule
        "env_step_s": stats.env_s,
        "env_start_s": starts.wall,  # load + reset of each game
        "turn_median_s": statistics.median(turns) if turns else 0.0,
        "other_s": clock.wall - stats.llm_s - stats.env_s - starts.wall,
        "steps": {task_id: t.steps for task_id, t in trajectories.items()},
        "tokens": {task_id: t.tokens["completion"] for task_id, t in trajectories.items()},
        "trajectories": trajectories,
    }


# --------------------------------------------------------------------------- naive


class _StopRule(StoppingCriteria):
    """generate() stops a row once its text meets ours' stop rule (the action line, or the end of
    the thought when the action is constrained)."""

    def __init__(self, tokenizer, prompt_length: int, rule):
        self.tokenizer, self.prompt_length, self.rule = tokenizer, prompt_length, rule

    def __call__(self, input_ids, scores, **kwargs):
        done = [self.rule(self.tokenizer.decode(row[self.prompt_length :], skip_special_tokens=True)) is not None
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Naive:
    """The loop a first implementation would write: each turn the whole history is rendered
    with the chat template and completed by a plain ``model.generate``."""

    def __init__(self, model, tokenizer, max_new_tokens: int, action_mode: str):
        self.model, self.tokenizer, self.max_new_tokens, self.action_mode = model, tokenizer, max_new_tokens, action_mode
        self.end_ids = [i for i in dict.fromkeys([model.generation_config.eos_token_id, tokenizer.eos_token_id])
                        if i is not None]
        self.prompt_tokens = self.completion_tokens = 0

    def _generate(self, text: str, max_new_tokens: int, **kwargs) -> list[int]:
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.end_ids, pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        new = [token for token in out[0, length:].tolist() if token not in self.end_ids]
        self.prompt_tokens += length
        self.completion_tokens += len(new)
        return new

    def turn(self, chat, env) -> tuple[str, str]:
        """(thought, action) of one turn: the reply started with "Thought:" as ours does; a
        constrained action is then generated under a prefix-allowed-tokens function."""
        chat = chat + [{"role": "assistant", "content": THOUGHT_START}]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        rule = stop_after_action_line if self.action_mode == "free" else stop_after_thought
        length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        reply = self.tokenizer.decode(self._generate(text, self.max_new_tokens, stopping_criteria=StoppingCriteriaList(
            [_StopRule(self.tokenizer, length, rule)])), skip_special_tokens=True)
        cut = rule(reply)
        parsed = parse_turn(_whole_reply(reply[:cut] if cut is not None else reply, True))
        if self.action_mode == "free":
            return parsed.thought, parsed.action
        _, options = action_choices(env)
        head = chat[:-1] + [{"role": "assistant", "content": format_turn(parsed.thought, "").rstrip()}]
        return parsed.thought, self._choose(head, options)

    def _choose(self, chat, options: list[str]) -> str:
        """One of ``options``, each as the tokens it has in the whole rendered turn, up to the end of turn."""
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        sequences = {}
        for option in options:
            turn = chat[:-1] + [{"role": "assistant", "content": chat[-1]["content"] + " " + option}]
            ids = self.tokenizer(self.tokenizer.apply_chat_template(turn, tokenize=False),
                                 add_special_tokens=False)["input_ids"][len(prompt) :]
            end = next((i for i, token in enumerate(ids) if token in self.end_ids), len(ids) - 1)
            sequences.setdefault(tuple(ids[: end + 1]), option)

        def allowed(_batch, input_ids):
            done = tuple(input_ids[len(prompt) :].tolist())
            return sorted({seq[len(done)] for seq in sequences if len(seq) > len(done) and seq[: len(done)] == done})

        new = self._generate(text, max(len(seq) for seq in sequences), prefix_allowed_tokens_fn=allowed)
        return next(option for seq, option in sequences.items() if [t for t in seq if t not in self.end_ids] == new)


def run_naive(games, model, tokenizer, max_new_tokens: int, env_cfg: EnvConfig, action_mode: str) -> dict:
    naive = _Naive(model, tokenizer, max_new_tokens, action_mode)
    clock, starts, generate, env_steps = _Clock(), _Clock(), _Clock(), _Clock()
    step_times: list[float] = []
    played: dict[str, list[StepRecord]] = {}
    tokens: dict[str, int] = {}
    with clock():
        for i, game in enumerate(games):
            with starts():
                env = AlfWorldEnv(game, phrasing=env_cfg.phrasing, max_steps=env_cfg.max_steps)
                first = env.reset()
            steps: list[StepRecord] = []
            before = naive.completion_tokens
            while True:
                t = time.perf_counter()
                with generate():
                    thought, action = naive.turn(react_chat(first.task_type, first.observation, steps, env.phrasing),
                                                 env)
                with env_steps():
                    step = env.step(action)
                steps.append(StepRecord(thought=thought, action=action, observation=step.observation,
                                        explored=False, valid=step.valid))
                step_times.append(time.perf_counter() - t)
                if step.done:
                    break
            played[f"g{i}"], tokens[f"g{i}"] = steps, naive.completion_tokens - before
    return {
        "wall_s": clock.wall,
        "cpu_s": clock.cpu,
        "env_steps": len(step_times),
        "completion_tokens": naive.completion_tokens,
        "prompt_tokens_encoded": naive.prompt_tokens,
        "generate_s": generate.wall,  # render + tokenize + prefill of the whole history + decode
        "env_step_s": env_steps.wall,
        "env_start_s": starts.wall,
        "step_median_s": statistics.median(step_times) if step_times else 0.0,
        "steps": played,
        "tokens": tokens,
    }


# --------------------------------------------------------------------------- ceiling


def context_lengths(trajectories, tokenizer, phrasing) -> list[int]:
    """Tokens of the policy's prompt at every turn our rollouts played (the KV cache a
    decode step attends to, before the turn's own generated tokens)."""
    lengths = []
    for t in trajectories.values():
        for k in range(len(t.steps)):
            chat = react_chat(t.task_type, t.initial_observation, t.steps[:k], phrasing)
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


@torch.inference_mode()
def decode_ceiling(model, batch: int, length: int, reps: int) -> float:
    """Median seconds of one forward of 1 new token per row over a full KV cache of ``length``
    (no padding) at batch ``batch``, in the engine's preallocated cache: the floor of a decode
    step's time in this model."""
    kv = _Batch(model, batch, length + reps + 2, model.device)
    for keys, values in zip(kv.keys, kv.values):
        keys[:, :, :length].normal_(std=0.1)
        values[:, :, :length].normal_(std=0.1)
    ids = torch.full((batch, 1), 100, dtype=torch.long)
    times = []
    for rep in range(reps + 2):  # 2 warm-up forwards
        n = length + rep
        mask = torch.ones(batch, n + 1, dtype=torch.long)
        positions = torch.full((batch, 1), n, dtype=torch.long)
        t = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv.cache(slice(0, batch), 0, n),
              use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens: about a minute on 2 cores")
    parser.add_argument("--model", metavar="PATH", help="HF model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--parallel", type=int, default=8, help="episodes played at once by ours (= games)")
    parser.add_argument("--steps", type=int, help="step limit of every episode (quick 2, full 6)")
    parser.add_argument("--max-new-tokens", type=int, help="most tokens of one turn (quick 8, full 96 = A3T default)")
    parser.add_argument("--games", metavar="DIR", help="game cache (default: $A3T_CACHE or ~/.cache/a3t, bench-games/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of our rollout to FILE")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                        help="the model's compute dtype on both sides (auto: a3t's llm.dtype default for this CPU)")
    parser.add_argument("--action-mode", choices=["free", "constrained", "both"], default="both",
                        help="the policy's action mode on both sides (default: both, one after the other)")
    parser.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS,
                        help=f"ours: prompt-lookup draft tokens per row and decode step (default {DRAFT_TOKENS}, 0: off)")
    parser.add_argument("--lanes", type=int, default=1,
                        help="ours: threads each call's rows are split over (llm.lanes; default 1, the CPU default "
                        "profile: 2; the time split between prefill and decode forwards is then approximate)")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip ours in bfloat16 beside float32 (run by default where the CPU has native bfloat16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # generate()'s notes about generation flags

    started = time.perf_counter()
    # Other processes on the machine skew every figure; record the load and each side's CPU use.
    load_before = os.getloadavg()[0]
    console.print(f"load average at start: {os.getloadavg()}; torch threads: {torch.get_num_threads()}")
    steps = args.steps or (2 if args.quick else 6)
    max_new_tokens = args.max_new_tokens or (8 if args.quick else RolloutConfig().max_new_tokens)
    n = args.parallel

    model_path = Path(args.model) if args.model else default_model_path()  # converts once, then cached
    t = time.perf_counter()
    dtype = compute_dtype(args.dtype, "cpu")
    model, tokenizer = load_model(model_path, dtype=dtype)
    load_s = time.perf_counter() - t
    cache_root = Path(os.environ.get("A3T_CACHE") or "~/.cache/a3t").expanduser()
    t = time.perf_counter()
    games = make_games(Path(args.games) if args.games else cache_root / "bench-games", n, args.seed)
    games_s = time.perf_counter() - t

    env_cfg = EnvConfig(max_steps=steps)  # phrasing: a3t's default
    llm = TransformersLLM(model=model, tokenizer=tokenizer, name=model_path.name, draft_tokens=args.draft_tokens,
                          lanes=args.lanes)
    fig = {"bench": "rollout_speed", "quick": args.quick, "model": model_path.name, "games": len(games),
           "parallel": n, "steps_limit": steps, "max_new_tokens": max_new_tokens,
           "torch_threads": torch.get_num_threads(), "draft_tokens": args.draft_tokens, "lanes": args.lanes,
           "dtype": dtype}
    modes = ["free", "constrained"] if args.action_mode == "both" else [args.action_mode]
    warm_up(llm, model, tokenizer)
    bf16_llm = None
    if dtype == "float32" and compute_dtype("auto", "cpu") == "bfloat16" and not args.no_bf16:
        bf16_model, _ = load_model(model_path, dtype="bfloat16")
        bf16_llm = TransformersLLM(model=bf16_model, tokenizer=tokenizer, name=model_path.name,
                                   draft_tokens=args.draft_tokens, lanes=args.lanes)
        warm_up(bf16_llm, bf16_model, tokenizer)
    for mode in modes:
        fig[mode] = compare(mode, games, model, tokenizer, llm, n, steps, max_new_tokens, env_cfg, args, bf16_llm)
        fig[f"ratio_tok_s_{mode}"] = fig[mode]["ratio_tok_s"]
    fig["exact"] = all(fig[mode]["exact"] for mode in modes)
    fig["model_load_s"] = load_s
    fig["games_s"] = games_s
    fig["wall_s"] = time.perf_counter() - started
    fig["load_avg_before"] = load_before
    fig["load_avg_after"] = os.getloadavg()[0]
    fig["contended"] = any(fig[mode]["contended"] for mode in modes)
    fig = _rounded(fig)

    out = Console(stderr=True, width=150)
    table = Table(title=f"Rollout speed: {len(games)} games, <= {steps} steps, <= {max_new_tokens} new tokens a turn, "
                        f"{model_path.name} ({dtype}), greedy")
    for column in ("action mode", "setup", "env steps", "tokens", "wall s", "steps/s", "tok/s", "cpu/wall"):
        table.add_column(column, justify="left" if column in ("action mode", "setup") else "right")
    for mode in modes:
        for name, label in (("ours", f"a3t rollout(), {n} at once, KV reuse"), ("naive", "naive loop, generate()")):
            table.add_row(mode, label, *(str(fig[mode][f"{name}_{k}"])
                                         for k in ("steps", "tokens", "wall_s", "steps_s", "tok_s", "cpu_per_wall")))
    out.print(table)
    for mode in modes:
        f = fig[mode]
        out.print(f"[bold]{mode}[/]: ours / naive: steps/s x{f['ratio_steps_s']}, tok/s x{f['ratio_tok_s']}; "
                  f"same actions: {f['actions_agree']:.0%} of steps, same thoughts: {f['thoughts_agree']:.0%}, "
                  f"same tokens per episode: {f['tokens_agree']:.0%}")
        out.print(f"  decode ceiling (batch {n}, context {f['ceiling_context_tokens']}): {f['ceiling_step_s']} s/forward"
                  f" = {f['ceiling_tok_s']} tok/s; ours {f['ours_fraction_of_ceiling']:.0%} of it overall, "
                  f"{f['ours_decode_fraction_of_ceiling']:.0%} over decode forwards "
                  f"({f['ours_tokens_per_row_forward']:.2f} tokens per row and forward)")
        out.print(f"  ours' {f['ours_wall_s']} s: prefill {f['ours_prefill_s']} ({f['ours_prefill_calls']} calls, "
                  f"{f['ours_prefill_padded_tokens']} padded tokens), decode {f['ours_decode_s']} "
                  f"({f['ours_decode_forwards']} forwards, median {f['ours_decode_step_median_s']} s), "
                  f"rest of LLM calls {f['ours_llm_other_s']}, env steps {f['ours_env_step_s']}, "
                  f"env start {f['ours_env_start_s']}, other {f['ours_other_s']}")
        out.print(f"  naive's {f['naive_wall_s']} s: generate {f['naive_generate_s']}, env steps {f['naive_env_step_s']}, "
                  f"env start {f['naive_env_start_s']}")
        if "bf16_speedup_tok_s" in f:
            out.print(f"  ours in bfloat16: {f['ours_bf16_tok_s']} tok/s, x{f['bf16_speedup_tok_s']} of float32's; "
                      f"same action as float32 at {f['bf16_actions_agree']:.0%} of steps")
    out.print(f"wall {fig['wall_s']} s")
    if fig["contended"]:
        out.print(f"[bold red]warning[/]: cpu/wall far below {torch.get_num_threads()} threads (load average "
                  f"{fig['load_avg_before']} -> {fig['load_avg_after']}): other processes took the cores and the "
                  "figures are unreliable; rerun on an idle machine or with --threads 1")
    print(json.dumps(fig))
    if not fig["exact"]:
        # Greedy decoding is deterministic: the engine's batching, KV reuse and drafts must not
        # change a single token. A difference is a bug in the engine (or in this benchmark).
        out.print("[bold red]error[/]: ours and the naive loop did not play the same episodes (see above)")
        sys.exit(1)


def warm_up(llm: TransformersLLM, model, tokenizer) -> None:
    """A short greedy completion on each side before anything is timed: the process's first
    forwards pay one-time allocations that neither side should carry."""
    chat = [{"role": "user", "content": "You are in the middle of a room. Your task is to: look around."}]
    llm.complete([chat], Sampling(temperature=0.0, max_new_tokens=8))
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def compare(mode: str, games, model, tokenizer, llm, n: int, steps: int, max_new_tokens: int, env_cfg: EnvConfig,
            args, bf16_llm: TransformersLLM | None = None) -> dict:
    """Both sides in one action mode, then their figures, with the decode ceiling measured right
    after each side (the load on a shared machine drifts: the median of both)."""
    cfg = RolloutConfig().model_copy(update={
        "parallel_episodes": n,
        "p_explore": 0.0,  # both sides only use the policy
        "forced_explore_after_invalid": steps + 1,  # never reached: forced exploration would ask ActRe
        "temperature": 0.0,
        "max_new_tokens": max_new_tokens,
        "retry_max": 0,  # each game played once, as the naive loop does
        "start_with_thought": True,  # the naive loop starts each reply with "Thought:" too
        "seed": args.seed,
    })
    console.print(f"{mode} actions, ours: {n} games, {n} episodes at once, <= {steps} steps, "
                  f"<= {max_new_tokens} new tokens a turn")
    ours = run_ours(games, llm, cfg, env_cfg, args.profile and f"{args.profile}.{mode}", mode)
    ours_bf16 = run_ours(games, bf16_llm, cfg, env_cfg, None, mode) if bf16_llm else None
    lengths = context_lengths(ours["trajectories"], tokenizer, env_cfg.phrasing)
    mean_completion = ours["completion_tokens"] / max(ours["env_steps"], 1)
    # A decode step attends to the prompt plus the tokens generated so far: mid-turn, half of them.
    context = int(statistics.median(lengths) + mean_completion / 2)
    reps = 4 if args.quick else 8
    ceiling = [decode_ceiling(model, n, context, reps)]
    console.print(f"  {ours['wall_s']:.1f} s; naive: one episode at a time")
    naive = run_naive(games, model, tokenizer, max_new_tokens, env_cfg, mode)
    console.print(f"  {naive['wall_s']:.1f} s")
    ceiling.append(decode_ceiling(model, n, context, reps))
    step_s = statistics.median(ceiling)

    fig = {}
    for name, side in (("ours", ours), ("naive", naive)):
        fig[f"{name}_steps"] = side["env_steps"]
        fig[f"{name}_tokens"] = side["completion_tokens"]
        fig[f"{name}_wall_s"] = side["wall_s"]
        fig[f"{name}_steps_s"] = side["env_steps"] / side["wall_s"]
        fig[f"{name}_tok_s"] = side["completion_tokens"] / side["wall_s"]
        fig[f"{name}_cpu_per_wall"] = side["cpu_s"] / side["wall_s"]
        fig[f"{name}_prompt_tokens_encoded"] = side["prompt_tokens_encoded"]
    fig["ratio_steps_s"] = fig["ours_steps_s"] / fig["naive_steps_s"]
    fig["ratio_tok_s"] = fig["ours_tok_s"] / fig["naive_tok_s"]
    fig |= agreement(ours, naive)
    played = [s for t in ours["trajectories"].values() for s in t.steps]
    fig["ours_valid_actions"] = sum(s.valid for s in played) / max(len(played), 1)
    fig["ours_successes"] = sum(t.success for t in ours["trajectories"].values())
    fig["context_median_tokens"] = int(statistics.median(lengths))
    fig["context_max_tokens"] = max(lengths)
    fig["ceiling_context_tokens"] = context
    fig["ceiling_step_s"] = step_s
    fig["ceiling_step_s_after_ours"], fig["ceiling_step_s_after_naive"] = ceiling
    fig["ceiling_tok_s"] = n / step_s
    # The first token of each row comes from the prefill's logits; the rest from decode forwards.
    decode_tokens = ours["completion_tokens"] - ours["answer_rows"]
    fig["ours_decode_tok_s"] = decode_tokens / ours["decode_s"] if ours["decode_s"] else 0.0
    fig["ours_fraction_of_ceiling"] = fig["ours_tok_s"] / fig["ceiling_tok_s"]
    fig["ours_decode_fraction_of_ceiling"] = fig["ours_decode_tok_s"] / fig["ceiling_tok_s"]
    # Generated tokens per row per forward: below 1 when finished rows ride along, above 1 when
    # drafts are accepted (a decode forward then gives a row several tokens; so can the
    # fraction of the one-token-a-row ceiling exceed 100%).
    fig["ours_tokens_per_row_forward"] = ours["completion_tokens"] / max(ours["row_slots"], 1)
    for key in ("prefill_s", "prefill_calls", "prefill_padded_tokens", "decode_s", "decode_forwards",
                "decode_step_median_s", "llm_other_s", "env_step_s", "env_start_s", "other_s", "turn_median_s"):
        fig[f"ours_{key}"] = ours[key]
    for key in ("generate_s", "env_step_s", "env_start_s", "step_median_s"):
        fig[f"naive_{key}"] = naive[key]
    # A process that got its cores shows cpu/wall near its thread count. Far below it, other
    # processes took the cores, and with several threads each op then waits for its slowest one.
    fig["contended"] = min(fig["ours_cpu_per_wall"], fig["naive_cpu_per_wall"]) < 0.8 * torch.get_num_threads()
    if ours_bf16:
        fig["ours_bf16_wall_s"] = ours_bf16["wall_s"]
        fig["ours_bf16_tok_s"] = ours_bf16["completion_tokens"] / ours_bf16["wall_s"]
        fig["bf16_speedup_tok_s"] = fig["ours_bf16_tok_s"] / fig["ours_tok_s"]
        pairs = step_pairs(ours, ours_bf16)
        fig["bf16_actions_agree"] = sum(a.action == b.action for a, b in pairs) / max(len(pairs), 1)
    return fig


def step_pairs(a: dict, b: dict) -> list[tuple[StepRecord, StepRecord]]:
    """The steps two runs played in the same game at the same turn."""
    return [(x, y) for g, steps in a["steps"].items() for x, y in zip(steps, b["steps"].get(g, []))]


def agreement(ours: dict, naive: dict) -> dict:
    """Share of steps with the same action and thought, of episodes with the same completion
    tokens; exact when all are 100% and both played the same steps."""
    pairs = step_pairs(ours, naive)
    games = list(ours["tokens"])
    fig = {"actions_agree": sum(a.action == b.action for a, b in pairs) / max(len(pairs), 1),
           "thoughts_agree": sum(a.thought == b.thought for a, b in pairs) / max(len(pairs), 1),
           "tokens_agree": sum(ours["tokens"][g] == naive["tokens"].get(g) for g in games) / max(len(games), 1)}
    fig["exact"] = (ours["env_steps"] == naive["env_steps"] and fig["actions_agree"] == fig["thoughts_agree"]
                    == fig["tokens_agree"] == 1.0)
    if ours["env_steps"] != naive["env_steps"]:
        print(f"warning: ours played {ours['env_steps']} steps, naive {naive['env_steps']}", file=sys.stderr)
    return fig


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
