import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from a3t.orchestration.cli import app
from a3t.envs.alfworld import find_games

runner = CliRunner()


def test_help_lists_the_games_commands():
    result = runner.invoke(app, ["games", "--help"])
    assert result.exit_code == 0
    assert "generate" in result.output and "play" in result.output


def test_generate_then_play(tmp_path):
    root = tmp_path / "games"
    overrides = [f"games.root={root}", "games.train=2", "games.valid_seen=0", "games.valid_unseen=1"]
    result = runner.invoke(app, ["games", "generate", *overrides])
    assert result.exit_code == 0, result.output
    assert len(find_games(root, "train")) == 2 and len(find_games(root, "valid_unseen")) == 1
    again = runner.invoke(app, ["games", "generate", *overrides])
    assert again.exit_code == 0 and "already there" in again.output

    result = runner.invoke(app, ["games", "play", str(root), "env.phrasing=move"])
    assert result.exit_code == 0, result.output
    assert "won 3/3 games by walkthrough" in result.output

    result = runner.invoke(app, ["games", "play", f"games.root={root}", "--split", "valid_unseen"])
    assert "won 1/1 games by walkthrough" in result.output


def test_play_reports_a_broken_game_and_fails(games_root, tmp_path):
    game = find_games(games_root, "train")[0]
    broken = tmp_path / "json_2.1.1" / "train" / "task" / "trial"
    broken.mkdir(parents=True)
    (broken / "traj_data.json").write_text((game.parent / "traj_data.json").read_text())
    (broken / "game.tw-pddl").write_text("{not json")
    result = runner.invoke(app, ["games", "play", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert "not JSON" in result.output and "1 could not be played" in result.output


def test_config_error_exits_2_and_names_the_key(tmp_path):
    result = runner.invoke(app, ["games", "generate", "games.trian=3"])
    assert result.exit_code == 2 and "games.trian: unknown key" in result.output


def test_interactive_play_to_a_win_by_typed_actions(games_root):
    game = next(g for g in find_games(games_root, "train") if g.parent.parent.name.startswith("pick_and_place"))
    walkthrough = json.loads(game.read_text())["walkthrough"]
    # The stored walkthrough says "move X to Y"; a player types the default "put X in/on Y".
    lines = [w.replace("move ", "put ", 1).replace(" to ", " in/on ", 1) if w.startswith("move ") else w for w in walkthrough]
    proc = subprocess.run(
        [sys.executable, "-m", "a3t", "games", "play", str(game.parent), "--interactive"],
        input="look\n" + "\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Your task is to:" in proc.stdout and "You won" in proc.stdout


def test_interactive_play_by_number_and_quit(games_root):
    game = find_games(games_root, "train")[0]
    proc = subprocess.run(
        [sys.executable, "-m", "a3t", "games", "play", str(game), "-i"],
        input="1\nquit\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "> go to" in proc.stdout and "stopped." in proc.stdout


def _rates(successes, within, tasks, ci=True):
    from a3t.stats import wilson_interval

    rates = {"k": 4, "tasks": tasks, "successes": successes, "success": successes / tasks,
             "success_within_k": within / tasks, "score": 100 * successes / tasks, "score_within_k": 100 * within / tasks}
    if ci:  # summaries written before the intervals lack these
        rates |= {"success_ci": list(wilson_interval(successes, tasks)),
                  "success_within_k_ci": list(wilson_interval(within, tasks))}
    return rates


def _render(renderable) -> str:
    import io

    from rich.console import Console

    out = Console(file=io.StringIO(), width=250)
    out.print(renderable)
    return out.file.getvalue()


def test_rates_table_shows_the_95_percent_intervals():
    from a3t.evaluate import SplitRates
    from a3t.orchestration.cli import _rates_table

    rates = _rates(6, 12, 24) | {"per_type": {"pick": _rates(1, 1, 12), "look": _rates(5, 11, 12)}}
    text = _render(_rates_table("valid_unseen", SplitRates.model_validate(rates)))
    assert "25.0% [12.0–44.9]" in text and "50.0% [31.4–68.6]" in text  # all 24 games
    assert "8.3% [1.5–35.4]" in text  # 1 of 12 pick games
    assert "first attempt [95% CI]" in text and "within 4 [95% CI]" in text


def test_campaign_table_shows_intervals_and_games_per_split_and_round(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from a3t.orchestration import cli
    from a3t.config import load_config
    from a3t.pipeline import Workspace

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "console", Console(file=io.StringIO(), width=250))
    cfg = load_config(overrides=["eval.splits=[valid_seen,valid_unseen]", "eval.attempts=4"])
    ws = Workspace.of(cfg)
    old = {"valid_seen": _rates(2, 3, 8, ci=False), "valid_unseen": _rates(1, 2, 8, ci=False)}  # no intervals
    new = {"valid_seen": _rates(6, 12, 24), "valid_unseen": _rates(12, 24, 24)}
    for k, evals in enumerate((old, new)):
        ws.round_data(k).mkdir(parents=True)
        (ws.round_run(k)).mkdir(parents=True)
        (ws.round_run(k) / "round.json").write_text(json.dumps(  # as older a3t wrote them: fewer fields
            {"data": {"collected": {"policy": 1, "explored": 0, "annotated": 0}}, "train": {"loss_per_epoch": []},
             "version": {"tag": f"a3t/x/round-{k}"}, "eval": {split: r | {"per_type": {}} for split, r in evals.items()},
             "time_s": {"annotate": 60.0, "train": 90.0} if k == 0 else {"rollout": 30.0, "train": 60.0}}))
    cli._report_campaign(cfg, None)
    text = cli.console.file.getvalue()
    stage_rows = [line for line in text.splitlines() if line.startswith("│ 0 ") or line.startswith("│ 1 ")][-2:]
    assert "time per stage" in text and "annotate" in text.split("time per stage")[1]
    assert [[cell.strip() for cell in row.split("│")[2:6]] for row in stage_rows] == [["1.0", "-", "1.5", "2.5"],
                                                                                     ["-", "0.5", "1.0", "1.5"]]
    assert "8 games" in text and "24 games" in text
    assert "25.0% [12.0–44.9]" in text and "50.0% [31.4–68.6]" in text  # round 1, valid_seen
    assert "100.0% [86.2–100.0]" in text  # round 1, valid_unseen within 4
    assert "12.5% [2.2–47.1]" in text  # round 0: its interval computed from the rate, 1 of 8


def test_annotate_and_rollout_commands_run_the_pipelines_steps(games_root, tmp_path):
    """`a3t annotate` and `a3t rollout` take their tasks where the pipeline does (a3t.envs.spec:
    games spread over task types, walkthroughs with detours) and write trajectory files."""
    from a3t.trajectory import TrajectoryStore

    common = ["--profile", "smoke", f"games.root={games_root}"]
    annotated = tmp_path / "annotated.jsonl"
    result = runner.invoke(app, ["annotate", "--count", "2", "--out", str(annotated), *common,
                                 "pipeline.walkthrough_reasons=plan", "pipeline.walkthrough_detours=1"])
    assert result.exit_code == 0, result.output
    records = list(TrajectoryStore(annotated).read())
    assert len(records) == 2 and all(t.success and t.source == "annotated" for t in records)
    assert len({t.task_type for t in records}) == 2  # two task types, not the first two games of one
    assert "ActRe" not in result.output  # the plan's reasons: no ActRe verdicts to show
    result = runner.invoke(app, ["annotate", "--count", "1", "--out", str(tmp_path / "actre.jsonl"), *common,
                                 "pipeline.walkthrough_reasons=actre"])
    assert result.exit_code == 0 and "ActRe" in result.output, result.output  # its checks' verdicts
    played = tmp_path / "played.jsonl"
    result = runner.invoke(app, ["rollout", "--split", "valid_unseen", "--limit", "1", "--out", str(played), *common,
                                 "rollout.retry_max=0"])
    assert result.exit_code == 0, result.output
    assert len(list(TrajectoryStore(played).read())) == 1
    result = runner.invoke(app, ["rollout", "--split", "nope", "--out", str(played), *common])
    assert result.exit_code == 1


def test_openmp_threads_sleep_only_when_workers_share_the_cores(monkeypatch):
    from a3t.config import load_config
    from a3t.orchestration.cli import _openmp_wait_policy

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    _openmp_wait_policy(load_config(profile="smoke"))
    assert "OMP_WAIT_POLICY" not in os.environ  # alone on the cores: OpenMP's default
    for override in ("pipeline.rollout_shards=2", "pipeline.task_runner=dask"):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        _openmp_wait_policy(load_config(overrides=[override], profile="smoke"))
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    _openmp_wait_policy(load_config(overrides=["pipeline.rollout_shards=2"], profile="smoke"))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice wins


def test_a_campaign_command_restarts_itself_once_with_mimalloc(monkeypatch):
    import pytest

    from a3t.config import load_config
    from a3t.orchestration import cli

    if sys.platform != "linux":
        pytest.skip("the allocator is preloaded on Linux only")
    execs = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append((path, argv)))
    monkeypatch.setenv("LD_PRELOAD", "/opt/user.so")
    monkeypatch.delenv("MIMALLOC_PURGE_DELAY", raising=False)
    cli._restart_with_mimalloc(load_config(profile="smoke"))  # smoke: the system allocator
    assert not execs
    cli._restart_with_mimalloc(load_config())
    lib = str(cli._mimalloc_library())
    assert execs == [(sys.executable, sys.orig_argv)]  # the same command, in place
    assert os.environ["LD_PRELOAD"] == f"{lib}:/opt/user.so" and os.environ["MIMALLOC_PURGE_DELAY"] == "-1"
    cli._restart_with_mimalloc(load_config())  # the restarted process: no second restart
    assert len(execs) == 1
    # The library the restart preloads is a working allocator for Python and torch.
    maps = subprocess.run([sys.executable, "-c", "import torch; torch.ones(1 << 20).sum(); "
                           "print(open('/proc/self/maps').read())"],
                          env={**os.environ, "LD_PRELOAD": lib}, capture_output=True, text=True, check=True).stdout
    assert lib in maps
