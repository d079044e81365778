"""Sweep grids: axes, validation, expansion into grid points, and the recipe of each point.

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
grid file (TOML or JSON) contains axes at the top level, or a list ``grid``
of sub-grids whose missing axes take the top-level values. The runs are the
union of the sub-grids.
"""

import hashlib
import itertools
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from minidisel.config import check_choice, check_float, check_int
from minidisel.experiment import METHODS
from minidisel.tasks import make_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

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
