"""Pre-train a base model on P, fine-tune it on Q, and measure what changed.

Methods: ``"full"`` trains every base parameter; ``"lora"``, ``"dora"`` and
``"disel"`` train an adapter tree while the base stays frozen. Each method's
loss has the form ``loss(trainable, frozen, batch, rng)``, so freezing is
structural: autograd differentiates the first argument only.

Training and evaluation use the fused layer functions (``Recipe.fused``,
default True). ``fused=False`` runs the plain textbook formulas instead:
the same numbers up to rounding, at one and a third to two and a half times
the time per step.
"""

import time
from dataclasses import dataclass, replace

import numpy as np

from minidisel.adapters import init_adapters
from minidisel import fused as fused_layers
from minidisel.config import AdapterConfig, ModelConfig, TrainConfig, check_bool, check_int
from minidisel.gates import mean_by_path, select_tokens
from minidisel.metrics import kl_from_base, predict, score
from minidisel.model import forward, init_params
from minidisel.nn import cross_entropy
from minidisel.tasks import VOCAB_SIZE, sample_batch
from minidisel.train import train
from minidisel.tree import count_parameters

METHODS = ("full", "lora", "dora", "disel")


@dataclass(frozen=True)
class Recipe:
    """Everything that defines one demo run besides the task and seed."""

    model: ModelConfig = ModelConfig(vocab_size=VOCAB_SIZE, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
    pretrain: TrainConfig = TrainConfig(
        steps=800, batch_size=32, lr=3e-3, weight_decay=0.01, log_every=0, progress=False
    )
    finetune_steps: int = 300
    finetune_batch_size: int = 32
    learning_rates: tuple = (("full", 3e-3), ("lora", 3e-3), ("dora", 3e-3), ("disel", 3e-3))
    adapter: AdapterConfig = AdapterConfig(method="disel", r=8, lora_alpha=16.0)
    eval_size: int = 512
    fused: bool = True  # False: the plain layer functions of nn.py (same numbers, slower)

    def __post_init__(self):
        check_int("finetune_steps", self.finetune_steps)
        check_int("finetune_batch_size", self.finetune_batch_size)
        check_int("eval_size", self.eval_size)
        check_bool("fused", self.fused)

    def finetune_config(self, method, seed, progress=False, log_every=0):
        """Return the fine-tuning TrainConfig of ``method``."""
        lr = dict(self.learning_rates)[method]
        return TrainConfig(
            steps=self.finetune_steps,
            batch_size=self.finetune_batch_size,
            lr=lr,
            weight_decay=0.0,
            seed=seed,
            progress=progress,
            log_every=log_every,
        )

    def adapter_for(self, method):
        """Return the adapter config of ``method`` (LoRA and DoRA share every field DISeL has in common)."""
        return replace(self.adapter, method=method)


def language_model_loss(trainable, frozen, batch, rng, model_config, adapter_config=None, fused=True):
    """Return the mean NLL of ``batch``'s scored targets.

    With ``adapter_config`` the trainable tree is an adapter on the frozen
    base; without it the trainable tree is the base itself (full fine-tuning).
    ``fused`` selects the fused layer functions and loss (False: the plain ones).
    """
    if adapter_config is None:
        logits = forward(trainable, batch["inputs"], model_config, fused=fused)
    else:
        logits = forward(
            frozen, batch["inputs"], model_config, trainable, adapter_config, training=True, rng=rng, fused=fused
        )
    loss = fused_layers.cross_entropy if fused else cross_entropy
    return loss(logits, batch["targets"], batch["mask"])


def pretrain(task, model_config, train_config, seed, log=print, fused=True):
    """Train a base model from scratch on the task's P distribution; return params and history."""
    params = init_params(model_config, np.random.default_rng(seed))

    def loss(trainable, frozen, batch, rng):
        return language_model_loss(trainable, frozen, batch, rng, model_config, fused=fused)

    def batches(rng, n):
        return sample_batch(task, "P", rng, n)

    return train(loss, params, None, batches, replace(train_config, seed=seed), log=log)


def finetune(base, task, method, recipe, seed, progress=False, log=print):
    """Fine-tune ``base`` on Q with ``method``; return ``(params, adapters, history)``.

    For full fine-tuning ``params`` are the new base and ``adapters`` is None;
    for the adapter methods ``params`` is ``base`` itself.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    config = recipe.finetune_config(method, seed, progress=progress)
    model_config = recipe.model
    adapter_config = None if method == "full" else recipe.adapter_for(method)

    def loss(trainable, frozen, batch, rng):
        return language_model_loss(trainable, frozen, batch, rng, model_config, adapter_config, recipe.fused)

    def batches(rng, n):
        return sample_batch(task, "Q", rng, n)

    if method == "full":
        params, history = train(loss, base, None, batches, config, log=log)
        return params, None, history
    adapters = init_adapters(base, model_config, adapter_config, np.random.default_rng(seed + 1))
    adapters, history = train(
        loss, adapters, base, batches, config, gate_lr_multiplier=adapter_config.gate_lr_multiplier, log=log
    )
    return base, adapters, history


def evaluation_sets(task, seed, size):
    """Return fixed held-out batches of P and Q, drawn from a stream separate from training."""
    rng = np.random.default_rng([seed, 7919])
    return {dist: sample_batch(task, dist, rng, size) for dist in ("P", "Q")}


def evaluate(params, eval_sets, task, model_config, adapters=None, adapter_config=None, fused=True):
    """Return per-distribution metrics, logits and flattened gates."""
    results = {}
    for dist, batch in eval_sets.items():
        logits, gates = predict(params, batch["inputs"], model_config, adapters, adapter_config, fused=fused)
        results[dist] = {"metrics": score(logits, batch, task.has_answers), "logits": logits, "gates": gates}
    return results


def run_method(base, base_eval, eval_sets, task, method, recipe, seed, log=print, progress=False, return_gates=False):
    """Fine-tune with one method and return its results record (as in ``results.json``) and history.

    With ``return_gates=True`` it also returns the gates: DISeL's values on
    every position of the evaluation sets, ``{dist: {path: (N, R)}}`` as
    :mod:`minidisel.gates` reads them, or None for the other methods.
    """
    started = time.perf_counter()
    params, adapters, history = finetune(base, task, method, recipe, seed, progress=progress, log=log)
    seconds = time.perf_counter() - started

    adapter_config = None if adapters is None else recipe.adapter_for(method)
    tuned = evaluate(params, eval_sets, task, recipe.model, adapters, adapter_config, recipe.fused)
    p_mask = eval_sets["P"]["mask"]
    run = {
        "method": method,
        "trainable_params": count_parameters(params if adapters is None else adapters),
        "steps": recipe.finetune_steps,
        "seconds": seconds,
        "P": tuned["P"]["metrics"],
        "Q": tuned["Q"]["metrics"],
        "P_kl_from_base": kl_from_base(base_eval["P"]["logits"], tuned["P"]["logits"], p_mask),
    }
    gates = None
    if method == "disel":
        gates = {dist: select_tokens(tuned[dist]["gates"], np.ones_like(eval_sets[dist]["mask"])) for dist in ("P", "Q")}
        run["gates"] = mean_by_path(gates)
    return (run, history, gates) if return_gates else (run, history)
