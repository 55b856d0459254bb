"""Generate solvable ALFWorld games from the tables that the alfworld wheel ships.

The official ALFWorld games are built from ALFRED's recorded scenes, which need the
alfworld data download. This module builds games of the same six task types and the
same file layout (``json_2.1.1/<split>/<task>/<trial>/{game.tw-pddl,traj_data.json,
initial_state.pddl}``) from what is installed: the floor plans' object and receptacle
lists (``alfworld/gen/layouts``), the compatibility tables (``alfworld.gen.constants``)
and the goal library (``alfworld.gen.goal_library``). Every game is solved once by
Fast Downward when it is generated; the plan is stored as its walkthrough and a game
the planner cannot solve is rejected and re-sampled.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import alfworld.gen.constants as C
import alfworld.gen.goal_library as goal_library
from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

if TYPE_CHECKING:
    from a3t.config import GamesConfig

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLITS = ("train", "valid_seen", "valid_unseen")
LAYOUTS_DIR = Path(C.__file__).parent / "layouts"

# The appliance a state-change task needs, and the alfworld table of objects it accepts.
_APPLIANCE = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
_LAMPS = ("DeskLamp", "FloorLamp")
# Lamps are in no receptacle table; ToggleObject needs the lamp to be in a receptacle,
# so a lamp stands on the first of these that the room has (our choice).
_LAMP_STANDS = ("SideTable", "Desk", "Dresser", "CoffeeTable", "DiningTable", "Shelf", "TVStand")
# ALFRED names a sink's basin "Sink|...|SinkBasin"; alfworld's demangler turns that id
# into "sinkbasin N". Naming it SinkBasin_bar_N would read "sinkbasinbasin N".
_BASIN_IDS = {"SinkBasin": "Sink_bar_{n}_bar_SinkBasin", "BathtubBasin": "Bathtub_bar_{n}_bar_BathtubBasin"}


@dataclass(frozen=True)
class GameSize:
    """How crowded a generated room is. Task-relevant receptacles are always kept."""

    max_receptacles: int = 8
    distractor_objects: tuple[int, int] = (3, 6)
    max_instances: int = 2


SIZES = {
    # Small rooms keep prompts short for CPU models.
    "small": GameSize(max_receptacles=8, distractor_objects=(3, 6), max_instances=2),
    # Close to official ALFWorld rooms: every receptacle of the floor plan, many objects.
    "alfworld": GameSize(max_receptacles=40, distractor_objects=(12, 24), max_instances=3),
}


@dataclass(frozen=True)
class FloorPlan:
    number: int
    room: str
    receptacles: dict[str, int]  # receptacle type -> number of instances in the scene
    objects: tuple[str, ...]  # pickupable object types in the scene
    lamps: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"FloorPlan{self.number}"


@dataclass
class GameSpec:
    """Everything needed to write one game; sampled from a seed, then solved."""

    task_type: str
    floor_plan: FloorPlan
    object_target: str
    parent_target: str  # "" for look_at_obj_in_light
    toggle_target: str  # "" unless look_at_obj_in_light
    receptacles: list[tuple[str, str]] = field(default_factory=list)  # (pddl id, type)
    objects: list[tuple[str, str, str]] = field(default_factory=list)  # (pddl id, type, receptacle id)
    task_desc: str = ""


def _room_of(number: int) -> str:
    for room, numbers in C.SCENE_TYPE.items():
        if number in numbers:
            return room
    raise ValueError(f"floor plan {number} is in no ALFRED room type")


def _pickupable_types() -> set[str]:
    static = set(C.VAL_RECEPTACLE_OBJECTS) - set(C.MOVABLE_RECEPTACLES)
    contained = set().union(*C.VAL_RECEPTACLE_OBJECTS.values())
    return {t for t in contained if t in C.OBJECTS and "Sliced" not in t and t not in static}


def load_floor_plans() -> dict[int, FloorPlan]:
    """Read the 120 floor plans' object and receptacle lists shipped in the alfworld wheel."""
    pickupable = _pickupable_types()
    static = set(C.VAL_RECEPTACLE_OBJECTS) - set(C.MOVABLE_RECEPTACLES)
    plans = {}
    for path in sorted(LAYOUTS_DIR.glob("FloorPlan*-objects.json")):
        number = int(re.match(r"FloorPlan(\d+)-", path.name).group(1))
        types = json.loads(path.read_text())
        points = json.loads((LAYOUTS_DIR / f"FloorPlan{number}-openable.json").read_text())
        counts: dict[str, int] = {}
        for object_id in points:  # every receptacle instance of the scene, with its viewpoint
            rtype = object_id.split("|")[0]
            rtype = {"Sink": "SinkBasin", "Bathtub": "BathtubBasin"}.get(rtype, rtype)
            if rtype in static:
                counts[rtype] = counts.get(rtype, 0) + 1
        for rtype in types:  # receptacles listed without a viewpoint still exist once
            if rtype in static and rtype not in counts:
                counts[rtype] = 1
        plans[number] = FloorPlan(
            number=number,
            room=_room_of(number),
            receptacles=dict(sorted(counts.items())),
            objects=tuple(sorted(t for t in types if t in pickupable)),
            lamps=tuple(t for t in _LAMPS if t in types),
        )
    return plans


