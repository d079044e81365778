"""``minidisel sweep``: the demo's experiment over a grid, on every core, resumable.

The grid and its axes are described in :mod:`minidisel.sweep_grid`. Each
finished run appends one JSON line to ``DIR/runs.jsonl``: the demo's run
record plus ``point`` (the grid point), ``base`` (the base model's metrics on
P and Q) and format fields. A restarted sweep skips the runs already in that
file. The figures and the summary table come from
:mod:`minidisel.sweep_report`.
"""

import json
import multiprocessing
import os
import time
import warnings
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from minidisel import __version__
from minidisel.checkpoint import atomic_write
from minidisel.config import check_int
from minidisel.demo import base_model, check_output_folder, make_recipe
from minidisel.experiment import evaluate, evaluation_sets, run_method
from minidisel.sweep_grid import QUICK_GRID, expand_grid, parse_grid, point_key, point_recipe, recipe_digest
from minidisel.tasks import make_task

RUNS_FORMAT = 1
RUNS_FILE = "runs.jsonl"


def check_record(record, number, path, digest):
    """Raise ``ValueError`` unless line ``number`` of the runs file is a run of this format and recipe."""
    if not isinstance(record, dict) or record.get("format") != RUNS_FORMAT or "point" not in record:
        found = record.get("format") if isinstance(record, dict) else None
        raise ValueError(
            f"{path} line {number} was written by an incompatible minidisel (runs format {found!r}, this version "
            f"writes {RUNS_FORMAT}); move the file away or choose another output folder"
        )
    if record.get("recipe_digest") != digest:
        raise ValueError(
            f"{path} line {number} is a run of another recipe (digest {record.get('recipe_digest')}, this sweep "
            f"{digest}, for example --quick against the full recipe); choose another output folder"
        )


def read_runs(path, digest):
    """Return the records of a runs file, dropping a corrupt last line (with a warning) and raising on others."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not valid JSON ({error}); fix or delete that line") from None
            warnings.warn(f"ignoring the corrupt last line {number} of {path} (an interrupted write); that run will be repeated", stacklevel=2)
            rewrite_runs(path, records)
            break
        check_record(record, number, path, digest)
        records.append(record)
    else:
        if lines and not path.read_text().endswith("\n"):
            rewrite_runs(path, records)  # so the next record starts on a line of its own
    return records


def rewrite_runs(path, records):
    """Replace the runs file by ``records``, atomically."""
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def append_run(path, record):
    """Append one record as a JSON line and flush it to disk."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record, sort_keys=True) + "\n")
        file.flush()
        os.fsync(file.fileno())


