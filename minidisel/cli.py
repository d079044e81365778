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

    sweep = commands.add_parser("sweep", help="run the demo's experiment over a grid and plot the accuracy-retention trade-off")
    sweep.add_argument("--config", default=None, help="grid file, .toml or .json (axes at the top level or a list 'grid' of sub-grids)")
    sweep.add_argument("--out", required=True, help="folder for runs.jsonl, tradeoff.png, by_<axis>.png and summary.md")
    for axis, text in SWEEP_AXIS_HELP.items():
        sweep.add_argument(f"--{axis.replace('_', '-')}", dest=axis, default=None, help=f"comma-separated {text}")
    sweep.add_argument("--quick", action="store_true", help="the tiny demo recipe and, without other axes, a grid that runs in seconds")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes (default: one per available core)")
    sweep.add_argument("--no-cache", action="store_true", help="pre-train base models even if cached copies exist")
    return parser


SWEEP_AXIS_HELP = {
    "task": "task families (default: disjoint)",
    "method": "methods among full, lora, dora, disel (default: all four)",
    "rank": "adapter ranks r; lora_alpha is 2r (default: the recipe's)",
    "gate_bias_init": "initial DISeL gate biases b_g (default: the recipe's)",
    "gate_lr_multiplier": "DISeL gate learning-rate multipliers (default: the recipe's)",
    "width": "model widths d_model (default: the recipe's)",
    "seed": "seeds (default: 0)",
    "steps": "fine-tuning step counts (default: the recipe's)",
}
SWEEP_AXIS_TYPES = {"rank": int, "width": int, "seed": int, "steps": int, "gate_bias_init": float, "gate_lr_multiplier": float}


def parse_axis_option(axis, text):
    """Split a comma-separated option into typed values, raising ``ValueError`` naming the option."""
    convert = SWEEP_AXIS_TYPES.get(axis, str)
    values = []
    for item in text.split(","):
        try:
            values.append(convert(item.strip()))
        except ValueError:
            option = "--" + axis.replace("_", "-")
            raise ValueError(f"invalid value {item.strip()!r} in {option}: expected a comma-separated list of {convert.__name__}s") from None
    return values


def run_sweep_command(args):
    """Run ``minidisel sweep`` with parsed arguments."""
    from minidisel.sweep import run_sweep
    from minidisel.sweep_grid import load_grid_file

    spec = load_grid_file(args.config) if args.config else None
    options = {axis: parse_axis_option(axis, getattr(args, axis)) for axis in SWEEP_AXIS_HELP if getattr(args, axis) is not None}
    if options:
        spec = {**(spec or {}), **options}
    source = args.config or "the command line"
    run_sweep(spec, args.out, quick=args.quick, workers=args.workers, use_cache=not args.no_cache, source=source)


def run_demo_command(args):
    """Run ``minidisel demo`` with parsed arguments."""
    from minidisel.demo import run_demo

    run_demo(
        args.task, args.seed, args.steps, args.rank, args.quick, args.out, use_cache=not args.no_cache, progress=True
    )


COMMANDS = {"demo": run_demo_command, "sweep": run_sweep_command}


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
