"""Save and load parameter trees as ``.npz`` files, atomically and strictly.

Writes go to a temporary file in the target folder, which is then renamed over
the final name, so a crash never leaves a half-written file under that name.
Loading never unpickles (``allow_pickle=False``) and, given a reference tree,
raises an error naming the first tensor that is missing, unexpected, or of
the wrong shape or dtype.
"""

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from minidisel.tree import flatten, unflatten


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match the model."""


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_tree(path, tree):
    """Save a tree of arrays to ``path`` as an uncompressed ``.npz`` keyed by dotted paths."""
    flat = {key: np.asarray(value) for key, value in flatten(tree).items()}
    atomic_write(path, lambda file: np.savez(file, **flat))


def save_json(path, data):
    """Write ``data`` as indented JSON to ``path``, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def file_sha256(path):
    """Return the hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tree(path, like=None):
    """Load a tree saved by :func:`save_tree`.

    With ``like`` (a reference tree), the file must hold exactly its tensors,
    with the same shapes and dtypes; otherwise :class:`CheckpointError` names
    the tensor and the file.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            flat = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if like is not None:
        check_matches(flat, flatten(like), path)
    return unflatten(flat)


def check_matches(flat, expected, source):
    """Raise :class:`CheckpointError` unless ``flat`` has the keys, shapes and dtypes of ``expected``."""
    for key in expected:
        if key not in flat:
            raise CheckpointError(f"tensor {key!r} is missing from {source}")
    for key, value in flat.items():
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {key!r} in {source}")
        want = np.asarray(expected[key])
        if value.shape != want.shape:
            raise CheckpointError(f"tensor {key!r} in {source} has shape {value.shape}, expected {want.shape}")
        if value.dtype != want.dtype:
            raise CheckpointError(f"tensor {key!r} in {source} has dtype {value.dtype}, expected {want.dtype}")
