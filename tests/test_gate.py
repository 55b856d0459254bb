"""The champion gate: a round whose success on the gate's split (the held-out split, or
``pipeline.gate_split``) falls below the champion's is rejected,
its dataset rolled back to the champion's DVC tag, and the next round starts from the
champion's data and adapter.

The campaign tests run the real CLI (smoke profile: tiny random model, real games, Prefect, DVC,
MLflow) in a subprocess whose evaluation is scripted: the tiny model wins nothing, so the rates
each round scores come from ``A3T_TEST_WINS`` (games won of 24, by round). Everything else is real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from a3t.config import ConfigError, load_config
from a3t.evaluate import Decision, SplitRates, judge_round, regressed
from a3t.stats import wilson_interval

CAMPAIGN = "default"

# The CLI with evaluate_round scripted: round k wins A3T_TEST_WINS[k] of 24 games on every split.
SCRIPTED_EVAL = """
import os, sys
from a3t import evaluate
from a3t.stats import wilson_interval

wins = [int(n) for n in os.environ["A3T_TEST_WINS"].split(",")]

def scripted(cfg, ws, round_, split, n=24):
    ci = wilson_interval(wins[round_], n)
    rate = wins[round_] / n
    return evaluate.SplitRates(k=cfg.eval.attempts, tasks=n, successes=wins[round_], success=rate, success_ci=ci,
                               success_within_k=rate, success_within_k_ci=ci, score=100 * rate,
                               score_within_k=100 * rate, per_type={})

