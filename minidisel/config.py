"""Frozen, validated configuration dataclasses.

Field names follow PEFT where PEFT has the concept (``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``, ``use_rslora``); gate fields start with
``gate_``. Every config checks itself on construction and raises ``TypeError``
or ``ValueError`` naming the field, the value and what is allowed.
"""

import math
from dataclasses import dataclass

ARCHITECTURES = ("gpt", "llama")
DTYPES = ("float64", "float32")
METHODS = ("lora", "dora", "disel")
GATE_WEIGHT_INITS = ("random", "zero")

# Linear layers of each architecture, by their Hugging Face names.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = {"gpt": ("up_proj", "down_proj"), "llama": ("gate_proj", "up_proj", "down_proj")}
ALL_LINEAR = "all-linear"


def check_int(name, value, minimum=1):
    """Raise unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_float(name, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """Raise unless ``value`` is a finite real number inside the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value}")


def check_choice(name, value, allowed):
    """Raise unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_bool(name, value):
    """Raise unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of the base transformer.

    ``arch="gpt"``: learned positions, LayerNorm with bias, GELU MLP, biases on
    every linear layer and an output head tied to the token embedding.
    ``arch="llama"``: rotary positions, RMSNorm, SwiGLU MLP, no biases, an
    untied output head and grouped-query attention (``n_kv_heads`` heads
    for keys and values).
    """

    vocab_size: int = 16
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads
    d_ff: int | None = None  # None: 4 * d_model
    max_seq_len: int = 32
    arch: str = "gpt"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dtype: str = "float64"

    def __post_init__(self):
        check_choice("arch", self.arch, ARCHITECTURES)
        check_choice("dtype", self.dtype, DTYPES)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        if self.arch == "llama" and self.head_dim % 2:
            # rotary embeddings rotate the head's features in pairs
            raise ValueError(
                f"d_model / n_heads (the head width) must be even for arch='llama', got "
                f"d_model={self.d_model}, n_heads={self.n_heads}, head width {self.head_dim}"
            )
        if self.n_kv_heads is not None:
            check_int("n_kv_heads", self.n_kv_heads)
            if self.arch == "gpt" and self.n_kv_heads != self.n_heads:
                raise ValueError(f"n_kv_heads must equal n_heads for arch='gpt', got {self.n_kv_heads}")
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"n_heads must be a multiple of n_kv_heads, got n_heads={self.n_heads}, "
                    f"n_kv_heads={self.n_kv_heads}"
                )
        if self.d_ff is not None:
            check_int("d_ff", self.d_ff)
        check_float("norm_eps", self.norm_eps, 0.0, low_open=True)
        check_float("rope_theta", self.rope_theta, 0.0, low_open=True)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def kv_heads(self):
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def mlp_dim(self):
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def linear_modules(self):
        """Names of the linear layers in each block, attention first."""
        return ATTENTION_MODULES + MLP_MODULES[self.arch]


@dataclass(frozen=True)
class AdapterConfig:
    """A LoRA, DoRA or DISeL adapter on a set of linear layers.

    ``target_modules`` lists layer names (``"q_proj"``, ``"up_proj"``, ...) or is
    ``"all-linear"``. ``gate_*`` fields apply to DISeL only.
    """

    method: str = "disel"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple | str = ALL_LINEAR
    use_rslora: bool = False
    gate_bias_init: float = -3.0
    gate_weight_init: str = "random"
    gate_normalize: bool = False
    gate_bottleneck_dim: int | None = None  # None: a full (r, d_in) gate
    gate_lr_multiplier: float = 5.0

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_int("r", self.r)
        check_float("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_float("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        check_bool("use_rslora", self.use_rslora)
        check_float("gate_bias_init", self.gate_bias_init)
        check_choice("gate_weight_init", self.gate_weight_init, GATE_WEIGHT_INITS)
        check_bool("gate_normalize", self.gate_normalize)
        if self.gate_bottleneck_dim is not None:
            check_int("gate_bottleneck_dim", self.gate_bottleneck_dim)
        check_float("gate_lr_multiplier", self.gate_lr_multiplier, 0.0, low_open=True)
        self._check_targets()

    def _check_targets(self):
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                targets = (targets,)
            else:
                return
        if isinstance(targets, list):
            targets = tuple(targets)
            object.__setattr__(self, "target_modules", targets)
        if not isinstance(targets, tuple) or not targets:
            raise ValueError(f"target_modules must be {ALL_LINEAR!r} or a non-empty list of names, got {targets!r}")
        known = set(ATTENTION_MODULES) | {m for ms in MLP_MODULES.values() for m in ms}
        for name in targets:
            if name not in known:
                raise ValueError(
                    f"unknown target module {name!r} in target_modules; allowed: {', '.join(sorted(known))} "
                    f"or {ALL_LINEAR!r}"
                )
        object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self):
        """The factor ``s``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def targets_for(self, model_config):
        """Return the layer names this adapter adapts in ``model_config``'s blocks."""
        available = model_config.linear_modules
        if self.target_modules == ALL_LINEAR:
            return available
        missing = [name for name in self.target_modules if name not in available]
        if missing:
            raise ValueError(
                f"target_modules {missing} do not exist in arch={model_config.arch!r}; "
                f"its linear layers are {', '.join(available)}"
            )
        return tuple(name for name in available if name in self.target_modules)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings for :func:`minidisel.train.train`.

    AdamW follows PyTorch: decoupled weight decay ``p <- p - lr * wd * p`` then
    the bias-corrected Adam step. The learning rate rises linearly for
    ``warmup_fraction * steps`` steps, then follows a cosine to zero.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_fraction: float = 0.05
    max_grad_norm: float | None = 1.0
    log_every: int = 50
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"betas must be a tuple of two numbers, got {self.betas!r}")
        check_float("betas[0]", self.betas[0], 0.0, 1.0, high_open=True)
        check_float("betas[1]", self.betas[1], 0.0, 1.0, high_open=True)
        check_float("eps", self.eps, 0.0, low_open=True)
        check_float("warmup_fraction", self.warmup_fraction, 0.0, 1.0, high_open=True)
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", self.max_grad_norm, 0.0, low_open=True)
        check_int("log_every", self.log_every, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_bool("progress", self.progress)

