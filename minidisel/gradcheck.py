"""Check gradients of functions of parameter trees against central finite differences.

``check_gradients(f, params)`` compares autograd's gradient of a scalar
function ``f(params)`` with ``(f(p + h e_i) - f(p - h e_i)) / 2h`` for every
scalar (or a random sample of them) of a nested dict of float64 arrays. The
central difference has truncation error ``h² |f'''| / 6`` and rounding error
about ``δf / h``, with ``δf`` the rounding error of ``f`` itself. ``h = 1e-6``
balances the two near 1e-10 when ``f`` is exact to an ulp or two and of order
1. A model's loss carries tens of ulps, which puts the rounding error near
1e-8, and a sharply curved ``f`` has a larger truncation error, which
``estimate_error=True`` measures for each entry.
"""

import numpy as np
from autograd import grad

from minidisel.tree import flatten, unflatten


def numerical_gradient(f, params, h=1e-6, paths=None, max_entries=None, rng=None):
    """Return central finite differences of ``f`` at ``params`` as ``{path: (indices, values)}``.

    ``paths`` restricts the check to some dotted paths; ``max_entries`` samples
    at most that many entries per tensor with ``rng``.
    """
    flat = {path: np.asarray(value, dtype=np.float64) for path, value in flatten(params).items()}
    unknown = [path for path in paths or () if path not in flat]
    if unknown:
        raise ValueError(f"paths {unknown} are not in params; its tensors are {', '.join(flat)}")
    differences = {}
    for path in paths or flat:
        indices = list(np.ndindex(flat[path].shape))
        if max_entries is not None and len(indices) > max_entries:
            rng = rng or np.random.default_rng(0)
            indices = [indices[i] for i in rng.choice(len(indices), max_entries, replace=False)]
        differences[path] = (indices, np.array([central_difference(f, flat, path, index, h) for index in indices]))
    return differences


def central_difference(f, flat, path, index, h):
    """Return ``(f(p + h e) - f(p - h e)) / 2h`` for one entry ``index`` of tensor ``path``."""
    values = []
    for step in (h, -h):
        shifted = dict(flat)
        shifted[path] = flat[path].copy()
        shifted[path][index] += step
        value = f(unflatten(shifted))
        if np.ndim(value) != 0:
            raise ValueError(f"f must return a scalar, got an array of shape {np.shape(value)}")
        values.append(float(value))
    return (values[0] - values[1]) / (2.0 * h)


def check_gradients(
    f, params, h=1e-6, rtol=1e-6, atol=1e-9, paths=None, max_entries=None, rng=None, estimate_error=False
):
    """Compare autograd's gradient of ``f`` with finite differences; return the worst error per tensor.

    Raises ``AssertionError`` naming the tensor and entry where
    ``|analytic - numeric| > atol + rtol·|numeric|``. With ``estimate_error``
    each entry's bound also grows by ``|D(2h) - D(h)|``, the gap between the
    central differences at steps 2h and h. The gap is three times the
    truncation error of ``D(h)``, so a sharply curved ``f`` does not fail a
    correct gradient, while a wrong gradient still fails whenever its error
    exceeds the gap.
    """
    for path, value in flatten(params).items():
        if np.asarray(value).dtype != np.float64:
            raise TypeError(f"gradient checks need float64 parameters; {path!r} is {np.asarray(value).dtype}")
    analytic = flatten(grad(f)(params))
    numeric = numerical_gradient(f, params, h, paths, max_entries, rng)
    gaps = step_gaps(f, params, h, numeric) if estimate_error else {}
    worst = {}
    for path, (indices, values) in numeric.items():
        got = np.array([analytic[path][index] for index in indices])
        error = np.abs(got - values)
        bad = np.flatnonzero(error > atol + rtol * np.abs(values) + gaps.get(path, 0.0))
        if bad.size:
            i = bad[0]
            raise AssertionError(
                f"gradient of {path}{list(indices[i])}: autograd {got[i]:.10g}, finite differences {values[i]:.10g}"
            )
        worst[path] = float(error.max()) if error.size else 0.0
    return worst


def step_gaps(f, params, h, numeric):
    """Return ``|D(2h) - D(h)|`` for each entry that ``numeric`` checked at step ``h``.

    With ``D(h) = f' + c h² + O(h⁴)`` the gap is ``3 |c| h²``, three times the
    truncation error of ``D(h)``.
    """
    flat = {path: np.asarray(value, dtype=np.float64) for path, value in flatten(params).items()}
    gaps = {}
    for path, (indices, values) in numeric.items():
        wide = np.array([central_difference(f, flat, path, index, 2.0 * h) for index in indices])
        gaps[path] = np.abs(wide - values)
    return gaps
