"""Measure what the fused layers and the leafwise gradients each contribute to one training step.

Variants: the plain or the fused layer functions, differentiated by
autograd's ``value_and_grad`` (which traces the parameter tree as one
container) or by :func:`minidisel.autodiff.leafwise_value_and_grad`, with
PyTorch's step as a yardstick, all in one process and in alternating rounds.
The table gives the median CPU milliseconds per step and the minor page
faults per step.

glibc adjusts its malloc thresholds to the largest block a process has
freed, so in a process that runs several variants, each one's page faults
depend on the others. ``profile_step.py`` therefore measures the
allocator's effect, one variant per fresh process. Here freed memory is kept
(:func:`minidisel.allocator.keep_freed_memory`, as the CLI does) unless
``--default-allocator`` is given.

    python benchmarks/ablation.py demo disel float64
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_step import DTYPES, METHODS, SIZES, Case, MinidiselStep, TorchStep, limit_threads, make_batch, torch  # noqa: E402

from minidisel.allocator import keep_freed_memory  # noqa: E402

VARIANTS = {
    "plain layers, autograd value_and_grad": dict(fused=False, leafwise=False),
    "plain layers, leafwise gradients": dict(fused=False, leafwise=True),
    "fused layers, autograd value_and_grad": dict(fused=True, leafwise=False),
    "fused layers, leafwise gradients": dict(fused=True, leafwise=True),
}


def measure(steps, rounds, steps_per_round):
    """Return ``{name: (median CPU ms, minor faults per step)}``, alternating the step functions in rounds."""
    cpu = {name: [] for name in steps}
    faults = {name: 0 for name in steps}
    names = list(steps)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(steps_per_round):
                started = time.process_time()
                steps[name]()
                cpu[name].append(time.process_time() - started)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    n = rounds * steps_per_round
    return {name: (1000 * float(np.median(cpu[name])), faults[name] / n) for name in names}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", choices=list(SIZES))
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("dtype", choices=DTYPES)
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default: 8)")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round (default: 5)")
    parser.add_argument("--default-allocator", action="store_true", help="do not call keep_freed_memory()")
    args = parser.parse_args(argv)

    limit_threads(1)
    kept = False if args.default_allocator else keep_freed_memory()
    case = Case(args.size, args.method, args.dtype)
    batch = make_batch(case.model_config(), np.random.default_rng(2))
    steps = {name: MinidiselStep(case, batch, **options) for name, options in VARIANTS.items()}
    if torch is not None:
        steps["PyTorch (same process)"] = TorchStep(case, batch)
    for step in steps.values():
        for _ in range(3):
            step()

    results = measure(steps, args.rounds, args.steps)
    print(f"{case.name}, 1 BLAS thread, freed memory kept: {'yes' if kept else 'no'}\n")
    print("| variant | median CPU ms per step | minor page faults per step |")
    print("|---|---|---|")
    for name, (milliseconds, faults) in results.items():
        print(f"| {name} | {milliseconds:.1f} | {faults:.0f} |")


if __name__ == "__main__":
    main()
