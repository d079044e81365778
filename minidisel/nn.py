"""Building blocks of the transformer, written in ``autograd.numpy``.

Each function is the plain textbook formula, numerically stable for any
finite input. All take and return arrays; none keeps state.
"""

import math

import autograd.numpy as np
from autograd.extend import defjvp, defvjp, primitive
from autograd.scipy.special import erf, expit, logsumexp


def linear(x, p):
    """Apply ``x @ W.T + b`` with ``W`` stored ``(out, in)``: (..., in) -> (..., out)."""
    y = x @ p["weight"].T
    return y + p["bias"] if "bias" in p else y


@primitive
def stop_gradient(x):
    """Return ``x`` as a constant for autograd, as ``torch.Tensor.detach`` does.

    The value passes through unchanged; the derivative is defined as zero in
    both reverse and forward mode, so no gradient flows back into ``x``.
    """
    return x


defvjp(stop_gradient, lambda ans, x: lambda g: np.zeros_like(g))
defjvp(stop_gradient, lambda g, ans, x: np.zeros_like(g))


def sigmoid(z):
    """Return the exact logistic ``1 / (1 + exp(-z))``, without overflow.

    SciPy's ``expit`` is evaluated in a form that never overflows, and
    autograd differentiates it as ``σ(z) (1 - σ(z))``.
    """
    return expit(z)


def gelu(x):
    """Return the exact (erf) GELU, as ``torch.nn.GELU()``."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def silu(x):
    """Return ``x · σ(x)``, as ``torch.nn.SiLU``."""
    return x * sigmoid(x)


def log_softmax(x, axis=-1):
    """Return ``x - logsumexp(x)`` along ``axis``."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax(x, axis=-1):
    """Return the softmax along ``axis`` through log-sum-exp."""
    return np.exp(log_softmax(x, axis=axis))


def layer_norm(x, p, eps):
    """Normalise the last axis to zero mean and unit (biased) variance, then scale and shift."""
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * p["weight"] + p["bias"]


def rms_norm(x, p, eps):
    """Divide the last axis by its root mean square, then scale (no shift)."""
    mean_square = np.mean(x**2, axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + eps) * p["weight"]


def causal_mask(T):
    """Return a constant ``(T, T)`` bool mask, True where position ``t`` may read ``s <= t``."""
    return np.tril(np.ones((T, T), dtype=bool))


def attention(q, k, v):
    """Causal scaled dot-product attention: (B, H, T, K) x3 -> (B, H, T, K)."""
    T, K = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(K)  # (B, H, T, T)

    # masked scores are -inf, so their softmax weight is exactly 0
    scores = np.where(causal_mask(T), scores, -np.inf)
    return softmax(scores) @ v  # (B, H, T, K)


def split_heads(x, n_heads):
    """(B, T, n_heads * K) -> (B, n_heads, T, K)."""
    B, T, width = x.shape
    return np.transpose(np.reshape(x, (B, T, n_heads, width // n_heads)), (0, 2, 1, 3))


def merge_heads(x):
    """(B, H, T, K) -> (B, T, H * K)."""
    B, H, T, K = x.shape
    return np.reshape(np.transpose(x, (0, 2, 1, 3)), (B, T, H * K))


def rotary_tables(T, K, theta, dtype):
    """Return the ``(T, K)`` cosine and sine tables of rotary embeddings.

    Frequencies follow Hugging Face's Llama: ``inv_freq[j] = theta^(-2j / K)``,
    angles ``t * inv_freq`` repeated twice along the last axis.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, K, 2, dtype=np.float64) / K)  # (K/2,)
    angles = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, K/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, K)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rotate_half(x):
    """Map the halves ``(x1, x2)`` of the last axis to ``(-x2, x1)``."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotate each pair of features by its position's angle: (B, H, T, K) -> (B, H, T, K)."""
    return x * cos + rotate_half(x) * sin


def cross_entropy(logits, targets, mask):
    """Return the mean negative log-likelihood of ``targets`` over positions where ``mask`` is True.

    ``logits`` (B, T, V), ``targets`` (B, T) ints, ``mask`` (B, T) bool -> scalar.
    """
    log_probs = log_softmax(logits)  # (B, T, V)
    V = logits.shape[-1]
    one_hot = targets[..., None] == np.arange(V)  # (B, T, V) constant
    nll = -np.sum(np.where(one_hot, log_probs, 0.0), axis=-1)  # (B, T)
    return np.sum(np.where(mask, nll, 0.0)) / np.sum(mask, dtype=logits.dtype)  # a float32 count keeps float32
