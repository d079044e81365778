import json
import subprocess
import sys

import numpy as np
import pytest

from minidisel.cache import cache_dir, cache_key, load_base
from minidisel.cli import main
from minidisel.demo import QUICK_RECIPE, base_model, run_demo
from minidisel.tasks import make_task
from minidisel.tree import flatten

METRICS_KEYS = {"accuracy", "nll"}


def check_metrics(metrics, has_accuracy=True):
    assert set(metrics) == METRICS_KEYS
    assert isinstance(metrics["nll"], float)
    assert np.isfinite(metrics["nll"])
    if has_accuracy:
        assert 0.0 <= metrics["accuracy"] <= 1.0
    else:
        assert metrics["accuracy"] is None


def test_quick_demo_writes_results_json(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"minidisel_version", "task", "seed", "base", "runs"}
    assert results["task"] == "disjoint"
    assert results["seed"] == 1
    check_metrics(results["base"]["P"])
    check_metrics(results["base"]["Q"])
    assert [run["method"] for run in results["runs"]] == ["full", "lora", "disel"]
    for run in results["runs"]:
        keys = {"method", "trainable_params", "steps", "seconds", "P", "Q", "P_kl_from_base"}
        assert set(run) == keys | ({"gates"} if run["method"] == "disel" else set())
        assert isinstance(run["trainable_params"], int)
        assert run["trainable_params"] > 0
        assert run["steps"] == QUICK_RECIPE.finetune_steps
        assert run["seconds"] > 0
        check_metrics(run["P"])
        check_metrics(run["Q"])
        assert run["P_kl_from_base"] >= 0.0
    gates = results["runs"][2]["gates"]
    assert set(gates) == {"P", "Q"}
    assert set(gates["P"]) == set(gates["Q"])
    assert "layers.0.self_attn.q_proj" in gates["P"]
    assert all(0.0 < value < 1.0 for value in gates["P"].values())
    for figure in ("training_curves.png", "gates.png", "gate_histograms.png", "gate_ranks.png"):
        assert (out / figure).stat().st_size > 0, figure


def test_quick_demo_plain_and_fused_agree(monkeypatch):
    import minidisel.fused

    fused_calls = []
    linear_map = minidisel.fused.linear_map
    monkeypatch.setattr(minidisel.fused, "linear_map", lambda *args: fused_calls.append(1) or linear_map(*args))
    plain = run_demo(seed=2, quick=True, log=lambda line: None, fused=False)
    assert fused_calls == []
    fused = run_demo(seed=2, quick=True, log=lambda line: None)
    assert fused_calls

    for dist in ("P", "Q"):
        assert fused["base"][dist] == pytest.approx(plain["base"][dist], rel=1e-9)
    for fused_run, plain_run in zip(fused["runs"], plain["runs"]):
        for dist in ("P", "Q"):
            assert fused_run[dist] == pytest.approx(plain_run[dist], rel=1e-9), (fused_run["method"], dist)
        assert fused_run["P_kl_from_base"] == pytest.approx(plain_run["P_kl_from_base"], rel=1e-6, abs=1e-12)


def test_cli_plain_flag_selects_layers(monkeypatch):
    calls = []
    monkeypatch.setattr("minidisel.demo.run_demo", lambda *args, **kwargs: calls.append(kwargs["fused"]))
    assert main(["demo", "--quick", "--plain"]) == 0
    assert main(["demo", "--quick"]) == 0
    assert calls == [False, True]


@pytest.mark.parametrize("preset", [{}, {"OMP_NUM_THREADS": "2"}])
def test_cli_restarts_demo_with_one_blas_thread(monkeypatch, preset):
    import minidisel.cli

    for name in minidisel.cli.BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in preset.items():
        monkeypatch.setenv(name, value)
    restarts = []
    monkeypatch.setattr(minidisel.cli.os, "execve", lambda path, args, env: restarts.append((args, env)))
    monkeypatch.setattr(minidisel.cli, "COMMANDS", {"demo": lambda args: None})
    monkeypatch.setattr(sys, "argv", ["minidisel", "demo", "--quick"])
    assert main() == 0
    if preset:
        assert restarts == []
    else:
        (args, env), = restarts
        assert args[1:] == ["-m", "minidisel", "demo", "--quick"]
        assert all(env[name] == "1" for name in minidisel.cli.BLAS_THREAD_VARIABLES)


def test_quick_demo_markov_has_no_accuracy():
    results = run_demo("markov", seed=0, quick=True, log=lambda line: None)
    check_metrics(results["base"]["P"], has_accuracy=False)
    assert results["runs"][0]["trainable_params"] > results["runs"][1]["trainable_params"]


def test_demo_uses_and_validates_cache():
    task = make_task("disjoint")
    lines = []
    first = base_model(task, QUICK_RECIPE, 0, log=lines.append)
    second = base_model(task, QUICK_RECIPE, 0, log=lines.append)
    assert "pre-trained" in lines[0]
    assert "loaded from cache" in lines[-1]
    for path, value in flatten(first).items():
        assert np.array_equal(value, flatten(second)[path])

    # a corrupt entry is detected, reported and rebuilt
    key = cache_key(task.name, QUICK_RECIPE.model, QUICK_RECIPE.pretrain, 0)
    weights = cache_dir() / f"{key}.npz"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring invalid cache entry"):
        assert load_base(key, QUICK_RECIPE.model) is None
    with pytest.warns(UserWarning):
        rebuilt = base_model(task, QUICK_RECIPE, 0, log=lines.append)
    assert "pre-trained" in lines[-1]
    assert np.array_equal(flatten(rebuilt)["norm.weight"], flatten(first)["norm.weight"])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--quick", "--task", "reverse"], "unknown task 'reverse'"),
        (["demo", "--quick", "--steps", "0"], "steps must be >= 1, got 0"),
        (["demo", "--quick", "--rank", "-2"], "rank must be >= 1, got -2"),
        (["demo", "--quick", "--seed", "-1"], "seed must be >= 0, got -1"),
    ],
)
def test_cli_bad_input_exits_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "cannot create output folder" in capsys.readouterr().err


def test_python_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "minidisel", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("minidisel ")
