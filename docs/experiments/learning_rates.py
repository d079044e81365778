"""Fine-tune one base model with each method at three learning rates and print Q and P scores.

Usage: python docs/experiments/learning_rates.py TASK SEED
"""

import sys
from dataclasses import replace

from minidisel.demo import base_model
from minidisel.experiment import METHODS, Recipe, evaluate, evaluation_sets, run_method
from minidisel.tasks import make_task


def main():
    task, seed = make_task(sys.argv[1]), int(sys.argv[2])
    recipe = replace(Recipe(), eval_size=256)
    base = base_model(task, recipe, seed, log=lambda line: None)
    eval_sets = evaluation_sets(task, seed, recipe.eval_size)
    base_eval = evaluate(base, eval_sets, task, recipe.model)
    for method in METHODS:
        for lr in (1e-3, 3e-3, 1e-2):
            run, _ = run_method(
                base, base_eval, eval_sets, task, method, replace(recipe, learning_rates=((method, lr),)), seed,
                log=lambda line: None,
            )
            print(f"{method:<6} lr {lr:.0e}  Q {run['Q']}  P {run['P']}  P KL {run['P_kl_from_base']:.3f}", flush=True)


if __name__ == "__main__":
    main()
