"""A3T's loss by hand: weighted_nll on tiny tensors, trajectory weights and task baselines.

Expected values are computed here with math.log from logits whose softmax is obvious
(rows like [ln 2, 0, 0] -> probabilities 1/2, 1/4, 1/4), not with the torch ops the
library uses.
"""

from __future__ import annotations

import math

import pytest
import torch

from a3t.filter import filter_trajectories, reward_of, task_baselines, trajectory_weight
from a3t.train import weighted_nll
from a3t.trajectory import Trajectory
from factories import make_trajectory

LN2, LN3 = math.log(2), math.log(3)

# B=2 trajectories, T=3 tokens, V=3. Position t predicts token t+1; the last position's
# logits are never used (they are set absurd to show it).
LOGITS = torch.tensor(
    [
        [[LN2, 0.0, 0.0], [0.0, 0.0, 0.0], [50.0, -50.0, 7.0]],  # p = (1/2,1/4,1/4), (1/3,1/3,1/3)
        [[LN3, LN2, 0.0], [0.0, LN2, 0.0], [-9.0, 9.0, 3.0]],  # p = (3/6,2/6,1/6), (1/4,2/4,1/4)
    ]
)
# labels[:, 0] is never predicted; -100 elsewhere is "not in the loss".
LABELS = torch.tensor([[-100, 0, 2], [-100, 1, 1]])
# log p of each in-loss token, by hand
LP = {
    (0, 1): math.log(1 / 2),  # token 0 under (1/2, 1/4, 1/4)
    (0, 2): math.log(1 / 3),  # token 2 under uniform
    (1, 1): math.log(2 / 6),  # token 1 under (3/6, 2/6, 1/6)
    (1, 2): math.log(2 / 4),  # token 1 under (1/4, 2/4, 1/4)
}


def per_token_weights(w0: float, w1: float, T: int = 3) -> torch.Tensor:
    return torch.tensor([[w0] * T, [w1] * T])


def test_log_probs_by_hand_match_the_logits():
    """Sanity check of the hand values themselves (log-softmax of the chosen rows)."""
    logp = torch.log_softmax(LOGITS, dim=-1)
    for (b, t), expected in LP.items():
        assert logp[b, t - 1, LABELS[b, t]].item() == pytest.approx(expected, abs=1e-6)


def test_sft_equals_plain_nll():
    # sft: every trajectory in the batch is a success with weight 1
    loss = weighted_nll(LOGITS, LABELS, per_token_weights(1.0, 1.0))
    expected = -sum(LP.values()) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx((LN2 + LN3) / 2, abs=1e-12)  # -(ln1/2 + ln1/3 + ln1/3 + ln1/2)/4
    plain = torch.nn.functional.cross_entropy(LOGITS[:, :-1].reshape(-1, 3), LABELS[:, 1:].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)


def test_pg_gives_a_failed_trajectory_a_negative_weight():
    # task with 1 success + 3 failures: the success weighs 1.75, a failure -0.25
    loss = weighted_nll(LOGITS, LABELS, per_token_weights(1.75, -0.25))
    expected = -(1.75 * (LP[0, 1] + LP[0, 2]) - 0.25 * (LP[1, 1] + LP[1, 2])) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # the failed trajectory alone: loss = +0.25 * its mean log-prob (< 0); minimizing it lowers its likelihood
    alone = weighted_nll(LOGITS[1:], LABELS[1:], per_token_weights(-0.25, -0.25)[1:])
    assert alone.item() == pytest.approx(0.25 * (LP[1, 1] + LP[1, 2]) / 2, abs=1e-6)
    assert alone.item() < 0


