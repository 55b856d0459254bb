"""Does a campaign make the agent better? The learning curve of the default campaign.

Runs ``a3t run`` (the default profile: SmolLM2-135M on the CPU, 3 rounds) in a temporary
workspace, or reads a finished one (``--workspace DIR``), and reports the policy's first-attempt
success after each round on the held-out games with its 95% Wilson interval (after a round the
champion gate rejected, the policy is the one it played with; ``*_trained`` lists every round's own
adapter), beside two baselines measured in the same run on the same valid_unseen games:

- a random policy: every step a uniformly random admissible action (seeded);
- the prompted base model: the round-0 policy before any training (1-shot example, greedy).

The full run also checks what the campaign was not tuned on: each round's policy plays 24
valid_unseen games generated with another seed (``games.seed=1``), and it runs the same campaign
with the other loss beside the default's (``train.loss=pg`` beside the CPU default's ``sft``: the
paper's ablation, pg >= sft), reported as ``pg_valid_unseen_first`` and ``sft_valid_unseen_first``.

``--quick`` runs the smoke profile (a tiny random model, two rounds, about two minutes): it checks
the machinery and the report, its rates mean nothing.

Run:  python benchmarks/learning.py [--quick] [--workspace DIR] [--no-ablation] [--no-other-seed]
The last line of stdout is one JSON object with the figures (DESIGN.md section 5).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from a3t.config import load_config
from a3t.envs import usable_actions
from a3t.envs.alfworld import AlfWorldEnv, find_games
from a3t.envs.alfworld_gen import game_jobs, generate_games
from a3t.evaluate import SplitRates, evaluate_policy
from a3t.envs.spec import spread_over_task_types
from a3t.pipeline import Workspace, eval_games_root, policy_round
from a3t.stats import wilson_interval

OTHER_SEED = 1


def run_campaign(workspace: Path, profile: str, overrides: list[str]) -> float:
    """``a3t run`` in the workspace (a git repository); returns its wall time."""
    started = time.perf_counter()
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run(["a3t", "run", "--profile", profile, *overrides], cwd=workspace, check=True, env=env)
    return time.perf_counter() - started


def curve(ws: Workspace, split: str, trained: bool = False) -> list[dict]:
    """The policy's first-attempt success on a split after each finished round: rate, interval,
    games. A round the champion gate rejected leaves the policy it played with, whose figures are
    those of the round that trained it; ``trained``: each round's own adapter, rejected or not."""
    out = []
    rejected = ws.rejected_rounds()
    for k in ws.finished_rounds():
        kept = k if trained or k not in rejected else policy_round(ws, k)
        rates = ws.round_summary(k if kept is None else kept).eval[split]
        out.append({"success": rates.success, "ci": list(rates.success_ci), "games": rates.tasks})
    return out


def random_policy(games: list[Path], max_steps: int, seed: int = 0) -> float:
    """Share of games won by uniformly random admissible actions (no LLM)."""
    won = 0
    for game in games:
        rng = random.Random(f"{seed}:{game}")
        env = AlfWorldEnv(game, max_steps=max_steps)
        env.reset()
        while True:
            step = env.step(rng.choice(usable_actions(env)))
            if step.done:
                won += step.won
                break
    return won / len(games)


def evaluate(cfg, games_root: Path, adapter: Path | None, store: Path) -> SplitRates:
    """First-attempt success of the base model + adapter on a root's valid_unseen games (a rerun resumes)."""
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"attempts": 1})})
    return evaluate_policy(cfg, games_root, "valid_unseen", adapter, store)


def other_seed_games(root: Path, count: int) -> Path:
    list(generate_games(game_jobs(root, {"valid_unseen": count}, seed=OTHER_SEED, size="small"), workers=2))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smoke profile: machinery only (about 2 minutes)")
    parser.add_argument("--workspace", type=Path, help="read (and finish) the campaigns of this workspace")
    parser.add_argument("--no-ablation", action="store_true", help="skip the campaign with the other loss (pg / sft)")
    parser.add_argument("--no-other-seed", action="store_true", help="skip the valid_unseen games of another seed")
    args = parser.parse_args()
    profile = "smoke" if args.quick else "default"
    started = time.perf_counter()
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="a3t-learning-"))
    if not (workspace / ".git").is_dir():
        subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    cfg = load_config(profile=profile)
    other = "pg" if cfg.train.loss == "sft" else "sft"
    ablation = not (args.quick or args.no_ablation)
    wall = {cfg.train.loss: run_campaign(workspace, profile, [])}
    if ablation:
        wall[other] = run_campaign(workspace, profile, [f"pipeline.campaign={other}", f"train.loss={other}"])

    ws = Workspace(workspace, cfg.pipeline.campaign)
    held_out = eval_games_root(cfg, ws)
    unseen = curve(ws, "valid_unseen")
    games = spread_over_task_types(find_games(held_out, "valid_unseen"), cfg.eval.tasks)
    bench = workspace / "data" / "runs" / "benchmark"
    prompted = evaluate(cfg, held_out, None, bench / "prompted.jsonl").success
    report = {
        "bench": "learning",
        "profile": profile,
        "loss": cfg.train.loss,
        "valid_unseen_first": [r["success"] for r in unseen],
        "valid_unseen_ci": [r["ci"] for r in unseen],
        "valid_unseen_games": unseen[0]["games"] if unseen else 0,
        "valid_seen_first": [r["success"] for r in curve(ws, "valid_seen")],
        # Every round's own adapter, the ones the champion gate rejected included.
        "valid_unseen_first_trained": [r["success"] for r in curve(ws, "valid_unseen", trained=True)],
        "valid_seen_first_trained": [r["success"] for r in curve(ws, "valid_seen", trained=True)],
        "rejected_rounds": sorted(ws.rejected_rounds()),
        "gain_last_vs_round_0": unseen[-1]["success"] - unseen[0]["success"] if unseen else 0.0,
        "random_policy_valid_unseen": random_policy(games, cfg.env.max_steps),
        "prompted_valid_unseen": prompted,
        "prompted_valid_unseen_ci": list(wilson_interval(round(prompted * len(games)), len(games))),
        "campaign_wall_s": wall,
    }
    report[f"{cfg.train.loss}_valid_unseen_first"] = report["valid_unseen_first"]
    if ablation:
        report[f"{other}_valid_unseen_first"] = [r["success"] for r in curve(Workspace(workspace, other), "valid_unseen")]
        report[f"{other}_valid_seen_first"] = [r["success"] for r in curve(Workspace(workspace, other), "valid_seen")]
    if not (args.quick or args.no_other_seed):
        # Games the campaign never saw, from another seed: each round's policy, same rules.
        root = other_seed_games(workspace / "data" / f"games_seed{OTHER_SEED}", cfg.games.valid_unseen)
        rounds = ws.finished_rounds()
        policies = [policy_round(ws, k) for k in rounds]
        trained = [k if (ws.adapter(k) / "adapter_config.json").is_file() else j for k, j in zip(rounds, policies)]
        rates = {j: evaluate(cfg, root, None if j is None else ws.adapter(j),
                             bench / f"seed{OTHER_SEED}_{'base' if j is None else f'round_{j}'}.jsonl").success
                 for j in dict.fromkeys(policies + trained)}
        report[f"seed{OTHER_SEED}_valid_unseen_first"] = [rates[j] for j in policies]
        report[f"seed{OTHER_SEED}_valid_unseen_first_trained"] = [rates[j] for j in trained]
    report["wall_s"] = time.perf_counter() - started
    print(f"workspace: {workspace}", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
