"""Fit the rational approximation of erf that the fused float32 GELU uses.

The fused GELU needs ``erf`` on every activation of the MLP, and SciPy's
``erf`` (a scalar routine applied element by element) costs about 3 ms per
(32, 32, 256) array here, more than all other element-wise work of a training
step. For float32 inputs :func:`minidisel.fused.normal_cdf` instead evaluates

    erf(t) ≈ t P(t²) / Q(t²)   on |t| <= 4,   erf(t) = ±1 beyond,

in float64 with NumPy, where ``P`` has degree 7 and ``Q`` degree 7 with
``Q(0) = 1``. Beyond 4, ``1 - erf(t) < 1.6e-8`` is below half a float32 ulp
of 1, so ±1 is the correctly rounded float32 value.

This script finds ``P`` and ``Q`` by iteratively reweighted linear least
squares on the relative error (a Loeb-style linearisation with Lawson
weights), prints the coefficients and their maximum relative error on a
fine grid, and needs only NumPy and SciPy:

    python benchmarks/fit_erf.py
"""

import numpy as np
from scipy.special import erf

NUMERATOR_DEGREE = 7
DENOMINATOR_DEGREE = 7
CLIP = 4.0
ITERATIONS = 40


def fit_points():
    """Return fit points on (0, CLIP]: a uniform grid plus Chebyshev points, which crowd at the ends."""
    uniform = np.linspace(0.0, CLIP, 20_001)[1:]
    chebyshev = (np.cos(np.linspace(0.0, np.pi, 4001)) + 1.0) * CLIP / 2
    t = np.unique(np.concatenate([uniform, chebyshev]))
    return t[t > 0]


def evaluate(P, Q, t):
    """Return ``t P(t²) / Q(t²)``; coefficients are in increasing powers."""
    s = t * t
    return t * np.polyval(P[::-1], s) / np.polyval(Q[::-1], s)


def fit():
    """Return ``(P, Q)`` minimising the maximum relative error of ``t P(t²) / Q(t²)`` against erf."""
    t = fit_points()
    s, target = t * t, erf(t)
    weights, denominator = 1.0 / target, np.ones_like(t)
    for iteration in range(ITERATIONS):
        # linear in the coefficients: t P(s) - erf(t) (Q(s) - 1) ≈ erf(t), scaled by the last Q(s)
        columns = [t * s**i for i in range(NUMERATOR_DEGREE + 1)]
        columns += [-target * s**j for j in range(1, DENOMINATOR_DEGREE + 1)]
        scale = weights / denominator
        M = np.stack(columns, axis=1) * scale[:, None]
        norms = np.abs(M).max(axis=0)
        coefficients = np.linalg.lstsq(M / norms, target * scale, rcond=None)[0] / norms
        P = coefficients[: NUMERATOR_DEGREE + 1]
        Q = np.concatenate([[1.0], coefficients[NUMERATOR_DEGREE + 1 :]])
        denominator = np.polyval(Q[::-1], s)

        # Lawson step: weight the points with large errors more, towards the minimax fit
        error = np.abs(evaluate(P, Q, t) / target - 1.0)
        if iteration >= 5:
            weights = weights * np.sqrt(error / error.max() + 1e-3)
    return P, Q


def main():
    P, Q = fit()
    t = np.linspace(1e-6, CLIP, 4_000_001)
    error = np.max(np.abs(evaluate(P, Q, t) / erf(t) - 1.0))
    print(f"numerator   (increasing powers of t²): {[float(c) for c in P]}")
    print(f"denominator (increasing powers of t²): {[float(c) for c in Q]}")
    print(f"maximum relative error on (0, {CLIP}]: {error:.3g}")


if __name__ == "__main__":
    main()