def test_gradient_of_a_negative_weight_lowers_the_likelihood():
    logits = LOGITS[1:].clone().requires_grad_(True)
    loss = weighted_nll(logits, LABELS[1:], per_token_weights(-0.25, -0.25)[1:])
    (grad,) = torch.autograd.grad(loss, logits)
    # d loss / d logit of the target token at a position = -w/N * (1 - p) = +0.25/2 * (1 - p) > 0:
    # gradient descent lowers the target's logit, i.e. its probability
    assert grad[0, 0, 1].item() == pytest.approx(0.25 / 2 * (1 - 2 / 6), abs=1e-6)
    assert grad[0, 1, 1].item() == pytest.approx(0.25 / 2 * (1 - 2 / 4), abs=1e-6)
    assert grad[0, 2].abs().sum().item() == 0.0  # the last position predicts nothing


def test_raw_uses_the_real_reward():
    # rewards 0.5 and 1.0 of one task: baseline 0.75, weights 0.25 and 1.25
    loss = weighted_nll(LOGITS, LABELS, per_token_weights(0.25, 1.25))
    expected = -(0.25 * (LP[0, 1] + LP[0, 2]) + 1.25 * (LP[1, 1] + LP[1, 2])) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_ignored_labels_count_neither_in_sum_nor_denominator():
    labels = torch.tensor([[-100, 0, -100], [-100, -100, 1]])
    loss = weighted_nll(LOGITS, labels, per_token_weights(1.0, 3.0))
    expected = -(1.0 * LP[0, 1] + 3.0 * LP[1, 2]) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # a label at position 0 is never predicted (nothing precedes it): it does not count either
    labels0 = labels.clone()
    labels0[0, 0] = 2
    assert weighted_nll(LOGITS, labels0, per_token_weights(1.0, 3.0)).item() == pytest.approx(expected, abs=1e-6)
    # nothing in the loss: 0, not NaN
    empty = weighted_nll(LOGITS, torch.full_like(LABELS, -100), per_token_weights(1.0, 1.0))
    assert empty.item() == 0.0


def test_num_items_in_batch_overrides_the_denominator():
    weights = per_token_weights(1.0, 1.0)
    for n in (10, torch.tensor(10)):
        loss = weighted_nll(LOGITS, LABELS, weights, num_items=n)
        assert loss.item() == pytest.approx(-sum(LP.values()) / 10, abs=1e-6)
    # gradient accumulation: micro-batches normalized by the step's token count add up to the big batch
    whole = weighted_nll(LOGITS, LABELS, per_token_weights(1.75, -0.25))
    parts = weighted_nll(LOGITS[:1], LABELS[:1], per_token_weights(1.75, -0.25)[:1], num_items=4) + weighted_nll(
        LOGITS[1:], LABELS[1:], per_token_weights(1.75, -0.25)[1:], num_items=4
    )
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_observation_tokens_in_or_out_of_the_loss():
    # trajectory 0: token 1 is the agent's turn, token 2 an observation
    with_obs = torch.tensor([[-100, 0, 2]])
    without_obs = torch.tensor([[-100, 0, -100]])
    w = torch.tensor([[1.75] * 3])
    assert weighted_nll(LOGITS[:1], with_obs, w).item() == pytest.approx(-1.75 * (LP[0, 1] + LP[0, 2]) / 2, abs=1e-6)
    assert weighted_nll(LOGITS[:1], without_obs, w).item() == pytest.approx(-1.75 * LP[0, 1], abs=1e-6)


def test_padding_weights_do_not_matter():
    """The collator pads weights with 0 and labels with -100: padded positions change nothing."""
    padded_logits = torch.cat([LOGITS, torch.zeros(2, 2, 3)], dim=1)
    padded_labels = torch.cat([LABELS, torch.full((2, 2), -100)], dim=1)
    padded_weights = torch.cat([per_token_weights(1.0, 2.0), torch.zeros(2, 2)], dim=1)
    assert weighted_nll(padded_logits, padded_labels, padded_weights).item() == pytest.approx(
        weighted_nll(LOGITS, LABELS, per_token_weights(1.0, 2.0)).item(), abs=1e-6
    )


# --- trajectory weights and task baselines ---------------------------------------------


def traj(task_id: str, success: bool, reward: float | None = None, n: int = 0) -> Trajectory:
    return make_trajectory(task_id, success, attempt=n, **({} if reward is None else {"reward": reward}))


