"""Time one training step of minidisel against an equivalent PyTorch model, side by side.

A training step is the forward pass, the backward pass, gradient clipping and
the AdamW update, on one fixed batch of random tokens with every position
scored. For each configuration the script first checks that minidisel (fused
and plain) and the PyTorch copy in ``torch_reference.py`` compute the same
losses over three steps from the same weights. It then times them in rounds
that alternate the implementations, so that changes in the machine's load hit
all of them alike. It reports medians, interquartile ranges and the ratio of
minidisel's median to PyTorch's, in wall-clock and in CPU time.

With ``--demo`` it also runs ``python -m minidisel demo`` (default settings,
fresh cache, so pre-training is included) and reports its wall time and peak
resident memory.

    python benchmarks/training_step.py --demo > timings.md

PyTorch is optional: without it the PyTorch columns are skipped with a message.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from autograd import value_and_grad

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minidisel import AdapterConfig, ModelConfig, TrainConfig, init_adapters, init_params  # noqa: E402
from minidisel.allocator import keep_freed_memory  # noqa: E402
from minidisel.experiment import language_model_loss  # noqa: E402
from minidisel.autodiff import leafwise_value_and_grad  # noqa: E402
from minidisel.train import adamw_init, adamw_step, clip_by_global_norm  # noqa: E402

try:
    import torch
except ImportError:  # the PyTorch columns are skipped
    torch = None

SIZES = {
    "demo": dict(vocab_size=32, d_model=64, n_layers=2, n_heads=4, max_seq_len=32),
    "wide": dict(vocab_size=32, d_model=128, n_layers=4, n_heads=4, max_seq_len=64),
}
METHODS = ("full", "lora", "disel")
DTYPES = ("float32", "float64")
BATCH_SIZE = 32
ADAPTER = dict(r=8, lora_alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
TRAIN = TrainConfig(steps=10_000, batch_size=BATCH_SIZE, lr=1e-3, weight_decay=0.01, log_every=0, progress=False)
GATE_LR_MULTIPLIER = 5.0


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: model size, training method and dtype."""

    size: str
    method: str
    dtype: str

    @property
    def name(self):
        return f"{self.size} {self.method} {self.dtype}"

    def model_config(self):
        return ModelConfig(**SIZES[self.size], dtype=self.dtype)

    def adapter_config(self):
        return None if self.method == "full" else AdapterConfig(method=self.method, **ADAPTER)


def make_batch(config, rng):
    """Return a fixed batch of random tokens with every position scored."""
    shape = (BATCH_SIZE, config.max_seq_len)
    return {
        "inputs": rng.integers(0, config.vocab_size, shape),
        "targets": rng.integers(0, config.vocab_size, shape),
        "mask": np.ones(shape, dtype=bool),
    }


def initial_weights(case):
    """Return the base parameters and adapters (None for full fine-tuning) of ``case``, seeded."""
    rng = np.random.default_rng(0)
    config, adapter_config = case.model_config(), case.adapter_config()
    params = init_params(config, rng)
    adapters = None if adapter_config is None else init_adapters(params, config, adapter_config, rng)
    return params, adapters


class MinidiselStep:
    """minidisel's training step, as :func:`minidisel.train.train` runs it (``leafwise=False``: autograd's own
    ``value_and_grad``, as before :mod:`minidisel.autodiff`)."""

    def __init__(self, case, batch, fused, leafwise=True):
        self.config, self.adapter_config = case.model_config(), case.adapter_config()
        params, adapters = initial_weights(case)
        self.trainable, self.frozen = (params, None) if adapters is None else (adapters, params)
        self.state = adamw_init(self.trainable)
        self.batch, self.rng = batch, np.random.default_rng(1)

        def loss(trainable, frozen, batch, rng):
            return language_model_loss(trainable, frozen, batch, rng, self.config, self.adapter_config, fused)

        self.loss_and_grad = leafwise_value_and_grad(loss) if leafwise else value_and_grad(loss)

    def __call__(self):
        loss, grads = self.loss_and_grad(self.trainable, self.frozen, self.batch, self.rng)
        grads, _ = clip_by_global_norm(grads, TRAIN.max_grad_norm)
        self.trainable, self.state = adamw_step(self.trainable, grads, self.state, TRAIN, GATE_LR_MULTIPLIER)
        return float(loss)


