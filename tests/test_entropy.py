"""Normalised entropy of distributions over cells, against hand-computed values, in NumPy, float32 and bfloat16."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lavender.eval.entropy import normalised_entropy


def _cells(values, side=4):
    p = np.zeros(side * side)
    p[: len(values)] = values
    return p.reshape(side, side)


CASES = [  # (distribution over a 4 x 4 map, expected H / log 16)
    (np.full((4, 4), 1 / 16), 1.0),
    (_cells([1.0]), 0.0),
    (_cells([0.5, 0.5]), math.log(2) / math.log(16)),  # two equal cells: 0.25
    # 0.5, 0.25, 0.25: H = 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2; log 16 = 4 log 2
    (_cells([0.5, 0.25, 0.25]), 1.5 / 4),
    (_cells([0.25] * 4), 0.5),  # four equal cells: log 4 / log 16
]


@pytest.mark.parametrize("p, expected", CASES)
def test_numpy_hand_values(p, expected):
    got = normalised_entropy(p)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("p, expected", CASES)
def test_tensor_hand_values(p, expected, dtype, tol):
    # every value above is a power of two, exact in bfloat16 too
    t = torch.as_tensor(p).to(dtype)
    got = normalised_entropy(t)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, abs=tol)


def test_bfloat16_distribution_whose_sum_drifted():
    """A random distribution over 32 x 32 cells rounded to bfloat16 no longer sums to 1; its entropy is read
    from the rounded values divided by their sum, within bfloat16's precision of the float64 value."""
    rng = np.random.default_rng(0)
    p = rng.gamma(0.3, size=(32, 32))
    p /= p.sum()
    rounded = torch.as_tensor(p).to(torch.bfloat16)
    assert abs(float(rounded.double().sum()) - 1) > 1e-5
    assert float(normalised_entropy(rounded)) == pytest.approx(normalised_entropy(p), abs=5e-3)
    assert float(normalised_entropy(rounded)) == pytest.approx(normalised_entropy(rounded.double().numpy()),
                                                                abs=1e-5)


def test_batches_scale_and_one_dimensional_cells():
    stack = np.stack([c for c, _ in CASES])  # (5, 4, 4)
    expected = np.array([e for _, e in CASES])
    np.testing.assert_allclose(normalised_entropy(stack), expected, atol=1e-12)
    np.testing.assert_allclose(normalised_entropy(torch.as_tensor(stack * 7.0, dtype=torch.float32)).numpy(),
                               expected, atol=1e-6)  # unnormalised input is divided by its sum
    flat = stack.reshape(5, 16)
    np.testing.assert_allclose(normalised_entropy(flat, cell_dims=1), expected, atol=1e-12)
    # cells over the last three axes: (2, 2, 4) is 16 cells too
    assert normalised_entropy(_cells([0.5, 0.5]).reshape(2, 2, 4), cell_dims=3) == pytest.approx(0.25)
    # a batch of two 2 x 2 maps is not one 8-cell map
    pair = np.array([[[1, 1], [0, 0]], [[1, 1], [1, 1]]], float)
    np.testing.assert_allclose(normalised_entropy(pair), [0.5, 1.0])


def test_refuses_what_is_no_distribution():
    with pytest.raises(ValueError, match="negative"):
        normalised_entropy(np.array([[0.5, -0.1], [0.3, 0.3]]))
    with pytest.raises(ValueError, match="no mass"):
        normalised_entropy(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="no mass"):
        normalised_entropy(torch.stack([torch.ones(2, 2), torch.zeros(2, 2)]))
    with pytest.raises(ValueError, match="non-finite"):
        normalised_entropy(torch.tensor([[float("nan"), 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 cells"):
        normalised_entropy(np.ones((1, 1)))
    with pytest.raises(ValueError, match="cell_dims"):
        normalised_entropy(np.ones(4), cell_dims=2)
