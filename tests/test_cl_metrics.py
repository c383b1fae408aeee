"""Continual-learning metrics against hand-computed accuracy matrices."""
import pytest

from mas_fast.cl.metrics import (average_accuracy, backward_transfer, forgetting, mean_std,
                                 seen_task_accuracy, summarise)

# R[i][j]: accuracy on task j after training task i. Task 0 improves after task 1 (0.95),
# then drops to 0.5, so forgetting (from the best) differs from BWT (from the diagonal).
R3 = [[0.90, 0.10, 0.20],
      [0.95, 0.80, 0.30],
      [0.50, 0.70, 0.95]]


def test_three_tasks_by_hand():
    assert average_accuracy(R3) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert backward_transfer(R3) == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)  # -0.25
    assert forgetting(R3) == pytest.approx(((0.95 - 0.50) + (0.80 - 0.70)) / 2)        # 0.275
    assert seen_task_accuracy(R3) == pytest.approx([0.90, (0.95 + 0.80) / 2, (0.50 + 0.70 + 0.95) / 3])
    assert summarise(R3) == pytest.approx({"acc": 2.15 / 3, "bwt": -0.25, "forgetting": 0.275})


def test_positive_backward_transfer_and_negative_forgetting():
    R = [[0.5, 0.0],
         [0.7, 0.9]]
    assert backward_transfer(R) == pytest.approx(0.2)
    assert forgetting(R) == pytest.approx(-0.2)
    assert average_accuracy(R) == pytest.approx(0.8)


def test_entries_above_the_diagonal_do_not_matter():
    changed = [row[:] for row in R3]
    changed[0][1], changed[0][2], changed[1][2] = 0.99, 0.0, 0.42
    assert summarise(changed) == pytest.approx(summarise(R3))


def test_single_task_has_no_transfer():
    assert backward_transfer([[0.8]]) == 0.0
    assert forgetting([[0.8]]) == 0.0
    assert average_accuracy([[0.8]]) == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[0.1], [0.2]], [0.1, 0.2]])
def test_non_square_matrices_are_refused(bad):
    with pytest.raises(ValueError, match="square"):
        average_accuracy(bad)


def test_mean_std_uses_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
