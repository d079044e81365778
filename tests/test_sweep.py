import json

import numpy as np
import pytest

from minidisel.cli import main
from minidisel.demo import QUICK_RECIPE
from minidisel.sweep import RUNS_FORMAT, read_runs, run_point, run_sweep
from minidisel.sweep_grid import AXES, expand_grid, load_grid_file, parse_grid, point_key, point_recipe, recipe_digest
from minidisel.sweep_report import aggregate, axis_lines, format_summary, write_report

DEMO_FIELDS = {"method", "trainable_params", "steps", "seconds", "P", "Q", "P_kl_from_base"}
SMALL_GRID = {"method": ["lora", "disel"], "seed": [3]}


def quiet(line):
    pass


def points_of(spec, recipe=QUICK_RECIPE):
    return expand_grid(parse_grid(spec, "test", recipe))


def test_grid_defaults_come_from_recipe():
    (point,) = points_of({"method": "disel"})
    assert point == {
        "task": "disjoint",
        "width": QUICK_RECIPE.model.d_model,
        "seed": 0,
        "method": "disel",
        "rank": QUICK_RECIPE.adapter.r,
        "gate_bias_init": QUICK_RECIPE.adapter.gate_bias_init,
        "gate_lr_multiplier": QUICK_RECIPE.adapter.gate_lr_multiplier,
        "steps": QUICK_RECIPE.finetune_steps,
    }
    assert set(point) == set(AXES)


def test_grid_drops_axes_a_method_ignores():
    spec = {"method": ["full", "lora", "disel"], "rank": [2, 4], "gate_bias_init": [-3, -5], "seed": [0, 1]}
    points = points_of(spec)
    by_method = {m: [p for p in points if p["method"] == m] for m in ("full", "lora", "disel")}
    assert len(by_method["full"]) == 2  # one per seed
    assert len(by_method["lora"]) == 4  # rank x seed
    assert len(by_method["disel"]) == 8  # rank x bias x seed
    assert all(p["rank"] is None and p["gate_bias_init"] is None for p in by_method["full"])
    assert all(p["gate_lr_multiplier"] is None for p in by_method["lora"])
    assert {p["gate_bias_init"] for p in by_method["disel"]} == {-3.0, -5.0}


def test_sub_grids_union_without_repeats():
    spec = {
        "seed": [0, 1],
        "method": ["lora", "disel"],
        "grid": [{"task": ["overlap-0", "overlap-2"]}, {"width": [16, 32]}],
    }
    points = points_of(spec)
    keys = [point_key(p) for p in points]
    assert len(keys) == len(set(keys))
    # sub-grid 1: 2 tasks x 2 methods x 2 seeds; sub-grid 2 adds width 32 (width 16 on disjoint repeats)
    assert len(points) == 8 + 4
    assert {p["task"] for p in points} == {"disjoint", "overlap-2"}


def test_point_recipe_sets_every_axis():
    point = points_of({"method": "disel", "rank": 4, "width": 32, "gate_bias_init": -5, "gate_lr_multiplier": 2, "steps": 7})[0]
    recipe = point_recipe(QUICK_RECIPE, point)
    assert recipe.model.d_model == 32
    assert recipe.finetune_steps == 7
    assert recipe.adapter.r == 4
    assert recipe.adapter.lora_alpha == 8.0
    assert recipe.adapter.gate_bias_init == -5.0
    assert recipe.adapter.gate_lr_multiplier == 2.0
    assert recipe.pretrain == QUICK_RECIPE.pretrain


def test_grid_files_toml_and_json(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text('seed = [0, 1]\nmethod = ["lora"]\n\n[[grid]]\ntask = "overlap-3"\n\n[[grid]]\nrank = [2, 4]\n')
    json_file = tmp_path / "grid.json"
    json_file.write_text(json.dumps({"seed": [0, 1], "method": ["lora"], "grid": [{"task": "overlap-3"}, {"rank": [2, 4]}]}))
    assert points_of(load_grid_file(toml)) == points_of(load_grid_file(json_file))
    assert len(points_of(load_grid_file(toml))) == 2 + 4


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"ranks": [2]}, "unknown grid key 'ranks' in"),
        ({"task": ["reverse"]}, "invalid value on grid axis 'task'"),
        ({"method": ["ia3"]}, "method must be one of 'full', 'lora', 'dora', 'disel', got 'ia3'"),
        ({"width": [15]}, "width must be a multiple of the 2 attention heads, got 15"),
        ({"rank": [0]}, "rank must be >= 1, got 0"),
        ({"rank": ["8"]}, "rank must be an int, got '8'"),
        ({"gate_lr_multiplier": [0]}, "gate_lr_multiplier must be in (0.0, inf]"),
        ({"seed": []}, "grid axis 'seed' in test is empty"),
        ({"grid": []}, "the grid in test is empty"),
        ({"grid": [{"steps": [0]}]}, "invalid value on grid axis 'steps' in test grid[0]"),
    ],
)
def test_grid_rejects_bad_input(spec, words):
    with pytest.raises((ValueError, TypeError)) as error:
        points_of(spec)
    assert words in str(error.value)


