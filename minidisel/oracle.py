"""Golden vectors: minidisel's float64 numbers, for another implementation to reproduce.

:func:`export_golden` writes a folder:

    golden.safetensors   inputs, parameters and expected outputs (keys below)
    manifest.json        configuration, shapes, dtypes, versions, tolerances
    adapter/             the adapter in PEFT's format
    base/                arch="llama" only: the base model for LlamaForCausalLM.from_pretrained

Keys of ``golden.safetensors``:

    tokens, targets                           (B, T) int64 inputs
    model.…, lm_head.weight                   base parameters, Hugging Face names
    base_model.model.….lora_A.weight, …       adapter parameters, PEFT names
    logits                                    (B, T, V)
    loss                                      () mean cross-entropy over all B·T positions
    gates.<PEFT module>                       (B, T, R) DISeL gate values of each adapted layer
    grads.<PEFT parameter key>                gradient of the loss w.r.t. that adapter parameter

:func:`verify_candidate` compares a candidate file holding exactly the output
keys (``logits``, ``loss``, ``gates.…``, ``grads.…``) with the golden ones.
"""

import dataclasses
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from autograd import value_and_grad

from minidisel import __version__
from minidisel.adapters import adapter_paths, init_adapters
from minidisel.checkpoint import CheckpointError, read_json, read_npz, save_json
from minidisel.config import AdapterConfig, ModelConfig, check_int
from minidisel.hf import read_safetensors, save_hf_model, write_safetensors
from minidisel.keys import adapters_to_peft, base_to_hf, peft_module
from minidisel.model import forward, init_params
from minidisel.nn import cross_entropy
from minidisel.peft_format import save_peft_adapter
from minidisel.tree import flatten, unflatten

GOLDEN_FORMAT = "minidisel-golden"
GOLDEN_VERSION = 1
GOLDEN_FILE = "golden.safetensors"
MANIFEST_FILE = "manifest.json"

# Recommended bounds |candidate - golden| <= atol + rtol·|golden|. In float64
# two exact implementations differ by rounding only (up to about 1e-14 on the
# golden models). NOTE: the float32 preset is an estimate: docs/oracle.md's PyTorch
# script in float32 stayed below 1.1e-6 on the default export, and larger
# models accumulate more rounding.
TOLERANCES = {
    "float64": {"atol": 1e-10, "rtol": 1e-10},
    "float32": {"atol": 1e-4, "rtol": 1e-4},
}

# Sizes of the exported model: small enough to read, large enough that every
# head, group and rank is exercised.
GOLDEN_MODELS = {
    "llama": ModelConfig(
        arch="llama", vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=16
    ),
    "gpt": ModelConfig(arch="gpt", vocab_size=32, d_model=16, n_layers=2, n_heads=4, d_ff=32, max_seq_len=16),
}
PARAMETER_RECIPE = (
    "every parameter is a random draw, not an initialisation, so that no term is trivially zero or one: "
    "weights N(0, 1/in_features), norm gains 1 + N(0, 0.1²), biases N(0, 0.1²), lora_A and gate weights "
    "as their initialisers, lora_B N(0, 0.1²), gate biases gate_bias_init + N(0, 0.5²)"
)


def randomize_base(params, rng):
    """Return base parameters with every tensor drawn at random (see PARAMETER_RECIPE)."""
    flat = {}
    for path, value in flatten(params).items():
        noise = rng.standard_normal(value.shape)
        if value.ndim == 2:
            flat[path] = noise / np.sqrt(value.shape[1])
        elif path.endswith("norm.weight"):
            flat[path] = 1.0 + 0.1 * noise
        else:
            flat[path] = 0.1 * noise
    return unflatten(flat)


def randomize_adapters(adapters, adapter_config, rng):
    """Return adapters with ``B`` and the gate biases drawn at random (see PARAMETER_RECIPE)."""
    flat = {}
    for path, value in flatten(adapters).items():
        noise = rng.standard_normal(value.shape)
        name = path.rsplit(".", 1)[-1]
        if name == "B":
            value = 0.1 * noise
        elif name == "b_g":
            value = adapter_config.gate_bias_init + 0.5 * noise
        flat[path] = value
    return unflatten(flat)


