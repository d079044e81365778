"""The ``minidisel`` command line."""

import argparse
import os
import sys
import warnings

from minidisel import __version__

# environment variables that set the thread count of OpenBLAS, OpenMP and MKL builds of BLAS
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def build_parser():
    """Return the argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="minidisel", description="DISeL (Dynamic Input-Sensitive LoRA) in NumPy.")
    parser.add_argument("--version", action="version", version=f"minidisel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="pre-train on P, fine-tune on Q with full, LoRA and DISeL, and compare")
    demo.add_argument("--task", default="disjoint", help="task family: disjoint, overlap-0..overlap-5, shared, markov (default: disjoint)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the base model, data and adapters (default: 0)")
    demo.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method (default: 300; 20 with --quick)")
    demo.add_argument("--rank", type=int, default=None, help="adapter rank r; lora_alpha is set to 2r (default: 8; 2 with --quick)")
    demo.add_argument("--out", default=None, help="folder for results.json and the PNG figures")
    demo.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (for tests)")
    demo.add_argument("--no-cache", action="store_true", help="pre-train the base model even if a cached copy exists")
    demo.add_argument(
        "--plain", action="store_true",
        help="use the plain layer functions instead of the fused ones (same results to rounding, slower)",
    )
    return parser


def run_demo_command(args):
    """Run ``minidisel demo`` with parsed arguments."""
    from minidisel.demo import run_demo

    run_demo(
        args.task, args.seed, args.steps, args.rank, args.quick, args.out, use_cache=not args.no_cache, fused=not args.plain
    )


COMMANDS = {"demo": run_demo_command}


def restart_with_one_blas_thread():
    """Re-run this command with single-threaded BLAS, unless the environment already sets a thread count.

    The demo multiplies small matrices, where one BLAS thread is as fast as
    two. When other processes keep the cores busy, OpenBLAS's threads wait
    for each other: on a 2-core virtual machine shared with other jobs the
    demo took 11 minutes with two threads and 1 minute with one. BLAS reads
    its thread count when NumPy loads, before this function runs, so the
    command runs itself again with the variables set. This process is then
    replaced and the call does not return.
    """
    if any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        return
    environment = dict(os.environ, **{name: "1" for name in BLAS_THREAD_VARIABLES})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "minidisel", *sys.argv[1:]], environment)


def main(argv=None):
    """Run the command line; invalid input prints one line to stderr and exits with status 2."""
    from minidisel.allocator import keep_freed_memory

    args = build_parser().parse_args(argv)
    if argv is None and args.command == "demo":
        restart_with_one_blas_thread()
    keep_freed_memory()  # training steps reuse freed memory instead of page-faulting it in again
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            COMMANDS[args.command](args)
    except (ValueError, TypeError, FloatingPointError) as error:
        print(f"minidisel {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
