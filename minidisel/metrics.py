"""Evaluation: task scores and drift from the base model.

All metrics are computed on the scored positions of a batch (its ``mask``):

* ``accuracy``: exact match, the fraction of sequences whose every answer
  token is the arg-max prediction (given the true prefix, which for a greedy
  decoder is the same as decoding the whole answer correctly);
* ``nll``: the mean next-token negative log-likelihood, in nats;
* drift: the mean ``KL(base ‖ tuned)`` between next-token distributions;
* gates: see :mod:`minidisel.gates` for per-token values and their summaries.
"""

import numpy as np

from minidisel.model import forward
from minidisel.nn import log_softmax
from minidisel.tree import flatten

EVAL_CHUNK = 256


def predict(params, inputs, model_config, adapters=None, adapter_config=None, gate_override=None, fused=True):
    """Return logits and the flattened gates ``{path: (B, T, R)}``, evaluating in chunks."""
    logits, gates = [], []
    for start in range(0, len(inputs), EVAL_CHUNK):
        chunk = inputs[start : start + EVAL_CHUNK]
        out, tree = forward(
            params, chunk, model_config, adapters, adapter_config,
            gate_override=gate_override, return_gates=True, fused=fused,
        )
        logits.append(out)
        gates.append(flatten(tree))
    merged = {path: np.concatenate([g[path] for g in gates]) for path in gates[0]}
    return np.concatenate(logits), merged


def score(logits, batch, has_answers=True):
    """Return ``{"accuracy": float or None, "nll": float}`` of ``logits`` (B, T, V) on ``batch``."""
    mask, targets = batch["mask"], batch["targets"]
    log_probs = log_softmax(logits)  # (B, T, V)
    target_log_probs = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # (B, T)
    nll = -float(np.sum(target_log_probs * mask) / np.sum(mask))
    if not has_answers:
        return {"accuracy": None, "nll": nll}
    correct = (np.argmax(logits, axis=-1) == targets) | ~mask  # (B, T)
    return {"accuracy": float(np.mean(np.all(correct, axis=1))), "nll": nll}


def kl_from_base(base_logits, tuned_logits, mask):
    """Return the mean ``KL(base ‖ tuned)`` of next-token distributions over masked positions."""
    log_p = log_softmax(base_logits)  # (B, T, V)
    log_q = log_softmax(tuned_logits)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)  # (B, T)
    return float(np.sum(kl * mask) / np.sum(mask))
