"""minidisel: a small, exact reference implementation of DISeL in NumPy.

DISeL (Dynamic Input-Sensitive LoRA) gates each rank-one component of a LoRA
update with its own per-token sigmoid:

    y = W x + b + s · B (g(x) ⊙ A x),   g(x) = σ(c · (W_g x + b_g))

Parameters are nested dicts of float arrays laid out as in ``torch.nn.Linear``
and PEFT (a weight is ``(out_features, in_features)``); computations run in
float64 unless a config asks for float32, and gradients come from autograd.

Shape legend used in every docstring and shape comment:

    B  batch            T  positions        D  model width
    H  heads            G  key/value heads  K  head width
    F  MLP width        V  vocabulary       R  adapter rank
"""

__version__ = "0.1.0"

from minidisel.config import AdapterConfig, ModelConfig, TrainConfig
from minidisel.model import forward, init_params
from minidisel.adapters import (
    adapter_paths,
    init_adapters,
    merge_adapters,
    unmerge_adapters,
)
from minidisel.train import train
from minidisel.gradcheck import check_gradients, numerical_gradient

__all__ = [
    "AdapterConfig",
    "ModelConfig",
    "TrainConfig",
    "adapter_paths",
    "check_gradients",
    "forward",
    "init_adapters",
    "init_params",
    "merge_adapters",
    "numerical_gradient",
    "train",
    "unmerge_adapters",
]
