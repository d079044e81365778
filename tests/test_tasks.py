import numpy as np
import pytest

from minidisel.tasks import ADD, BOS, REV, SEP, make_task, sample_batch


def test_disjoint_task_rules():
    task = make_task("disjoint")
    rng = np.random.default_rng(0)
    for dist, digits in (("P", set(range(5))), ("Q", set(range(5, 10)))):
        tokens = task.samplers[dist](rng, 20)
        assert np.all(tokens[:, 0] == BOS)
        assert np.all(tokens[:, 7] == SEP)
        x, y = tokens[:, 1:7], tokens[:, 8:]
        assert set(np.unique(x)) <= digits
        expected = x[:, ::-1] if dist == "P" else (x[:, ::-1] + 1) % 5
        assert np.array_equal(y, expected)


def test_overlap_task_shares_digits():
    task = make_task("overlap-2")
    q = task.samplers["Q"](np.random.default_rng(1), 200)
    assert set(np.unique(q[:, 1:7])) == set(range(3, 8))


def test_shared_task_uses_markers():
    task = make_task("shared")
    rng = np.random.default_rng(2)
    p, q = task.samplers["P"](rng, 10), task.samplers["Q"](rng, 10)
    assert np.all(p[:, 1] == REV)
    assert np.all(q[:, 1] == ADD)
    assert np.array_equal(q[:, 9:], (q[:, 2:8] + 1) % 10)


def test_markov_rows_are_distributions():
    task = make_task("markov")
    tokens = task.samplers["P"](np.random.default_rng(3), 5)
    assert tokens.shape == (5, task.seq_len)
    assert np.all(tokens[:, 0] == BOS)
    assert tokens[:, 1:].max() < 10
    assert not task.has_answers
    assert task.scored.all()


def test_batch_scores_answer_digits():
    task = make_task("disjoint")
    batch = sample_batch(task, "P", np.random.default_rng(4), 3)
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (3, 13)
    assert batch["mask"][0].tolist() == [False] * 7 + [True] * 6
    assert np.all(batch["inputs"][:, 7] == SEP)


@pytest.mark.parametrize("name", ["reverse", "overlap-6", "overlap-", "", "Disjoint"])
def test_unknown_task_rejected(name):
    with pytest.raises(ValueError, match="unknown task"):
        make_task(name)


def test_unknown_distribution_rejected():
    with pytest.raises(ValueError, match="dist must be 'P' or 'Q', got 'R'"):
        sample_batch(make_task("markov"), "R", np.random.default_rng(0), 2)
