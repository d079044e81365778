import warnings

import numpy as np
import pytest
import scipy.special
import scipy.stats

from minidisel.nn import attention, causal_mask, cross_entropy, gelu, layer_norm, log_softmax, rms_norm, sigmoid, softmax


def test_sigmoid_is_exact_logistic():
    z = np.linspace(-30, 30, 121)
    assert np.allclose(sigmoid(z), 1.0 / (1.0 + np.exp(-z)), rtol=1e-15, atol=0)
    # 0.5 (tanh z + 1) is σ(2z), not σ(z): the two must differ away from 0
    assert not np.allclose(sigmoid(z), 0.5 * (np.tanh(z) + 1.0))


def test_sigmoid_saturates_without_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = sigmoid(np.array([-1e4, -800.0, 0.0, 800.0, 1e4]))
    assert values[0] == 0.0 and values[-1] == 1.0 and values[2] == 0.5
    assert np.all(np.isfinite(values))


def test_log_softmax_stable_for_large_logits():
    x = np.array([[1e4, 0.0, -1e4], [-3.0, -3.0, -3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = log_softmax(x)
    assert np.allclose(out, scipy.special.log_softmax(x, axis=-1))
    assert np.allclose(softmax(x).sum(axis=-1), 1.0)


def test_gelu_is_erf_gelu():
    x = np.linspace(-5, 5, 41)
    expected = x * scipy.stats.norm.cdf(x)
    assert np.allclose(gelu(x), expected, rtol=1e-13, atol=1e-15)


def test_layer_norm_matches_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 6))
    p = {"weight": rng.standard_normal(6), "bias": rng.standard_normal(6)}
    normalized = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    assert np.allclose(layer_norm(x, p, 1e-5), normalized * p["weight"] + p["bias"], atol=1e-14)


def test_rms_norm_matches_definition():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5))
    w = rng.standard_normal(5)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w
    assert np.allclose(rms_norm(x, {"weight": w}, 1e-6), expected, atol=1e-14)


def test_attention_matches_loop_over_positions():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    out = attention(q, k, v)
    for t in range(5):
        scores = q[:, :, t : t + 1] @ np.swapaxes(k[:, :, : t + 1], -1, -2) / 2.0
        expected = scipy.special.softmax(scores, axis=-1) @ v[:, :, : t + 1]
        assert np.allclose(out[:, :, t : t + 1], expected, atol=1e-14)


def test_causal_mask_lower_triangular():
    mask = causal_mask(4)
    assert mask[3, 0] and mask[2, 2] and not mask[0, 1]


def test_cross_entropy_averages_masked_positions():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 3, 5))
    targets = rng.integers(0, 5, (2, 3))
    mask = np.array([[True, False, True], [False, False, True]])
    log_probs = scipy.special.log_softmax(logits, axis=-1)
    picked = [-log_probs[b, t, targets[b, t]] for b in range(2) for t in range(3) if mask[b, t]]
    assert cross_entropy(logits, targets, mask) == pytest.approx(np.mean(picked), rel=1e-14)


def test_cross_entropy_keeps_float32():
    logits = np.random.default_rng(4).standard_normal((2, 3, 5)).astype(np.float32)
    loss = cross_entropy(logits, np.zeros((2, 3), dtype=int), np.ones((2, 3), dtype=bool))
    assert loss.dtype == np.float32
