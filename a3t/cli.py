"""The `a3t` command line: one console script, one subcommand per job.

Every subcommand takes ``--config FILE`` and ``section.key=value`` overrides.
"""

from __future__ import annotations

import os
import sys

# Busy-waiting OpenMP threads make every torch step 10-20x slower when another process
# shares the cores (measured on 2-core machines); sleep instead unless the user chose.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from a3t.config import Config, ConfigError, load_config

app = typer.Typer(help="a3t: a language agent that improves itself from its own trajectories (A3T).", no_args_is_help=True)
games_app = typer.Typer(help="Generate and play ALFWorld games.", no_args_is_help=True)
app.add_typer(games_app, name="games")
console = Console()

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
ProfileOption = Annotated[str, typer.Option("--profile", "-p", help="Settings profile: default (CPU) or paper.")]
OverridesArg = Annotated[
    Optional[list[str]], typer.Argument(help="Config overrides as section.key=value, e.g. games.train=60.")
]


def _config(path: Path | None, overrides: list[str], profile: str = "default") -> Config:
    try:
        return load_config(path, overrides, profile)
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


@games_app.command("generate")
def games_generate(
    overrides: OverridesArg = None, config: ConfigOption = None, profile: ProfileOption = "default"
) -> None:
    """Generate solvable games of all 6 task types into games.root (official ALFWorld layout)."""
    from a3t.envs.alfworld_gen import game_jobs, generate_games

    cfg = _config(config, overrides or [], profile)
    g = cfg.games
    jobs = game_jobs(g.root, g.counts(), g.seed, g.size, g.plan_timeout_s)
    new = {split: 0 for split in g.counts()}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"generating {g.size} games (seed {g.seed}) into {g.root}", total=len(jobs))
        for job, _, written in generate_games(jobs, g.workers):
            new[job.split] += written
            progress.advance(bar)
    table = Table("split", "games", "new", "already there")
    for split, n in g.counts().items():
        table.add_row(split, str(n), str(new[split]), str(n - new[split]))
    console.print(table)


def _games_to_play(target: Path, splits: list[str]) -> list[Path]:
    from a3t.envs.alfworld import find_games

    if target.is_file():
        return [target]
    if (target / "game.tw-pddl").is_file():
        return [target / "game.tw-pddl"]
    games = []
    for split in splits:
        if (target / "json_2.1.1" / split).is_dir():
            games += find_games(target, split)
    if not games:
        console.print(f"[red]no games under {target}[/red] (splits {', '.join(splits)}; expected {target}/json_2.1.1/<split>/...)")
        raise typer.Exit(1)
    return games


@games_app.command("play")
def games_play(
    args: Annotated[Optional[list[str]], typer.Argument(help="[DIR] then section.key=value overrides. DIR: a data root, a trial folder or a game.tw-pddl (default: games.root).")] = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", "-s", help="Split(s) to play (default: all).")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Play the first game yourself.")] = False,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
) -> None:
    """Play games by their walkthrough and print won / steps per game, or play one yourself."""
    from a3t.envs.alfworld import play_walkthrough

    args = args or []
    overrides = [a for a in args if "=" in a]
    targets = [a for a in args if "=" not in a]
    if len(targets) > 1:
        console.print(f"[red]one DIR at most, got {len(targets)}: {' '.join(targets)}[/red]")
        raise typer.Exit(2)
    cfg = _config(config, overrides, profile)
    games = _games_to_play(Path(targets[0]) if targets else cfg.games.root, split or ["train", "valid_seen", "valid_unseen"])
    if interactive:
        _play_interactively(games[0], cfg)
        return
    table = Table("split", "game", "won", "steps")
    won = failed = 0
    for game in games:
        r = play_walkthrough(game, cfg.env.phrasing, cfg.env.max_steps)
        split_name, name = game.parent.parent.parent.name, f"{game.parent.parent.name}/{game.parent.name}"
        if r.error:
            failed += 1
            table.add_row(split_name, name, "[red]error[/red]", r.error)
            continue
        won += r.won
        table.add_row(split_name, name, "yes" if r.won else "[red]no[/red]", str(r.steps))
    console.print(table)
    console.print(f"won {won}/{len(games)} games by walkthrough" + (f", {failed} could not be played" if failed else ""))
    if won < len(games):
        raise typer.Exit(1)