def check_runs_writable(out):
    """Raise ``ValueError`` unless the runs file in ``out`` can be created or appended to."""
    path = Path(out) / RUNS_FILE
    if path.exists() and not path.is_file():
        raise ValueError(f"runs file {path} is not a regular file; remove it or choose another output folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"runs file {path} is not writable")
    return path


def available_cores():
    """Return the number of cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def single_threaded_blas():
    """Limit BLAS and OpenMP to one thread in worker processes started inside this block.

    One worker per core already fills the machine; a multi-threaded BLAS in
    each worker would only oversubscribe the cores.
    """
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def quiet(line):
    """Discard a log line (workers report through their results)."""


def prepare_base(task_name, width, seed, recipe, use_cache):
    """Return the base model of one (task, width, seed), from the cache or pre-trained, and its evaluation."""
    recipe = replace(recipe, model=replace(recipe.model, d_model=width))
    task = make_task(task_name)
    params = base_model(task, recipe, seed, use_cache, log=quiet)
    base_eval = evaluate(params, evaluation_sets(task, seed, recipe.eval_size), task, recipe.model)
    return params, base_eval


def run_point(point, recipe, base, base_eval, header):
    """Fine-tune and evaluate one grid point; return its runs-file record.

    A run whose training diverges is recorded with its ``error`` message, so
    that the sweep goes on and a restart does not repeat it.
    """
    recipe = point_recipe(recipe, point)
    task = make_task(point["task"])
    eval_sets = evaluation_sets(task, point["seed"], recipe.eval_size)
    record = {**header, "point": point, "base": {dist: base_eval[dist]["metrics"] for dist in ("P", "Q")}}
    try:
        run, _ = run_method(base, base_eval, eval_sets, task, point["method"], recipe, point["seed"], log=quiet)
    except FloatingPointError as error:
        return {**record, "method": point["method"], "error": str(error)}
    return {**record, **run}


def group_by_base(points):
    """Return ``{(task, width, seed): [points]}``: the runs that share one pre-trained base model."""
    groups = {}
    for point in points:
        groups.setdefault((point["task"], point["width"], point["seed"]), []).append(point)
    return groups


def execute(points, recipe, header, runs_path, workers, use_cache, log, progress):
    """Run ``points`` on ``workers`` processes, appending each record to ``runs_path``; return the records.

    Each base model is pre-trained (or loaded) once, in a worker. A free
    worker takes a run whose base is ready before it starts another base, so
    finished runs reach the file early and an interruption loses little.
    """
    groups = group_by_base(points)
    bases, ready = deque(groups), deque()
    records, running = [], {}
    bar = tqdm(total=len(points), unit="run", desc="sweep", disable=not progress)
    # workers start at the first submissions, so the environment must stay set while jobs are submitted
    with single_threaded_blas():
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            while bases or ready or running:
                while len(running) < workers and (bases or ready):
                    submit_next(pool, running, bases, ready, recipe, header, use_cache)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    if isinstance(job, tuple):
                        params, base_eval = future.result()
                        ready.extend((point, params, base_eval) for point in groups[job])
                        continue
                    record = future.result()
                    append_run(runs_path, record)
                    records.append(record)
                    bar.update(1)
                    if "error" in record:
                        bar.write(f"run {point_key(job)} failed: {record['error']}")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()
            log(f"sweep stopped: {len(records)} new runs saved in {runs_path}; run the same command again to resume")
            raise
    pool.shutdown()
    bar.close()
    return records


def submit_next(pool, running, bases, ready, recipe, header, use_cache):
    """Submit the next job: a run whose base model is ready, else the next base model."""
    if ready:
        point, params, base_eval = ready.popleft()
        running[pool.submit(run_point, point, recipe, params, base_eval, header)] = point
    else:
        base = bases.popleft()
        running[pool.submit(prepare_base, *base, recipe, use_cache)] = base


def run_sweep(spec, out, quick=False, workers=None, use_cache=True, source="the command line", log=print, progress=True):
    """Run every grid point of ``spec`` not yet in ``out/runs.jsonl``, then write the figures; return the records.

    ``spec`` is a grid table as read from a grid file (None: the ``--quick``
    grid, or the recipe's single point). Every input is checked before the
    first run starts.
    """
    recipe = make_recipe(quick)
    if spec is None:
        spec = QUICK_GRID if quick else {}
    points = expand_grid(parse_grid(spec, source, recipe))
    workers = available_cores() if workers is None else workers
    check_int("workers", workers)
    check_output_folder(out)
    runs_path = check_runs_writable(out)
    digest = recipe_digest(recipe)
    records = read_runs(runs_path, digest)

    done = {point_key(record["point"]) for record in records}
    pending = [point for point in points if point_key(point) not in done]
    log(f"sweep: {len(points)} runs in the grid, {len(points) - len(pending)} already in {runs_path}, "
        f"{len(pending)} to run on {workers} worker processes")
    started = time.perf_counter()
    if pending:
        header = {"format": RUNS_FORMAT, "minidisel_version": __version__, "recipe": "quick" if quick else "default", "recipe_digest": digest}
        records += execute(pending, recipe, header, runs_path, workers, use_cache, log, progress)
    log(f"sweep: {len(pending)} runs finished in {time.perf_counter() - started:.0f} s")

    from minidisel.sweep_report import write_report

    requested = {point_key(point) for point in points}
    selected = [record for record in records if point_key(record["point"]) in requested]
    reference = {"gate_bias_init": recipe.adapter.gate_bias_init, "gate_lr_multiplier": recipe.adapter.gate_lr_multiplier}
    for name in write_report(out, selected, reference):
        log(f"wrote {Path(out) / name}")
    return selected
