import json
import subprocess
import sys

from typer.testing import CliRunner

from a3t.cli import app
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
        [sys.executable, "-m", "a3t.cli", "games", "play", str(game.parent), "--interactive"],
        input="look\n" + "\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Your task is to:" in proc.stdout and "You won" in proc.stdout


def test_interactive_play_by_number_and_quit(games_root):
    game = find_games(games_root, "train")[0]
    proc = subprocess.run(
        [sys.executable, "-m", "a3t.cli", "games", "play", str(game), "-i"],
        input="1\nquit\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "> go to" in proc.stdout and "stopped." in proc.stdout
