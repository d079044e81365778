"""Fused layer functions with hand-written gradients: the fast path of the model.

Each function here computes what the textbook formula of the same name in
:mod:`minidisel.nn` or :mod:`minidisel.adapters` computes, but as one autograd
primitive with its vector-Jacobian product (VJP) written by hand. autograd then
records one node per layer instead of one per small array operation, and the
backward pass runs a few large NumPy calls instead of many small ones.

Notation of the derivations: ``ḡ`` is the gradient of the loss with respect
to the primitive's output (the ``g`` a VJP receives), and ``x̄`` is the
gradient with respect to its input ``x``. ``N`` is the number of tokens
``B·T``, because every per-token formula acts on the rows of an
``(N, width)`` matrix.

autograd never sees inside a primitive: there the arrays are plain NumPy
arrays, so the code may update its own fresh arrays in place (``y += b``),
which the plain formulas must not do. Tests compare every primitive with
autograd's derivative of the plain formula and with finite differences, and
compare the whole fused model with the plain one.
"""

import math
from functools import lru_cache

import autograd.numpy as anp
import numpy
from autograd.extend import defvjp, defvjp_argnums, primitive
from scipy.special import erfc, expit

from minidisel import adapters as plain_adapters


def rows(x):
    """View ``(..., width)`` as ``(N, width)`` without copying a contiguous array."""
    return x.reshape(-1, x.shape[-1])


def sum_rows(g):
    """Sum ``(..., width)`` over every axis but the last: the gradient of a broadcast bias or gain."""
    return rows(g).sum(axis=0)


# ---------------------------------------------------------------- linear layers


@primitive
def linear_map(x, W, b):
    """Return ``x W^T + b`` (``b`` may be None): (..., in) -> (..., out).

    VJP, from ``y = x W^T + b``:

        x̄ = ḡ W            W̄ = ḡ^T x  (summed over all N tokens)            b̄ = Σ_N ḡ

    ``W̄`` is one ``(out, N) @ (N, in)`` product over the flattened tokens.
    autograd's gradient of the plain batched product instead forms one
    ``(out, in)`` matrix per batch row and then sums them.
    """
    y = rows(x) @ W.T
    if b is not None:
        y += b
    return y.reshape(x.shape[:-1] + (W.shape[0],))


def linear_map_vjp(argnums, ans, args, kwargs):
    x, W, b = args

    def vjp(g):
        grads = {0: lambda: (rows(g) @ W).reshape(x.shape), 1: lambda: rows(g).T @ rows(x), 2: lambda: sum_rows(g)}
        return tuple(grads[argnum]() for argnum in argnums)

    return vjp


defvjp_argnums(linear_map, linear_map_vjp)


def linear(x, p):
    """Apply ``x @ W.T + b`` with ``W`` stored ``(out, in)``: (..., in) -> (..., out)."""
    return linear_map(x, p["weight"], p.get("bias"))


# ---------------------------------------------------------------- adapters


def dropped_out(x, settings):
    """Return the adapter's input ``x̃``: ``x`` itself, or ``keep ⊙ x / (1 - p)`` with dropout."""
    if settings["keep"] is None:
        return x
    return numpy.where(settings["keep"], x / (1.0 - settings["dropout"]), 0.0)


def adapter_activations(x_tilde, A, W_g, b_g, V, U, settings):
    """Return ``u = x̃ A^T`` and the gates ``g`` (None for LoRA): (N, in) -> (N, R), (N, R)."""
    if settings["method"] == "lora" or settings["gate_override"] is not None:
        u = x_tilde @ A.T
        if settings["method"] == "lora":
            return u, None
        return u, numpy.full(u.shape, settings["gate_override"], dtype=u.dtype)

    if W_g is not None:
        # one product for both thin factors: x̃ [A; W_g]^T
        uz = x_tilde @ numpy.concatenate([A, W_g]).T  # (N, 2R)
        u, z = uz[:, : A.shape[0]], uz[:, A.shape[0] :]
        z += b_g
    else:
        u = x_tilde @ A.T
        z = (x_tilde @ V.T) @ U.T + b_g  # (N, D_b) -> (N, R)
    if settings["gate_scale"] != 1.0:
        z *= settings["gate_scale"]
    return u, expit(z)