def split_floor_plans(plans: dict[int, FloorPlan]) -> dict[str, list[FloorPlan]]:
    """ALFRED's scene split: train and valid_seen share the train scenes, valid_unseen
    uses only the held-out test scenes (1-6 of each room type)."""
    train = [plans[n] for n in C.TRAIN_SCENE_NUMBERS if n in plans]
    unseen = [plans[n] for n in C.TEST_SCENE_NUMBERS if n in plans]
    return {"train": train, "valid_seen": train, "valid_unseen": unseen}


def _task_candidates(task_type: str, plan: FloorPlan) -> list[tuple[str, str, str]]:
    """(object, parent, toggle) triples that make a valid task of this type in this room."""
    if plan.room not in C.GOALS_VALID[task_type]:
        return []
    if task_type == "look_at_obj_in_light":
        if not any(s in plan.receptacles for s in _LAMP_STANDS):
            return []
        return [(o, "", lamp) for lamp in plan.lamps for o in plan.objects if _homes(plan, o, "")]
    needs = _APPLIANCE.get(task_type)
    if needs and needs[0] not in plan.receptacles:
        return []
    out = []
    for obj in plan.objects:
        if needs and obj not in C.VAL_ACTION_OBJECTS[needs[1]]:
            continue
        for parent in plan.receptacles:
            if obj in C.VAL_RECEPTACLE_OBJECTS[parent] and (not needs or parent != needs[0]):
                if _homes(plan, obj, parent):
                    out.append((obj, parent, ""))
    return out


def _homes(plan: FloorPlan, obj: str, parent: str) -> list[str]:
    """Receptacle types of the room where a task object may start: not the goal one."""
    return [r for r in plan.receptacles if r != parent and obj in C.VAL_RECEPTACLE_OBJECTS[r]]


def _receptacle_id(rtype: str, n: int) -> str:
    return _BASIN_IDS.get(rtype, "{t}_bar_{n}").format(t=rtype, n=n)


def sample_game(rng: random.Random, task_type: str, plans: list[FloorPlan], size: GameSize) -> GameSpec:
    """Pick a floor plan and a task of this type, then furnish the room."""
    options = [(plan, c) for plan in plans for c in _task_candidates(task_type, plan)]
    if not options:
        raise ValueError(f"no floor plan in this split supports {task_type}")
    plan, (obj, parent, toggle) = rng.choice(options)

    # Receptacles: the task's own ones first, then the room's others up to the size limit.
    required = {parent, rng.choice(_homes(plan, obj, parent))} - {""}
    if task_type in _APPLIANCE:
        required.add(_APPLIANCE[task_type][0])
    if toggle:
        required.add(next(s for s in _LAMP_STANDS if s in plan.receptacles))
    instances = [(t, k) for t, count in plan.receptacles.items() for k in range(1, count + 1)]
    rng.shuffle(instances)
    chosen = [inst for inst in instances if inst[0] in required and inst[1] == 1]
    room_left = max(size.max_receptacles - len(chosen), 0)
    chosen += [inst for inst in instances if inst not in chosen][:room_left]
    chosen.sort()
    receptacles = [(_receptacle_id(t, k), t) for t, k in chosen]

    spec = GameSpec(task_type, plan, obj, parent, toggle, receptacles=receptacles)
    counter = {"n": 0}

    def place(otype: str, where: list[tuple[str, str]]) -> None:
        counter["n"] += 1
        rid, _ = rng.choice(where)
        spec.objects.append((f"{otype}_bar_{counter['n']}", otype, rid))

    def holders(otype: str, exclude: str = "") -> list[tuple[str, str]]:
        return [(rid, t) for rid, t in receptacles if otype in C.VAL_RECEPTACLE_OBJECTS[t] and t != exclude]

    # Task objects never start in the goal receptacle, so no game is won at step 0.
    n_targets = rng.randint(2, max(2, size.max_instances)) if task_type == "pick_two_obj_and_place" else rng.randint(1, size.max_instances)
    for _ in range(n_targets):
        place(obj, holders(obj, exclude=parent))
    if toggle:
        stand = next(rid for rid, t in receptacles if t == next(s for s in _LAMP_STANDS if s in plan.receptacles))
        place(toggle, [(stand, "")])
    lo, hi = size.distractor_objects
    others = [o for o in plan.objects if o != obj and holders(o, exclude=parent if task_type != "look_at_obj_in_light" else "")]
    for otype in rng.sample(others, min(len(others), rng.randint(lo, hi))):
        for _ in range(rng.randint(1, size.max_instances)):
            place(otype, holders(otype))

    template = rng.choice(goal_library.gdict[task_type]["templates"])
    spec.task_desc = template.format(obj=obj.lower(), recep=parent.lower(), toggle=toggle.lower(), mrecep="")
    return spec


