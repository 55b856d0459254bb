"""The `a3t` command line: one console script, one subcommand per job.

Every subcommand takes ``--config FILE`` and ``section.key=value`` overrides.
"""

from __future__ import annotations

import os
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from a3t.config import Config, ConfigError, load_config
from a3t.envs.spec import env_spec
from a3t.evaluate import SplitRates

app = typer.Typer(help="a3t: a language agent that improves itself from its own trajectories (A3T).", no_args_is_help=True)
games_app = typer.Typer(help="Generate and play ALFWorld games.", no_args_is_help=True)
app.add_typer(games_app, name="games")
console = Console()

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
ProfileOption = Annotated[
    str, typer.Option("--profile", "-p", help="Settings profile: default (CPU), paper (GPU), smoke (tiny model), "
                      "webshop (WebShop on the CPU) or paper-webshop.")
]
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
    from a3t.envs.alfworld_gen import generate_configured_games

    cfg = _config(config, overrides or [], profile)
    g = cfg.games
    new = generate_configured_games(g, Path(g.root), f"generating {g.size} games (seed {g.seed}) into {g.root}")["new"]
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


SplitOption = Annotated[str, typer.Option("--split", "-s", help="Split of games.root (WebShop: of its goals) to play.")]


def _rollout_table(stats, store) -> None:
    table = Table("episodes played", "won", "already stored", "generated tokens", "tokens/s", "file")
    row = [str(stats.episodes), str(stats.successes), str(stats.skipped), str(stats.completion_tokens),
           f"{stats.tokens_per_s:.1f}", str(store.path)]
    if stats.actre_accepted or stats.actre_rejected:  # ActRe was asked: its checks' verdicts (a3t.agent.actre)
        for name in ("accepted", "rejected", "fallbacks"):
            table.add_column(f"ActRe {name}")
            row.append(str(getattr(stats, f"actre_{name}")))
    table.add_row(*row)
    console.print(table)


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
    """Play the games (WebShop: goals) of a split with the policy, with A3T exploration and retries of failed
    tasks."""
    from a3t.envs.alfworld import GameFileError
    from a3t.pipeline import load_agents, shows_example
    from a3t.progress import rollout_bar
    from a3t.rollout import rollout
    from a3t.trajectory import TrajectoryStore

    cfg = _config(config, overrides or [], profile)
    try:
        tasks = env_spec(cfg.env.name).tasks(cfg, Path(cfg.games.root), split, limit)
    except (GameFileError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    policy, annotator = load_agents(cfg)
    store = TrajectoryStore(out)
    with rollout_bar(f"rollout {split}", len(tasks)) as show:
        stats = rollout(tasks, store, policy, annotator, cfg.rollout, cfg.env, round_=round_, on_progress=show,
                        action_mode=cfg.agent.action_mode, with_example=shows_example(cfg, cfg.llm.adapter))
    _rollout_table(stats, store)


@app.command("annotate")
def annotate_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    split: SplitOption = "train",
    count: Annotated[
        Optional[int], typer.Option(help="Annotate the walkthroughs of the first N games (WebShop: goals).")
    ] = None,
    episodes: Annotated[
        Optional[Path],
        typer.Option(help='ALFWorld: JSONL of recorded episodes to annotate instead: {"game": PATH, "actions": [...]} '
                     "per line."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Trajectory JSONL file (appended).")] = Path("data/trajectories/annotated.jsonl"),
    round_: Annotated[int, typer.Option("--round", help="Round number recorded in each trajectory.")] = 0,
) -> None:
    """Turn action sequences (planner or WebShop oracle walkthroughs, or recorded episodes) into ReAct trajectories
    with ActRe."""
    from a3t.annotate import recorded_tasks
    from a3t.envs.alfworld import GameFileError
    from a3t.pipeline import annotate
    from a3t.trajectory import TrajectoryStore

    cfg = _config(config, overrides or [], profile)
    try:
        if episodes is not None:
            if not env_spec(cfg.env.name).has_games:
                raise ValueError("--episodes: recorded episodes are of ALFWorld games; for WebShop, a3t annotates "
                                 "its oracle's walkthroughs")
            tasks = recorded_tasks(episodes, cfg.env.phrasing)
        else:
            tasks = env_spec(cfg.env.name).walkthroughs(cfg, Path(cfg.games.root), split, count)
    except (GameFileError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    store = TrajectoryStore(out)
    stats = annotate(cfg, tasks, store, round_)
    _rollout_table(stats, store)
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
    from a3t.data import load_trajectories
    from a3t.pipeline import train_policy

    cfg = _config(config, overrides or [], profile)
    missing = [str(p) for p in data if not p.is_file()]
    if missing:
        console.print(f"[red]trajectory file(s) not found: {', '.join(missing)}[/red]")
        raise typer.Exit(1)
    stats = train_policy(cfg, load_trajectories(data), out, round_, previous=init_adapter)
    console.print(f"{stats['examples']} weighted trajectories ({cfg.train.loss} loss) from {len(data)} file(s)")
    console.print_json(data=stats)
    if stats["examples"]:
        console.print(f"adapter: {out / 'adapter'}")
    else:
        raise typer.Exit(1)


# --- The pipeline: Prefect flows over a workspace (the current directory) ---------------------

def _prefect_env() -> None:
    # Prefect's temporary local server otherwise sends analytics and may log "database is locked".
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its 20 s start-up limit is too short on a busy 2-core machine (prefect #15075).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _run_flow(flow_fn, **params):
    """Call a flow; the workspace's and the config's errors become one clear line, exit 1."""
    _prefect_env()
    from a3t.envs.webshop_server import WebShopServerError
    from a3t.versioning import WorkspaceError

    try:
        return flow_fn(**params)
    except (WorkspaceError, ConfigError, FileNotFoundError, ImportError, WebShopServerError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None


def _openmp_wait_policy(cfg: Config) -> None:
    """Let OpenMP's threads sleep between torch ops when several workers of the campaign share
    the cores (rollout shards, Dask or Ray processes); a campaign alone on them keeps OpenMP's
    default, a short busy-wait. On 2 cores, in a process of their own, sleeping threads made 32
    of a default campaign's first plays 1.28x slower and its trainer 1.14x; with a busy process
    beside it, busy-waiting made a forward 2.2x slower than sleeping. Set before torch loads
    OpenMP and before a cluster starts its workers; the user's own OMP_WAIT_POLICY wins."""
    if cfg.pipeline.rollout_shards > 1 or cfg.pipeline.task_runner != "thread":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _mimalloc_library() -> Path | None:
    try:
        lib = Path(distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so"))
    except PackageNotFoundError:
        return None
    return lib if lib.exists() else None


def _restart_with_mimalloc(cfg: Config) -> None:
    """Run this command again, in place (exec), with mimalloc as the process's C allocator.

    glibc's heap fragments over a campaign: PyTorch allocates every tensor with posix_memalign,
    the engine's key/value buffers change size at every call, and in round 2 a quarter of the
    rollout thread's time went to posix_memalign (4% with mimalloc). With mimalloc, 32 first plays
    took as long after a round's training in the process as before it (120 s and 122 s; glibc:
    133 s and 121 s). Freed pages stay with the process (MIMALLOC_PURGE_DELAY=-1): giving them
    back after mimalloc's default 10 ms made training 1.5x slower (page faults at every step). An
    allocator can only be chosen when a process starts, hence the restart; children (training) inherit it."""
    if cfg.pipeline.allocator != "mimalloc" or sys.platform != "linux":
        return
    lib = _mimalloc_library()
    if lib is None:
        console.print("[yellow]pipeline.allocator=mimalloc: the cmeel-mimalloc package is not installed; "
                      "running on the system allocator[/yellow]")
        return
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    if str(lib) in preload:  # already restarted (or the user preloaded it)
        return
    os.environ["LD_PRELOAD"] = ":".join([str(lib), *preload])
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def _campaign_config(path: Path | None, overrides: list[str], profile: str) -> Config:
    """The config of a command whose process runs the campaign (run, round, serve), and that
    process set up for it before anything loads torch: its allocator, its OpenMP threads."""
    cfg = _config(path, overrides, profile)
    from a3t.evaluate import gate_split_problem

    if problem := gate_split_problem(cfg):
        console.print(f"[red]config error:[/red] {problem}")
        raise typer.Exit(2)
    _restart_with_mimalloc(cfg)
    _openmp_wait_policy(cfg)
    return cfg


def _with_task_runner(flow_fn, cfg: Config):
    from a3t.orchestration.flows.self_improve import task_runner

    return flow_fn.with_options(task_runner=task_runner(cfg.pipeline))


@app.command("run")
def run_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: Annotated[str, typer.Option("--profile", "-p", help="smoke (tiny model, ~2 min), default (CPU), paper "
                                         "(GPU), webshop or paper-webshop.")] = "default",
) -> None:
    """Run the self-improvement campaign in this directory: rounds of rollout, ActRe exploration,
    filtering, DVC versioning, QLoRA training, evaluation and MLflow tracking. A rerun resumes."""
    cfg = _campaign_config(config, overrides or [], profile)
    from a3t.orchestration.flows.self_improve import self_improve

    started = time.perf_counter()
    _run_flow(_with_task_runner(self_improve, cfg), config_file=_str(config), profile=profile, overrides=overrides or [])
    _report_campaign(cfg, time.perf_counter() - started)


@app.command("round")
def round_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    round_: Annotated[Optional[int], typer.Option("--round", help="Round to run (default: the next one).")] = None,
) -> None:
    """Run one round of the campaign (the DVC stage `round` calls this)."""
    cfg = _campaign_config(config, overrides or [], profile)
    from a3t.orchestration.flows.self_improve import one_round

    _run_flow(_with_task_runner(one_round, cfg), config_file=_str(config), profile=profile,
              overrides=overrides or [], round_=round_)
    _report_campaign(cfg, None)


@app.command("eval")
def eval_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    adapter: Annotated[Optional[Path], typer.Option(help="A peft adapter folder (default: the base model).")] = None,
    round_: Annotated[Optional[int], typer.Option("--round", help="Evaluate this round's adapter of the campaign.")] = None,
) -> None:
    """Evaluate a policy on eval.splits: first-attempt success and success within eval.attempts (WebShop: and score)."""
    _config(config, overrides or [], profile)
    from a3t.orchestration.flows.evaluate import evaluate

    results = _run_flow(evaluate, config_file=_str(config), profile=profile, overrides=overrides or [],
                        adapter=_str(adapter), round_=round_)
    for split, rates in results.items():
        console.print(_rates_table(split, SplitRates.model_validate(rates)))


@app.command("rollback")
def rollback_command(
    tag: Annotated[str, typer.Argument(help="A round's tag, e.g. a3t/default/round-0 (see `git tag -l 'a3t/*'`).")],
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    force: Annotated[bool, typer.Option(help="Discard uncommitted changes of the versioned data.")] = False,
) -> None:
    """Restore the dataset of a round's tag (checked by hash); the next `a3t run` continues from it."""
    _config(config, overrides or [], profile)
    from a3t.orchestration.flows.rollback import rollback

    restored = _run_flow(rollback, tag=tag, config_file=_str(config), profile=profile, overrides=overrides or [],
                         force=force)
    console.print(f"restored the dataset of [bold]{restored['tag']}[/bold] (commit {restored['commit'][:10]}); "
                  "`a3t run` continues with the next round")


@app.command("serve")
def serve_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * *' (every day at 03:00).")] = "0 3 * * *",
    rounds_per_run: Annotated[int, typer.Option(help="Rounds each scheduled run adds.")] = 1,
    port: Annotated[int, typer.Option(help="Port of the local Prefect server (when PREFECT_API_URL is not set).")] = 4200,
) -> None:
    """Serve the self-improvement flow as a scheduled Prefect deployment: each run continues the
    campaign with more rounds. Uses the server at PREFECT_API_URL, else starts a local one."""
    cfg = _campaign_config(config, overrides or [], profile)
    _prefect_env()
    from a3t.orchestration.flows.serve import prefect_server

    params = {"config_file": _str(config and config.resolve()), "profile": profile, "overrides": overrides or [],
              "workspace": str(Path.cwd()), "more_rounds": rounds_per_run}
    with prefect_server(port) as url:
        console.print(f"Prefect server: {url.removesuffix('/api')} (schedules and runs in its UI)")
        from a3t.orchestration.flows.self_improve import (
            self_improve,  # after PREFECT_API_URL is set
        )

        _with_task_runner(self_improve, cfg).serve(name=f"a3t-{cfg.pipeline.campaign}", cron=cron, parameters=params)


@app.command("ui")
def ui_command(
    overrides: OverridesArg = None,
    config: ConfigOption = None,
    profile: ProfileOption = "default",
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI of this workspace (mlflow/ store) on 127.0.0.1; prints the page that
    compares the campaign's rounds (pipeline.campaign)."""
    from a3t.orchestration.tracking import comparison_url
    from a3t.orchestration.tracking import ui_command as mlflow_ui

    cfg = _config(config, overrides or [], profile)
    argv = mlflow_ui(Path.cwd(), port)
    ui = f"http://127.0.0.1:{port}"
    console.print(f"MLflow UI on {ui} (Ctrl-C to stop)")
    compare = comparison_url(Path.cwd(), cfg.pipeline.campaign, ui)
    if compare:
        console.print(f"rounds of campaign {cfg.pipeline.campaign!r} side by side: {compare}", soft_wrap=True)
    os.execvp(argv[0], argv)


def _str(value) -> str | None:
    return None if value is None else str(value)


def _rate(rate: float, ci: tuple[float, float]) -> str:
    """``25.0% [12.0–44.9]``: a rate with its 95% Wilson interval."""
    return f"{rate:.1%} [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def _rates_table(split: str, rates: SplitRates) -> Table:
    k = rates.k
    table = Table("task type", "tasks", "first attempt [95% CI]", f"within {k} [95% CI]", title=split,
                  caption=f"score (100 x mean reward): {rates.score:.1f} first attempt, "
                          f"{rates.score_within_k:.1f} best within {k}")
    for kind, r in rates.per_type.items():
        table.add_row(kind, str(r.tasks), _rate(r.success, r.success_ci), _rate(r.success_within_k, r.success_within_k_ci))
    table.add_row("[bold]all[/bold]", str(rates.tasks), f"[bold]{_rate(rates.success, rates.success_ci)}[/bold]",
                  f"[bold]{_rate(rates.success_within_k, rates.success_within_k_ci)}[/bold]")
    return table


def _split_cell(rates: SplitRates) -> str:
    # A line per header line: with a few tens of games the interval is as wide as a round's
    # gain, so the number of games stays in sight.
    return (f"{rates.tasks} games\n{_rate(rates.success, rates.success_ci)}\n"
            f"{_rate(rates.success_within_k, rates.success_within_k_ci)}")


@app.command("status")
def status_command(
    overrides: OverridesArg = None, config: ConfigOption = None, profile: ProfileOption = "default"
) -> None:
    """The campaign of this workspace: its rounds' success rates, the champion adapter, and the run
    that holds the workspace if one does. Reads files and the MLflow store; starts nothing."""
    from a3t.orchestration.tracking import champion
    from a3t.pipeline import Workspace, campaign_rows
    from a3t.versioning import lock_holder

    cfg = _config(config, overrides or [], profile)
    ws = Workspace.of(cfg)
    rows = campaign_rows(cfg, ws)  # the table each flow run publishes as a Prefect artifact
    columns = [name for name in (rows[0] if rows else ["round"]) if name != "why"]  # the reasons go below it
    table = Table(*[Column(name, overflow="fold") for name in columns], title=f"campaign {ws.campaign}: rounds")
    for row in rows:
        table.add_row(*[row[name] for name in columns])
    console.print(table)
    for row in rows:
        if row["why"]:
            console.print(f"round {row['round']} {row['decision']}: {row['why']}")
    if rows:
        console.print(f"last round: {rows[-1]['round']}, {rows[-1]['decision']}")
    best = champion(Path.cwd(), cfg.pipeline.campaign)
    console.print("champion: " + (f"round {best['round']} (model version {best['version']}, "
                                  f"first-attempt success {best['score']:.1%})" if best else "none yet"))
    holder = lock_holder(Path.cwd())
    console.print("running:  " + (f"pid {holder['pid']} since {holder['started']}: {holder['command']}"
                                  if holder else "no run holds this workspace"))


def _report_campaign(cfg: Config, wall_s: float | None) -> None:
    """Each finished round's success rates, and where to look next."""
    from a3t.pipeline import Workspace

    ws = Workspace.of(cfg)
    rounds = ws.finished_rounds()
    # WebShop's results are read as score and success rate (the paper's table).
    scored = env_spec(cfg.env.name).scored
    table = Table("round", "collected\npol/expl/ann", "train\nloss",
                  # Unwrapped: a rate apart from its interval reads as two numbers.
                  *[Column(f"{split}\ngames\n1st [95% CI]\n≤{cfg.eval.attempts} [95% CI]", no_wrap=True)
                    for split in cfg.eval.splits],
                  *([f"{split} score\n1st / ≤{cfg.eval.attempts}" for split in cfg.eval.splits] if scored else []),
                  Column("DVC tag", overflow="fold"), title=f"campaign {ws.campaign}: success rates")
    for k in rounds:
        s = ws.round_summary(k)
        c = s.data.collected
        losses = s.train.loss_per_epoch
        scores = [f"{s.eval[sp].score:.1f} / {s.eval[sp].score_within_k:.1f}" if sp in s.eval else "-"
                  for sp in cfg.eval.splits] if scored else []
        # The champion gate's decision under the round, when it was not a plain accept.
        verdict = "" if s.decision.verdict == "accepted" else f"\n{s.decision.verdict}"
        table.add_row(f"{k}{verdict}", "/".join(str(c.get(source, 0)) for source in ("policy", "explored", "annotated")),
                      f"{losses[-1]:.3f}" if losses else "-",
                      *[_split_cell(s.eval[sp]) if sp in s.eval else "-" for sp in cfg.eval.splits],
                      *scores, s.version.get("tag", "-"))
    console.print(table)
    _report_stage_times(ws, rounds)
    if wall_s is not None:
        console.print(f"wall time {wall_s / 60:.1f} min")
    console.print("MLflow:   [bold]a3t ui[/bold]  (then http://127.0.0.1:5000, experiment a3t)")
    console.print(f"DVC:      [bold]git tag -l 'a3t/{ws.campaign}/*'[/bold]   roll back: [bold]a3t rollback TAG[/bold]")


def _report_stage_times(ws, rounds: list[int]) -> None:
    """Where each round's time went (seconds per stage, as in MLflow's time/<stage>_s)."""
    from a3t.pipeline import STAGES

    times = {k: ws.round_summary(k).time_s for k in rounds}
    times = {k: t for k, t in times.items() if t}  # rounds finished before stage times were kept have none
    if not times:
        return
    stages = [stage for stage in STAGES if any(stage in t for t in times.values())]
    table = Table("round", *[Column(f"{stage}\n(min)", justify="right") for stage in stages],
                  Column("total\n(min)", justify="right"), title="time per stage")
    for k, t in times.items():
        table.add_row(str(k), *[f"{t[stage] / 60:.1f}" if stage in t else "-" for stage in stages],
                      f"{sum(t.values()) / 60:.1f}")
    console.print(table)


if __name__ == "__main__":
    app()
