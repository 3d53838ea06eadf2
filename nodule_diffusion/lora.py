"""LoRA: the adapter layer, injection, merge/unmerge, adapter files and the orthogonality loss.

Implements
    LoRALayer           a frozen nn.Linear or nn.Conv2d plus any number of named low-rank adapters [LoRA Eq. 3],
                        on a convolution as LoCon: a k×k conv down to r channels, a 1×1 conv back up [LoCon]
    inject_lora         the only code that swaps modules (suffix rule on module names)
    set_active / merge / unmerge / remove_adapter / adapter_state / adapter_factors / add_factors
    save_adapter / load_adapter / save_merged / fingerprint_state_dict / base_state_dict
    read_adapter / check_adapter_name   schema + content-hash check of an adapter file; the name it records
    orthogonality_loss  squared Frobenius cosine between the ΔW of adapter pairs, from the factors [OURS Eq. 2]
    orthogonal_bases    disjoint rows of one random orthogonal matrix, frozen A's [OrthoAdapt]

Papers
    [LoRA]       Hu et al. 2021, arXiv:2106.09685 (§4.1: A Kaiming/Gaussian, B = 0, ΔW = (α/r)·B·A)
    [ZipLoRA]    Shah et al. 2023, arXiv:2311.13600 (per-column merger coefficients m)
    [OrthoAdapt] Po et al. 2024, arXiv:2312.02432 (frozen orthogonal input bases, one disjoint set per concept)
    [LoCon]      Yeh et al. 2024, arXiv:2309.14859 (LyCORIS §3: LoRA on convolutions, ΔW reshaped to the kernel)
    [OURS]       the composition objective of notes/method.md §3 (arXiv 2603.01659 gives no formula); equations
                 numbered as in compose.py: Eq. 1 total loss, Eq. 2 L_orth (here), Eq. 3 L_attn

Notation (per adapted layer; D_in = in_features, D_out = out_features; a Conv2d's kernel (C_out, C_in, kh, kw) is
the matrix (D_out, D_in) = (C_out, C_in·kh·kw), so every formula below holds for both layer kinds)
    W0   (D_out, D_in)  frozen base weight          A  (r, D_in)   down-projection, Kaiming-uniform init
    r    adapter rank                                B  (D_out, r)  up-projection, zero init ⇒ ΔW = 0 at start
    alpha  LoRA α;  s = α/r the scaling              m  (D_in,)     merger vector (ZipLoRA), ones when absent
    w    the active weight of an adapter (set_active), not part of ΔW
    ΔW_name = s·B·A·diag(m)          W = W0 + Σ_{active i} w_i·ΔW_i
    Effective factors (adapter_factors): A_eff = A·diag(m), B_eff = s·B, so that B_eff·A_eff = ΔW.

Deviations
    DEVIATION: no LoRA dropout (the paper's 0.1 on GPT-3 is unneeded for our tiny adapters; add it if you need it).
    Conv2d adapters (LoCon) go beyond attention-only LoRA, as design §4 allows ("optionally feed-forward and
    convs"); which layers get one is diffusion.LORA_TARGETS. Grouped convolutions and padding modes other than
    zeros are refused.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nodule_diffusion.common import DataError, check_schema, check_tensors, tensor_digest

ADAPTER_FORMAT_VERSION = 2  # 2: content_sha256 and the adapter's name recorded (format 1 files are still read)


def fan(base: nn.Module) -> tuple[int, int]:
    """(D_out, D_in) of a layer's weight seen as a matrix: a Conv2d kernel flattened over (C_in, kh, kw)."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    return base.out_channels, base.in_channels * base.kernel_size[0] * base.kernel_size[1]


