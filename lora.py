"""Hand-written LoRA: add adapters, disable them (the self-teacher), merge/unmerge, save/load in PEFT layout.

LoRA (Hu et al., 2021, arXiv 2106.09685) freezes a pretrained weight W (out × in) and learns a low-rank update:

    Eq. 3 of the LoRA paper:  h = W x + ΔW x = W x + (α/r)·B A x,   A (r × in), B (out × r)

with A random and B = 0, so the model is unchanged at initialization (LoRA paper, Sec. 4.1). In this project
the trainable policy π_θ is the base model plus the adapter, and the self-teacher π_base is the same weights
with the adapter disabled (`adapters_disabled`), so one copy of the weights serves both.

Public API:
    add_lora(model, r=64, alpha=128, targets=(...), dropout=0.0, dtype=torch.float32) -> model
    adapters_disabled(model)     context manager: inside it the model computes exactly the base model
    merge(model, dtype=None) / unmerge(model)  explicit, idempotent; never tied to train()/eval()
    lora_state_dict(model)       {PEFT key: tensor}
    save_adapter(model, directory, base_model_name_or_path=None)
    load_adapter(model, directory) -> model   (adds LoRA from the saved config if the model has none)

Module layout: each targeted `nn.Linear` is replaced by a `LoRALinear` that holds the SAME `weight` (and
`bias`) Parameter objects plus two bias-free `nn.Linear` children `lora_A`, `lora_B`. So the model's ordinary
state_dict keys for the base weights are unchanged (`model.layers.0.self_attn.q_proj.weight`), and the adapter
keys are the PEFT keys minus PEFT's wrapper prefix: `model.layers.0.self_attn.q_proj.lora_A.weight` is saved as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, exactly as PEFT 0.21 writes it for a causal LM
(no adapter name in the saved keys). `adapter_config.json` carries the fields PEFT writes (checked against
PEFT 0.21.2: an adapter saved here loads in `PeftModel.from_pretrained` and vice versa; see tests/test_lora.py).

Departures from the paper (and from PEFT):
1. Adapter dtype: A and B are fp32 by default, even on a bf16 base (the paper trains in bf16). The LoRA branch
   casts x to fp32, computes (α/r)·B A x in fp32 and casts the sum back to the base output dtype. This keeps
   AdamW's small updates (lr 5e-6) from being rounded away in bf16 parameters, and it is what PEFT does by
   default (`autocast_adapter_dtype=True`). Pass `dtype=None` to use the base weight's dtype.
2. Merge keeps an exact copy of each original weight (a non-persistent buffer, so state_dict is unaffected) and
   `unmerge` restores it bit for bit instead of subtracting ΔW, because W + ΔW − ΔW ≠ W in floating point
   (in bf16 the error is one ulp on many entries and would accumulate over merge/unmerge cycles, slowly moving
   the self-teacher away from the base policy). Cost: one extra copy of the targeted weights while merged.
   PEFT instead subtracts.
3. `adapters_disabled` on a merged model computes the base output exactly from that saved copy, without
   unmerging (PEFT unmerges by subtraction, which is inexact).
4. A forward pass with gradients enabled on a merged model raises: the LoRA branch is not computed while merged,
   so A and B would silently receive no gradient. Unmerge before training.
5. Only plain LoRA: no DoRA, rsLoRA, bias training, per-module rank/alpha patterns or modules_to_save;
   load_adapter rejects configs that use them, naming the field and file.
6. A is initialized Kaiming-uniform with a=√5 (U(−1/√in, 1/√in), nn.Linear's default), as in the authors'
   loralib code and PEFT; the paper's text says Gaussian. Either way B = 0, so ΔW = 0 at init.
7. `merge(model, dtype=torch.float32)` on a bf16 (or fp16) base does not write W + ΔW into the bf16 weight: that
   rounding erases every entry of ΔW below half an ulp of W (at lr 5e-6, ΔW ~ 6e-5 after 60 steps against a
   half-ulp of ~6e-5 at |w| ≈ 0.02), so the merged model would be close to the base model. It keeps W + ΔW as a
   separate fp32 copy (non-persistent; W untouched) and each layer computes in fp32 and rounds its output once,
   like a bf16 matmul with fp32 accumulation. Cost: an fp32 copy of the targeted weights while merged. With
   dtype=None (or the base's own dtype) W is updated in place, as PEFT does.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the causal LM)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """LoRA Eq. 3 plus the bias b, dropout on the LoRA branch, W and b the wrapped nn.Linear's frozen Parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype: torch.dtype | None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter object: base state_dict keys and tying are unchanged
        self.bias = base.bias
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r  # α/r of LoRA Eq. 3
        lora_dtype = base.weight.dtype if dtype is None else dtype
        factory = dict(device=base.weight.device, dtype=lora_dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # A: (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # B: (out, r)
        # ΔW = 0 at init (Sec. 4.1); A as in departure 6
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        # The original W while merged in place (departure 2); non-persistent, so it never enters the state_dict.
        self.register_buffer("weight_unmerged", None, persistent=False)
        # W + ΔW in a wider dtype than W while merged with merge(dtype=...) (departure 7); W is then untouched.
        self.register_buffer("weight_merged", None, persistent=False)

    def delta_weight(self) -> Tensor:
        """ΔW of LoRA Eq. 3 in fp32, (out, in)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.disabled:  # the exact base weight: saved by an in-place merge, or untouched (departure 7)
                return F.linear(x, self.weight if self.weight_unmerged is None else self.weight_unmerged, self.bias)
            if torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
                raise RuntimeError("forward with gradients on a merged LoRA model: A and B would get no gradient; "
                                   "call lora.unmerge(model) before training (or run under torch.no_grad())")
            if self.weight_merged is not None:  # W + ΔW in fp32: computed there, the output rounded once
                wide = self.weight_merged.dtype
                bias = None if self.bias is None else self.bias.to(wide)
                return F.linear(x.to(wide), self.weight_merged, bias).to(x.dtype)  # (..., out)
            return F.linear(x, self.weight, self.bias)  # weight = W + ΔW
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.disabled:
            return y
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)  # (..., in), dropout on the LoRA branch only
        # LoRA Eq. 3
        return (y + self.scaling * self.lora_B(self.lora_A(h))).to(y.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None) -> None:
        """W ← W + ΔW in place (dtype None or W's dtype), or W + ΔW kept apart in `dtype` (departure 7)."""
        if self.merged:
            return
        if dtype is None or dtype == self.weight.dtype:
            self.weight_unmerged = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))  # W ← W + ΔW
        else:
            self.weight_merged = self.weight.to(dtype) + self.delta_weight().to(dtype)  # (out, in)  W + ΔW
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.weight_merged is not None:  # W was never touched
            self.weight_merged = None
        else:
            self.weight.copy_(self.weight_unmerged)  # exact restore (departure 2)
            self.weight_unmerged = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, merged={self.merged}, disabled={self.disabled}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layers (call lora.add_lora(model) first)")
    return layers


