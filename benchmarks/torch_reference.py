"""A PyTorch copy of minidisel's GPT-style model, LoRA and DISeL, for timing only.

It mirrors :mod:`minidisel.model` (learned positions, pre-norm LayerNorm
blocks, exact GELU, biases everywhere, output head tied to the token
embedding) and :mod:`minidisel.adapters`. It loads its weights from
minidisel's parameter trees, so the benchmark can first check that both
compute the same losses and then time them on equal terms.
"""

import math

import torch
import torch.nn.functional as F

from minidisel.train import learning_rate


def tensor(array, dtype):
    """Return a trainable-or-not copy of a NumPy array as a torch tensor of ``dtype``."""
    return torch.tensor(array, dtype=dtype)


class AdaptedLinear(torch.nn.Module):
    """A frozen or trainable linear layer with an optional LoRA or DISeL update."""

    def __init__(self, base, adapter, adapter_config, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(tensor(base["weight"], dtype))
        self.bias = torch.nn.Parameter(tensor(base["bias"], dtype)) if "bias" in base else None
        self.adapter_config = adapter_config
        if adapter is not None:
            self.A = torch.nn.Parameter(tensor(adapter["A"], dtype))
            self.B = torch.nn.Parameter(tensor(adapter["B"], dtype))
            if adapter_config.method == "disel":
                self.W_g = torch.nn.Parameter(tensor(adapter["W_g"], dtype))
                self.b_g = torch.nn.Parameter(tensor(adapter["b_g"], dtype))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.adapter_config is None:
            return y
        h = F.linear(x, self.A)  # (B, T, R)
        if self.adapter_config.method == "disel":
            h = torch.sigmoid(F.linear(x, self.W_g, self.b_g)) * h
        return y + self.adapter_config.scaling * F.linear(h, self.B)


class Block(torch.nn.Module):
    """One pre-norm GPT block, as :func:`minidisel.model.block`."""

    def __init__(self, p, adapters, adapter_config, config, dtype):
        super().__init__()
        self.config = config

        def norm(q):
            layer = torch.nn.LayerNorm(config.d_model, eps=config.norm_eps, dtype=dtype)
            layer.weight.data.copy_(tensor(q["weight"], dtype))
            layer.bias.data.copy_(tensor(q["bias"], dtype))
            return layer

        def linear(group, name):
            adapter = adapters.get(group, {}).get(name) if adapters else None
            return AdaptedLinear(p[group][name], adapter, adapter_config if adapter is not None else None, dtype)

        self.norm1, self.norm2 = norm(p["input_layernorm"]), norm(p["post_attention_layernorm"])
        self.q, self.k, self.v, self.o = (linear("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.up, self.down = linear("mlp", "up_proj"), linear("mlp", "down_proj")

    def forward(self, x):
        B, T, D = x.shape
        H = self.config.n_heads
        h = self.norm1(x)
        q, k, v = (layer(h).view(B, T, H, D // H).transpose(1, 2) for layer in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        a = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(torch.nn.Module):
    """minidisel's GPT-style decoder, with adapters where ``adapters`` has them."""

    def __init__(self, params, config, adapters=None, adapter_config=None):
        super().__init__()
        dtype = getattr(torch, config.dtype)
        self.embed = torch.nn.Parameter(tensor(params["embed_tokens"]["weight"], dtype))
        self.positions = torch.nn.Parameter(tensor(params["embed_positions"]["weight"], dtype))
        layer_adapters = (adapters or {"layers": {}})["layers"]
        self.blocks = torch.nn.ModuleList(
            Block(params["layers"][str(i)], layer_adapters.get(str(i)), adapter_config, config, dtype)
            for i in range(config.n_layers)
        )
        self.norm = torch.nn.LayerNorm(config.d_model, eps=config.norm_eps, dtype=dtype)
        self.norm.weight.data.copy_(tensor(params["norm"]["weight"], dtype))
        self.norm.bias.data.copy_(tensor(params["norm"]["bias"], dtype))

    def forward(self, tokens):
        x = self.embed[tokens] + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.T


def loss_of(model, batch):
    """Return the mean cross-entropy over the batch's scored positions, as minidisel's loss."""
    logits = model(batch["inputs"])
    nll = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    mask = batch["mask"].flatten()
    return (nll * mask).sum() / mask.sum()


def to_torch_batch(batch):
    """Convert a minidisel batch of NumPy arrays to torch tensors."""
    return {
        "inputs": torch.from_numpy(batch["inputs"]),
        "targets": torch.from_numpy(batch["targets"]),
        "mask": torch.from_numpy(batch["mask"]),
    }


def trainable_groups(model, full, weight_decay, gate_lr_multiplier, lr):
    """Split trainable parameters into minidisel's three AdamW groups and freeze the rest."""
    groups = {"decay": [], "no_decay": [], "gate": []}
    for name, parameter in model.named_parameters():
        is_adapter = name.rsplit(".", 1)[-1] in ("A", "B", "W_g", "b_g")
        parameter.requires_grad_(full != is_adapter)
        if not parameter.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in ("W_g", "b_g"):
            groups["gate"].append(parameter)
        else:
            groups["decay" if parameter.ndim >= 2 else "no_decay"].append(parameter)
    return [
        {"params": groups["decay"], "weight_decay": weight_decay, "lr": lr, "scale": 1.0},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr, "scale": 1.0},
        {"params": groups["gate"], "weight_decay": 0.0, "lr": lr, "scale": gate_lr_multiplier},
    ]


class Trainer:
    """One AdamW training step per call, with minidisel's groups, schedule and clipping."""

    def __init__(self, model, full, train_config, gate_lr_multiplier):
        self.model, self.config = model, train_config
        groups = trainable_groups(model, full, train_config.weight_decay, gate_lr_multiplier, train_config.lr)
        groups = [group for group in groups if group["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=train_config.betas, eps=train_config.eps)
        self.parameters = [p for group in groups for p in group["params"]]
        self.step_count = 0

    def step(self, batch):
        """Run forward, backward, clipping and the AdamW update; return the loss tensor."""
        self.step_count += 1
        lr = learning_rate(self.step_count, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_of(self.model, batch)
        loss.backward()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        return loss
