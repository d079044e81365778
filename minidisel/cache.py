"""A disk cache of pre-trained base models, so that repeated demo runs skip pre-training.

An entry is ``<key>.npz`` plus ``<key>.json``. The key is a SHA-256 of
everything that determines the base model (task, model and training configs,
seed, cache format). The JSON stores the SHA-256 of the ``.npz``; an entry
whose digest, keys, shapes or dtypes do not match is reported and rebuilt,
never used. The folder is ``$MINIDISEL_CACHE`` if set, else
``$XDG_CACHE_HOME/minidisel``, else ``~/.cache/minidisel``.
"""

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from minidisel import __version__
from minidisel.checkpoint import CheckpointError, file_sha256, load_tree, save_json, save_tree
from minidisel.model import init_params

CACHE_FORMAT = 1


def cache_dir():
    """Return the cache folder (not created)."""
    if os.environ.get("MINIDISEL_CACHE"):
        return Path(os.environ["MINIDISEL_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "minidisel"


def cache_key(task_name, model_config, train_config, seed, fused=True):
    """Return the hex key of a base model pre-trained with these settings.

    ``fused`` is part of the key because the fused and plain layer functions
    round differently, so their base models differ in the last bits.
    """
    description = {
        "format": CACHE_FORMAT,
        "task": task_name,
        "model": asdict(model_config),
        "pretrain": {k: v for k, v in asdict(train_config).items() if k not in ("progress", "log_every")},
        "seed": seed,
        "layers": "fused" if fused else "plain",
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def load_base(key, model_config, folder=None):
    """Return the cached base model of ``key``, or None if it is absent or invalid (with a warning)."""
    folder = Path(folder or cache_dir())
    weights, meta_path = folder / f"{key}.npz", folder / f"{key}.json"
    if not weights.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("sha256") != file_sha256(weights):
            raise CheckpointError(f"digest mismatch for {weights}")
        reference = init_params(model_config, np.random.default_rng(0))
        return load_tree(weights, like=reference)
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring invalid cache entry {weights} ({error}); pre-training again", stacklevel=2)
        return None


def store_base(key, params, info, folder=None):
    """Write a base model and its metadata to the cache."""
    folder = Path(folder or cache_dir())
    weights = folder / f"{key}.npz"
    save_tree(weights, params)
    meta = {"key": key, "sha256": file_sha256(weights), "minidisel_version": __version__, **info}
    save_json(folder / f"{key}.json", meta)