def write_grid(tmp_path, spec):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    return str(path)


def runs_file_lines(folder):
    return (folder / "runs.jsonl").read_text().splitlines()


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"rank": [2], "colour": "red"}, "unknown grid key 'colour'"),
        ({"task": "overlap-9"}, "unknown task 'overlap-9'"),
        ({"seed": []}, "grid axis 'seed'"),
    ],
)
def test_cli_bad_grid_exits_2_before_runs(tmp_path, capsys, spec, words):
    out = tmp_path / "out"
    assert main(["sweep", "--quick", "--config", write_grid(tmp_path, spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "runs.jsonl").exists()


def test_cli_bad_axis_option(tmp_path, capsys):
    assert main(["sweep", "--quick", "--rank", "2,x", "--out", str(tmp_path)]) == 2
    assert "invalid value 'x' in --rank: expected a comma-separated list of ints" in capsys.readouterr().err


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["sweep", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "cannot create output folder" in capsys.readouterr().err


def test_cli_runs_file_not_a_file(tmp_path, capsys):
    (tmp_path / "runs.jsonl").mkdir()
    assert main(["sweep", "--quick", "--out", str(tmp_path)]) == 2
    assert "runs.jsonl is not a regular file" in capsys.readouterr().err


def test_cli_incompatible_runs_file(tmp_path, capsys):
    (tmp_path / "runs.jsonl").write_text(json.dumps({"format": 0, "point": {}}) + "\n")
    assert main(["sweep", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "runs.jsonl line 1 was written by an incompatible minidisel (runs format 0" in err
    assert len(err.strip().splitlines()) == 1


def test_runs_file_of_other_recipe_rejected(tmp_path):
    record = {"format": RUNS_FORMAT, "point": {}, "recipe_digest": "0123"}
    (tmp_path / "runs.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="line 1 is a run of another recipe"):
        read_runs(tmp_path / "runs.jsonl", recipe_digest(QUICK_RECIPE))


def test_runs_file_corrupt_middle_line_rejected(tmp_path):
    digest = recipe_digest(QUICK_RECIPE)
    good = json.dumps({"format": RUNS_FORMAT, "point": {}, "recipe_digest": digest})
    (tmp_path / "runs.jsonl").write_text(good + "\n{broken\n" + good + "\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_runs(tmp_path / "runs.jsonl", digest)


def test_quick_sweep_writes_runs_and_figures(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["sweep", "--quick", "--out", str(out), "--workers", "2"]) == 0
    records = [json.loads(line) for line in runs_file_lines(out)]
    assert len(records) == 8  # 4 methods x 2 seeds
    assert {(r["point"]["method"], r["point"]["seed"]) for r in records} == {(m, s) for m in ("full", "lora", "dora", "disel") for s in (0, 1)}
    for record in records:
        expected = DEMO_FIELDS | {"point", "base", "format", "minidisel_version", "recipe", "recipe_digest"}
        assert set(record) == expected | ({"gates"} if record["method"] == "disel" else set())
        assert record["method"] == record["point"]["method"]
        assert record["format"] == RUNS_FORMAT
        assert record["recipe"] == "quick"
        assert set(record["base"]) == {"P", "Q"}
    for name in ("tradeoff.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    assert "| disjoint | 16 | 20 | dora | 2 |" in (out / "summary.md").read_text()


def test_sweep_resumes_and_repairs_last_line(tmp_path):
    out = tmp_path / "small"
    first = run_sweep(SMALL_GRID, out, quick=True, workers=1, log=quiet, progress=False)
    assert len(first) == 2
    assert len(runs_file_lines(out)) == 2

    # a finished sweep runs nothing again
    lines = []
    again = run_sweep(SMALL_GRID, out, quick=True, workers=1, log=lines.append, progress=False)
    assert "2 already in" in lines[0]
    assert "0 to run" in lines[0]
    assert [r["point"] for r in again] == [r["point"] for r in first]

    # an interrupted write leaves half a line: it is reported, dropped and its run repeated
    text = (out / "runs.jsonl").read_text()
    (out / "runs.jsonl").write_text(text[: len(text) - 40])
    with pytest.warns(UserWarning, match="ignoring the corrupt last line 2"):
        repaired = run_sweep(SMALL_GRID, out, quick=True, workers=1, log=quiet, progress=False)
    assert len(repaired) == 2
    assert len(runs_file_lines(out)) == 2
    for line in runs_file_lines(out):
        json.loads(line)
    repeated = {point_key(r["point"]): r for r in repaired}
    for record in first:
        assert repeated[point_key(record["point"])]["Q"] == record["Q"]  # runs are reproducible bit for bit


def test_diverged_run_is_recorded(monkeypatch):
    import minidisel.sweep as sweep

    def diverge(*args, **kwargs):
        raise FloatingPointError("training diverged: loss is nan at step 3")

    monkeypatch.setattr(sweep, "run_method", diverge)
    point = points_of({"method": "lora"})[0]
    metrics = {"accuracy": 0.5, "nll": 1.0}
    base_eval = {dist: {"metrics": metrics} for dist in ("P", "Q")}
    record = run_point(point, QUICK_RECIPE, None, base_eval, {"format": RUNS_FORMAT})
    assert record["error"] == "training diverged: loss is nan at step 3"
    assert record["point"] == point
    assert record["method"] == "lora"


def synthetic_records():
    """Return run records of two tasks, two methods and three seeds with known scores."""
    records = []
    for task, p_acc in (("overlap-0", 0.2), ("overlap-3", 0.6)):
        for method, shift in (("lora", 0.0), ("disel", 0.1)):
            for seed in range(3):
                point = {"task": task, "width": 64, "seed": seed, "method": method, "rank": 8, "steps": 300,
                         "gate_bias_init": -3.0 if method == "disel" else None, "gate_lr_multiplier": 5.0 if method == "disel" else None}
                record = {"point": point, "method": method, "P": {"accuracy": p_acc + shift + 0.01 * seed, "nll": 1.0},
                          "Q": {"accuracy": 0.9, "nll": 0.1}, "P_kl_from_base": 0.5, "base": {"P": {"accuracy": 1.0, "nll": 0.0}, "Q": {"accuracy": 0.0, "nll": 3.0}}}
                if method == "disel":
                    record["gates"] = {"P": {"layers.0.self_attn.q_proj": 0.1}, "Q": {"layers.0.self_attn.q_proj": 0.7}}
                records.append(record)
    return records


def test_report_statistics_over_seeds():
    records = synthetic_records()
    stats = aggregate([r for r in records if r["point"]["task"] == "overlap-3" and r["method"] == "disel"])
    assert stats["seeds"] == 3
    assert stats["P"][0] == pytest.approx(0.71)
    assert stats["P"][1] == pytest.approx(np.std([0.7, 0.71, 0.72], ddof=1))
    assert stats["gate_Q"] == pytest.approx((0.7, 0.0))
    lines = axis_lines(records, "task")
    assert set(lines) == {"lora r8", "disel r8 b_g=-3 gate lr x5"}
    assert list(lines["lora r8"]) == ["overlap-0", "overlap-3"]
    summary = format_summary(records)
    assert "| overlap-3 | 64 | 300 | disel | 8 | -3.0 | 5.0 | 3 | 1.000 ± 0.000 | 0.710 ± 0.010 |" in summary


def test_report_rank_axis_skips_full_fine_tuning(tmp_path):
    records = [r for r in synthetic_records() if r["point"]["task"] == "overlap-0"]
    for record in [r for r in records if r["method"] == "lora"]:
        records.append({**record, "point": {**record["point"], "rank": 2}})
        records.append({**record, "method": "full", "point": {**record["point"], "method": "full", "rank": None}})
    names = write_report(tmp_path, records)
    assert "by_rank.png" in names
    assert list(axis_lines(records, "rank")) == ["lora"]


def test_report_writes_figures(tmp_path):
    records = synthetic_records() + [{"point": {"method": "lora"}, "error": "diverged"}]
    names = write_report(tmp_path, records)
    assert names == ["tradeoff.png", "gates.png", "by_task.png", "summary.md"]
    assert "1 runs failed" in (tmp_path / "summary.md").read_text()
    for name in names:
        assert (tmp_path / name).stat().st_size > 0
