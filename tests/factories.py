"""The tests' one way to make a trajectory record: every field has a default a test overrides."""

from __future__ import annotations

from a3t.trajectory import StepRecord, Trajectory

LOOK = StepRecord(thought="I look.", action="look", observation="Nothing happens.")


def make_trajectory(task_id: str = "train/task/trial_0", success: bool = False, attempt: int = 0, round_: int = 0,
                    **fields) -> Trajectory:
    """Round ``round_``'s attempt ``attempt`` at ``task_id``: reward 1 or 0 and the terminal reason
    by ``success`` unless given; any other Trajectory field by keyword."""
    record = dict(
        episode_id=f"r{round_}/{task_id}#a{attempt}", task_id=task_id, game=f"games/{task_id}/game.tw-pddl",
        task_type="pick_and_place_simple", task="put a mug in desk", round=round_, attempt=attempt,
        source="policy", initial_observation="You are in the middle of a room.\n\nYour task is to: put a mug in desk.",
        steps=[LOOK], reward=float(success), success=success, terminal_reason="won" if success else "step_limit",
        model="tiny",
    )
    return Trajectory(**(record | fields))
