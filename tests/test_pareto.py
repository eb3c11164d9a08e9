"""Pareto code against brute force on exhaustive small grids, plus invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoquant.pareto import dominates, hypervolume, knee_index, non_dominated_mask

DIRS = ["maximize", "minimize"]


def brute_force_front(values, directions):
    signs = np.array([-1 if d == "maximize" else 1 for d in directions])
    loss = values * signs
    keep = []
    for i in range(len(loss)):
        dominated = any(
            np.all(loss[j] <= loss[i]) and np.any(loss[j] < loss[i])
            for j in range(len(loss))
            if j != i
        )
        keep.append(not dominated)
    return np.array(keep)


@pytest.mark.parametrize("n_objectives", [2, 3])
def test_exhaustive_small_grid(n_objectives):
    """Every subset of a 3-level grid in 2 objectives (and a sample in 3) matches brute force."""
    levels = [0.0, 1.0, 2.0]
    grid = np.array(list(itertools.product(levels, repeat=n_objectives)))
    directions = (DIRS * 2)[:n_objectives]
    rng = np.random.default_rng(0)
    subsets = (
        itertools.chain.from_iterable(
            itertools.combinations(range(len(grid)), k) for k in range(1, len(grid) + 1)
        )
        if n_objectives == 2
        else (rng.choice(len(grid), size=rng.integers(1, 12), replace=True) for _ in range(3000))
    )
    count = 0
    for subset in subsets:
        values = grid[list(subset)]
        assert np.array_equal(
            non_dominated_mask(values, directions), brute_force_front(values, directions)
        )
        count += 1
    assert count >= 511 if n_objectives == 2 else count == 3000


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=25), st.randoms()
)
def test_front_invariants(points, rnd):
    values = np.array(points, dtype=float)
    mask = non_dominated_mask(values, DIRS)
    assert mask.any()
    front = values[mask]
    for a in values:
        for b in front:
            assert not dominates(a, b, DIRS)
    order = list(range(len(values)))
    rnd.shuffle(order)
    assert np.array_equal(non_dominated_mask(values[order], DIRS), mask[order])


def test_duplicates_are_all_kept():
    values = np.array([[0.9, 10.0], [0.9, 10.0], [0.8, 20.0]])
    assert non_dominated_mask(values, DIRS).tolist() == [True, True, False]


def test_hypervolume_known_values():
    # accuracy up, size down, reference (0, 100): rectangles 0.9*50 and (0.5-0)*(100-50) overlap
    values = np.array([[0.9, 50.0], [0.5, 10.0]])
    expected = 0.9 * (100 - 50) + 0.5 * (50 - 10)
    assert hypervolume(values, DIRS, [0.0, 100.0]) == pytest.approx(expected)
    assert hypervolume(values[:1], DIRS, [0.0, 100.0]) == pytest.approx(45.0)
    assert hypervolume(np.array([[0.9, 150.0]]), DIRS, [0.0, 100.0]) == 0.0
    dominated_added = np.vstack([values, [[0.4, 60.0]]])
    assert hypervolume(dominated_added, DIRS, [0.0, 100.0]) == pytest.approx(expected)


def test_knee_is_the_balanced_point():
    values = np.array([[1.0, 100.0], [0.95, 20.0], [0.5, 10.0]])
    assert knee_index(values, DIRS) == 1