@primitive
def adapted_map(x, W, b, A, B, W_g, b_g, V, U, settings):
    """Return a linear layer plus its LoRA or DISeL update: (..., in) -> (..., out).

    ``b``, ``W_g``, ``b_g``, ``V`` and ``U`` may be None. ``settings`` contains the
    constants: ``method``, ``scaling`` (``s``), ``gate_scale`` (``c``),
    ``gate_override``, the dropout ``keep`` mask (None without dropout) and
    ``dropout`` rate. Forward, per token:

        x̃ = keep ⊙ x / (1 - p)       u = x̃ A^T        z = c (x̃ W_g^T + b_g)
        g = σ(z)                      h = g ⊙ u         y = x W^T + b + s h B^T

    (LoRA: ``g = 1``; bottleneck gate: ``z = c ((x̃ V^T) U^T + b_g)``;
    ``gate_override``: ``g`` is that constant and the gate gets no gradient.)

    VJP, by the chain rule backwards through those lines:

        h̄ = s ḡ B                     B̄ = s ḡ^T h
        ū = h̄ ⊙ g                     Ā = ū^T x̃
        z̄ = h̄ ⊙ u ⊙ g (1 - g)          since σ'(z) = σ(z)(1 - σ(z))
        W̄_g = c z̄^T x̃                 b̄_g = c Σ_N z̄
        x̃̄ = ū A + c z̄ W_g            x̄ = ḡ W + keep ⊙ x̃̄ / (1 - p)
        W̄ = ḡ^T x                     b̄ = Σ_N ḡ

    Bottleneck gate: with ``ζ = x̃ V^T``, ``Ū = c z̄^T ζ``, ``ζ̄ = c z̄ U``,
    ``V̄ = ζ̄^T x̃`` and ``x̃̄ = ū A + ζ̄ V``. The VJP recomputes ``u`` and ``g``
    (thin products) instead of storing them, and forms only the gradients
    autograd requests, so a frozen ``W`` costs no ``(out, in)`` product.
    """
    x_rows = rows(x)
    u, g = adapter_activations(dropped_out(x_rows, settings), A, W_g, b_g, V, U, settings)
    h = settings["scaling"] * (u if g is None else g * u)  # (N, R)
    y = x_rows @ W.T
    y += h @ B.T
    if b is not None:
        y += b
    return y.reshape(x.shape[:-1] + (W.shape[0],))


def gate_gradients(z_bar, x_tilde, W_g, V, U, settings, requested):
    """Return the gradients of the gate parameters in ``requested`` and ``c z̄`` mapped back to ``x̃``'s width.

    ``z̄`` (N, R) is the gradient of the gate logits before the factor ``c``.
    """
    c_z_bar = settings["gate_scale"] * z_bar
    grads = {"b_g": c_z_bar.sum(axis=0)} if "b_g" in requested else {}
    if W_g is not None:
        if "W_g" in requested:
            grads["W_g"] = c_z_bar.T @ x_tilde
        return grads, c_z_bar @ W_g
    zeta_bar = c_z_bar @ U  # (N, D_b)
    if "U" in requested:
        grads["U"] = c_z_bar.T @ (x_tilde @ V.T)
    if "V" in requested:
        grads["V"] = zeta_bar.T @ x_tilde
    return grads, zeta_bar @ V


