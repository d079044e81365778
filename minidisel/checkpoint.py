"""Save and load parameter trees, atomically and strictly.

Writes go to a temporary file in the target folder, which is then renamed over
the final name, so a crash never leaves a half-written file under that name.
Loading never unpickles (``allow_pickle=False``) and, given the expected
tensors, raises :class:`CheckpointError` naming the file and the first tensor
that is missing, unexpected, or of the wrong shape or dtype.

minidisel's own checkpoint is a folder: ``config.json`` (format name and
version, the model and adapter configs, the SHA-256 of each tensor file) and
``base.npz`` and/or ``adapters.npz`` keyed by dotted minidisel paths.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from minidisel import __version__
from minidisel.config import AdapterConfig, ModelConfig
from minidisel.keys import adapter_shapes, base_shapes
from minidisel.tree import flatten, unflatten

CHECKPOINT_FORMAT = "minidisel-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
BASE_FILE = "base.npz"
ADAPTERS_FILE = "adapters.npz"


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


def read_npz(path):
    """Return ``{key: array}`` from an ``.npz`` file, never unpickling.

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file and
    for an object (pickled) array, naming the file and the tensor.
    """
    flat = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                try:
                    flat[key] = archive[key]
                except ValueError as error:
                    raise CheckpointError(f"cannot read tensor {key!r} from {path}: {error}") from error
    except CheckpointError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    return flat


def load_tree(path, like=None):
    """Load a tree saved by :func:`save_tree`.

    With ``like`` (a reference tree), the file must hold exactly its tensors,
    with the same shapes and dtypes; otherwise :class:`CheckpointError` names
    the tensor and the file.
    """
    flat = read_npz(path)
    if like is not None:
        check_matches(flat, flatten(like), path)
    return unflatten(flat)


def check_matches(flat, expected, source):
    """Raise :class:`CheckpointError` unless ``flat`` has the keys, shapes and dtypes of ``expected``."""
    shapes = {key: np.shape(value) for key, value in expected.items()}
    check_keys_and_shapes(flat, shapes, source)
    for key, value in flat.items():
        want = np.asarray(expected[key]).dtype
        if value.dtype != want:
            raise CheckpointError(f"tensor {key!r} in {source} has dtype {value.dtype}, expected {want}")


def check_keys_and_shapes(flat, shapes, source):
    """Raise :class:`CheckpointError` unless ``flat`` has exactly the keys of ``shapes``, with those shapes."""
    for key in shapes:
        if key not in flat:
            raise CheckpointError(f"tensor {key!r} is missing from {source}")
    for key, value in flat.items():
        if key not in shapes:
            raise CheckpointError(f"unexpected tensor {key!r} in {source}")
        if tuple(value.shape) != tuple(shapes[key]):
            raise CheckpointError(
                f"tensor {key!r} in {source} has shape {tuple(value.shape)}, expected {tuple(shapes[key])}"
            )


def convert_tensor(value, dtype, key, source):
    """Return ``value`` as ``dtype`` if that is exact; raise :class:`CheckpointError` otherwise.

    Floating-point tensors widen (float16 -> float32 -> float64) but never
    narrow, so a loaded weight always equals the stored one.
    """
    dtype = np.dtype(dtype)
    if value.dtype.kind != "f":
        raise CheckpointError(f"tensor {key!r} in {source} has dtype {value.dtype}; expected a floating-point dtype")
    if not np.can_cast(value.dtype, dtype, casting="safe"):
        raise CheckpointError(
            f"tensor {key!r} in {source} has dtype {value.dtype}, which {dtype} cannot represent exactly; "
            f"load it with dtype='{value.dtype}' or convert the file first"
        )
    return value.astype(dtype, copy=False)


def read_json(path):
    """Return the parsed JSON object in ``path``; raise :class:`CheckpointError` if it is missing or invalid."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read JSON file {path}: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(cls, data, source):
    """Build config dataclass ``cls`` from ``data``, which must name every field and nothing else."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{cls.__name__} in {source} must be a JSON object, got {data!r}")
    names = [field.name for field in dataclasses.fields(cls)]
    missing = [name for name in names if name not in data]
    unknown = sorted(set(data) - set(names))
    if missing:
        raise CheckpointError(f"{cls.__name__} in {source} is missing the field(s) {', '.join(missing)}")
    if unknown:
        raise CheckpointError(f"{cls.__name__} in {source} has unknown field(s) {', '.join(unknown)}")
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"invalid {cls.__name__} in {source}: {error}") from error


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The contents of a minidisel checkpoint folder; ``params`` or ``adapters`` may be None."""

    model_config: ModelConfig
    params: dict | None = None
    adapter_config: AdapterConfig | None = None
    adapters: dict | None = None