def golden_case(model_config, adapter_config, seed, batch_size, seq_len):
    """Return ``(params, adapters, tokens, targets)`` drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    params = randomize_base(init_params(model_config, rng), rng)
    adapters = randomize_adapters(init_adapters(params, model_config, adapter_config, rng), adapter_config, rng)
    tokens = rng.integers(0, model_config.vocab_size, size=(batch_size, seq_len))
    targets = rng.integers(0, model_config.vocab_size, size=(batch_size, seq_len))
    return params, adapters, tokens, targets


def golden_outputs(params, adapters, tokens, targets, model_config, adapter_config):
    """Return ``{key: array}`` of logits, loss, gates and adapter gradients, under golden-file keys."""
    mask = np.ones(tokens.shape, dtype=bool)

    def loss_of(trainable):
        logits = forward(params, tokens, model_config, trainable, adapter_config)
        return cross_entropy(logits, targets, mask)

    loss, grads = value_and_grad(loss_of)(adapters)
    logits, gates = forward(params, tokens, model_config, adapters, adapter_config, return_gates=True)
    outputs = {"logits": logits, "loss": np.asarray(loss)}

    flat_gates = flatten(gates)
    for layer in adapter_paths(model_config, adapter_config):
        if layer in flat_gates:
            outputs[f"gates.{peft_module(layer)}"] = flat_gates[layer]
    for key, value in adapters_to_peft(grads, model_config, adapter_config).items():
        outputs[f"grads.{key}"] = value
    return outputs


def package_versions():
    """Return the versions of Python and the packages that produce golden vectors."""
    versions = {"minidisel": __version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        versions["autograd"] = version("autograd")
    except PackageNotFoundError:
        versions["autograd"] = "unknown"
    return versions


def build_manifest(tensors, outputs, model_config, adapter_config, seed):
    """Return the ``manifest.json`` contents for a golden file."""
    tensor_roles = {}
    for key, value in tensors.items():
        role = "parameter"
        if key in outputs:
            role = "output"
        elif key in ("tokens", "targets"):
            role = "input"
        tensor_roles[key] = {"shape": list(value.shape), "dtype": str(value.dtype), "role": role}
    return {
        "format": GOLDEN_FORMAT,
        "format_version": GOLDEN_VERSION,
        "versions": package_versions(),
        "seed": seed,
        "model_config": dataclasses.asdict(model_config),
        "adapter_config": dataclasses.asdict(adapter_config),
        "scaling": adapter_config.scaling,
        "loss": "mean over all B*T positions of -log softmax(logits)[target]",
        "parameters": PARAMETER_RECIPE,
        "tolerances": TOLERANCES,
        "outputs": sorted(outputs),
        "tensors": tensor_roles,
    }


def export_golden(folder, model_config, adapter_config, seed=0, batch_size=2, seq_len=7):
    """Write golden vectors for ``model_config`` and ``adapter_config`` to ``folder``; return the manifest."""
    if not isinstance(model_config, ModelConfig) or model_config.dtype != "float64":
        raise ValueError(f"golden vectors need a float64 ModelConfig, got {model_config!r}")
    if not isinstance(adapter_config, AdapterConfig):
        raise TypeError(f"adapter_config must be an AdapterConfig, got {type(adapter_config).__name__}")
    check_int("batch_size", batch_size)
    check_int("seq_len", seq_len)
    if seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len must be in [1, {model_config.max_seq_len}] (max_seq_len), got {seq_len}")

    params, adapters, tokens, targets = golden_case(model_config, adapter_config, seed, batch_size, seq_len)
    outputs = golden_outputs(params, adapters, tokens, targets, model_config, adapter_config)
    tensors = {"tokens": tokens.astype(np.int64), "targets": targets.astype(np.int64)}
    tensors.update(base_to_hf(params))
    tensors.update(adapters_to_peft(adapters, model_config, adapter_config))
    tensors.update(outputs)

    folder = Path(folder)
    write_safetensors(folder / GOLDEN_FILE, tensors)
    save_peft_adapter(folder / "adapter", adapters, model_config, adapter_config)
    if model_config.arch == "llama":
        save_hf_model(folder / "base", params, model_config)
    manifest = build_manifest(tensors, outputs, model_config, adapter_config, seed)
    save_json(folder / MANIFEST_FILE, manifest)
    return manifest


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result for one output tensor: ``status`` is ``"ok"`` or names the failure."""

    key: str
    status: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    detail: str = ""

    @property
    def passed(self):
        return self.status == "ok"


