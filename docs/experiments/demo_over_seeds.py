"""Run ``minidisel demo`` over several seeds and task families and summarise the runs.

Usage: python docs/experiments/demo_over_seeds.py OUT.json [--seeds 0 1 2] [--tasks disjoint shared markov]

Writes every run's results dict to OUT.json and prints a Markdown table with
mean ± standard deviation over seeds of each method's scores and drift.
"""

import argparse
import json
import time

import numpy as np

from minidisel.demo import run_demo


def summarise(results_by_task):
    """Return Markdown rows: task, method, Q score, P score after, P drift, gates on P and Q."""
    rows = []
    for task, runs in results_by_task.items():
        use_accuracy = runs[0]["base"]["P"]["accuracy"] is not None
        key = "accuracy" if use_accuracy else "nll"
        base_p = [r["base"]["P"][key] for r in runs]
        for method in ("full", "lora", "disel"):
            picked = [next(x for x in r["runs"] if x["method"] == method) for r in runs]
            q = [x["Q"][key] for x in picked]
            p = [x["P"][key] for x in picked]
            kl = [x["P_kl_from_base"] for x in picked]
            gates = ""
            if method == "disel":
                gp = [np.mean(list(x["gates"]["P"].values())) for x in picked]
                gq = [np.mean(list(x["gates"]["Q"].values())) for x in picked]
                gates = f"{fmt(gp)} | {fmt(gq)}"
            rows.append(f"| {task} | {method} | {key} | {fmt(q)} | {fmt(base_p)} → {fmt(p)} | {fmt(kl)} | {gates or '– | –'} |")
    return rows


def fmt(values):
    """Format a list of numbers as mean ± sample standard deviation."""
    values = np.asarray(values, dtype=float)
    spread = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {spread:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["disjoint", "shared", "markov"])
    args = parser.parse_args()

    results, started = {}, time.perf_counter()
    for task in args.tasks:
        results[task] = [run_demo(task, seed=seed, log=lambda line: None) for seed in args.seeds]
        print(f"{task}: done after {time.perf_counter() - started:.0f} s", flush=True)
    with open(args.out, "w") as file:
        json.dump(results, file, indent=1)

    print("| task | method | score | Q score | P score (base → after) | P KL from base | DISeL gate on P | DISeL gate on Q |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(summarise(results)))


if __name__ == "__main__":
    main()