def expected_adapter_shapes(model_config, adapter_config):
    """Return ``{minidisel adapter path: shape}`` of every adapter tensor."""
    table = adapter_shapes(model_config, adapter_config)
    return {f"{layer}.{name}": shape for (layer, name), (_, shape) in table.items()}


def check_trees(model_config, params, adapter_config, adapters):
    """Raise unless the trees to save have exactly the tensors, shapes and dtype their configs give."""
    if not isinstance(model_config, ModelConfig):
        raise TypeError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if params is None and adapters is None:
        raise ValueError("nothing to save: params and adapters are both None")
    if (adapters is None) != (adapter_config is None):
        raise ValueError("adapters and adapter_config must be given together")
    if adapter_config is not None and not isinstance(adapter_config, AdapterConfig):
        raise TypeError(f"adapter_config must be an AdapterConfig, got {type(adapter_config).__name__}")
    trees = [("params", params, base_shapes(model_config))]
    if adapters is not None:
        trees.append(("adapters", adapters, expected_adapter_shapes(model_config, adapter_config)))
    for name, tree, shapes in trees:
        if tree is None:
            continue
        flat = {key: np.asarray(value) for key, value in flatten(tree).items()}
        check_keys_and_shapes(flat, shapes, f"the {name} argument")
        for key, value in flat.items():
            if value.dtype != np.dtype(model_config.dtype):
                raise ValueError(f"{name} tensor {key!r} has dtype {value.dtype}, expected {model_config.dtype}")


def save_checkpoint(folder, model_config, params=None, adapter_config=None, adapters=None):
    """Save base parameters and/or adapters with their configs in minidisel's format.

    ``config.json`` is written last and records the SHA-256 of each tensor
    file, so a folder whose writing was interrupted fails to load instead of
    mixing old and new tensors.
    """
    check_trees(model_config, params, adapter_config, adapters)
    folder = Path(folder)
    digests = {}
    for name, tree in ((BASE_FILE, params), (ADAPTERS_FILE, adapters)):
        if tree is not None:
            save_tree(folder / name, tree)
            digests[name] = file_sha256(folder / name)
    config = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "minidisel_version": __version__,
        "model": dataclasses.asdict(model_config),
        "adapter": None if adapter_config is None else dataclasses.asdict(adapter_config),
        "files": digests,
    }
    save_json(folder / CONFIG_FILE, config)


def read_checkpoint_config(path):
    """Return the parsed ``config.json`` of a checkpoint after checking its format and version."""
    config = read_json(path)
    if config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a minidisel checkpoint: format is {config.get('format')!r}")
    if config.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {config.get('format_version')!r}; this minidisel reads version "
            f"{CHECKPOINT_VERSION}"
        )
    for field in ("model", "adapter", "files"):
        if field not in config:
            raise CheckpointError(f"{path} is missing the field {field!r}")
    return config


def load_checkpoint_file(folder, name, digests, shapes, dtype):
    """Load one tensor file of a checkpoint after checking its digest, keys, shapes and dtype."""
    path = Path(folder) / name
    if not path.exists():
        raise CheckpointError(f"{path} is missing, but {Path(folder) / CONFIG_FILE} lists it")
    if file_sha256(path) != digests[name]:
        raise CheckpointError(f"{path} does not match the SHA-256 recorded in {CONFIG_FILE}; the file changed")
    flat = read_npz(path)
    check_keys_and_shapes(flat, shapes, path)
    for key, value in flat.items():
        if value.dtype != np.dtype(dtype):
            raise CheckpointError(f"tensor {key!r} in {path} has dtype {value.dtype}, expected {dtype}")
    return unflatten(flat)


def load_checkpoint(folder):
    """Load a folder written by :func:`save_checkpoint`; return a :class:`Checkpoint`."""
    folder = Path(folder)
    config = read_checkpoint_config(folder / CONFIG_FILE)
    source = folder / CONFIG_FILE
    model_config = config_from_dict(ModelConfig, config["model"], source)
    adapter_config = None if config["adapter"] is None else config_from_dict(AdapterConfig, config["adapter"], source)

    digests = config["files"]
    unknown = sorted(set(digests) - {BASE_FILE, ADAPTERS_FILE})
    if unknown or not digests:
        raise CheckpointError(f"{source} must list {BASE_FILE} and/or {ADAPTERS_FILE} under 'files', got {digests}")
    if (ADAPTERS_FILE in digests) != (adapter_config is not None):
        raise CheckpointError(f"{source}: an adapter config needs {ADAPTERS_FILE} and the other way round")

    params = adapters = None
    if BASE_FILE in digests:
        params = load_checkpoint_file(folder, BASE_FILE, digests, base_shapes(model_config), model_config.dtype)
    if adapter_config is not None:
        shapes = expected_adapter_shapes(model_config, adapter_config)
        adapters = load_checkpoint_file(folder, ADAPTERS_FILE, digests, shapes, model_config.dtype)
    return Checkpoint(model_config, params, adapter_config, adapters)