def _play_interactively(game: Path, cfg: Config) -> None:
    from a3t.envs.alfworld import AlfWorldEnv, GameFileError

    try:
        env = AlfWorldEnv(game, phrasing=cfg.env.phrasing, max_steps=cfg.env.max_steps)
    except GameFileError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    console.print(f"[bold]{game}[/bold] ({env.game.task_type})\n")
    console.print(env.reset().observation)
    while True:
        actions = env.admissible_actions
        console.print("\n" + "  ".join(f"[cyan]{i}[/cyan] {a}" for i, a in enumerate(actions, 1)))
        console.print("action (number or text, 'quit' to stop)> ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            console.print("\nstopped.")
            return
        choice = line.strip()
        action = actions[int(choice) - 1] if choice.isdigit() and 0 < int(choice) <= len(actions) else choice
        step = env.step(action)
        console.print(f"> {action}\n{step.observation}")
        if step.done:
            console.print(f"\n[bold]{'You won' if step.won else 'Episode over'}[/bold] after {env.steps_taken} steps "
                          f"({env.invalid_actions} invalid).")
            return


SplitOption = Annotated[str, typer.Option("--split", "-s", help="Split of games.root to play.")]


def _progress_rollout(tasks, store, policy, annotator, cfg: Config, round_: int, label: str):
    from a3t.rollout import rollout

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(label, total=len(tasks))

        def show(stats):
            total = max(len(tasks), stats.episodes + stats.skipped)  # retries add episodes
            progress.update(bar, completed=stats.episodes + stats.skipped, total=total,
                            description=f"{label}: {stats.successes} won, {stats.tokens_per_s:.0f} tok/s")

        stats = rollout(tasks, store, policy, annotator, cfg.rollout, cfg.env, round_=round_, on_progress=show)
    table = Table("episodes played", "won", "already stored", "generated tokens", "tokens/s", "file")
    table.add_row(str(stats.episodes), str(stats.successes), str(stats.skipped), str(stats.completion_tokens),
                  f"{stats.tokens_per_s:.1f}", str(store.path))
    console.print(table)
    return stats


def _models(cfg: Config, need_policy: bool = True):
    """The policy LLM (None when not needed) and the ActRe annotator (the policy's LLM
    unless the config names another, as in the paper)."""
    from a3t.agent.actre import ActReAnnotator
    from a3t.llm import load_llm
    from a3t.llm.base import Sampling

    policy = load_llm(cfg.llm) if need_policy or cfg.actre is None else None
    actre_llm = load_llm(cfg.actre) if cfg.actre is not None else policy
    sampling = Sampling(temperature=0.0, max_new_tokens=cfg.rollout.actre_max_new_tokens)
    return (policy if need_policy else None), ActReAnnotator(actre_llm, phrasing=cfg.env.phrasing, sampling=sampling)


@app.command("rollout")
def rollout_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    split: SplitOption = "train",
    out: Annotated[Path, typer.Option(help="Trajectory JSONL file (appended; finished episodes are skipped).")] = Path(
        "data/trajectories/rollout.jsonl"
    ),
    round_: Annotated[int, typer.Option("--round", help="Round number recorded in each trajectory.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Play only the first N games of the split.")] = None,
) -> None:
    """Play the games of a split with the policy, with A3T exploration and retries of failed tasks."""
    from a3t.envs.alfworld import find_games
    from a3t.rollout import task_for
    from a3t.trajectory import TrajectoryStore

    cfg = _config(config, overrides or [], profile)
    tasks = [task_for(g) for g in find_games(cfg.games.root, split)][:limit]
    policy, annotator = _models(cfg)
    _progress_rollout(tasks, TrajectoryStore(out), policy, annotator, cfg, round_, f"rollout {split}")


@app.command("annotate")
def annotate_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    split: SplitOption = "train",
    count: Annotated[Optional[int], typer.Option(help="Annotate the walkthroughs of the first N games.")] = None,
    episodes: Annotated[
        Optional[Path],
        typer.Option(help='JSONL of recorded episodes to annotate instead: {"game": PATH, "actions": [...]} per line.'),
    ] = None,
    out: Annotated[Path, typer.Option(help="Trajectory JSONL file (appended).")] = Path("data/trajectories/annotated.jsonl"),
    round_: Annotated[int, typer.Option("--round", help="Round number recorded in each trajectory.")] = 0,
) -> None:
    """Turn action sequences (planner walkthroughs or recorded episodes) into ReAct trajectories with ActRe."""
    from a3t.annotate import recorded_tasks, walkthrough_tasks
    from a3t.envs.alfworld import GameFileError, find_games
    from a3t.trajectory import TrajectoryStore

    cfg = _config(config, overrides or [], profile)
    try:
        if episodes is not None:
            tasks = recorded_tasks(episodes, cfg.env.phrasing)
        else:
            tasks = walkthrough_tasks(find_games(cfg.games.root, split)[:count], cfg.env.phrasing)
    except (GameFileError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    _, annotator = _models(cfg, need_policy=False)
    cfg.rollout.retry_max = 0  # a script is played once
    stats = _progress_rollout(tasks, TrajectoryStore(out), None, annotator, cfg, round_, "annotate")
    if stats.successes < stats.episodes:
        console.print(f"[yellow]{stats.episodes - stats.successes} annotated episodes did not win when replayed[/yellow]")


@app.command("train")
def train_command(
    data: Annotated[list[Path], typer.Option("--data", "-d", help="Trajectory JSONL file(s): all rounds so far.")],
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    out: Annotated[Path, typer.Option(help="Output folder: adapter/ and checkpoints/ (resumed if present).")] = Path(
        "data/adapters/round_0"
    ),
    round_: Annotated[int, typer.Option("--round", help="Round number: round 0 trains epochs_first_round.")] = 0,
    init_adapter: Annotated[
        Optional[Path], typer.Option(help="Continue this adapter (used when train.from_base_each_round=false).")
    ] = None,
) -> None:
    """Train a QLoRA adapter on trajectories with the A3T loss (pg / sft / raw)."""
    from transformers import AutoTokenizer

    from a3t.data import build_examples, load_trajectories
    from a3t.llm.models import default_model_path
    from a3t.train import train_adapter

    cfg = _config(config, overrides or [], profile)
    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        console.print(f"[red]trajectory file(s) not found: {', '.join(missing)}[/red]")
        raise typer.Exit(1)
    base = default_model_path() if cfg.llm.model == "default" else Path(cfg.llm.model)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    t = cfg.train
    examples = build_examples(load_trajectories(data), tokenizer, t.loss, t.observations_in_loss, cfg.env.phrasing,
                              t.max_length)
    console.print(f"{len(examples)} weighted trajectories ({t.loss} loss) from {len(data)} file(s)")
    epochs = t.epochs_first_round if round_ == 0 else t.epochs_later_rounds
    start = None if t.from_base_each_round else init_adapter
    stats = train_adapter(examples, base, out, t, epochs, init_adapter=start, dtype=cfg.llm.dtype, device=cfg.llm.device)
    console.print_json(data=stats)
    console.print(f"adapter: {out / 'adapter'}")


if __name__ == "__main__":
    app()
