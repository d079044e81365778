"""Fit the rational approximation of the scaled complementary error function that the float32 GELU uses.

The fused GELU needs the normal CDF ``Φ`` on every activation of the MLP.
SciPy's ``erf`` and ``erfc`` (scalar routines applied element by element)
cost about 3 ms per (32, 32, 256) array here, more than all other
element-wise work of a training step. For float32 inputs
:func:`minidisel.fused.lower_tail` instead evaluates, in float32 NumPy
operations on the whole block,

    Φ(-|x|) = erfc(t) / 2 = exp(-t²) erfcx(t) / 2,   t = |x| / √2,
    erfcx(t) ≈ P(t) / Q(t)   on 0 <= t <= 10.5,

with ``P`` of degree 5 and ``Q`` of degree 6, ``Q(0) = 1``, and
``Φ(x) = 1 - Φ(-x)`` for positive ``x``. ``erfcx(t) = exp(t²) erfc(t)`` is
smooth and falls like ``1 / (t √π)``, so a low-degree rational fits it
closely, and working with ``erfc`` keeps the relative accuracy of small
``Φ(x)`` for negative ``x``, which ``(1 + erf) / 2`` loses to cancellation.
Beyond ``t = 10.5``, ``exp(-t²)`` is below float32's smallest subnormal.

This script finds ``P`` and ``Q`` by iteratively reweighted linear least
squares on the relative error (a linearised fit with Lawson weights), prints
the coefficients and their maximum relative error on a fine grid, and needs
only NumPy and SciPy:

    python benchmarks/fit_erfcx.py
"""

import numpy as np
from scipy.special import erfcx

NUMERATOR_DEGREE = 5
DENOMINATOR_DEGREE = 6
UPPER = 10.5
ITERATIONS = 60


def fit_points():
    """Return fit points on [0, UPPER]: a uniform grid plus Chebyshev points, which crowd at the ends."""
    uniform = np.linspace(0.0, UPPER, 20_001)
    chebyshev = (np.cos(np.linspace(0.0, np.pi, 4001)) + 1.0) * UPPER / 2
    return np.unique(np.concatenate([uniform, chebyshev]))


def evaluate(P, Q, t):
    """Return ``P(t) / Q(t)``; coefficients are in increasing powers."""
    return np.polyval(P[::-1], t) / np.polyval(Q[::-1], t)


def fit():
    """Return ``(P, Q)`` minimising the maximum relative error of ``P(t) / Q(t)`` against erfcx."""
    t = fit_points()
    target = erfcx(t)
    weights, denominator = 1.0 / target, np.ones_like(t)
    for iteration in range(ITERATIONS):
        # linear in the coefficients: P(t) - erfcx(t) (Q(t) - 1) ≈ erfcx(t), scaled by the last Q(t)
        columns = [t**i for i in range(NUMERATOR_DEGREE + 1)]
        columns += [-target * t**j for j in range(1, DENOMINATOR_DEGREE + 1)]
        scale = weights / denominator
        M = np.stack(columns, axis=1) * scale[:, None]
        norms = np.abs(M).max(axis=0)
        coefficients = np.linalg.lstsq(M / norms, target * scale, rcond=None)[0] / norms
        P = coefficients[: NUMERATOR_DEGREE + 1]
        Q = np.concatenate([[1.0], coefficients[NUMERATOR_DEGREE + 1 :]])
        denominator = np.polyval(Q[::-1], t)

        # Lawson step: weight the points with large errors more, towards the minimax fit
        error = np.abs(evaluate(P, Q, t) / target - 1.0)
        if iteration >= 5:
            weights = weights * np.sqrt(error / error.max() + 1e-3)
    return P, Q


def main():
    P, Q = fit()
    t = np.linspace(0.0, UPPER, 4_000_001)
    error = np.max(np.abs(evaluate(P, Q, t) / erfcx(t) - 1.0))
    print(f"numerator   (increasing powers of t): {[float(c) for c in P]}")
    print(f"denominator (increasing powers of t): {[float(c) for c in Q]}")
    print(f"maximum relative error on [0, {UPPER}]: {error:.3g}")


if __name__ == "__main__":
    main()