def adapted_map_gradients(g_out, requested, x, W, b, A, B, W_g, b_g, V, U, settings):
    """Return ``{argument name: gradient}`` of :func:`adapted_map` for the names in ``requested``."""
    g_rows, x_rows = rows(g_out), rows(x)
    x_tilde = dropped_out(x_rows, settings)
    u, g = adapter_activations(x_tilde, A, W_g, b_g, V, U, settings)
    grads = {}
    if "W" in requested:
        grads["W"] = g_rows.T @ x_rows
    if "b" in requested:
        grads["b"] = g_rows.sum(axis=0)
    if "B" in requested:
        grads["B"] = g_rows.T @ (settings["scaling"] * (u if g is None else g * u))

    h_bar = settings["scaling"] * (g_rows @ B)  # (N, R)
    u_bar = h_bar if g is None else h_bar * g
    if "A" in requested:
        grads["A"] = u_bar.T @ x_tilde
    x_tilde_bar = u_bar @ A if "x" in requested else None
    gate_parameters = {"W_g": W_g, "b_g": b_g, "V": V, "U": U}
    gated = g is not None and settings["gate_override"] is None
    if gated:
        gate_grads, gate_x_bar = gate_gradients(h_bar * u * g * (1.0 - g), x_tilde, W_g, V, U, settings, requested)
        grads.update(gate_grads)
        x_tilde_bar = None if x_tilde_bar is None else x_tilde_bar + gate_x_bar
    else:  # no gate, or a constant one: the gate parameters do not change the output
        grads.update({name: numpy.zeros_like(p) for name, p in gate_parameters.items() if name in requested})

    if "x" in requested:
        if settings["keep"] is not None:
            x_tilde_bar = numpy.where(settings["keep"], x_tilde_bar / (1.0 - settings["dropout"]), 0.0)
        x_bar = g_rows @ W
        x_bar += x_tilde_bar
        grads["x"] = x_bar.reshape(x.shape)
    return grads


ADAPTED_MAP_ARGUMENTS = ("x", "W", "b", "A", "B", "W_g", "b_g", "V", "U")


def adapted_map_vjp(argnums, ans, args, kwargs):
    requested = [ADAPTED_MAP_ARGUMENTS[argnum] for argnum in argnums]

    def vjp(g):
        grads = adapted_map_gradients(g, requested, *args, **kwargs)
        return tuple(grads[name] for name in requested)

    return vjp


defvjp_argnums(adapted_map, adapted_map_vjp)


def adapter_settings(x, mode):
    """Return the constant settings of :func:`adapted_map`, drawing the dropout mask as the plain path does."""
    config = mode.config
    keep = None
    if mode.training and config.lora_dropout > 0.0:
        keep = mode.rng.random(x.shape) >= config.lora_dropout  # the same draw as adapters.dropout
        keep = rows(keep)
    return {
        "method": config.method,
        "scaling": config.scaling,
        "gate_scale": 1.0 / math.sqrt(x.shape[-1]) if config.gate_normalize else 1.0,
        "gate_override": mode.gate_override,
        "keep": keep,
        "dropout": config.lora_dropout,
    }


def project(x, base, adapter, mode, with_gates=False):
    """Apply one linear layer with its adapter, if any: (..., in) -> (..., out), gates or None.

    LoRA and DISeL run as one :func:`adapted_map` node; any other method runs
    the plain :func:`minidisel.adapters.project`. Gates are only computed
    when ``with_gates`` is True, by the plain formula on the same dropped-out
    input, so that they stay differentiable.

    NOTE: DoRA has no fused primitive yet, so it trains at the plain path's speed.
    """
    if adapter is None or mode is None:
        return linear(x, base), None
    if mode.config.method not in ("lora", "disel"):
        return plain_adapters.project(x, base, adapter, mode)

    settings = adapter_settings(x, mode)
    y = adapted_map(
        x, base["weight"], base.get("bias"), adapter["A"], adapter["B"],
        adapter.get("W_g"), adapter.get("b_g"), adapter.get("V"), adapter.get("U"), settings=settings,
    )
    if not with_gates or mode.config.method != "disel":
        return y, None
    return y, gates_of(x, adapter, settings, mode)


def gates_of(x, adapter, settings, mode):
    """Return the DISeL gates ``(..., R)`` of input ``x`` with the plain autograd formula."""
    x_tilde = x
    if settings["keep"] is not None:
        x_tilde = anp.where(settings["keep"].reshape(x.shape), x / (1.0 - settings["dropout"]), 0.0)
    g = plain_adapters.gate_values(x_tilde, adapter, mode.config)
    if mode.gate_override is not None:
        g = anp.full(g.shape, mode.gate_override, dtype=g.dtype)
    return g


# ---------------------------------------------------------------- normalisation