evaluate.evaluate_round = scripted
from a3t.orchestration.cli import app
app(args=sys.argv[1:], prog_name="a3t")
"""


def rates(wins: int, games: int = 24) -> SplitRates:
    ci = wilson_interval(wins, games)
    return SplitRates(k=1, tasks=games, successes=wins, success=wins / games, success_ci=ci, success_within_k=wins / games,
                      success_within_k_ci=ci, score=0.0, score_within_k=0.0, per_type={})


def test_a_drop_within_the_noise_is_not_a_regression():
    # 6/24 [12.0-44.9] against 10/24 [24.5-61.2]: the intervals overlap.
    assert not regressed(rates(6), rates(10), tolerance=None)
    # 1/24 [0.7-20.2] against 10/24: they do not.
    assert regressed(rates(1), rates(10), tolerance=None)
    assert not regressed(rates(12), rates(10), tolerance=None)


def test_a_tolerance_is_in_points_and_a_drop_of_exactly_it_passes():
    assert not regressed(rates(9), rates(12), tolerance=0.125)  # 3 of 24 = 12.5 points
    assert regressed(rates(8), rates(12), tolerance=0.125)
    assert regressed(rates(11), rates(12), tolerance=0.0)


def test_the_gate_rejects_keeps_or_accepts():
    rejected = judge_round("valid_unseen", rates(1), 0, rates(10), None, "rollback")
    assert rejected.verdict == "rejected" and rejected.champion_round == 0
    assert "1/24" in rejected.reason and "10/24" in rejected.reason and "champion round 0" in rejected.reason
    assert judge_round("valid_unseen", rates(1), 0, rates(10), None, "stop").verdict == "rejected"
    assert judge_round("valid_unseen", rates(1), 0, rates(10), None, "keep").verdict == "kept"
    assert judge_round("valid_unseen", rates(9), 0, rates(10), None, "rollback") == Decision(champion_round=0)
    assert judge_round("valid_unseen", rates(0), None, None, None, "rollback").verdict == "accepted"  # no champion yet


def test_the_gate_judges_and_crowns_on_pipeline_gate_split_alone():
    """gate_split=valid_seen: a round better on valid_unseen but worse on valid_seen is rejected, and
    the champion is the best round on valid_seen."""
    from a3t.pipeline import champion_round, judge

    cfg = load_config(profile="smoke", overrides=["pipeline.gate_split=valid_seen", "pipeline.regression_tolerance=0"])
    rounds = [SimpleNamespace(decision=Decision(), eval={"valid_seen": rates(seen), "valid_unseen": rates(unseen)})
              for seen, unseen in ((10, 2), (12, 1))]
    ws = SimpleNamespace(finished_rounds=lambda: range(len(rounds)), round_summary=rounds.__getitem__)
    assert champion_round(cfg, ws) == 1
    worse = judge(cfg, ws, 2, {"valid_seen": rates(11), "valid_unseen": rates(20)})
    assert worse.verdict == "rejected" and worse.champion_round == 1 and worse.reason.startswith("valid_seen first-attempt success 11/24")
    assert judge(cfg, ws, 2, {"valid_seen": rates(12), "valid_unseen": rates(0)}).verdict == "accepted"  # a tie passes


@pytest.mark.parametrize("override, key", [("pipeline.regression_tolerance=1.5", "regression_tolerance"),
                                           ("pipeline.regression_tolerance=-0.1", "regression_tolerance"),
                                           ("pipeline.on_regression=undo", "on_regression"),
                                           ("pipeline.gate_split=train", "gate_split")])
def test_a_gate_setting_that_makes_no_sense_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"pipeline.{key}"):
        load_config(overrides=[override])


def test_a_campaign_refuses_a_gate_split_it_does_not_evaluate():
    """A campaign (run, round, serve) gating on a split eval.splits leaves out is a config error
    naming the key; evaluating one split alone is fine."""
    from typer.testing import CliRunner

    from a3t.evaluate import gate_split_problem
    from a3t.orchestration.cli import app

    cfg = load_config(overrides=["eval.splits=[valid_unseen]"])  # the CPU default gates on valid_seen
    assert "pipeline.gate_split: valid_seen is not evaluated" in gate_split_problem(cfg)
    assert gate_split_problem(load_config()) is None
    assert gate_split_problem(load_config(overrides=["env.name=webshop"])) is None  # no valid_seen: its test split
    result = CliRunner().invoke(app, ["run", "eval.splits=[valid_unseen]"])
    assert result.exit_code == 2 and "pipeline.gate_split: valid_seen is not evaluated" in result.output


# --- a campaign whose round regresses ------------------------------------------------------------


def run(ws: Path, env: dict, wins: str, *overrides: str) -> subprocess.CompletedProcess:
    # train.from_base_each_round=false: a round continues the adapter it plays with (the CPU default).
    args = ["run", "--profile", "smoke", "train.from_base_each_round=false", *overrides]
    return subprocess.run([sys.executable, "-c", SCRIPTED_EVAL, *args], cwd=ws, env=env | {"A3T_TEST_WINS": wins},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


def summary(ws: Path, k: int) -> dict:
    return json.loads((ws / "data" / "runs" / CAMPAIGN / f"round_{k}" / "round.json").read_text())


def at_champion(ws: Path) -> bool:
    """The dataset is exactly round 0's version: its hash is the one tag round-0 points at, and DVC
    sees the workspace as its pointers say."""
    from a3t.versioning import dataset_hash

    tagged = subprocess.run(["git", "show", f"a3t/{CAMPAIGN}/round-0:data/trajectories.dvc"], cwd=ws,
                            capture_output=True, text=True, check=True).stdout
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data/trajectories.dvc", "data/games.dvc"],
                            cwd=ws, capture_output=True, text=True, check=True).stdout
    return dataset_hash(ws / "data" / "trajectories") in tagged and "up to date" in status


def test_a_regressing_round_is_rejected_and_the_dataset_rolled_back_to_the_champion(ws, env):
    done = run(ws, env, "12,0", "pipeline.rounds=2")
    assert done.returncode == 0, done.stdout[-4000:]
    assert "round 0: accepted" in done.stdout
    assert "round 1: rejected" in done.stdout and f"rolled back to a3t/{CAMPAIGN}/round-0" in done.stdout
    decision = summary(ws, 1)["decision"]
    assert decision["verdict"] == "rejected" and decision["champion_round"] == 0 and "0/24" in decision["reason"]
    assert not (ws / "data" / "trajectories" / CAMPAIGN / "round_1").exists()
    assert at_champion(ws)
    tags = subprocess.run(["git", "tag", "-l", f"a3t/{CAMPAIGN}/*"], cwd=ws, capture_output=True, text=True).stdout
    assert tags.split() == [f"a3t/{CAMPAIGN}/round-0", f"a3t/{CAMPAIGN}/round-1"]  # the rejected round stays on record

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow' / 'mlflow.db'}")
    run1 = client.get_run(summary(ws, 1)["tracking"]["round_run"])
    assert run1.data.tags["a3t.decision"] == "rejected" and run1.info.run_name == "round-1 (rejected)"
    assert "0/24" in run1.data.tags["a3t.decision_reason"] and run1.data.metrics["round/rejected"] == 1.0
    versions = client.search_model_versions(f"name='a3t-{CAMPAIGN}'")
    assert [v.tags["a3t.round"] for v in versions] == ["0"]  # a rejected adapter is not registered
    assert client.get_model_version_by_alias(f"a3t-{CAMPAIGN}", "champion").tags["a3t.round"] == "0"


def test_the_next_run_starts_from_the_champion_and_stop_ends_it(ws, env):
    done = run(ws, env, "12,0,1", "pipeline.rounds=3", "pipeline.on_regression=stop")
    assert done.returncode != 0 and "pipeline.on_regression=stop ends this run" in done.stdout
    round2 = summary(ws, 2)
    assert 1 not in round2["data"]["train_set_rounds"]  # the rejected round's data is gone
    continued = Path(round2["train"]["init_adapter"])
    assert continued.parts[-3:] == ("round_0", "train", "adapter")  # the champion's adapter, not round 1's
    assert round2["decision"]["verdict"] == "rejected" and at_champion(ws)

    status = subprocess.run([sys.executable, "-m", "a3t", "status", "--profile", "smoke"], cwd=ws, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "last round: 2, rejected" in status.stdout and "champion: round 0" in status.stdout
    assert "round 1 rejected: valid_unseen first-attempt success 0/24" in status.stdout

    # What the morning shows in Prefect's UI: the run's table artifact, the same rows.
    artifact = subprocess.run([sys.executable, "-m", "prefect", "artifact", "inspect", f"a3t-{CAMPAIGN}-rounds"],
                              cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    shown = " ".join(artifact.stdout.split())  # as printed, wrapped
    assert "'key': 'a3t-default-rounds'" in shown and "'type': 'table'" in shown, artifact.stdout[-2000:]
    assert '"decision": "rejected"' in shown and f"a3t/{CAMPAIGN}/round-2" in shown


def test_a_rejected_rounds_tag_is_no_rollback_target(ws, env):
    refused = subprocess.run([sys.executable, "-m", "a3t", "rollback", f"a3t/{CAMPAIGN}/round-1", "--profile", "smoke"],
                             cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "which the champion gate rejected" in refused.stdout + refused.stderr
    assert at_champion(ws)  # nothing touched