def problem_pddl(spec: GameSpec) -> str:
    """The PDDL problem of a game, with the facts alfworld's domain (alfred.pddl) reads."""
    rtypes = sorted({t for _, t in spec.receptacles} | ({spec.parent_target} - {""}))
    otypes = sorted({t for _, t, _ in spec.objects} | {spec.object_target})
    locations = {rid: f"loc_bar_{i}" for i, (rid, _) in enumerate(spec.receptacles, start=1)}
    start = "loc_bar_0"  # the middle of the room, where no receptacle stands

    objects = ["agent1 - agent", f"{start} - location"]
    objects += [f"{loc} - location" for loc in locations.values()]
    objects += [f"{rid} - receptacle" for rid, _ in spec.receptacles]
    objects += [f"{oid} - object" for oid, _, _ in spec.objects]
    objects += [f"{t}Type - rtype" for t in rtypes] + [f"{t}Type - otype" for t in otypes]

    init = ["(= (total-cost) 0)", f"(atLocation agent1 {start})"]
    for rid, rtype in spec.receptacles:
        init += [f"(receptacleType {rid} {rtype}Type)", f"(receptacleAtLocation {rid} {locations[rid]})"]
        if rtype in C.OPENABLE_CLASS_SET:
            init.append(f"(openable {rid})")
    init += [
        f"(canContain {r}Type {o}Type)" for r in rtypes for o in otypes if o in C.VAL_RECEPTACLE_OBJECTS.get(r, ())
    ]
    for oid, otype, rid in spec.objects:
        init += [f"(objectType {oid} {otype}Type)", f"(inReceptacle {oid} {rid})", f"(objectAtLocation {oid} {locations[rid]})"]
        if otype in _LAMPS:
            init.append(f"(toggleable {oid})")
            continue
        init.append(f"(pickupable {oid})")
        if otype in C.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {oid})")
        for table, predicate in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"), ("Sliceable", "sliceable")):
            if otype in C.VAL_ACTION_OBJECTS[table]:
                init.append(f"({predicate} {oid})")

    goal = goal_library.gdict[spec.task_type]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep=""
    )
    goal = goal.replace("#", "-")  # the goal library writes types as "?x # type"
    sep = "\n        "
    return (
        f"(define (problem {spec.floor_plan.name.lower()}_{spec.task_type})\n"
        f"    (:domain alfred)\n"
        f"    (:objects{sep}{sep.join(objects)}\n    )\n"
        f"    (:init{sep}{sep.join(init)}\n    )\n"
        f"{goal.strip()}\n"
    )


