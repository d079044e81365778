"""Training: AdamW with three parameter groups, warm-up and cosine decay, clipping.

The three groups:

* ``"decay"``: weight matrices and embeddings (arrays of two or more axes),
  decayed at the base learning rate;
* ``"no_decay"``: biases and normalisation gains (one-axis arrays);
* ``"gate"``: DISeL gate parameters (``W_g``, ``b_g``, ``U``, ``V``), never
  decayed, because decay would pull ``W_g`` to zero and leave a gate that
  cannot tell inputs apart; they train at ``gate_lr_multiplier`` times the base rate.
"""

import math
import time

import numpy as np
from tqdm.auto import tqdm

from minidisel.adapters import GATE_KEYS
from minidisel.autodiff import leafwise_value_and_grad
from minidisel.config import TrainConfig, check_float
from minidisel.tree import flatten, tree_map, unflatten

GROUPS = ("decay", "no_decay", "gate")


def parameter_group(path, leaf):
    """Return the optimiser group of the parameter at dotted ``path``."""
    if path.rsplit(".", 1)[-1] in GATE_KEYS:
        return "gate"
    return "decay" if np.ndim(leaf) >= 2 else "no_decay"


def parameter_groups(params):
    """Return ``{group: [dotted paths]}``; every parameter is in exactly one group."""
    groups = {name: [] for name in GROUPS}
    for path, leaf in flatten(params).items():
        groups[parameter_group(path, leaf)].append(path)
    return groups


def learning_rate(step, config):
    """Return the base learning rate at ``step`` (counted from 1).

    It rises linearly to ``config.lr`` over the warm-up steps, then follows a
    half cosine that would reach zero one step after ``config.steps``, so the
    first step after warm-up uses the full rate and no step has a zero rate.
    """
    warmup = math.ceil(config.warmup_fraction * config.steps)
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup - 1) / (config.steps - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_norm(tree):
    """Return the L2 norm of all leaves of ``tree`` taken together."""
    return math.sqrt(sum(float(np.sum(leaf * leaf)) for leaf in flatten(tree).values()))


def clip_by_global_norm(grads, max_norm):
    """Scale ``grads`` so that their global norm is at most ``max_norm``; return them and the old norm."""
    norm = global_norm(grads)
    if max_norm is None or norm <= max_norm:
        return grads, norm
    factor = max_norm / (norm + 1e-6)  # the same small guard as torch.nn.utils.clip_grad_norm_
    return tree_map(lambda g: g * factor, grads), norm


def adamw_init(params):
    """Return AdamW's state: step 0 and zero first and second moments."""
    zeros = tree_map(np.zeros_like, params)
    return {"step": 0, "m": zeros, "v": tree_map(np.zeros_like, params)}


def adamw_update(p, g, m, v, lr, weight_decay, step, config):
    """Apply one AdamW step to one array, as ``torch.optim.AdamW``: return new ``p, m, v``."""
    beta1, beta2 = config.betas
    p = p - lr * weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1**step)
    v_hat = v / (1.0 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + config.eps), m, v


def adamw_step(params, grads, state, config, gate_lr_multiplier):
    """Apply AdamW to every parameter with its group's rate and decay; return new params and state."""
    step = state["step"] + 1
    base_lr = learning_rate(step, config)
    rates = {"decay": base_lr, "no_decay": base_lr, "gate": base_lr * gate_lr_multiplier}
    decays = {"decay": config.weight_decay, "no_decay": 0.0, "gate": 0.0}

    flat_p, flat_g = flatten(params), flatten(grads)
    flat_m, flat_v = flatten(state["m"]), flatten(state["v"])
    new_p, new_m, new_v = {}, {}, {}
    for path, p in flat_p.items():
        group = parameter_group(path, p)
        new_p[path], new_m[path], new_v[path] = adamw_update(
            p, flat_g[path], flat_m[path], flat_v[path], rates[group], decays[group], step, config
        )
    return unflatten(new_p), {"step": step, "m": unflatten(new_m), "v": unflatten(new_v)}


def train(loss_fn, trainable, frozen, sample_batch, config, gate_lr_multiplier=5.0, log=print):
    """Minimise ``loss_fn(trainable, frozen, batch, rng)`` over ``trainable`` with AdamW.

    ``sample_batch(rng, batch_size)`` draws a training batch; one
    ``numpy.random.Generator`` seeded with ``config.seed`` feeds both batches and
    dropout, so a run is reproducible bit for bit. Every ``config.log_every``
    steps one line goes to ``log``. Returns the trained parameters and the
    history ``{"step", "loss", "lr", "grad_norm"}`` (lists, one entry per step).

    Raises ``FloatingPointError`` at the first non-finite loss, naming the step
    and the last finite loss.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_float("gate_lr_multiplier", gate_lr_multiplier, 0.0, low_open=True)
    rng = np.random.default_rng(config.seed)
    loss_and_grad = leafwise_value_and_grad(loss_fn)
    state = adamw_init(trainable)
    history = {"step": [], "loss": [], "lr": [], "grad_norm": []}
    started = time.perf_counter()

    bar = tqdm(range(1, config.steps + 1), disable=not config.progress, leave=False, desc="train")
    for step in bar:
        batch = sample_batch(rng, config.batch_size)
        loss, grads = loss_and_grad(trainable, frozen, batch, rng)
        check_finite_loss(loss, step, history["loss"])

        grads, norm = clip_by_global_norm(grads, config.max_grad_norm)
        trainable, state = adamw_step(trainable, grads, state, config, gate_lr_multiplier)
        record(history, step, float(loss), learning_rate(step, config), norm)

        if config.log_every and (step % config.log_every == 0 or step == config.steps):
            milliseconds = 1000.0 * (time.perf_counter() - started) / step
            line = format_log_line(step, config.steps, float(loss), learning_rate(step, config), norm, milliseconds)
            bar.write(line) if config.progress else log(line)
    return trainable, history


def check_finite_loss(loss, step, losses):
    """Raise ``FloatingPointError`` if ``loss`` is NaN or infinite."""
    if not np.isfinite(loss):
        last = f"{losses[-1]:.6g} at step {step - 1}" if losses else "none (it was the first step)"
        raise FloatingPointError(f"training diverged: loss is {float(loss)} at step {step}; last finite loss: {last}")


def record(history, step, loss, lr, grad_norm):
    """Append one step's values to the history."""
    for key, value in (("step", step), ("loss", loss), ("lr", lr), ("grad_norm", grad_norm)):
        history[key].append(value)


def format_log_line(step, steps, loss, lr, grad_norm, milliseconds):
    """Return the fixed-format training log line."""
    width = len(str(steps))
    return (
        f"step {step:>{width}}/{steps} | loss {loss:.4f} | lr {lr:.2e} | "
        f"grad norm {grad_norm:.3f} | {milliseconds:.1f} ms/step"
    )

