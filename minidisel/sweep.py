"""``minidisel sweep``: the demo's experiment over a grid, on every core, resumable.

A grid maps each axis to a list of values; an axis left out takes the
recipe's value. Axes (and the recipe field each one sets):

    task                 task family: disjoint, overlap-0 .. overlap-5, shared, markov
    method               full, lora, dora, disel
    rank                 adapter rank r (lora_alpha = 2 r, as in the demo)
    gate_bias_init       DISeL's initial gate bias b_g
    gate_lr_multiplier   DISeL's gate learning rate / base learning rate
    width                model width d_model
    seed                 seed of the base model, the data and the adapters
    steps                fine-tuning steps

An axis a method ignores is dropped from its runs (full fine-tuning has no
rank, LoRA and DoRA have no gates), so each distinct run happens once. A
grid file (TOML or JSON) holds axes at the top level, or a list ``grid`` of
sub-grids whose missing axes take the top-level values; the runs are the
union of the sub-grids.

Each finished run appends one JSON line to ``DIR/runs.jsonl``: the demo's run
record plus ``point`` (the grid point), ``base`` (the base model's metrics)
and format fields. A restarted sweep skips the runs already in that file.
"""

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from minidisel import __version__
from minidisel.checkpoint import atomic_write
from minidisel.config import check_choice, check_float, check_int
from minidisel.demo import base_model, check_output_folder, make_recipe
from minidisel.experiment import METHODS, evaluate, evaluation_sets, run_method
from minidisel.tasks import make_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

RUNS_FORMAT = 1
RUNS_FILE = "runs.jsonl"
AXES = ("task", "width", "seed", "method", "rank", "gate_bias_init", "gate_lr_multiplier", "steps")
GATE_AXES = ("gate_bias_init", "gate_lr_multiplier")
QUICK_GRID = {"task": ["disjoint"], "method": list(METHODS), "seed": [0, 1]}


def default_axes(recipe):
    """Return the value each axis takes when a grid leaves it out."""
    return {
        "task": ["disjoint"],
        "width": [recipe.model.d_model],
        "seed": [0],
        "method": list(METHODS),
        "rank": [recipe.adapter.r],
        "gate_bias_init": [recipe.adapter.gate_bias_init],
        "gate_lr_multiplier": [recipe.adapter.gate_lr_multiplier],
        "steps": [recipe.finetune_steps],
    }


def check_value(axis, value, recipe):
    """Raise ``TypeError``/``ValueError`` unless ``value`` is valid on ``axis``; return it normalised."""
    if axis == "task":
        return make_task(value).name
    if axis == "method":
        check_choice("method", value, METHODS)
        return value
    if axis in ("rank", "steps"):
        check_int(axis, value)
        return value
    if axis == "seed":
        check_int("seed", value, minimum=0)
        return value
    if axis == "width":
        check_int("width", value)
        if value % recipe.model.n_heads:
            raise ValueError(f"width must be a multiple of the {recipe.model.n_heads} attention heads, got {value}")
        return value
    if axis == "gate_lr_multiplier":
        check_float(axis, value, 0.0, low_open=True)
        return float(value)
    check_float(axis, value)
    return float(value)


def check_axes(table, source, recipe):
    """Return ``{axis: [values]}`` from one grid table, raising a one-line error on any invalid entry."""
    if not isinstance(table, dict):
        raise TypeError(f"a grid in {source} must be a table of axes, got {table!r}")
    axes = {}
    for axis, values in table.items():
        if axis not in AXES:
            raise ValueError(f"unknown grid key {axis!r} in {source}; allowed: {', '.join(AXES)}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ValueError(f"grid axis {axis!r} in {source} is empty; give at least one value")
        try:
            checked = [check_value(axis, value, recipe) for value in values]
        except (TypeError, ValueError) as error:
            raise type(error)(f"invalid value on grid axis {axis!r} in {source}: {error}") from None
        axes[axis] = list(dict.fromkeys(checked))  # drop repeats, keep order
    return axes


def parse_grid(spec, source, recipe):
    """Return the list of sub-grids (``{axis: [values]}`` with every axis) described by ``spec``."""
    if not isinstance(spec, dict):
        raise TypeError(f"the grid in {source} must be a table, got {type(spec).__name__}")
    shared = check_axes({key: value for key, value in spec.items() if key != "grid"}, source, recipe)
    tables = spec.get("grid", [{}])
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"the grid in {source} is empty: 'grid' must be a non-empty list of tables")
    defaults = default_axes(recipe)
    return [{**defaults, **shared, **check_axes(table, f"{source} grid[{i}]", recipe)} for i, table in enumerate(tables)]


def load_grid_file(path):
    """Read a grid from a ``.toml`` or ``.json`` file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read grid file {path}: {error.strerror}") from error
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix == ".toml":
            return tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"grid file {path} is not valid {path.suffix[1:].upper()}: {error}") from error
    raise ValueError(f"grid file {path} must end in .toml or .json")


def grid_point(values):
    """Return a run's grid point, with the axes its method ignores set to None."""
    point = dict(zip(AXES, values))
    if point["method"] == "full":
        point["rank"] = None
    if point["method"] != "disel":
        point.update({axis: None for axis in GATE_AXES})
    return point


def expand_grid(grids):
    """Return the distinct grid points of all sub-grids, in order."""
    points = {}
    for grid in grids:
        for values in itertools.product(*(grid[axis] for axis in AXES)):
            point = grid_point(values)
            points.setdefault(point_key(point), point)
    if not points:
        raise ValueError("the grid is empty")
    return list(points.values())


def point_key(point):
    """Return a string that identifies a grid point."""
    return json.dumps(point, sort_keys=True)


def point_recipe(recipe, point):
    """Return the recipe of one grid point: ``recipe`` with its width, rank, gate settings and steps."""
    recipe = replace(recipe, model=replace(recipe.model, d_model=point["width"]), finetune_steps=point["steps"])
    adapter = recipe.adapter
    if point["rank"] is not None:
        adapter = replace(adapter, r=point["rank"], lora_alpha=2.0 * point["rank"])
    if point["gate_bias_init"] is not None:
        adapter = replace(adapter, gate_bias_init=point["gate_bias_init"], gate_lr_multiplier=point["gate_lr_multiplier"])
    return replace(recipe, adapter=adapter)


def recipe_digest(recipe):
    """Return a short hash of the recipe that every grid point starts from."""
    description = json.dumps(asdict(recipe), sort_keys=True, default=str)
    return hashlib.sha256(description.encode()).hexdigest()[:16]


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

    Each base model is pre-trained (or loaded) once, in a worker, and its runs
    are queued as soon as it is ready.
    """
    groups = group_by_base(points)
    records = []
    bar = tqdm(total=len(points), unit="run", desc="sweep", disable=not progress)
    # workers start at the first submissions, so the environment must stay set while jobs are submitted
    with single_threaded_blas():
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            running = {pool.submit(prepare_base, *base, recipe, use_cache): base for base in groups}
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    if isinstance(job, tuple):
                        params, base_eval = future.result()
                        for point in groups[job]:
                            running[pool.submit(run_point, point, recipe, params, base_eval, header)] = point
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

    wanted = {point_key(point) for point in points}
    selected = [record for record in records if point_key(record["point"]) in wanted]
    for name in write_report(out, selected):
        log(f"wrote {Path(out) / name}")
    return selected