def traj_data(spec: GameSpec, trial: str) -> dict:
    """The subset of ALFRED's traj_data.json that alfworld and a3t read."""
    return {
        "task_id": trial,
        "task_type": spec.task_type,
        "scene": {"floor_plan": spec.floor_plan.name, "scene_num": spec.floor_plan.number},
        "pddl_params": {
            "object_target": spec.object_target,
            "parent_target": spec.parent_target,
            "toggle_target": spec.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "turk_annotations": {"anns": [{"task_desc": spec.task_desc.capitalize() + ".", "high_descs": []}]},
        "generator": "a3t",
    }


def game_data(spec: GameSpec, problem: str, walkthrough: list[str] | None) -> dict:
    """A ``game.tw-pddl`` document exactly as alfworld-generate writes one."""
    grammar = Path(ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", spec.task_desc)
    return {
        "pddl_domain": Path(ALFRED_PDDL_PATH).read_text(),
        "grammar": grammar,
        "pddl_problem": problem,
        "solvable": walkthrough is not None,
        "walkthrough": walkthrough,
    }


def trial_dir(root: Path, split: str, spec: GameSpec, index: int) -> Path:
    """Official naming: <task>-<Object>-<MovableRecep>-<Parent>-<scene>/trial_<id>."""
    parent = spec.parent_target or spec.toggle_target
    task_dir = f"{spec.task_type}-{spec.object_target}-None-{parent}-{spec.floor_plan.number}"
    return root / "json_2.1.1" / split / task_dir / f"trial_a3t_{index:05d}"


def write_game(directory: Path, spec: GameSpec, problem: str, walkthrough: list[str]) -> Path:
    """Write the three files of a game; each file appears whole or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "traj_data.json": json.dumps(traj_data(spec, directory.name), indent=2),
        "initial_state.pddl": problem,
        "game.tw-pddl": json.dumps(game_data(spec, problem, walkthrough)),
    }
    for name, text in files.items():  # game.tw-pddl last: its presence marks a finished game
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, directory / name)
    return directory / "game.tw-pddl"


# A generated plan longer than this is rejected: the agent gets 50 steps (ReAct, A3T).
MAX_PLAN_STEPS = 40
_MAX_ATTEMPTS = 30


def _plan_in_child(conn, data: dict) -> None:
    from a3t.envs.alfworld import _engine

    try:
        engine = _engine(request_walkthrough=True)
        engine.load(data)
        conn.send(list(engine.reset()["policy_commands"] or []))
    except BaseException:  # no plan: Fast Downward raises, or its translator exits
        conn.send(None)


def plan(data: dict, timeout_s: float) -> list[str] | None:
    """Fast Downward's plan for a game, or None when it finds none within timeout_s.
    The planner runs in a child process: a hard search (two objects in a crowded room
    can take minutes) cannot be interrupted inside the C++ library, only killed."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_plan_in_child, args=(sender, data))
    child.start()
    sender.close()
    try:
        return receiver.recv() if receiver.poll(timeout_s) else None
    except EOFError:  # the child died without answering
        return None
    finally:
        child.kill()
        child.join()


def solve(spec: GameSpec, problem: str, timeout_s: float) -> list[str] | None:
    """Plan, then replay the plan through the environment API to check that it wins."""
    from a3t.envs.alfworld import AlfWorldEnv, GameFile

    data = game_data(spec, problem, None)
    walkthrough = plan(data, timeout_s)
    if not walkthrough or len(walkthrough) > MAX_PLAN_STEPS:
        return None
    env = AlfWorldEnv(GameFile(Path("<generated>"), spec.task_type, data, walkthrough), phrasing="move")
    env.reset()
    won = [env.step(action).won for action in walkthrough]
    return walkthrough if won[-1] else None


@dataclass(frozen=True)
class GameJob:
    root: Path
    split: str
    index: int
    seed: int
    size: str
    plan_timeout_s: float


def make_game(job: GameJob) -> tuple[Path, bool]:
    """Sample, solve and write game ``index`` of a split; (path, True if newly written).
    The same job always gives the same game, so a rerun skips games already on disk."""
    rng = random.Random(f"{job.seed}:{job.split}:{job.index}")
    task_type = TASK_TYPES[job.index % len(TASK_TYPES)]
    plans = split_floor_plans(load_floor_plans())[job.split]
    for _ in range(_MAX_ATTEMPTS):
        spec = sample_game(rng, task_type, plans, SIZES[job.size])
        directory = trial_dir(job.root, job.split, spec, job.index)
        if (directory / "game.tw-pddl").exists():
            return directory / "game.tw-pddl", False
        problem = problem_pddl(spec)
        walkthrough = solve(spec, problem, job.plan_timeout_s)
        if walkthrough is not None:
            return write_game(directory, spec, problem, walkthrough), True
    raise RuntimeError(f"{job.split} game {job.index}: no solvable {task_type} game in {_MAX_ATTEMPTS} tries")


def game_jobs(
    root: str | Path, counts: dict[str, int], seed: int, size: str, plan_timeout_s: float = 20.0
) -> list[GameJob]:
    if size not in SIZES:
        raise ValueError(f"unknown game size {size!r}; choose one of {', '.join(SIZES)}")
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {', '.join(sorted(unknown))}; splits are {', '.join(SPLITS)}")
    return [GameJob(Path(root), split, i, seed, size, plan_timeout_s) for split, n in counts.items() for i in range(n)]


def generate_games(jobs: list[GameJob], workers: int = 1) -> Iterator[tuple[GameJob, Path, bool]]:
    """Make the games of ``jobs`` on ``workers`` processes, yielding each as it is done."""
    if workers <= 1:
        for job in jobs:
            yield (job, *make_game(job))
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(make_game, job): job for job in jobs}
        for future in as_completed(futures):
            yield (futures[future], *future.result())


def generate_configured_games(games: GamesConfig, root: Path, label: str) -> dict[str, int]:
    """The games the ``games`` settings ask for, under ``root`` (games that are there already are
    kept), with a progress bar. Returns the number of games per split and how many were new."""
    from a3t.progress import step_bar

    jobs = game_jobs(root, games.counts(), games.seed, games.size, games.plan_timeout_s)
    new = {split: 0 for split in games.counts()}
    with step_bar(label, len(jobs)) as advance:
        for job, _, written in generate_games(jobs, games.workers):
            new[job.split] += written
            advance()
    return {"games": games.counts(), "new": new}
