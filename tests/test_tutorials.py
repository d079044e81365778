"""Execute every tutorial notebook top to bottom in a real Jupyter kernel.

The kernel is ipykernel's ``python3``, started in ``tutorials/`` with the
repository root first on ``PYTHONPATH``, so the notebooks import this
checkout's minidisel and not another installed copy. Each notebook must finish
within ``TIME_LIMIT_SECONDS``. A notebook that is skipped, fails or is not
executed fails the suite (see the hooks in conftest.py).
"""

import os
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
TWINS = sorted((TUTORIALS / "text").glob("*.py"))
TIME_LIMIT_SECONDS = 90.0
CELL_TIMEOUT_SECONDS = 300
STRIP_COMMAND = "jupyter nbconvert --clear-output --inplace tutorials/*.ipynb"
SYNC_COMMAND = "jupytext --sync tutorials/*.ipynb"


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def kernel_environment():
    """Return the environment of the kernel: this one, with the repository root first on PYTHONPATH.

    Unless a BLAS thread count is already set, the kernel gets one BLAS thread, as the README advises
    for notebooks: on a busy machine a multi-threaded BLAS makes the small training steps many times slower.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if not any(name in env for name in BLAS_THREAD_VARIABLES):
        env["OPENBLAS_NUM_THREADS"] = "1"
    return env


def execute(notebook):
    """Run ``notebook`` (a NotebookNode) in a fresh python3 kernel. Return it, now with outputs, and the seconds taken."""
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_SECONDS,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    started = time.perf_counter()
    client.execute(env=kernel_environment())
    return notebook, time.perf_counter() - started


class NotebookRuns:
    """The notebooks executed in this test session, each run at most once."""

    def __init__(self):
        self.seconds = {}

    def run(self, path):
        if path.name not in self.seconds:
            _, self.seconds[path.name] = execute(nbformat.read(path, as_version=4))
        return self.seconds[path.name]


@pytest.fixture(scope="session")
def notebook_runs():
    return NotebookRuns()


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_kernel_imports_this_checkout():
    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import minidisel; print(minidisel.__file__)")])
    executed, _ = execute(probe)
    printed = executed.cells[0].outputs[0]["text"].strip()
    assert Path(printed).resolve().is_relative_to(REPO), f"kernel imported minidisel from {printed}, not from {REPO}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, notebook_runs):
    seconds = notebook_runs.run(path)
    assert seconds < TIME_LIMIT_SECONDS, f"{path.name} took {seconds:.1f} s; the limit is {TIME_LIMIT_SECONDS:.0f} s"


def test_every_notebook_executed(notebook_runs):
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"
    for path in NOTEBOOKS:
        notebook_runs.run(path)
    assert sorted(notebook_runs.seconds) == [path.name for path in NOTEBOOKS]
    assert len(notebook_runs.seconds) == len(NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(code_cells(notebook)):
        assert cell.outputs == [], f"{path.name}: code cell {index} has outputs; run `{STRIP_COMMAND}`"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has an execution count; run `{STRIP_COMMAND}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_valid_for_python3(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_each_notebook_has_a_text_twin():
    assert [path.stem for path in NOTEBOOKS] == [path.stem for path in TWINS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_text_twin_matches_notebook(path):
    notebook = nbformat.read(path, as_version=4)
    twin = jupytext.read(TUTORIALS / "text" / f"{path.stem}.py")
    cells = [(cell.cell_type, cell.source) for cell in notebook.cells]
    twin_cells = [(cell.cell_type, cell.source) for cell in twin.cells]
    assert len(cells) == len(twin_cells), f"{path.name} and its text twin differ in cell count; run `{SYNC_COMMAND}`"
    for index, (cell, twin_cell) in enumerate(zip(cells, twin_cells)):
        assert cell == twin_cell, f"{path.name}: cell {index} differs from its text twin; run `{SYNC_COMMAND}`"
