"""How fast a3t's ALFWorld environment plays, against alfworld's own batched environment.

Measured in one run, on the same generated games, with the same seeded random
admissible actions (each game gets the same action sequence in every setup):

1. one env: ``a3t.envs.alfworld.AlfWorldEnv`` in this process, steps/s and resets/s;
2. N envs in N worker processes, each owning its envs and playing its own share of
   the games: aggregate steps/s and resets/s;
3. alfworld's ``AlfredTWEnv(...).init_env(batch_size=N)``: textworld's asynchronous
   batch env (one child process per slot, stepped in lock-step over pipes).

"Loads" are new games started (parse the game, then reset). alfworld's reset always
loads the next game of its pool, so its resets/s is compared with our loads/s;
our resets/s restart an already-loaded game. Steps and resets are medians over
``reps`` passes over all games; loads are timed once.

Run:  python benchmarks/env_speed.py [--quick] [--envs N] [--games DIR] [--size small|alfworld]
The last line of stdout is one JSON object with the figures (DESIGN.md §5).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout

from rich.console import Console
from rich.table import Table

from a3t.envs.alfworld import AlfWorldEnv
from a3t.envs.alfworld_gen import game_jobs, generate_games

MAX_STEPS = 50  # ReAct/A3T's episode length; every setup plays fewer steps than this
_barrier = None  # set in each parallel worker, so all workers start each phase together


def _rng(seed: int, game: str, rep: int) -> random.Random:
    # Keyed by game and pass, not by process or slot: every setup plays the same actions.
    return random.Random(f"{seed}:{game}:{rep}")


def _set_barrier(barrier) -> None:
    global _barrier
    _barrier = barrier


def play(games: list[str], steps: int, reps: int, seed: int) -> dict[str, list[tuple[int, float]]]:
    """Load every game, then ``reps`` times: reset each env, then play up to ``steps``
    random admissible actions in each. Returns {phase: [(count, seconds), ...]}."""
    sync = _barrier.wait if _barrier is not None else (lambda: None)
    out: dict[str, list[tuple[int, float]]] = {"loads": [], "resets": [], "steps": []}

    sync()
    t = time.perf_counter()
    envs = [AlfWorldEnv(game, phrasing="move", max_steps=MAX_STEPS) for game in games]
    for env in envs:
        env.reset()
    out["loads"].append((len(envs), time.perf_counter() - t))

    for rep in range(reps):
        sync()
        t = time.perf_counter()
        for env in envs:
            env.reset()
        out["resets"].append((len(envs), time.perf_counter() - t))

        sync()
        t, n = time.perf_counter(), 0
        for game, env in zip(games, envs):
            rng = _rng(seed, game, rep)
            for _ in range(steps):
                n += 1
                if env.step(rng.choice(env.admissible_actions)).done:  # won by chance
                    break
        out["steps"].append((n, time.perf_counter() - t))
    return out


def rates(results: list[dict], phase: str) -> list[float]:
    """Aggregate rate per pass: all workers' counts over the slowest worker's time
    (they started the phase together at the barrier, so that is the phase's wall time)."""
    passes = zip(*(r[phase] for r in results))
    return [sum(c for c, _ in p) / max(s for _, s in p) for p in passes]


def parallel(games: list[str], n: int, steps: int, reps: int, seed: int) -> list[dict]:
    barrier = multiprocessing.get_context("fork").Barrier(n)
    # fork: workers inherit the imported engine, so no import time is measured.
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"),
                             initializer=_set_barrier, initargs=(barrier,)) as pool:
        # The barrier also makes each share run in its own process: a worker that took two
        # shares would wait at the barrier with no other worker to release it.
        futures = [pool.submit(play, games[i::n], steps, reps, seed) for i in range(n)]
        return [f.result() for f in futures]


