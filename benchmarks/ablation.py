"""Measure what each speed-up contributes to one training step, in one process.

Variants: the plain or the fused layer functions, differentiated by
autograd's ``value_and_grad`` (which traces the parameter tree as one
container) or by :func:`minidisel.autodiff.leafwise_value_and_grad`; each first
with glibc's default malloc thresholds, then after
:func:`minidisel.allocator.keep_freed_memory` (which cannot be undone within a
process, so the default-allocator rounds come first). PyTorch's step runs in
the same rounds as a yardstick. Rounds alternate the variants; the table
gives the median CPU milliseconds per step and the minor page faults per step.

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
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per allocator setting (default: 6)")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round (default: 5)")
    args = parser.parse_args(argv)

    limit_threads(1)
    case = Case(args.size, args.method, args.dtype)
    batch = make_batch(case.model_config(), np.random.default_rng(2))
    steps = {name: MinidiselStep(case, batch, **options) for name, options in VARIANTS.items()}
    if torch is not None:
        steps["PyTorch (same process)"] = TorchStep(case, batch)
    for step in steps.values():
        for _ in range(3):
            step()

    print(f"{case.name}, 1 BLAS thread, median CPU ms per step (minor page faults per step)\n")
    print("| variant | glibc default thresholds | keep_freed_memory() |")
    print("|---|---|---|")
    default = measure(steps, args.rounds, args.steps)
    applied = keep_freed_memory()
    kept = measure(steps, args.rounds, args.steps)
    for name in steps:
        print(f"| {name} | {default[name][0]:.1f} ({default[name][1]:.0f}) | {kept[name][0]:.1f} ({kept[name][1]:.0f}) |")
    if not applied:
        print("\nkeep_freed_memory() did not apply (not glibc), so both columns use the default thresholds")


if __name__ == "__main__":
    main()
