"""The ``minidisel`` command line."""

import argparse
import os
import sys
import warnings

from minidisel import __version__
from minidisel.config import AdapterConfig

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
    add_sweep_parser(commands)
    add_oracle_parser(commands)
    return parser


def add_sweep_parser(commands):
    """Add ``minidisel sweep``."""
    sweep = commands.add_parser("sweep", help="run the demo's experiment over a grid and plot the accuracy-retention trade-off")
    sweep.add_argument("--config", default=None, help="grid file, .toml or .json (axes at the top level or a list 'grid' of sub-grids)")
    sweep.add_argument("--out", required=True, help="folder for runs.jsonl, tradeoff.png, gates.png, by_<axis>.png and summary.md")
    for axis, text in SWEEP_AXIS_HELP.items():
        sweep.add_argument(f"--{axis.replace('_', '-')}", dest=axis, default=None, help=f"comma-separated {text}")
    sweep.add_argument("--quick", action="store_true", help="the tiny demo recipe and, without other axes, a grid that runs in seconds")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes (default: one per available core)")
    sweep.add_argument("--no-cache", action="store_true", help="pre-train base models even if cached copies exist")


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


def add_oracle_parser(commands):
    """Add ``minidisel oracle export`` and ``minidisel oracle verify``."""
    oracle = commands.add_parser("oracle", help="write golden vectors, or check another implementation against them")
    actions = oracle.add_subparsers(dest="oracle_command", required=True)

    export = actions.add_parser("export", help="write float64 golden vectors to a folder")
    export.add_argument("dir", help="output folder")
    export.add_argument("--arch", choices=("gpt", "llama"), default="llama", help="base architecture (default: llama)")
    export.add_argument("--method", choices=("lora", "disel"), default="disel", help="adapter (default: disel)")
    export.add_argument("--rank", type=int, default=4, help="adapter rank r (default: 4)")
    export.add_argument("--lora-alpha", type=float, default=8.0, help="lora_alpha (default: 8)")
    export.add_argument("--use-rslora", action="store_true", help="scale by lora_alpha / sqrt(r) instead of lora_alpha / r")
    export.add_argument(
        "--target-modules", nargs="+", default=["all-linear"],
        help="adapted layers, e.g. q_proj v_proj, or all-linear (default: all-linear)",
    )
    export.add_argument("--gate-bias-init", type=float, default=-3.0, help="centre of the gate biases b_g (default: -3)")
    export.add_argument("--gate-weight-init", choices=("random", "zero"), default="random", help="gate weight init (default: random)")
    export.add_argument("--gate-normalize", action="store_true", help="scale gate logits by 1/sqrt(in_features)")
    export.add_argument("--gate-bottleneck-dim", type=int, default=None, help="bottleneck width of the gate (default: full gate)")
    export.add_argument("--seed", type=int, default=0, help="seed of parameters and inputs (default: 0)")
    export.add_argument("--batch-size", type=int, default=2, help="sequences in the input batch (default: 2)")
    export.add_argument("--seq-len", type=int, default=7, help="positions per sequence (default: 7)")

    verify = actions.add_parser("verify", help="compare a candidate .npz or .safetensors file with golden vectors")
    verify.add_argument("dir", help="folder written by 'minidisel oracle export'")
    verify.add_argument("candidate", help="candidate file with the keys logits, loss, gates.*, grads.*")
    verify.add_argument(
        "--tolerance", choices=("float64", "float32"), default="float64",
        help="tolerance preset from manifest.json (default: float64)",
    )
    verify.add_argument("--atol", type=float, default=None, help="absolute tolerance, overrides the preset")
    verify.add_argument("--rtol", type=float, default=None, help="relative tolerance, overrides the preset")


def run_demo_command(args):
    """Run ``minidisel demo`` with parsed arguments."""
    from minidisel.demo import run_demo

    run_demo(
        args.task, args.seed, args.steps, args.rank, args.quick, args.out,
        use_cache=not args.no_cache, progress=True, fused=not args.plain,
    )


def run_oracle_command(args):
    """Run ``minidisel oracle export`` or ``minidisel oracle verify``; return the exit status."""
    if args.oracle_command == "verify":
        return run_oracle_verify(args)
    return run_oracle_export(args)


def run_oracle_verify(args):
    """Print the comparison report; return 0 if every tensor matches, else 1."""
    from minidisel import oracle

    comparisons, atol, rtol = oracle.verify_candidate(args.dir, args.candidate, args.tolerance, args.atol, args.rtol)
    print(oracle.format_report(comparisons, atol, rtol))
    return 0 if all(c.passed for c in comparisons) else 1


def run_oracle_export(args):
    """Write golden vectors for the configuration given on the command line."""
    from minidisel import oracle

    targets = args.target_modules
    adapter_config = AdapterConfig(
        method=args.method,
        r=args.rank,
        lora_alpha=args.lora_alpha,
        use_rslora=args.use_rslora,
        target_modules=targets[0] if targets == ["all-linear"] else tuple(targets),
        gate_bias_init=args.gate_bias_init,
        gate_weight_init=args.gate_weight_init,
        gate_normalize=args.gate_normalize,
        gate_bottleneck_dim=args.gate_bottleneck_dim,
    )
    model_config = oracle.GOLDEN_MODELS[args.arch]
    manifest = oracle.export_golden(args.dir, model_config, adapter_config, args.seed, args.batch_size, args.seq_len)
    print(f"wrote {len(manifest['tensors'])} tensors ({len(manifest['outputs'])} outputs) to {args.dir}")
    return 0


COMMANDS = {"demo": run_demo_command, "sweep": run_sweep_command, "oracle": run_oracle_command}


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
            status = COMMANDS[args.command](args)
    except (ValueError, TypeError, FloatingPointError) as error:
        print(f"minidisel {args.command}: error: {error}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
