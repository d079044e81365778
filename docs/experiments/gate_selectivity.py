"""Vary one setting at a time around the demo's recipe and measure how selective DISeL's gates become.

Usage: python docs/experiments/gate_selectivity.py OUT.json [--seeds 0 1 2] [--only FACTOR ...]

For each setting and seed it fine-tunes LoRA and DISeL on Q from the same
base model and records the mean gate on P and Q inputs, the P score and the
drift KL(base ‖ tuned) on P. Prints a Markdown table (mean ± std over seeds).
"""

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from minidisel.demo import base_model
from minidisel.experiment import Recipe, evaluate, evaluation_sets, run_method
from minidisel.tasks import make_task

DEFAULT = Recipe()


def variants():
    """Yield ``(factor, value, task name, recipe)``: the default, then one change at a time."""
    yield "default", "-", "disjoint", DEFAULT
    for k in (2, 5):
        yield "token overlap (shared digits)", k, f"overlap-{k}", DEFAULT
    for bias in (-1.0, -5.0):
        yield "gate_bias_init", bias, "disjoint", replace(DEFAULT, adapter=replace(DEFAULT.adapter, gate_bias_init=bias))
    for multiplier in (1.0, 25.0):
        adapter = replace(DEFAULT.adapter, gate_lr_multiplier=multiplier)
        yield "gate_lr_multiplier", multiplier, "disjoint", replace(DEFAULT, adapter=adapter)
    for steps in (100, 1000):
        yield "fine-tuning steps", steps, "disjoint", replace(DEFAULT, finetune_steps=steps)
    for width in (32, 128):
        yield "d_model", width, "disjoint", replace(DEFAULT, model=replace(DEFAULT.model, d_model=width))
    for lr in (1e-3,):
        rates = tuple((method, lr) for method, _ in DEFAULT.learning_rates)
        yield "learning rate", lr, "disjoint", replace(DEFAULT, learning_rates=rates)


def measure(task_name, recipe, seed):
    """Return the LoRA and DISeL run records of one setting and seed."""
    task = make_task(task_name)
    base = base_model(task, recipe, seed, log=lambda line: None)
    eval_sets = evaluation_sets(task, seed, recipe.eval_size)
    base_eval = evaluate(base, eval_sets, task, recipe.model)
    runs = {}
    for method in ("lora", "disel"):
        runs[method], _ = run_method(base, base_eval, eval_sets, task, method, recipe, seed, log=lambda line: None)
    runs["base_P_accuracy"] = base_eval["P"]["metrics"]["accuracy"]
    return runs


def fmt(values):
    """Format numbers as mean ± sample standard deviation."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=None, help="run only these factors, e.g. 'learning rate'")
    args = parser.parse_args()

    records, started = [], time.perf_counter()
    print("| factor | value | DISeL gate P | DISeL gate Q | P acc LoRA | P acc DISeL | P KL LoRA | P KL DISeL | Q acc LoRA | Q acc DISeL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for factor, value, task_name, recipe in variants():
        if args.only and factor not in args.only:
            continue
        per_seed = [measure(task_name, recipe, seed) for seed in args.seeds]
        records.append({"factor": factor, "value": value, "task": task_name, "runs": per_seed})

        def pick(method, *keys):
            out = []
            for runs in per_seed:
                item = runs[method]
                for key in keys:
                    item = item[key]
                out.append(item)
            return out

        gate_p = [np.mean(list(g.values())) for g in pick("disel", "gates", "P")]
        gate_q = [np.mean(list(g.values())) for g in pick("disel", "gates", "Q")]
        print(
            f"| {factor} | {value} | {fmt(gate_p)} | {fmt(gate_q)} | {fmt(pick('lora', 'P', 'accuracy'))} | "
            f"{fmt(pick('disel', 'P', 'accuracy'))} | {fmt(pick('lora', 'P_kl_from_base'))} | "
            f"{fmt(pick('disel', 'P_kl_from_base'))} | {fmt(pick('lora', 'Q', 'accuracy'))} | {fmt(pick('disel', 'Q', 'accuracy'))} |",
            flush=True,
        )
        with open(args.out, "w") as file:
            json.dump(records, file, indent=1, default=str)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