class TorchStep:
    """The same step in PyTorch eager mode."""

    def __init__(self, case, batch):
        from torch_reference import GPT, Trainer, to_torch_batch

        params, adapters = initial_weights(case)
        model = GPT(params, case.model_config(), adapters, case.adapter_config())
        self.trainer = Trainer(model, case.method == "full", TRAIN, GATE_LR_MULTIPLIER)
        self.batch = to_torch_batch(batch)

    def __call__(self):
        return self.trainer.step(self.batch).item()


def build_steps(case, with_plain):
    """Return ``{implementation: step function}`` for ``case``, each on its own copy of the weights."""
    batch = make_batch(case.model_config(), np.random.default_rng(2))
    steps = {"fused": MinidiselStep(case, batch, fused=True)}
    if with_plain:
        steps["plain"] = MinidiselStep(case, batch, fused=False)
    if torch is not None:
        steps["torch"] = TorchStep(case, batch)
    return steps


def check_same_losses(case, with_plain, n_steps=3):
    """Raise unless every implementation gives the same losses over ``n_steps`` fresh steps."""
    steps = build_steps(case, with_plain)
    losses = {name: [step() for _ in range(n_steps)] for name, step in steps.items()}
    rtol = 1e-9 if case.dtype == "float64" else 1e-4
    reference = np.array(losses["fused"])
    for name, values in losses.items():
        if not np.allclose(values, reference, rtol=rtol, atol=0.0):
            raise AssertionError(f"{case.name}: {name} losses {values} differ from fused minidisel's {list(reference)}")
    return reference


def time_case(case, rounds, steps_per_round, warmup, with_plain):
    """Return ``{implementation: (wall seconds, cpu seconds)}`` per timed step, alternating implementations."""
    steps = build_steps(case, with_plain)
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: ([], []) for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            for _ in range(steps_per_round):
                wall, cpu = time.perf_counter(), time.process_time()
                steps[name]()
                times[name][0].append(time.perf_counter() - wall)
                times[name][1].append(time.process_time() - cpu)
    return {name: (np.array(wall), np.array(cpu)) for name, (wall, cpu) in times.items()}


def milliseconds(values):
    """Format the median and interquartile range of ``values`` (seconds) in milliseconds."""
    q1, median, q3 = 1000 * np.percentile(values, [25, 50, 75])
    return f"{median:.1f} ({q1:.1f}-{q3:.1f})"


def table_row(case, times):
    """Return one markdown row: per implementation the wall-clock median and IQR, then the ratios."""
    cells = [case.name]
    for name in ("fused", "plain", "torch"):
        cells.append(milliseconds(times[name][0]) if name in times else "-")
    if "torch" in times:
        for column in (0, 1):
            ratio = np.median(times["fused"][column]) / np.median(times["torch"][column])
            cells.append(f"{ratio:.2f}")
    else:
        cells += ["-", "-"]
    return "| " + " | ".join(cells) + " |"