def adaptable(module: nn.Module) -> bool:
    """Layers an adapter can wrap: nn.Linear, and nn.Conv2d without groups and with zero padding."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                             and module.padding_mode == "zeros")


class LoRALayer(nn.Module):
    """A frozen `base` nn.Linear or nn.Conv2d with named LoRA adapters: W = W0 + Σ_active w·s·B·A·diag(m).

    Linear: x (..., D_in) → (..., D_out), y = W0·x + b + Σ w·s·B·A·(m ⊙ x) [LoRA Eq. 3].
    Conv2d: x (N, C_in, H, W) → (N, C_out, H', W'), the adapter is conv(x, A as an (r, C_in, kh, kw) kernel, the
    base's stride/padding/dilation) followed by a 1×1 conv with B [LoCon]: the same map as conv(x, ΔW).
    Output dtype = base(x)'s. Merging is explicit (`merge()`), guarded by a flag, in float32, and never tied to
    train()/eval(); unmerge() restores W0 bit-exactly.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d):
        super().__init__()
        if not adaptable(base):
            raise DataError(f"LoRA wraps nn.Linear or an ungrouped, zero-padded nn.Conv2d, not {base}")
        self.base = base  # composition, not inheritance: the wrapped layer keeps its own state
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_m = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: dict[str, float] = {}  # adapter name -> weight w, in insertion order
        # W0 as it was before merge() (D_out, D_in), None when unmerged. Restoring this copy makes unmerge()
        # bit-exact (W0 + ΔW − ΔW is not, in floating point), for the memory that storing ΔW would take.
        # A non-persistent buffer, so .to(device) moves it and state_dict() ignores it.
        self.register_buffer("unmerged_weight", None, persistent=False)

    @property
    def merged(self) -> bool:
        return self.unmerged_weight is not None

    # The wrapper stands in for the layer it replaced, so code that reads these keeps working.
    in_features = property(lambda self: fan(self.base)[1])  # D_in (C_in·kh·kw for a convolution)
    out_features = property(lambda self: fan(self.base)[0])
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def _require_unmerged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"LoRALayer.{what}: the adapters are merged; call unmerge() first")

    def add_adapter(self, name: str, r: int, alpha: float, init: str = "kaiming",
                    A_init: torch.Tensor | None = None, train_A: bool = True) -> None:
        """Add adapter `name` (A (r, D_in), B (D_out, r) = 0) with s = alpha/r; it joins the active set with w = 1.

        init: "kaiming" (Kaiming-uniform, a = √5, as nn.Linear and [LoRA §4.1]), "gaussian" (N(0, 1/r²), peft's
        choice), "orthogonal" (orthonormal rows). A_init (r, D_in) overrides init, e.g. from `orthogonal_bases`;
        train_A=False freezes A (Orthogonal Adaptation trains B only).
        """
        self._require_unmerged("add_adapter")
        if not name or "." in name or name in self.lora_A:
            raise DataError(f"adapter name {name!r} is empty, contains '.', or already exists")
        if r < 1:
            raise DataError(f"adapter {name!r}: rank r must be >= 1, got {r}")
        weight = self.base.weight
        A = torch.empty(r, self.in_features, device=weight.device, dtype=torch.float32)
        if A_init is not None:
            if tuple(A_init.shape) != tuple(A.shape):
                raise DataError(f"adapter {name!r}: A_init has shape {tuple(A_init.shape)}, expected {tuple(A.shape)}")
            A.copy_(A_init)
        elif init == "kaiming":
            # [LoRA §4.1] says "random Gaussian"; loralib (and nn.Linear) use Kaiming-uniform with a = √5
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        elif init == "orthogonal":
            nn.init.orthogonal_(A)
        else:
            raise DataError(f"adapter {name!r}: unknown init {init!r} (kaiming | gaussian | orthogonal)")
        self.lora_A[name] = nn.Parameter(A, requires_grad=train_A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device))
        self.scaling[name] = alpha / r  # [LoRA §4.1] s = α/r
        self.active[name] = 1.0

    def add_merger(self, name: str) -> None:
        """Give adapter `name` a trainable merger vector m (D_in,) = 1 [ZipLoRA]: ΔW_name = s·B·A·diag(m)."""
        self._require_unmerged("add_merger")
        self.lora_m[name] = nn.Parameter(torch.ones(self.in_features, device=self.lora_A[name].device))

    def remove_adapter(self, name: str) -> None:
        self._require_unmerged("remove_adapter")
        for table in (self.lora_A, self.lora_B, self.lora_m):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        self.active.pop(name, None)

    def set_active(self, names: list[str], weights: list[float] | None = None) -> None:
        """Make exactly `names` active with `weights` (default 1 each); unknown names raise DataError."""
        self._require_unmerged("set_active")
        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names):
            raise DataError(f"set_active: {len(names)} names but {len(weights)} weights")
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise DataError(f"set_active: unknown adapters {unknown}; this layer has {list(self.lora_A)}")
        self.active = {n: float(w) for n, w in zip(names, weights)}

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff (r, D_in), B_eff (D_out, r)) with B_eff·A_eff = ΔW_name; differentiable."""
        A = self.lora_A[name]
        if name in self.lora_m:
            A = A * self.lora_m[name]  # A·diag(m) scales column j of A by m[j]   # (r, D_in)
        return A, self.scaling[name] * self.lora_B[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW_name = s·B·A·diag(m), float32 (D_out, D_in), without the active weight w."""
        A, B = self.factors(name)
        return B.float() @ A.float()  # (D_out, D_in)

    def active_delta(self) -> torch.Tensor:
        """Σ_active w·ΔW in float32, in the shape of the base weight ((D_out, D_in), or the conv kernel's)."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.base.weight.device)
        for name, w in self.active.items():
            delta = delta + w * self.delta_weight(name)
        return delta.view(self.base.weight.shape)  # (C_out, C_in, kh, kw) for a convolution

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + Σ_active w·ΔW, computed in float32; a second call does nothing."""
        if self.merged:
            return
        weight = self.base.weight
        self.unmerged_weight = weight.detach().clone()
        weight.copy_((weight.float() + self.active_delta()).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W0 bit-exactly, undoing merge() even if the adapters changed since; a second call does nothing."""
        if not self.merged:
            return
        self.base.weight.copy_(self.unmerged_weight)
        self.unmerged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., D_out)
        if self.merged:
            return out  # the adapters already live in base.weight; adding them again would double them
        for name, w in self.active.items():
            A, B = self.lora_A[name], self.lora_B[name]
            h = x.to(A.dtype)
            if isinstance(self.base, nn.Conv2d):
                lora_out = self._conv_adapter(h, name)  # (N, C_out, H', W')
            else:
                if name in self.lora_m:
                    h = h * self.lora_m[name]  # x ⊙ m = diag(m)·x
                # [LoRA Eq. 3] h = W0·x + s·B·(A·x); ΔW is never formed: two thin matmuls, O(r·(D_in + D_out))/token
                lora_out = F.linear(F.linear(h, A), B)  # (..., r) then (..., D_out)
            out = torch.add(out, lora_out.to(out.dtype), alpha=w * self.scaling[name])  # out + w·s·lora_out, one op
        return out

    def _conv_adapter(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """B·A applied to a feature map without forming ΔW [LoCon]: conv(h, A) to r channels, then a 1×1 conv B."""
        conv, (A, B) = self.base, (self.lora_A[name], self.lora_B[name])
        if name in self.lora_m:
            A = A * self.lora_m[name]  # A·diag(m): m weighs the flattened (C_in, kh, kw) columns   # (r, D_in)
        kernel = A.view(A.shape[0], conv.in_channels, *conv.kernel_size)  # (r, C_in, kh, kw)
        down = F.conv2d(h, kernel, None, conv.stride, conv.padding, conv.dilation)  # (N, r, H', W')
        return F.conv2d(down, B[:, :, None, None])  # (N, C_out, H', W')

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"adapters(rank)={ranks}, active={self.active}, merged={self.merged}"


LoRALinear = LoRALayer  # the name design §5 gives the layer; it has wrapped convolutions as well since LoCon

# ----------------------------------------------------------------------------- injection and model-level helpers

def _matches(module_name: str, targets: list[str] | tuple[str, ...]) -> bool:
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def _wrap(model: nn.Module, layer_name: str) -> LoRALayer:
    """Return the LoRALayer at `layer_name`, wrapping the nn.Linear / nn.Conv2d found there first if needed."""
    module = model.get_submodule(layer_name)
    if isinstance(module, LoRALayer):
        return module
    if not adaptable(module):
        raise DataError(f"module {layer_name!r} is a {type(module).__name__}, LoRA needs nn.Linear or nn.Conv2d")
    parent_name, _, child = layer_name.rpartition(".")
    wrapped = LoRALayer(module)
    setattr(model.get_submodule(parent_name), child, wrapped)  # the one place where modules are swapped
    return wrapped


def inject_lora(model: nn.Module, targets: list[str] | tuple[str, ...], name: str, r: int, alpha: float,
                init: str = "kaiming") -> list[str]:
    """Add adapter `name` to every nn.Linear or nn.Conv2d whose module name equals a target or ends with
    "." + target (modules of other kinds with a matching name, e.g. an nn.Identity skip, are passed over).

    Layers already wrapped get another adapter. Returns the adapted module names (sorted). Raises DataError if no
    module matched. Every non-adapter parameter of `model` is left as it is; freeze the rest of the model yourself
    (or rely on the base layers being frozen here).
    """
    wrapped_bases = {id(m.base) for m in lora_layers(model).values()}  # addressed through their wrappers
    names = []
    for module_name, module in model.named_modules():
        if id(module) in wrapped_bases:
            continue
        if module_name and _matches(module_name, targets) and (adaptable(module) or isinstance(module, LoRALayer)):
            names.append(module_name)
    if not names:
        raise DataError(f"inject_lora: no nn.Linear / nn.Conv2d module name matches targets {list(targets)}")
    for layer_name in names:  # collected first: swapping while iterating named_modules() is unsafe
        _wrap(model, layer_name).add_adapter(name, r, alpha, init=init)
    return sorted(names)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRALayer in `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _layers_with(model: nn.Module, name: str) -> dict[str, LoRALayer]:
    layers = {n: m for n, m in lora_layers(model).items() if name in m.lora_A}
    if not layers:
        raise DataError(f"no layer of the model holds an adapter named {name!r}")
    return layers


def set_active(model: nn.Module, names: list[str], weights: list[float] | None = None) -> None:
    """Activate `names` (weights default 1) in every LoRA layer; a layer activates the names it holds."""
    weights = [1.0] * len(names) if weights is None else list(weights)
    for n in names:
        _layers_with(model, n)  # every name must exist somewhere
    for layer in lora_layers(model).values():
        pairs = [(n, w) for n, w in zip(names, weights) if n in layer.lora_A]
        layer.set_active([n for n, _ in pairs], [w for _, w in pairs])


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` everywhere; the (possibly empty) wrappers stay, so module names stay stable."""
    for layer in _layers_with(model, name).values():
        layer.remove_adapter(name)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Only adapter `name`'s tensors: "<layer>.lora_A" (r, D_in), "<layer>.lora_B" (D_out, r), "<layer>.lora_m"."""
    state = {}
    for layer_name, layer in _layers_with(model, name).items():
        state[f"{layer_name}.lora_A"] = layer.lora_A[name].detach()
        state[f"{layer_name}.lora_B"] = layer.lora_B[name].detach()
        if name in layer.lora_m:
            state[f"{layer_name}.lora_m"] = layer.lora_m[name].detach()
    return state


def adapter_factors(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A_eff (r, D_in), B_eff (D_out, r))}: A_eff = A·diag(m), B_eff = s·B, B_eff·A_eff = ΔW.

    Differentiable (the orthogonality loss trains through it)."""
    return {layer_name: layer.factors(name) for layer_name, layer in _layers_with(model, name).items()}


@torch.no_grad()
def add_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Load composed factors {layer: (A (k, D_in), B (D_out, k))} as a new adapter with s = 1 (r = α = k)."""
    for layer_name, (A, B) in factors.items():
        layer = _wrap(model, layer_name)
        k = A.shape[0]
        if tuple(B.shape) != (layer.out_features, k):
            raise DataError(f"add_factors: layer {layer_name!r}: B has shape {tuple(B.shape)}, "
                            f"expected {(layer.out_features, k)}")
        layer.add_adapter(name, r=k, alpha=k, A_init=A)  # α = r ⇒ s = 1, so B·A is the composed ΔW as given
        layer.lora_B[name].copy_(B)