def alfworld_batch(root: str, games: list[str], n: int, steps: int, reps: int, seed: int) -> dict[str, list[tuple[int, float]]]:
    """alfworld's own batch env of n slots over the same games, timed like play()."""
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    config = {
        "dataset": {"data_path": os.path.join(root, "json_2.1.1", "train"), "num_train_games": -1},
        "env": {"task_types": [1, 2, 3, 4, 5, 6], "goal_desc_human_anns_prob": 0,
                "domain_randomization": False, "expert_type": "handcoded"},
        # "dqn", not "dagger": with "dagger" and train_eval="train" alfworld wraps every
        # env in its hand-coded expert, which would bill the expert's cost to the engine.
        "general": {"training_method": "dqn"},
        "rl": {"training": {"max_nb_steps_per_episode": MAX_STEPS}},
    }
    # alfworld prints "Initializing AlfredTWEnv..." and a tqdm bar; keep stdout for the JSON.
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        tw = AlfredTWEnv(config, train_eval="train")
        tw.game_files = list(games)  # exactly our games, whatever else a --games cache holds
        env = tw.init_env(batch_size=n)

    out: dict[str, list[tuple[int, float]]] = {"resets": [], "steps": []}
    try:
        for rep in range(reps):
            resets = reset_s = stepped = step_s = 0
            # textworld cycles through its (shuffled) pool: len(games)/n resets play each game once.
            for _ in range(len(games) // n):
                t = time.perf_counter()
                _, infos = env.reset()  # loads the next n games, then resets them
                reset_s += time.perf_counter() - t
                resets += n
                rngs = [_rng(seed, game, rep) for game in infos["extra.gamefile"]]
                done = [False] * n
                t = time.perf_counter()
                for _ in range(steps):
                    if all(done):
                        break
                    commands = [rng.choice(cmds) for rng, cmds in zip(rngs, infos["admissible_commands"])]
                    stepped += done.count(False)  # a finished slot is not stepped again
                    _, _, dones, infos = env.step(commands)
                    done = list(dones)
                step_s += time.perf_counter() - t
            out["resets"].append((resets, reset_s))
            out["steps"].append((stepped, step_s))
    finally:
        env.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few games and steps: under a minute on 2 cores")
    parser.add_argument("--envs", type=int, default=os.cpu_count() or 2, help="parallel envs and batch size")
    parser.add_argument("--games", metavar="DIR", help="game cache directory (default: a temp dir)")
    parser.add_argument("--size", default="small", choices=["small", "alfworld"], help="generated room size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    # Other processes on the machine skew every figure, the parallel ones most; record the load.
    load_before = os.getloadavg()[0]
    n = args.envs
    count, steps, reps = (6, 10, 3) if args.quick else (24, 30, 3)
    count = -(-max(count, n) // n) * n  # a multiple of n: every slot and worker gets as many games

    with tempfile.TemporaryDirectory(prefix="a3t-env-speed-") as tmp:
        root = args.games or tmp
        jobs = game_jobs(root, {"train": count}, seed=args.seed, size=args.size, plan_timeout_s=20)
        games = sorted(str(path) for _, path, _ in generate_games(jobs, workers=os.cpu_count() or 1))

        one = play(games, steps, reps, args.seed)
        many = parallel(games, n, steps, reps, args.seed)
        batch = alfworld_batch(root, games, n, steps, reps, args.seed)

    # Same games and same actions per (game, pass) must mean the same steps in every setup;
    # a game won by chance stops early everywhere. Anything else would make the rates unfair.
    played = {name: [c for c, _ in r["steps"]] for name, r in
              (("one env", one), ("alfworld batch", batch))}
    played["parallel"] = [sum(c) for c in zip(*([c for c, _ in r["steps"]] for r in many))]
    if len({tuple(v) for v in played.values()}) != 1:
        print(f"warning: setups played different step counts per pass: {played}", file=sys.stderr)

    med = statistics.median
    fig = {
        "bench": "env_speed",
        "quick": args.quick,
        "games": len(games),
        "steps_per_episode": steps,
        "steps_per_pass": played["one env"][0],
        "reps": reps,
        "one_env_steps_s": med(rates([one], "steps")),
        "one_env_resets_s": med(rates([one], "resets")),
        "one_env_loads_s": rates([one], "loads")[0],
        "parallel_envs": n,
        "parallel_steps_s": med(rates(many, "steps")),
        "parallel_resets_s": med(rates(many, "resets")),
        "parallel_loads_s": rates(many, "loads")[0],
        "alfworld_batch_steps_s": med(rates([batch], "steps")),
        "alfworld_batch_resets_s": med(rates([batch], "resets")),
    }
    fig["ratio_parallel_vs_alfworld_steps"] = fig["parallel_steps_s"] / fig["alfworld_batch_steps_s"]
    # alfworld's reset starts a new game, so it is matched with our loads (new games/s).
    fig["ratio_parallel_vs_alfworld_new_games"] = fig["parallel_loads_s"] / fig["alfworld_batch_resets_s"]
    fig["wall_s"] = time.perf_counter() - started
    fig["load_avg_before"] = load_before
    fig = {k: round(v, 2) if isinstance(v, float) else v for k, v in fig.items()}

    table = Table(title=f"ALFWorld env speed: {len(games)} {args.size} games, {steps} random steps each, "
                        f"median of {reps} passes")
    for column in ("setup", "steps/s", "resets/s", "new games/s"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    table.add_row("a3t AlfWorldEnv, 1 env", str(fig["one_env_steps_s"]), str(fig["one_env_resets_s"]),
                  str(fig["one_env_loads_s"]))
    table.add_row(f"a3t AlfWorldEnv, {n} processes", str(fig["parallel_steps_s"]), str(fig["parallel_resets_s"]),
                  str(fig["parallel_loads_s"]))
    table.add_row(f"alfworld AlfredTWEnv, batch {n}", str(fig["alfworld_batch_steps_s"]), "-",
                  f"{fig['alfworld_batch_resets_s']} (its reset)")
    console = Console()
    console.print(table)
    console.print(f"{n} processes vs alfworld batch: steps x{fig['ratio_parallel_vs_alfworld_steps']}, "
                  f"new games x{fig['ratio_parallel_vs_alfworld_new_games']}; wall {fig['wall_s']} s")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