def add_lora(model: nn.Module, r: int = 64, alpha: float = 128,
             targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0,
             dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Wrap every nn.Linear whose name's last component is in `targets`; freeze all other parameters.

    dtype: dtype of A and B (fp32 by default, see departure 1); None = the base weight's dtype.
    Raises if the model already has LoRA layers or if no module matches.
    """
    if isinstance(targets, str):
        raise TypeError(f"targets must be a sequence of module names, got the string {targets!r}")
    if lora_layers(model):
        raise ValueError("add_lora: the model already has LoRA layers")
    matches = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not matches:
        raise ValueError(f"add_lora: no nn.Linear module named any of {tuple(targets)} in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(linear, r=r, alpha=alpha, dropout=dropout, dtype=dtype))
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly the base model (merged or not); restored on exit."""
    layers = _require_lora(model, "adapters_disabled")
    previous = {name: m.disabled for name, m in layers.items()}
    for m in layers.values():
        m.disabled = True
    try:
        yield model
    finally:
        for name, m in layers.items():
            m.disabled = previous[name]


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """W ← W + ΔW in every LoRA layer (the original W is kept to unmerge exactly). Idempotent.

    dtype: hold the merged weight in this dtype when it differs from W's: `torch.float32` keeps a small ΔW exact on
    a bf16 base (departure 7); None merges in place in W's dtype."""
    for m in _require_lora(model, "merge").values():
        m.merge(dtype)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the original W in every merged LoRA layer. Idempotent."""
    for m in _require_lora(model, "unmerge").values():
        m.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under PEFT's saved keys, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.

    Values are detached views of the live parameters (not copies).
    """
    out = {}
    for name, m in _require_lora(model, "lora_state_dict").items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()  # (r, in)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()  # (out, r)
    return out


def _hyperparameters(model: nn.Module, what: str) -> tuple[int, float, float, list[str]]:
    """(r, alpha, dropout, sorted target names) shared by all LoRA layers; raises if they differ."""
    layers = _require_lora(model, what)
    values = {(m.r, m.alpha, m.dropout_p) for m in layers.values()}
    if len(values) != 1:
        raise ValueError(f"LoRA layers have different (r, alpha, dropout): {sorted(values)}; the PEFT config "
                         "holds one value of each")
    r, alpha, dropout = values.pop()
    return r, alpha, dropout, sorted({name.rsplit(".", 1)[-1] for name in layers})


def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json as PEFT 0.21 does for a causal LM.

    base_model_name_or_path defaults to the model's own `name_or_path` (None for a model built from a config).
    """
    from safetensors.torch import save_file

    r, alpha, dropout, targets = _hyperparameters(model, "save_adapter")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "exclude_modules": None,
        "target_parameters": None,
        "trainable_token_indices": None,
    }
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


# Config fields of features this file does not implement, with the value that means "not used".
_UNSUPPORTED_DEFAULTS = {
    "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
    "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
    "alpha_pattern": {}, "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
    "use_qalora": False, "alora_invocation_tokens": None, "layer_replication": None,
}
# init_lora_weights values whose initialization rewrites the base weights: such an adapter is relative to a
# modified base model, not to the plain one this file loads it onto.
_BASE_MODIFYING_INITS = ("pissa", "olora", "loftq", "corda")


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load adapter_model.safetensors + adapter_config.json (saved here or by PEFT) into the model.

    A model without LoRA layers gets them first, via add_lora with r, lora_alpha, target_modules and
    lora_dropout from the config (adapter dtype fp32). A model with LoRA layers must match r and lora_alpha
    (lora_dropout, a training-time setting, is then the model's own and is not checked).
    The weights are validated against the model's LoRA layers: missing keys, unexpected keys and shapes.
    Loading into a merged model is refused (its merged weights would be stale).
    """
    from safetensors.torch import load_file

    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_adapter: {path} does not exist")
    with open(config_path) as f:
        config = json.load(f)
    for field, expected in (("peft_type", "LORA"), ("task_type", "CAUSAL_LM")):
        if config.get(field) != expected:
            raise ValueError(f"{config_path}: {field} is {config.get(field)!r}, expected {expected!r}")
    for field, default in _UNSUPPORTED_DEFAULTS.items():
        if field in config and config[field] != default and not (default is None and config[field] in ({}, [])):
            raise ValueError(f"{config_path}: {field} = {config[field]!r} is not supported by lora.py "
                             f"(only {default!r})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise ValueError(f"{config_path}: init_lora_weights = {init!r} modifies the base weights; such an "
                         "adapter does not apply to the plain base model")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise ValueError(f"{config_path}: missing field {field!r}")
    if not isinstance(config["target_modules"], list):
        raise ValueError(f"{config_path}: target_modules must be a list of module names, got "
                         f"{config['target_modules']!r} (regex strings are not supported)")

    layers = lora_layers(model)
    if not layers:
        add_lora(model, r=config["r"], alpha=config["lora_alpha"], targets=tuple(config["target_modules"]),
                 dropout=config.get("lora_dropout", 0.0))
        layers = lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise ValueError(f"load_adapter({directory}): the model is merged; call lora.unmerge(model) first")
    r, alpha, _, _ = _hyperparameters(model, "load_adapter")
    for field, ours in (("r", r), ("lora_alpha", alpha)):
        if config[field] != ours:
            raise ValueError(f"{config_path}: {field} = {config[field]} but the model's LoRA layers have {ours}")

    loaded = load_file(weights_path)
    expected = lora_state_dict(model)
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    if missing:
        raise ValueError(f"{weights_path}: {len(missing)} missing keys, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{weights_path}: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    for key, target in expected.items():
        if loaded[key].shape != target.shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(loaded[key].shape)}, the model expects "
                             f"{tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(loaded[key])  # target is a view of the live parameter; copy_ casts the dtype
    return model