# ----------------------------------------------------------------------------- files

def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unwrapped_state_dict(model: nn.Module, fold_active: bool) -> dict[str, torch.Tensor]:
    """The model's state dict under the original (un-injected) names, without lora tensors.

    Wrapped weights hold W0 (fold_active=False) or W0 + Σ_active w·ΔW (fold_active=True), whatever the merge state.
    """
    layers = lora_layers(model)
    lora_prefixes = tuple(_key(n, "lora_") for n in layers)
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(lora_prefixes)}
    for layer_name, layer in layers.items():
        W0 = (layer.unmerged_weight if layer.merged else layer.base.weight).detach()
        state.pop(_key(layer_name, "base.weight"))
        state[_key(layer_name, "weight")] = (W0.float() + layer.active_delta().detach()).to(W0.dtype) if fold_active \
            else W0
        if layer.base.bias is not None:
            state[_key(layer_name, "bias")] = state.pop(_key(layer_name, "base.bias"))
    return state


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """W0 of every layer under the un-injected names: fingerprint_state_dict(base_state_dict(m)) names the base."""
    return _unwrapped_state_dict(model, fold_active=False)


def fingerprint_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 hex digest over the sorted names, dtypes, shapes and raw bytes of the tensors (non-tensors ignored)."""
    return tensor_digest({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})


def _atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save `obj` with its content_sha256 added, through a temp file in the same folder + os.replace."""
    path = Path(path)
    obj = {**obj, "content_sha256": tensor_digest(obj)}
    tmp = path.with_name(path.name + ".tmp")  # same folder ⇒ os.replace is an atomic rename
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_adapter(path: str | os.PathLike, model: nn.Module, name: str, base_fingerprint: str, config: dict,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter `name` alone: its name, tensors, `config` (primitives), `extra` tensors, the base fingerprint.

    The file is a plain dict loadable with torch.load(weights_only=True); per-layer r and α are recorded so that
    `load_adapter` can inject the adapter into a fresh base without any flags.
    """
    layers = _layers_with(model, name)
    payload = {
        "format_version": ADAPTER_FORMAT_VERSION,
        "kind": "nodule_diffusion.lora_adapter",
        "name": name,
        "base_fingerprint": base_fingerprint,
        "config": dict(config),
        "layers": {n: {"r": int(l.lora_A[name].shape[0]), "alpha": float(l.scaling[name] * l.lora_A[name].shape[0])}
                   for n, l in layers.items()},
        "tensors": {k: v.detach().cpu().clone() for k, v in adapter_state(model, name).items()},
        "extra": {k: v.detach().cpu().clone() for k, v in (extra or {}).items()},
    }
    _atomic_save(payload, path)


# What every adapter file holds (common.check_schema), checked by read_adapter before any use.
ADAPTER_SCHEMA = {"base_fingerprint": str, "config": dict, "layers": dict, "tensors": dict, "extra": dict}


def read_adapter(path: str | os.PathLike) -> dict:
    """Read and check an adapter file → its payload; every problem is a one-line DataError naming the file.

    Checked: readable with weights_only=True, kind, format_version, ADAPTER_SCHEMA, each layer's r (int ≥ 1) and
    alpha (finite number), tensors and extras are tensors, the content hash (format ≥ 2), no NaN/inf values.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, pickled objects, missing file...
        raise DataError(f"{path}: cannot read the adapter file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("kind") != "nodule_diffusion.lora_adapter":
        raise DataError(f"{path}: not a nodule_diffusion LoRA adapter file")
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= ADAPTER_FORMAT_VERSION:
        raise DataError(f"{path}: adapter format_version {version!r}, this code reads 1 .. {ADAPTER_FORMAT_VERSION}")
    check_schema(str(path), payload, ADAPTER_SCHEMA)
    for layer_name, spec in payload["layers"].items():
        r, alpha = (spec.get("r"), spec.get("alpha")) if isinstance(spec, dict) else (None, None)
        if not (isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise DataError(f"{path}: layer {layer_name!r} needs r (int ≥ 1) and alpha (finite number), got {spec!r}")
    for group in ("tensors", "extra"):
        bad = [k for k, v in payload[group].items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DataError(f"{path}: {group} entry {bad[0]!r} is not a tensor")
    if version >= 2 and not isinstance(payload.get("content_sha256"), str):
        raise DataError(f"{path}: format {version} adapter without a content_sha256 string (edited or corrupted)")
    check_tensors(str(path), payload)
    return payload


def _read_adapter_file(path: str | os.PathLike, base_fingerprint: str) -> dict:
    payload = read_adapter(path)
    if payload["base_fingerprint"] != base_fingerprint:
        raise DataError(f"{path}: adapter was made for another base model (fingerprint "
                        f"{payload['base_fingerprint'][:12]}…, this base {base_fingerprint[:12]}…)")
    return payload


def recorded_name(adapter: dict) -> str | None:
    """The name an adapter file records: its "name" (format 2), else config attribute=value or config "adapter",
    else the single "token:<name>" extra (format 1 files written by the LoRA stage); None when it records none."""
    config, extra = adapter.get("config") or {}, adapter.get("extra") or {}
    if isinstance(adapter.get("name"), str):
        return adapter["name"]
    if isinstance(config.get("attribute"), str) and isinstance(config.get("value"), str):
        return f"{config['attribute']}={config['value']}"
    if isinstance(config.get("adapter"), str):
        return config["adapter"]
    tokens = [k[len("token:"):] for k in extra if str(k).startswith("token:")]
    return tokens[0] if len(tokens) == 1 else None


def check_adapter_name(adapter: dict, expected_name: str, path: str | os.PathLike) -> None:
    """Refuse an adapter used under another name than the one its file records (e.g. texture=solid.pt renamed
    margin=well_defined.pt): its ΔW and token would draw texture=solid while outputs are labelled margin=well_defined.

    `adapter` is the file's payload (`read_adapter`). A file that records no name is accepted.
    """
    name = recorded_name(adapter)
    if name is not None and name != expected_name:
        raise DataError(f"{path}: this adapter was trained as {name!r} but is being loaded as {expected_name!r} "
                        f"(was the file renamed?); use it under its own name")


def load_adapter(path: str | os.PathLike, model: nn.Module, name: str, base_fingerprint: str,
                 expected_name: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Inject the adapter stored at `path` into `model` as `name` and load it; returns (config, extra).

    Refuses with DataError naming the file when the file is unreadable, malformed or of another format
    (`read_adapter`), was made for another base (fingerprint differs), records another name than `expected_name`
    (`check_adapter_name`; default: `name` without an "@tag" suffix, since "texture=solid@ortho" is a tagged copy
    of texture=solid), names layers the model lacks, or holds tensors of the wrong shape. The model is checked
    completely before anything is injected, so a refused file leaves it unchanged.
    """
    payload = _read_adapter_file(path, base_fingerprint)
    check_adapter_name(payload, name.partition("@")[0] if expected_name is None else expected_name, path)
    modules = dict(model.named_modules())
    tensors = payload["tensors"]
    for layer_name, spec in payload["layers"].items():
        module = modules.get(layer_name)
        base = module.base if isinstance(module, LoRALayer) else module
        if base is None or not adaptable(base):
            raise DataError(f"{path}: layer {layer_name!r} is missing in the model (or is not a Linear / Conv2d)")
        if isinstance(module, LoRALayer) and name in module.lora_A:
            raise DataError(f"{path}: the model already has an adapter named {name!r} at {layer_name!r}")
        d_out, d_in = fan(base)
        want = {"lora_A": (spec["r"], d_in), "lora_B": (d_out, spec["r"]), "lora_m": (d_in,)}
        for part, shape in want.items():
            tensor = tensors.get(f"{layer_name}.{part}")
            if (tensor is None and part != "lora_m") or (tensor is not None and tuple(tensor.shape) != shape):
                got = None if tensor is None else tuple(tensor.shape)
                raise DataError(f"{path}: {layer_name}.{part} has shape {got}, the model needs {shape}")
    with torch.no_grad():
        for layer_name, spec in payload["layers"].items():
            layer = _wrap(model, layer_name)
            layer.add_adapter(name, spec["r"], spec["alpha"], A_init=tensors[f"{layer_name}.lora_A"])
            layer.lora_B[name].copy_(tensors[f"{layer_name}.lora_B"])
            if f"{layer_name}.lora_m" in tensors:
                layer.add_merger(name)
                layer.lora_m[name].copy_(tensors[f"{layer_name}.lora_m"])
    return payload["config"], payload["extra"]


def save_merged(path: str | os.PathLike, model: nn.Module, config: dict | None = None) -> None:
    """The explicit merged export: {"format_version", "kind", "config", "model"}, where "model" is the full state
    dict under the un-injected names with every active adapter × weight folded into W (no lora tensors)."""
    merged = {k: v.cpu().clone() for k, v in _unwrapped_state_dict(model, fold_active=True).items()}
    _atomic_save({"format_version": ADAPTER_FORMAT_VERSION, "kind": "nodule_diffusion.merged_model",
                  "config": dict(config or {}), "model": merged}, path)


# ----------------------------------------------------------------------------- orthogonality

def frobenius_inner(A_i: torch.Tensor, B_i: torch.Tensor, A_j: torch.Tensor, B_j: torch.Tensor) -> torch.Tensor:
    """⟨B_i·A_i, B_j·A_j⟩_F without forming either product:
    tr((B_iᵀB_j)(A_jA_iᵀ)) = Σ (B_iᵀB_j) ⊙ (A_iA_jᵀ)   (tr(XY) = Σ X ⊙ Yᵀ).

    A_* (r_*, D_in), B_* (D_out, r_*); cost O(r_i·r_j·(D_in + D_out)).
    """
    return ((B_i.transpose(0, 1) @ B_j) * (A_i @ A_j.transpose(0, 1))).sum()  # (r_i, r_j) ⊙ (r_i, r_j) → ()


def orthogonality_loss(factors, eps: float = 1e-8) -> torch.Tensor:
    """L_orth: mean over layers of Σ_{i<j} the squared cosine of ΔW_i and ΔW_j.

    factors[k][l] = (A, B) for adapter k and layer l; each level may be a list or a dict (by adapter name, by
    layer name), with B·A = ΔW (pass the effective factors of `adapter_factors`). Every adapter must cover the same
    layers. Scale-invariant (a squared cosine), in [0, n(n−1)/2]; 0 when the ΔW are Frobenius-orthogonal.
    Differentiable float32 scalar.
    """
    adapters = list(factors.values()) if isinstance(factors, dict) else list(factors)
    adapters = [a if isinstance(a, dict) else dict(enumerate(a)) for a in adapters]  # layer index as key
    if len(adapters) < 2:
        raise ValueError("orthogonality_loss needs at least two adapters")
    layers = list(adapters[0])
    if any(set(a) != set(layers) for a in adapters[1:]):
        raise ValueError("orthogonality_loss: every adapter must cover the same layers")
    per_layer = []
    for layer in layers:
        pairs = [tuple(t.float() for t in a[layer]) for a in adapters]
        sq_norms = [frobenius_inner(A, B, A, B) for A, B in pairs]  # ‖BA‖²_F = tr((BᵀB)(AAᵀ))
        total = torch.zeros((), device=pairs[0][0].device)
        for i in range(len(pairs)):
            for j in range(i + 1, len(pairs)):
                inner = frobenius_inner(*pairs[i], *pairs[j])
                # [OURS Eq. 2] L_orth = (1/|L|)·Σ_l Σ_{i<j} ⟨ΔW_i,ΔW_j⟩²_F / (‖ΔW_i‖²_F·‖ΔW_j‖²_F + ε)
                total = total + inner ** 2 / (sq_norms[i] * sq_norms[j] + eps)
        per_layer.append(total)
    return torch.stack(per_layer).mean()


def orthogonal_bases(in_features: int, r: int, n_adapters: int, seed: int) -> list[torch.Tensor]:
    """n_adapters frozen down-projections A_k (r, D_in) with A_i·A_jᵀ = 0 for i ≠ j and A_k·A_kᵀ = I_r.

    [OrthoAdapt] one shared random orthogonal basis (QR of a seeded Gaussian), each concept takes a disjoint
    set of r rows; hence ⟨ΔW_i, ΔW_j⟩_F = tr((B_iᵀB_j)(A_jA_iᵀ)) = 0 whatever the trained B's are. Needs
    r·n_adapters ≤ D_in. float32.
    """
    if r * n_adapters > in_features:
        raise DataError(f"orthogonal_bases: {n_adapters} adapters × rank {r} exceed in_features {in_features}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gaussian)  # Q (D_in, D_in) orthogonal
    Q = Q * torch.sign(torch.diagonal(R))  # sign fix makes Q Haar-distributed (Mezzadri 2007)
    rows = Q.transpose(0, 1)  # (D_in, D_in), orthonormal rows
    return [rows[k * r:(k + 1) * r].float().contiguous() for k in range(n_adapters)]  # each (r, D_in)