def weights_of(trajectories, variant):
    baselines = task_baselines(trajectories, variant)
    return [trajectory_weight(reward_of(t, variant), baselines[t.task_id], variant) for t in trajectories]


def test_pg_one_success_three_failures():
    ts = [traj("a", True, n=0)] + [traj("a", False, n=i) for i in (1, 2, 3)]
    assert task_baselines(ts, "pg") == {"a": pytest.approx(0.25)}
    assert weights_of(ts, "pg") == pytest.approx([1.75, -0.25, -0.25, -0.25])
    # by the formula: (1 - 0.25) + 1 and (0 - 0.25) + 0
    assert trajectory_weight(1.0, 0.25, "pg") == pytest.approx(1.75)
    assert trajectory_weight(0.0, 0.25, "pg") == pytest.approx(-0.25)


def test_pg_only_successes_is_sft_and_only_failures_is_zero():
    ts = [traj("ok", True, n=0), traj("ok", True, n=1), traj("bad", False, n=0), traj("bad", False, n=1)]
    assert task_baselines(ts, "pg") == {"ok": 1.0, "bad": 0.0}
    assert weights_of(ts, "pg") == [1.0, 1.0, 0.0, 0.0]


def test_baselines_are_per_task_over_all_rounds():
    ts = [traj("a", True, n=0), traj("a", False, n=1), traj("b", True, n=0), traj("b", False, n=1), traj("b", False, n=2)]
    ts[1] = ts[1].model_copy(update={"round": 2})
    assert task_baselines(ts, "pg") == {"a": pytest.approx(0.5), "b": pytest.approx(1 / 3)}
    assert weights_of(ts, "pg") == pytest.approx([1.5, -0.5, 1 + 2 / 3, -1 / 3, -1 / 3])


def test_sft_weights():
    ts = [traj("a", True, n=0)] + [traj("a", False, n=i) for i in (1, 2, 3)] + [traj("b", False, n=0)]
    assert weights_of(ts, "sft") == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_binarized_variants_ignore_the_real_reward():
    ts = [traj("w", False, reward=0.5, n=0), traj("w", True, reward=1.0, n=1)]
    assert [reward_of(t, "pg") for t in ts] == [0.0, 1.0]
    assert [reward_of(t, "sft") for t in ts] == [0.0, 1.0]
    assert weights_of(ts, "pg") == pytest.approx([-0.5, 1.5])
    assert weights_of(ts, "sft") == [0.0, 1.0]


def test_raw_weights_with_real_rewards():
    ts = [traj("w", False, reward=0.5, n=0), traj("w", True, reward=1.0, n=1)]
    assert [reward_of(t, "raw") for t in ts] == [0.5, 1.0]
    assert task_baselines(ts, "raw") == {"w": pytest.approx(0.75)}
    # (0.5 - 0.75) + 0.5 and (1.0 - 0.75) + 1.0
    assert weights_of(ts, "raw") == pytest.approx([0.25, 1.25])


def test_the_filter_weighs_once_over_everything_collected():
    """raw: rewards 1, .5, .25, .25 give baseline .5 and weights 1.5, .5, 0, 0. The kept records
    carry them; weighing the kept two again would give baseline .75 and 1.25, .25."""
    ts = [traj("w", True, reward=r, n=i) if r == 1 else traj("w", False, reward=r, n=i)
          for i, r in enumerate([1.0, 0.5, 0.25, 0.25])]
    kept = filter_trajectories(ts, "raw")
    assert [t.episode_id for t in kept] == [ts[0].episode_id, ts[1].episode_id]
    assert [(t.weight, t.baseline) for t in kept] == [(1.5, 0.5), (0.5, 0.5)]
    assert filter_trajectories(kept, "raw") == kept  # a training set read back keeps its weights
    with pytest.raises(ValueError, match="already carry a weight"):
        filter_trajectories(kept + ts[2:], "raw")
