"""The PyTorch script of docs/oracle.md against minidisel's golden vectors."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.interop
pytest.importorskip("torch", reason="the interop tests need PyTorch: pip install -e '.[interop]'")
pytest.importorskip("transformers", reason="the interop tests need transformers: pip install -e '.[interop]'")

from minidisel.cli import main  # noqa: E402
from minidisel.hf import read_safetensors, write_safetensors  # noqa: E402
from minidisel.oracle import verify_candidate  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "oracle.md"
EXPORTS = {
    "lora": ["--method", "lora", "--rank", "3", "--target-modules", "q_proj", "v_proj", "up_proj"],
    "disel-bottleneck": [
        "--method", "disel", "--gate-bottleneck-dim", "3", "--gate-normalize", "--use-rslora", "--seed", "4",
    ],
}


def docs_script():
    """Return the Python block that follows the ``oracle-script`` marker in docs/oracle.md."""
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"<!-- oracle-script: candidate.py -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, "docs/oracle.md has no python block after <!-- oracle-script: candidate.py -->"
    return match.group(1)


def run_docs_script(tmp_path, golden, candidate):
    """Run the docs' script as a user would, in a fresh process with no network access to the hub."""
    script = tmp_path / "candidate.py"
    script.write_text(docs_script(), encoding="utf-8")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(golden), str(candidate)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr


def export_and_run(folder, options):
    """Export golden vectors with ``options`` into ``folder`` and run the docs' script on them."""
    golden, candidate = folder / "golden", folder / "candidate.safetensors"
    assert main(["oracle", "export", str(golden), *options]) == 0
    run_docs_script(folder, golden, candidate)
    return golden, candidate


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """Golden vectors of the default export (DISeL on a Llama) and the docs' script's candidate."""
    return export_and_run(tmp_path_factory.mktemp("default"), [])


def verify(golden, candidate, capsys):
    """Run ``minidisel oracle verify``; return its exit status and report."""
    capsys.readouterr()
    status = main(["oracle", "verify", str(golden), str(candidate)])
    report = capsys.readouterr().out
    errors = [c.max_abs for c in verify_candidate(golden, candidate)[0] if np.isfinite(c.max_abs)]
    print(f"{report}max abs error over the compared tensors: {max(errors):.3e}")
    return status, report


def test_docs_script_passes_default_export(default_run, capsys):
    status, report = verify(*default_run, capsys)
    assert status == 0
    assert "PASS: all 72 tensors match" in report
    assert "gates.base_model.model.model.layers.1.mlp.down_proj" in report


@pytest.mark.parametrize("name", EXPORTS)
def test_docs_script_passes_other_exports(name, tmp_path, capsys):
    status, report = verify(*export_and_run(tmp_path, EXPORTS[name]), capsys)
    assert status == 0
    assert "PASS: all" in report


def test_verify_rejects_perturbed_candidate(default_run, tmp_path, capsys):
    golden, candidate = default_run
    outputs = read_safetensors(candidate)

    # one gradient entry off by 1e-8: far above float64 rounding, far below anything visible in a plot
    key = "grads.base_model.model.model.layers.0.self_attn.k_proj.lora_disel_gate.linear.weight"
    perturbed = dict(outputs)
    perturbed[key] = outputs[key].copy()
    perturbed[key][1, 2] += 1e-8
    write_safetensors(tmp_path / "perturbed.safetensors", perturbed)

    status, report = verify(golden, tmp_path / "perturbed.safetensors", capsys)
    failed = [line for line in report.splitlines() if "FAIL (" in line]
    assert status == 1
    assert len(failed) == 1
    assert failed[0].startswith(key)
    assert "FAIL: 1 of 72 tensors failed" in report


def test_verify_reports_missing_and_misshapen_tensors(default_run, tmp_path, capsys):
    golden, candidate = default_run
    outputs = read_safetensors(candidate)
    del outputs["gates.base_model.model.model.layers.0.mlp.gate_proj"]
    outputs["loss"] = np.asarray(outputs["loss"]).reshape(1)
    np.savez(tmp_path / "partial.npz", **outputs)

    status, report = verify(golden, tmp_path / "partial.npz", capsys)
    assert status == 1
    assert "FAIL (missing" in report
    assert "FAIL (wrong shape: shape (1,), expected ()" in report
    assert "FAIL: 2 of 72 tensors failed" in report
