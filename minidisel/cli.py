"""The ``minidisel`` command line."""

import argparse
import sys
import warnings

from minidisel import __version__


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
    return parser


def run_demo_command(args):
    """Run ``minidisel demo`` with parsed arguments."""
    from minidisel.demo import run_demo

    run_demo(
        args.task, args.seed, args.steps, args.rank, args.quick, args.out, use_cache=not args.no_cache, progress=True
    )


COMMANDS = {"demo": run_demo_command}


def main(argv=None):
    """Run the command line; invalid input prints one line to stderr and exits with status 2."""
    args = build_parser().parse_args(argv)
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