# Starts the demo from a small intermediate Python process and prints the demo's peak RSS. Linux
# carries a process's peak RSS across fork and exec, so a child of this benchmark (itself several
# hundred MiB with PyTorch loaded) would report at least the benchmark's own size.
PEAK_RSS_PROBE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_demo():
    """Run ``python -m minidisel demo`` with a fresh cache; return (wall seconds, peak RSS in MiB, exit code)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MINIDISEL_CACHE=cache, PYTHONPATH=str(ROOT))
        started = time.perf_counter()
        probe = subprocess.run(
            [sys.executable, "-c", PEAK_RSS_PROBE, sys.executable, "-m", "minidisel", "demo"],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        )
        seconds = time.perf_counter() - started
    code, peak_kib = map(int, probe.stdout.split())
    return seconds, peak_kib / 1024, code


def blas_description():
    """Describe NumPy's BLAS: library, version, kernel and threads (threadpoolctl), else NumPy's build info."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed (pip install threadpoolctl for the BLAS kernel in use)"
    return "; ".join(
        f"{info['internal_api']} {info['version']}, kernel {info.get('architecture')}, {info['num_threads']} threads"
        for info in threadpool_info() if info["user_api"] == "blas"
    )


def machine_description(threads):
    """Return markdown lines describing the machine, libraries and settings of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"
        + (f", PyTorch {torch.__version__}" if torch is not None else ", PyTorch not installed"),
        f"- NumPy BLAS: {blas_description()}",
        f"- threads: {threads} for NumPy's BLAS and for PyTorch",
        "- OPENBLAS_CORETYPE={}, OPENBLAS_L2_SIZE={}".format(
            os.environ.get("OPENBLAS_CORETYPE", "(unset)"), os.environ.get("OPENBLAS_L2_SIZE", "(unset)")
        ),
    ]
    if hasattr(os, "getloadavg"):
        lines.append("- load average (1, 5, 15 min) at start: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg()))
    return lines


def limit_threads(threads):
    """Limit NumPy's BLAS and PyTorch to ``threads`` threads; return the threadpoolctl limiter or None."""
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"note: threadpoolctl is not installed, so NumPy's BLAS keeps its default threads", file=sys.stderr)
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", nargs="*", default=list(SIZES), choices=list(SIZES), help="model sizes to time (none: only --demo)"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="training methods")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="floating-point types")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per configuration (default: 6)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation per round (default: 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and PyTorch threads (default: 1)")
    parser.add_argument("--plain", action="store_true", help="also time minidisel's plain layer functions")
    parser.add_argument("--demo", action="store_true", help="also time `minidisel demo` end to end")
    parser.add_argument(
        "--default-allocator", action="store_true",
        help="leave glibc's malloc thresholds alone instead of calling keep_freed_memory() as the CLI does",
    )
    return parser.parse_args(argv)


def print_header(args, kept):
    """Print the command, the machine and the settings of this run."""
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: `{command}`\n")
    print("\n".join(machine_description(args.threads)))
    print(f"- freed memory kept for reuse (keep_freed_memory, as the CLI does): {'yes' if kept else 'no'}\n")
    if torch is None:
        print("PyTorch is not installed: the PyTorch columns are skipped.\n")


def print_step_table(args):
    """Check and time every configuration, printing one table row each."""
    print("| configuration | fused ms | plain ms | PyTorch ms | fused / PyTorch (wall) | fused / PyTorch (CPU) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for method in args.methods:
            for dtype in args.dtypes:
                case = Case(size, method, dtype)
                check_same_losses(case, args.plain)
                times = time_case(case, args.rounds, args.steps, args.warmup, args.plain)
                print(table_row(case, times), flush=True)
    print(
        "\nBefore timing, every implementation gave the same losses over 3 steps from the same weights "
        "(relative tolerance 1e-9 in float64, 1e-4 in float32)."
    )


def main(argv=None):
    args = parse_args(argv)
    limiter = limit_threads(args.threads)
    kept = False if args.default_allocator else keep_freed_memory()
    print_header(args, kept)
    if args.sizes:
        print_step_table(args)

    if args.demo:
        if limiter is not None:
            limiter.restore_original_limits()
        seconds, peak, code = run_demo()
        print(f"\n`minidisel demo` (default settings, fresh cache): {seconds:.1f} s wall, peak RSS {peak:.0f} MiB, exit {code}")
    if hasattr(os, "getloadavg"):
        print("\nload average (1, 5, 15 min) at end: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