def compare_tensor(key, golden, candidate, atol, rtol):
    """Compare one candidate tensor with its golden value; a bad dtype or shape gives a failed result, not an error."""
    if candidate.dtype.kind != "f":
        return Comparison(key, "wrong dtype", detail=f"dtype {candidate.dtype}, expected a floating-point dtype")
    if candidate.shape != golden.shape:
        return Comparison(key, "wrong shape", detail=f"shape {candidate.shape}, expected {golden.shape}")
    error = np.abs(candidate.astype(np.float64) - golden)
    max_abs = float(np.max(error)) if error.size else 0.0
    scale = float(np.max(np.abs(golden))) if golden.size else 0.0
    max_rel = max_abs / scale if scale > 0.0 else max_abs
    within = np.all(error <= atol + rtol * np.abs(golden)) and np.all(np.isfinite(candidate))
    return Comparison(key, "ok" if within else "mismatch", max_abs, max_rel)


def read_candidate(path):
    """Return ``{key: array}`` from a candidate ``.npz`` or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".npz":
        return read_npz(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    raise CheckpointError(f"candidate {path} must be a .npz or .safetensors file, got suffix {path.suffix!r}")


def read_golden(folder):
    """Return ``(manifest, {output key: golden array})`` of a golden folder."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST_FILE)
    if manifest.get("format") != GOLDEN_FORMAT or manifest.get("format_version") != GOLDEN_VERSION:
        raise CheckpointError(
            f"{folder / MANIFEST_FILE} is not a {GOLDEN_FORMAT} manifest of version {GOLDEN_VERSION}: "
            f"format {manifest.get('format')!r}, version {manifest.get('format_version')!r}"
        )
    tensors = read_safetensors(folder / GOLDEN_FILE)
    missing = [key for key in manifest["outputs"] if key not in tensors]
    if missing:
        raise CheckpointError(f"{folder / GOLDEN_FILE} lacks the output(s) {', '.join(missing)} that its manifest lists")
    return manifest, {key: tensors[key] for key in manifest["outputs"]}


def verify_candidate(folder, candidate_path, tolerance="float64", atol=None, rtol=None):
    """Compare a candidate with the golden outputs in ``folder``; return ``(comparisons, atol, rtol)``.

    ``tolerance`` picks a preset of the manifest (``"float64"`` or
    ``"float32"``); ``atol`` and ``rtol`` override it. A missing, unexpected,
    misshapen or non-float candidate tensor is a failed comparison.
    """
    manifest, golden = read_golden(folder)
    if tolerance not in manifest["tolerances"]:
        raise ValueError(f"tolerance must be one of {', '.join(manifest['tolerances'])}, got {tolerance!r}")
    preset = manifest["tolerances"][tolerance]
    atol = preset["atol"] if atol is None else atol
    rtol = preset["rtol"] if rtol is None else rtol
    candidate = read_candidate(candidate_path)

    comparisons = []
    for key, value in golden.items():
        if key not in candidate:
            comparisons.append(Comparison(key, "missing", detail="not in the candidate file"))
        else:
            comparisons.append(compare_tensor(key, value, candidate[key], atol, rtol))
    for key in sorted(set(candidate) - set(golden)):
        comparisons.append(Comparison(key, "unexpected", detail="not a golden output"))
    return comparisons, atol, rtol


def format_report(comparisons, atol, rtol):
    """Return the text report: one line per tensor, then a PASS or FAIL line."""
    width = max(len(c.key) for c in comparisons)
    lines = [f"{'tensor':<{width}}  {'max abs err':>11}  {'max rel err':>11}  result"]
    for c in comparisons:
        result = "ok" if c.passed else f"FAIL ({c.status}{': ' + c.detail if c.detail else ''})"
        lines.append(f"{c.key:<{width}}  {c.max_abs:>11.3e}  {c.max_rel:>11.3e}  {result}")
    failed = [c for c in comparisons if not c.passed]
    criterion = f"|candidate - golden| <= {atol:g} + {rtol:g}·|golden|"
    if failed:
        lines.append(f"FAIL: {len(failed)} of {len(comparisons)} tensors failed ({criterion})")
    else:
        lines.append(f"PASS: all {len(comparisons)} tensors match ({criterion})")
    lines.append("max rel err is max|candidate - golden| / max|golden| over the tensor")
    return "\n".join(lines)