def normalized_rows(x, eps, center):
    """Return ``x̂`` and ``1/σ`` per row: LayerNorm (``center``) or RMSNorm statistics."""
    x = x - x.mean(axis=-1, keepdims=True) if center else x.copy()
    inv_std = 1.0 / numpy.sqrt(numpy.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    x *= inv_std
    return x, inv_std


@primitive
def layer_norm_map(x, w, b, eps):
    """LayerNorm of the last axis: ``y = x̂ ⊙ w + b``, ``x̂ = (x - μ) / sqrt(σ² + ε)``.

    VJP. With ``d`` the width, ``x̂̄ = ḡ ⊙ w`` and ``r = 1 / sqrt(σ² + ε)``,
    differentiating ``μ`` and ``σ²`` (both means over the row) gives

        x̄ = r (x̂̄ - mean(x̂̄) - x̂ ⊙ mean(x̂̄ ⊙ x̂))          per row
        w̄ = Σ_N ḡ ⊙ x̂                                    b̄ = Σ_N ḡ

    The middle term removes the component along the constant vector (from
    ``μ``), the last the component along ``x̂`` (from ``σ²``).
    """
    y, _ = normalized_rows(x, eps, center=True)
    y *= w
    y += b
    return y


def norm_vjp(center):
    """Return the VJP maker of :func:`layer_norm_map` (``center``) or :func:`rms_norm_map`."""

    def vjp_maker(argnums, ans, args, kwargs):
        x, w, eps = args[0], args[1], args[-1]

        def vjp(g):
            x_hat, inv_std = normalized_rows(x, eps, center)
            grads = {1: lambda: sum_rows(g * x_hat), 2: lambda: sum_rows(g)}
            if 0 in argnums:
                x_bar = g * w  # x̂̄, turned into x̄ in place
                projection = numpy.mean(x_bar * x_hat, axis=-1, keepdims=True)
                if center:
                    x_bar -= numpy.mean(x_bar, axis=-1, keepdims=True)
                x_bar -= x_hat * projection
                x_bar *= inv_std
                grads[0] = lambda: x_bar
            return tuple(grads[argnum]() for argnum in argnums)

        return vjp

    return vjp_maker


defvjp_argnums(layer_norm_map, norm_vjp(center=True))


@primitive
def rms_norm_map(x, w, eps):
    """RMSNorm of the last axis: ``y = x̂ ⊙ w``, ``x̂ = x / sqrt(mean(x²) + ε)``.

    VJP: as LayerNorm's without the centring terms,

        x̄ = r (x̂̄ - x̂ ⊙ mean(x̂̄ ⊙ x̂)),   x̂̄ = ḡ ⊙ w,   r = 1 / sqrt(mean(x²) + ε)
        w̄ = Σ_N ḡ ⊙ x̂
    """
    y, _ = normalized_rows(x, eps, center=False)
    y *= w
    return y


defvjp_argnums(rms_norm_map, norm_vjp(center=False))


def layer_norm(x, p, eps):
    """Normalise the last axis to zero mean and unit (biased) variance, then scale and shift."""
    return layer_norm_map(x, p["weight"], p["bias"], eps)


def rms_norm(x, p, eps):
    """Divide the last axis by its root mean square, then scale (no shift)."""
    return rms_norm_map(x, p["weight"], eps)


# ---------------------------------------------------------------- activations


# erfcx(t) = exp(t²) erfc(t) ≈ P(t) / Q(t) on 0 <= t <= 10.5, coefficients in increasing powers
# of t, fitted by benchmarks/fit_erfcx.py to a relative error below 1e-10
ERFCX_NUMERATOR = (
    0.9999999999129073, 1.4369678706723261, 1.004100071193588, 0.40447063558929364,
    0.09349399388189279, 0.010115335187801533,
)
ERFCX_DENOMINATOR = (
    1.0, 2.5653470259928546, 2.898784467480879, 1.8623022189968157,
    0.7258917825233654, 0.16571276916758265, 0.0179289860791711,
)
ERFCX_UPPER = 10.5  # exp(-10.5²) is below float32's smallest subnormal, so it rounds to 0


def horner(coefficients, s):
    """Return the polynomial with ``coefficients`` (increasing powers) at ``s``, in ``s``'s dtype."""
    value = numpy.full_like(s, coefficients[-1])
    for c in coefficients[-2::-1]:
        value *= s
        value += c
    return value


def lower_tail(a):
    """Return ``Φ(-a) = erfc(a / √2) / 2`` for ``a >= 0``, in ``a``'s dtype.

    float64 uses SciPy's ``erfc``, exact to rounding. float32 evaluates
    ``exp(-t²) erfcx(t) / 2`` at ``t = a / √2`` in float32 NumPy operations,
    about 4 times faster than SciPy's ``erfc``, within 3e-5 relative and
    2.5e-7 absolute error (tested).
    """
    t = a * (1.0 / math.sqrt(2.0))
    if a.dtype == numpy.float32:
        numpy.minimum(t, ERFCX_UPPER, out=t)  # exp(-t²) rounds to 0 from here on, so Φ does not change
        tail = numpy.exp(-(t * t))
        tail *= horner(ERFCX_NUMERATOR, t)
        tail /= horner(ERFCX_DENOMINATOR, t)
    else:
        tail = erfc(t, out=t)
    tail *= 0.5
    return tail


def normal_cdf(x):
    """Return the standard normal CDF ``Φ(x)`` in ``x``'s dtype, through :func:`lower_tail`."""
    tail = lower_tail(numpy.abs(x))
    return numpy.where(x < 0, tail, 1.0 - tail)


BLOCK_BYTES = 128 * 1024  # per temporary of a block, so that a block's temporaries stay in the L2 cache


def blockwise(function, *arrays):
    """Return ``function(*arrays)`` for an element-wise ``function``, computed block by block.

    Evaluating a formula of many NumPy operations on a few thousand elements
    at a time keeps its temporaries in the cache, instead of streaming each
    intermediate array of a whole layer through memory once per operation.
    """
    flats = [numpy.ascontiguousarray(a).reshape(-1) for a in arrays]
    out = numpy.empty(flats[0].shape, dtype=arrays[0].dtype)
    size = BLOCK_BYTES // out.itemsize
    for start in range(0, out.size, size):
        block = slice(start, start + size)
        out[block] = function(*(flat[block] for flat in flats))
    return out.reshape(arrays[0].shape)


def gelu_values(x):
    """Return ``x Φ(x)`` for a 1-D block ``x``, as ``max(x, 0) - |x| Φ(-|x|)``.

    Both forms are equal (for ``x >= 0`` use ``Φ(x) = 1 - Φ(-x)``), and the
    second needs only the lower tail, which :func:`lower_tail` computes
    without the cancellation of ``1 + erf(x / √2)`` for negative ``x``.
    """
    magnitude = numpy.abs(x)
    y = x + magnitude
    y *= 0.5  # max(x, 0)
    y -= magnitude * lower_tail(magnitude)
    return y


def gelu_gradient(g, y, x):
    """Return ``g (Φ(x) + x φ(x))`` for 1-D blocks, with ``Φ(x)`` read from the output ``y = x Φ(x)``."""
    tiny = math.sqrt(numpy.finfo(x.dtype).tiny)
    slope = numpy.divide(y, x, out=numpy.full_like(x, 0.5), where=numpy.abs(x) > tiny)
    density = x * x
    density *= -0.5
    numpy.exp(density, out=density)
    density *= x
    density *= 1.0 / math.sqrt(2.0 * math.pi)
    slope += density
    slope *= g
    return slope


@primitive
def gelu(x):
    """Return the exact (erf) GELU ``y = x Φ(x)``, as ``torch.nn.GELU()``.

    VJP: ``x̄ = ḡ (Φ(x) + x φ(x))`` with ``φ(x) = exp(-x²/2) / √(2π)``.
    ``Φ(x)`` is read back from the output as ``y / x`` instead of being
    computed again, because ``erfc`` costs more than all the other
    element-wise work of the step. Where ``|x|`` is below ``sqrt(tiny)``,
    ``Φ(x)`` rounds to exactly 1/2 and ``y / x`` could lose precision, so 1/2
    is used. Both directions run block by block (:func:`blockwise`).
    """
    return blockwise(gelu_values, x)


defvjp(gelu, lambda ans, x: lambda g: blockwise(gelu_gradient, g, ans, x))


@primitive
def swiglu(gate, up):
    """Return Llama's gated activation ``h = silu(a) ⊙ u``, ``silu(a) = a σ(a)``, for ``a = gate``, ``u = up``.

    VJP: ``ū = ḡ ⊙ silu(a)`` and ``ā = ḡ ⊙ u ⊙ σ(a) (1 + a (1 - σ(a)))``,
    since ``d/da (a σ(a)) = σ(a) + a σ(a)(1 - σ(a))``.
    """
    return gate * expit(gate) * up


def swiglu_vjp(argnums, ans, args, kwargs):
    gate, up = args

    def vjp(g):
        s = expit(gate)
        grads = {0: lambda: g * up * s * (1.0 + gate * (1.0 - s)), 1: lambda: g * gate * s}
        return tuple(grads[argnum]() for argnum in argnums)

    return vjp


defvjp_argnums(swiglu, swiglu_vjp)


# ---------------------------------------------------------------- attention


def to_heads(x, groups, per_group):
    """View (B, T, G·r·K) as (B, G, r, T, K): ``r = per_group`` query heads share each of ``G`` groups."""
    B, T, width = x.shape
    return x.reshape(B, T, groups, per_group, width // (groups * per_group)).transpose(0, 2, 3, 1, 4)


def from_heads(y):
    """(B, G, r, T, K) -> (B, T, G·r·K), copying into token-major order."""
    B, G, r, T, K = y.shape
    return y.transpose(0, 3, 1, 2, 4).reshape(B, T, G * r * K)


@lru_cache(maxsize=32)
def causal_blocked(T):
    """Return the constant ``(T, T)`` mask, True where position ``t`` may NOT read ``s > t``; built once per length."""
    blocked = numpy.triu(numpy.ones((T, T), dtype=bool), k=1)
    blocked.flags.writeable = False
    return blocked


@primitive
def attention_weights(q, k, n_heads):
    """Return causal softmax weights ``P = softmax(q k^T / √K + mask)``: (B, G, H/G, T, T).

    ``q`` is (B, T, H·K), ``k`` is (B, T, G·K); query head ``h`` reads key head
    ``h // (H/G)`` (grouped-query attention; G = H for GPT). Row ``t`` of
    ``P`` is zero beyond ``t``.

    VJP. For one row, ``P = softmax(S)`` has Jacobian ``diag(P) - P P^T``, so

        S̄ = P ⊙ (P̄ - Σ_s P̄_s P_s)              (row-wise; zero where P is 0)
        q̄ = S̄ k / √K                           k̄ = Σ_{heads in a group} S̄^T q / √K

    The weights are the primitive's output, so the VJP reuses them.
    """
    B, T, width = q.shape
    groups, K = k.shape[-1] * n_heads // width, width // n_heads
    qh, kh = to_heads(q, groups, n_heads // groups), to_heads(k, groups, 1)
    scores = qh @ kh.swapaxes(-1, -2)  # (B, G, r, T, T)
    scores *= 1.0 / math.sqrt(K)

    # masked scores are -inf, so their weight is exactly 0
    numpy.copyto(scores, -numpy.inf, where=causal_blocked(T))
    scores -= scores.max(axis=-1, keepdims=True)
    numpy.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def attention_weights_vjp(argnums, ans, args, kwargs):
    q, k, n_heads = args
    width = q.shape[-1]
    groups, K = k.shape[-1] * n_heads // width, width // n_heads

    def vjp(g):
        scores_bar = g * ans
        scores_bar -= ans * scores_bar.sum(axis=-1, keepdims=True)
        scores_bar *= 1.0 / math.sqrt(K)
        grads = {}
        if 0 in argnums:
            grads[0] = from_heads(scores_bar @ to_heads(k, groups, 1))
        if 1 in argnums:
            kh_bar = (scores_bar.swapaxes(-1, -2) @ to_heads(q, groups, n_heads // groups)).sum(axis=2, keepdims=True)
            grads[1] = from_heads(kh_bar)
        return tuple(grads[argnum] for argnum in argnums)

    return vjp


defvjp_argnums(attention_weights, attention_weights_vjp)


@primitive
def mix_values(P, v):
    """Return the attention output ``P v`` in token-major layout: (B, G, r, T, T), (B, T, G·K) -> (B, T, G·r·K).

    VJP: ``P̄ = Ō v^T`` per head and ``v̄ = Σ_{heads in a group} P^T Ō``, with
    ``Ō`` the output gradient viewed as (B, G, r, T, K).
    """
    groups, per_group = P.shape[1], P.shape[2]
    return from_heads(P @ to_heads(v, groups, 1))


def mix_values_vjp(argnums, ans, args, kwargs):
    P, v = args
    groups, per_group = P.shape[1], P.shape[2]

    def vjp(g):
        out_bar = to_heads(g, groups, per_group)  # (B, G, r, T, K)
        grads = {}
        if 0 in argnums:
            grads[0] = out_bar @ to_heads(v, groups, 1).swapaxes(-1, -2)
        if 1 in argnums:
            grads[1] = from_heads((P.swapaxes(-1, -2) @ out_bar).sum(axis=2, keepdims=True))
        return tuple(grads[argnum] for argnum in argnums)

    return vjp


defvjp_argnums(mix_values, mix_values_vjp)


@primitive
def apply_rotary(x, cos, sin, n_heads):
    """Rotate each pair ``(x_j, x_{j+K/2})`` of every head by its position's angle: (B, T, n·K) -> (B, T, n·K).

    ``y = x ⊙ cos + rotate_half(x) ⊙ sin`` with ``rotate_half(x1, x2) = (-x2, x1)``
    and ``cos``, ``sin`` of shape (T, K), as Hugging Face's Llama.

    VJP: a rotation's transpose is the rotation by the negative angle, so
    ``x̄ = ḡ ⊙ cos - rotate_half(ḡ ⊙ sin)``, that is
    ``x̄1 = ḡ1 cos1 + ḡ2 sin2`` and ``x̄2 = ḡ2 cos2 - ḡ1 sin1``.
    """
    return rotate(x, cos, sin, n_heads, sign=1.0)


def rotate(x, cos, sin, n_heads, sign):
    """Apply ``x ⊙ cos + sign · rotate_half(x ⊙ ...)``: the rotary map (sign 1) or its transpose (sign -1)."""
    B, T, width = x.shape
    K, half = width // n_heads, width // n_heads // 2
    xh = x.reshape(B, T, n_heads, K)
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, K)
    y = xh * c
    if sign > 0:
        y[..., :half] -= xh[..., half:] * s[..., :half]
        y[..., half:] += xh[..., :half] * s[..., half:]
    else:
        y[..., :half] += xh[..., half:] * s[..., half:]
        y[..., half:] -= xh[..., :half] * s[..., :half]
    return y.reshape(B, T, width)


defvjp(apply_rotary, lambda ans, x, cos, sin, n_heads: lambda g: rotate(g, cos, sin, n_heads, sign=-1.0))


def attention(q, k, v, config, rotary=None):
    """Causal multi-head attention on projected inputs: (B, T, H·K), (B, T, G·K) x2 -> (B, T, H·K).

    Rotary embeddings rotate ``q`` and ``k`` first when ``rotary`` is
    ``(cos, sin)``; each key/value head serves ``H / G`` query heads.
    """
    if rotary is not None:
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin, config.n_heads), apply_rotary(k, cos, sin, config.kv_heads)
    return mix_values(attention_weights(q, k, config.n_heads), v)


# ---------------------------------------------------------------- loss


@primitive
def cross_entropy(logits, targets, mask):
    """Return the mean negative log-likelihood of ``targets`` over positions where ``mask`` is True.

    ``logits`` (B, T, V), ``targets`` (B, T) ints, ``mask`` (B, T) bool -> scalar.
    With ``n`` scored positions, ``L = (1/n) Σ_{scored} (logsumexp(ℓ) - ℓ_target)``.

    VJP: ``∂L/∂ℓ = (softmax(ℓ) - onehot(target)) · mask / n``, times ``ḡ``.
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_normalizer = numpy.log(numpy.exp(shifted).sum(axis=-1))  # (B, T)
    picked = numpy.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return numpy.sum(numpy.where(mask, log_normalizer - picked, 0.0)) / numpy.sum(mask, dtype=logits.dtype)


def cross_entropy_vjp(ans, logits, targets, mask):
    def vjp(g):
        probs = numpy.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        numpy.put_along_axis(probs, targets[..., None], numpy.take_along_axis(probs, targets[..., None], -1) - 1.0, -1)
        weights = numpy.where(mask, g / numpy.sum(mask, dtype=logits.dtype), 0.0).astype(logits.dtype)  # (B, T)
        return probs * weights[..., None]

    return vjp


defvjp(cross_entropy, cross_entropy_vjp)
