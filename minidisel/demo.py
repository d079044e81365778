"""``minidisel demo``: pre-train on P, fine-tune on Q three ways, and compare what P keeps.

The base model is pre-trained on P (or loaded from the cache), then fine-tuned
on Q with full fine-tuning, LoRA and DISeL under the same step budget. The
table reports, per method: trainable parameters, the score on Q, the score on P
before and after, the drift ``KL(base ‖ tuned)`` on P inputs, and seconds.
"""

import os
import time
from dataclasses import replace
from pathlib import Path

from minidisel import __version__
from minidisel.cache import cache_key, load_base, store_base
from minidisel.checkpoint import save_json
from minidisel.config import AdapterConfig, ModelConfig, TrainConfig, check_int
from minidisel.experiment import Recipe, evaluate, evaluation_sets, pretrain, run_method
from minidisel.gates import (
    format_gate_table,
    mean_by_path,
    most_selective_layer,
    plot_gate_heatmap,
    plot_gate_histograms,
    plot_rank_profile,
)
from minidisel.tasks import VOCAB_SIZE, make_task

# DoRA is left out of the demo's table; ``minidisel sweep`` compares all four methods.
DEMO_METHODS = ("full", "lora", "disel")

QUICK_RECIPE = Recipe(
    model=ModelConfig(vocab_size=VOCAB_SIZE, d_model=16, n_layers=1, n_heads=2, max_seq_len=32),
    pretrain=TrainConfig(steps=60, batch_size=16, lr=1e-2, log_every=0, progress=False),
    finetune_steps=20,
    finetune_batch_size=16,
    adapter=AdapterConfig(method="disel", r=2, lora_alpha=4.0),
    eval_size=64,
)


def make_recipe(quick=False, steps=None, rank=None, fused=True):
    """Return the demo's recipe, optionally tiny (``quick``), with other fine-tuning steps or rank.

    ``fused=False`` trains and evaluates with the plain layer functions.
    """
    recipe = replace(QUICK_RECIPE if quick else Recipe(), fused=fused)
    if steps is not None:
        check_int("steps", steps)
        recipe = replace(recipe, finetune_steps=steps)
    if rank is not None:
        check_int("rank", rank)
        recipe = replace(recipe, adapter=replace(recipe.adapter, r=rank, lora_alpha=2.0 * rank))
    return recipe


def base_model(task, recipe, seed, use_cache=True, log=print, progress=False):
    """Return a base model pre-trained on P, from the cache when a valid entry exists."""
    key = cache_key(task.name, recipe.model, recipe.pretrain, seed, recipe.fused)
    cached = load_base(key, recipe.model) if use_cache else None
    if cached is not None:
        log(f"base model: loaded from cache (key {key})")
        return cached

    started = time.perf_counter()
    pretrain_config = replace(recipe.pretrain, progress=progress)
    params, history = pretrain(task, recipe.model, pretrain_config, seed, log=log, fused=recipe.fused)
    seconds = time.perf_counter() - started
    log(f"base model: pre-trained on P for {recipe.pretrain.steps} steps in {seconds:.1f} s, final loss {history['loss'][-1]:.4f}")
    if use_cache:
        store_base(key, params, {"task": task.name, "seed": seed, "pretrain_seconds": seconds})
    return params


def run_demo(
    task_name="disjoint",
    seed=0,
    steps=None,
    rank=None,
    quick=False,
    out=None,
    use_cache=True,
    log=print,
    progress=False,
    fused=True,
):
    """Run the demo and return ``results`` (the ``results.json`` dict); write files to ``out`` if given."""
    check_int("seed", seed, minimum=0)
    task = make_task(task_name)
    recipe = make_recipe(quick, steps, rank, fused)
    if out is not None:
        check_output_folder(out)
    log(f"task {task.name}: {task.description}; seed {seed}")

    base = base_model(task, recipe, seed, use_cache, log, progress)
    eval_sets = evaluation_sets(task, seed, recipe.eval_size)
    base_eval = evaluate(base, eval_sets, task, recipe.model, fused=recipe.fused)
    results = {
        "minidisel_version": __version__,
        "task": task.name,
        "seed": seed,
        "base": {dist: base_eval[dist]["metrics"] for dist in ("P", "Q")},
        "runs": [],
    }
    histories, gates = {}, None
    for method in DEMO_METHODS:
        run, histories[method], method_gates = run_method(
            base, base_eval, eval_sets, task, method, recipe, seed, log=log, progress=progress, return_gates=True
        )
        results["runs"].append(run)
        gates = method_gates if method_gates is not None else gates

    log(format_table(results))
    if out is not None:
        write_outputs(out, results, histories, gates)
    return results


def check_output_folder(out):
    """Create ``out`` if needed and raise ``ValueError`` unless it is a writable folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output folder {out}: {error.strerror}") from error
    if not os.access(out, os.W_OK):
        raise ValueError(f"output folder {out} is not writable")


def format_score(metrics):
    """Format a metrics dict as ``accuracy / nll`` (accuracy omitted when it is None)."""
    if metrics["accuracy"] is None:
        return f"nll {metrics['nll']:.3f}"
    return f"{metrics['accuracy']:.3f} / {metrics['nll']:.3f}"


def format_table(results):
    """Return the demo's result table as text."""
    base_p = format_score(results["base"]["P"])
    kind = "acc / nll" if results["base"]["P"]["accuracy"] is not None else "nll"
    header = f"{'method':<7} {'trainable':>9}  {'Q ' + kind:>15}  {'P ' + kind + ' (base -> after)':>34}  {'P KL':>7}  {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for run in results["runs"]:
        lines.append(
            f"{run['method']:<7} {run['trainable_params']:>9}  {format_score(run['Q']):>15}  "
            f"{base_p + ' -> ' + format_score(run['P']):>34}  {run['P_kl_from_base']:>7.4f}  {run['seconds']:>7.1f}"
        )
    for run in results["runs"]:
        if "gates" in run:
            lines.append(format_gate_table(run["gates"]))
    return "\n".join(lines)


def write_outputs(out, results, histories, gates=None):
    """Write ``results.json`` and the figures to folder ``out``.

    With DISeL's gate values (``{dist: {path: (N, R)}}``) it also writes the
    gate heatmap, the histograms on P and Q inputs and one layer's per-rank profile.
    """
    from minidisel.plots import plot_training_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "results.json", results)
    title = f"task {results['task']}, seed {results['seed']}"
    plot_training_curves(histories, out / "training_curves.png", title)
    if gates is not None:
        write_gate_figures(out, gates, title)


def write_gate_figures(out, gates, title):
    """Write ``gates.png``, ``gate_histograms.png`` and ``gate_ranks.png`` to folder ``out``."""
    means = mean_by_path(gates)
    layer = most_selective_layer(means)
    plot_gate_heatmap(means, f"DISeL mean gates, {title}").savefig(out / "gates.png", dpi=120)
    plot_gate_histograms(gates, title=f"DISeL gate values, {title}").savefig(out / "gate_histograms.png", dpi=120)
    plot_rank_profile(gates, layer, f"{layer} (largest P/Q gap), {title}").savefig(out / "gate_ranks.png", dpi=120)
