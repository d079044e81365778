"""Profile minidisel's training step for one configuration and measure its memory churn.

Prints, per step, CPU milliseconds and minor page faults (fresh pages the
kernel had to map in), first with glibc's default malloc thresholds, then
after :func:`minidisel.allocator.keep_freed_memory`. Then it prints the peak
of NumPy memory traced by ``tracemalloc`` and a call-tree profile of the
step from pyinstrument, or cProfile's CPU-time table without pyinstrument.

    python benchmarks/profile_step.py demo disel float32 [--plain]
"""

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_step import DTYPES, METHODS, SIZES, Case, MinidiselStep, limit_threads, make_batch  # noqa: E402

from minidisel.allocator import keep_freed_memory  # noqa: E402


def churn(step, n_steps):
    """Return (median CPU ms, minor page faults per step) over ``n_steps`` steps."""
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(n_steps):
        started = time.process_time()
        step()
        times.append(time.process_time() - started)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / n_steps
    return 1000 * float(np.median(times)), faults


def traced_peak(step):
    """Return the peak NumPy and Python memory (MiB) that ``tracemalloc`` records during one step."""
    tracemalloc.start()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def profile(step, n_steps):
    """Print a profile of ``n_steps`` steps: pyinstrument's call tree, else cProfile's CPU-time table."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        import cProfile
        import pstats

        print("pyinstrument is not installed; cProfile with CPU time instead")
        profiler = cProfile.Profile(time.process_time)
        profiler.runcall(lambda: [step() for _ in range(n_steps)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    profiler = Profiler(interval=0.001)
    profiler.start()
    for _ in range(n_steps):
        step()
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", choices=list(SIZES))
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("dtype", choices=DTYPES)
    parser.add_argument("--plain", action="store_true", help="profile the plain layer functions instead")
    parser.add_argument("--steps", type=int, default=30, help="steps per measurement (default: 30)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default: 1)")
    args = parser.parse_args(argv)

    limit_threads(args.threads)
    case = Case(args.size, args.method, args.dtype)
    step = MinidiselStep(case, make_batch(case.model_config(), np.random.default_rng(2)), fused=not args.plain)
    for _ in range(3):
        step()
    layers = "plain" if args.plain else "fused"
    print(f"{case.name}, {layers} layers, {args.threads} BLAS thread(s)")
    milliseconds, faults = churn(step, args.steps)
    print(f"glibc default thresholds: {milliseconds:.1f} ms CPU per step, {faults:.0f} minor page faults per step")
    applied = keep_freed_memory()
    milliseconds, faults = churn(step, args.steps)
    print(f"keep_freed_memory() (applied: {applied}): {milliseconds:.1f} ms CPU per step, {faults:.0f} minor page faults per step")
    print(f"peak traced memory during one step: {traced_peak(step):.1f} MiB\n")
    profile(step, args.steps)


if __name__ == "__main__":
    main()
