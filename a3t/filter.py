"""Filter: which trajectories a round trains on, and how much each one counts.

Rewards are binarized (success = 1, else 0; the ``raw`` loss keeps WebShop's real-valued
reward), each task's trajectories form a group whose mean reward is the baseline, and each
trajectory gets one weight (``trajectory_weight``). Trajectories of weight 0 teach nothing
and are left out.

The weight and the baseline are computed once, over everything the rounds collected, and
written into each kept record (``Trajectory.weight`` / ``.baseline`` in a round's
``train_set.jsonl``). Training reads them from there: weighing the kept records again would
compute the baselines over a set the filter already thinned, which for ``raw`` gives other
weights (rewards 1, .5, .25, .25 give baseline .5 and weights 1.5, .5, 0, 0; the two kept
records alone would give baseline .75 and weights 1.25, .25).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

from a3t.trajectory import Trajectory

LossVariant = Literal["pg", "sft", "raw"]


def reward_of(t: Trajectory, variant: LossVariant) -> float:
    # Binarized (paper): success 1, everything else 0. ``raw`` keeps WebShop's real reward.
    return t.reward if variant == "raw" else float(t.success)


def task_baselines(trajectories: list[Trajectory], variant: LossVariant) -> dict[str, float]:
    """Mean reward of each task's group of trajectories (all rounds together)."""
    rewards: dict[str, list[float]] = defaultdict(list)
    for t in trajectories:
        rewards[t.task_id].append(reward_of(t, variant))
    return {task: sum(r) / len(r) for task, r in rewards.items()}


def trajectory_weight(reward: float, baseline: float, variant: LossVariant) -> float:
    """The factor on a trajectory's log-likelihood.

    sft: 1 for a success, 0 otherwise (behaviour cloning on successes).
    pg (A3T): (reward - task baseline) + reward: the policy-gradient term with a per-task
        baseline plus the SFT term on successes. A failure of a task that also has
        successes gets -baseline < 0; a task with only successes is plain SFT (weight 1).
    raw: as pg with the real-valued reward.
    """
    if variant == "sft":
        return 1.0 if reward >= 1.0 else 0.0
    return (reward - baseline) + reward


def filter_trajectories(trajectories: list[Trajectory], variant: LossVariant) -> list[Trajectory]:
    """The trajectories with a non-zero weight, in order, each a copy carrying its weight and
    its task's baseline. Records that already carry a weight come from a training set the
    filter wrote: they are returned as they are (never weighed twice). A mix of weighed and
    unweighed records is an error: their baselines would not be over the same set."""
    weighed = [t.weight is not None for t in trajectories]
    if all(weighed):
        return list(trajectories)
    if any(weighed):
        first = trajectories[weighed.index(True)].episode_id
        raise ValueError(f"some trajectories already carry a weight (e.g. {first}) and others do not: "
                         "pass either a round's train_set.jsonl or the trajectories it was built from")
    baselines = task_baselines(trajectories, variant)
    kept = []
    for t in trajectories:
        baseline = baselines[t.task_id]
        weight = trajectory_weight(reward_of(t, variant), baseline, variant)
        if weight != 0.0:
            kept.append(t.model_copy(update={"weight": weight, "baseline": baseline}))
    return kept
