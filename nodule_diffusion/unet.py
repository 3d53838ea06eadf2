"""Mask-conditioned inpainting UNet with cross-attention to attribute tokens, and the attribute-token embedding.

Implements ε_θ(x_t, t, c; M, C) of design §4: the caller concatenates [x_t, M, C = x0·(1−M)] as input channels
(SD-inpainting style) and the conditioning tokens c enter through cross-attention.

    timestep_embedding    sinusoidal embedding of t                                 [DDPM §4], [Transformer §3.5]
    ResBlock              GroupNorm → SiLU → conv, + timestep projection, GroupNorm → SiLU → dropout → conv,
                          + skip                                                    [DDPM App. B], [IDDPM]
    Attention             multi-head softmax(Q·Kᵀ/√d)·V with to_q, to_k, to_v, to_out [Transformer Eq. 1]
    SpatialTransformer    GroupNorm → proj_in → (LN → self-attn) → (LN → cross-attn) → (LN → GEGLU FF)
                          → proj_out, residual                                      [LDM §3.3]
    UNet                  down path, middle block, up path with skip connections   [UNet], [DDPM], [LDM]
    AttributeTokens       learned generic / value / null tokens → context (B, 1 + K, D)        [OURS]

Papers: [DDPM] arXiv:2006.11239, [IDDPM] arXiv:2102.09672 (zero-initialised output layers come from its released
code's `zero_module`, not from an equation), [LDM] arXiv:2112.10752, [Transformer] arXiv:1706.03762,
[GEGLU] arXiv:2002.05202, [UNet] arXiv:1505.04597, [OURS] arXiv:2603.01659.

Deviations:
- DEVIATION: proj_in / proj_out of the transformer block are Linear layers on tokens, not LDM's 1×1 convs
  (mathematically identical; diffusers' `use_linear_projection`), so they are plain `nn.Linear` for LoRA.
- DEVIATION: no attention at full resolution by default and one transformer layer per block (depth 1): small
  32×32 crops on a 2-core CPU. Attention levels are configurable.

Shape letters: B batch, C channels, H×W spatial, N = H·W query tokens, L context tokens, D context dim,
h heads, d = C/h head dim, K attributes, V values of one attribute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from nodule_diffusion.common import DataError


@dataclass
class UNetConfig:
    """Architecture of the UNet; stored in checkpoints via to_dict() so that models rebuild from the file alone."""

    in_channels: int = 3            # x_t, mask M, masked context C (concatenated by the caller)
    out_channels: int = 1           # eps_pred (or v / x0, by the scheduler's prediction_type)
    crop_size: int = 32             # side in pixels of the square crops the model is trained and sampled at
    base_channels: int = 32         # channels at level 0
    channel_mult: tuple[int, ...] = (1, 2, 2)   # level i has base_channels·channel_mult[i] channels
    num_res_blocks: int = 1         # ResBlocks per level on the way down (the up path has one more)
    # Indices into channel_mult (level 0 = full resolution, level i = crop_size / 2^i). Not pixel sizes, not
    # downsample factors: one meaning (notes/style.md §3, complaint 5).
    attention_levels: tuple[int, ...] = (2,)  # 8×8 at crop 32: attention at 16×16 costs ~2× a CPU step
    mid_attention: bool = True      # transformer block in the middle (lowest-resolution) block, as in [LDM]
    num_heads: int = 4              # attention heads; head dim d = channels / num_heads
    context_dim: int = 64           # D, the width of the conditioning tokens
    norm_groups: int = 8            # GroupNorm groups
    dropout: float = 0.0            # dropout inside ResBlocks [IDDPM]

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        for name in ("in_channels", "out_channels", "crop_size", "base_channels", "num_res_blocks", "num_heads",
                     "context_dim", "norm_groups"):
            if getattr(self, name) < 1:
                raise DataError(f"UNetConfig: {name} = {getattr(self, name)} must be ≥ 1")
        if not 0.0 <= self.dropout < 1.0:
            raise DataError(f"UNetConfig: dropout = {self.dropout} must be in [0, 1)")
        levels = len(self.channel_mult)
        if levels == 0 or min(self.channel_mult) < 1:
            raise DataError(f"UNetConfig: channel_mult {self.channel_mult} must be one or more integers ≥ 1")
        if any(level not in range(levels) for level in self.attention_levels):
            raise DataError(f"UNetConfig: attention_levels {self.attention_levels} must index channel_mult "
                            f"{self.channel_mult} (0 .. {levels - 1})")
        if self.crop_size % 2 ** (levels - 1):
            raise DataError(f"UNetConfig: crop_size {self.crop_size} must be divisible by 2^{levels - 1}")
        for mult in self.channel_mult:
            width = self.base_channels * mult
            if width % self.norm_groups or width % self.num_heads:
                raise DataError(f"UNetConfig: width {width} must be divisible by norm_groups "
                                f"{self.norm_groups} and num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        """Plain dict of primitives for checkpoints; JSON turns its tuples into lists, from_dict turns them back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str | None = None) -> UNetConfig:
        """Inverse of to_dict; lists (from JSON) become tuples. A value that is not a dict, an unknown field, a value
        of the wrong type or an inconsistent architecture raises a DataError that starts with `source` (pass the
        checkpoint's path so that the message names the file)."""
        where = f"{source}: unet_config" if source else "UNetConfig"
        if not isinstance(values, dict):
            raise DataError(f"{where} must be a dict of UNetConfig fields, got {type(values).__name__}")
        known = {f.name: f.type for f in fields(cls)}  # annotations are strings (from __future__ import annotations)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise DataError(f"{where}: unknown field(s) {unknown}; known: {', '.join(known)}")
        checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "bool": lambda v: isinstance(v, bool),
                  "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(
                      isinstance(x, int) and not isinstance(x, bool) for x in v)}
        for name, value in values.items():
            if not checks[known[name]](value):
                raise DataError(f"{where}: field '{name}' must be {known[name]}, got {value!r}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except DataError as err:
            if source is None:
                raise
            raise DataError(f"{source}: {err}") from None


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with requires_grad when trainable_only)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias: its block starts as the identity (residual) or zero output [IDDPM]."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps [DDPM §4], [Transformer §3.5].

    t: (B,) int64 in [0, T). Returns (B, dim) float32: [cos(t·f_i), sin(t·f_i)] with
    f_i = exp(−ln(max_period)·i/(dim/2)), i = 0 .. dim/2 − 1 (cos first, as diffusers' flip_sin_to_cos);
    an odd dim gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, 2·(dim/2))
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class ResBlock(nn.Module):
    """[DDPM App. B] residual block with timestep injection. x (B, C_in, H, W), t_emb (B, E) → (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, t_emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.t_proj = nn.Linear(t_emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        # zero-initialised: the block starts as its skip path [IDDPM]
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.t_proj(F.silu(t_emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention [Transformer Eq. 1]: softmax(Q·Kᵀ/√d)·V, Q = x·W_q, K = c·W_k, V = c·W_v.

    Self-attention when context is None. The four projections are plain nn.Linear named to_q, to_k, to_v, to_out
    so that LoRA can target them by name suffix (e.g. "attn2.to_k"). With `capture` set, the probabilities are
    computed explicitly (differentiable) and kept in `self.probs` (B, h, N, L); otherwise the fused
    scaled_dot_product_attention kernel runs and nothing is stored.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 4, dim_head: int = 16):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        self.capture = False
        self.probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, query_dim), context (B, L, context_dim) or None → (B, N, query_dim)."""
        context = x if context is None else context
        (B, N, _), L = x.shape, context.shape[1]
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        if self.capture:
            # [Transformer Eq. 1] P = softmax(Q·Kᵀ/√d), each row a distribution over the L tokens
            probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)  # (B, h, N, L)
            self.probs = probs
            out = probs @ v  # (B, h, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d), same formula, fused
        out = out.transpose(1, 2).reshape(B, N, h * d)  # (B, N, h·d)
        return self.to_out(out)


class FeedForward(nn.Module):
    """GEGLU feed-forward [GEGLU §2], [LDM]: fc2(a ⊙ GELU(g)), [a, g] = fc1(x); inner width 4·dim."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.fc1(x).chunk(2, dim=-1)  # (B, N, 4·dim) each
        return self.fc2(a * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """[LDM §3.3] transformer block on a feature map: x (B, C, H, W), context (B, L, D) → (B, C, H, W)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # eps as in [LDM]
        self.proj_in = nn.Linear(channels, channels)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(channels), nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn1 = Attention(channels, None, heads, channels // heads)  # self-attention
        self.attn2 = Attention(channels, context_dim, heads, channels // heads)  # cross-attention to tokens
        self.ff = FeedForward(channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))  # block starts as the identity [IDDPM]
        self.hw: tuple[int, int] | None = None  # spatial size of the last forward, for attention maps

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        self.hw = (H, W)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = self.proj_in(tokens)
        tokens = tokens + self.attn1(self.norm1(tokens))
        tokens = tokens + self.attn2(self.norm2(tokens), context)
        tokens = tokens + self.ff(self.norm3(tokens))
        out = self.proj_out(tokens).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + out


class Level(nn.Module):
    """Container for one resolution level: ResBlocks, one transformer per ResBlock (or none), a resampler."""

    def __init__(self, res: list[ResBlock], attn: list[SpatialTransformer], resample: nn.Module | None):
        super().__init__()
        self.res, self.attn, self.resample = nn.ModuleList(res), nn.ModuleList(attn), resample


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv (no transposed-conv checkerboard). (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class UNet(nn.Module):
    """ε_θ(x_t, t, c): forward(x, t, context) → (B, out_channels, H, W).

    x: (B, in_channels, H, W) float, [x_t, M, C] with x_t, C in [-1, 1] and M in {0, 1}; H, W divisible by
    2^(len(channel_mult) − 1). t: (B,) int64 in [0, T). context: (B, L, context_dim) float tokens.
    At initialisation the output is exactly zero (zero-initialised output conv) [IDDPM].
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        base, groups, heads, levels = cfg.base_channels, cfg.norm_groups, cfg.num_heads, len(cfg.channel_mult)
        t_dim = 4 * base  # timestep MLP width, as [DDPM] / [LDM]
        self.t_mlp = nn.Sequential(nn.Linear(base, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        def res(c_in, c_out):
            return ResBlock(c_in, c_out, t_dim, groups, cfg.dropout)

        def attn(c, level):
            return SpatialTransformer(c, cfg.context_dim, heads, groups) if level in cfg.attention_levels else None

        # Down path; `skips` tracks the channels of every tensor pushed for the up path. Modules are registered
        # in forward order, so self.modules() visits the transformers in the order forward calls them.
        ch, skips, down = base, [base], []
        for level, mult in enumerate(cfg.channel_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(ch, base * mult))
                ch = base * mult
                attns.append(attn(ch, level))
                skips.append(ch)
            last = level == levels - 1
            downsample = None if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)  # (B, C, H/2, W/2)
            down.append(Level(blocks, [a for a in attns if a is not None], downsample))
            if not last:
                skips.append(ch)
        self.down = nn.ModuleList(down)

        self.mid_res1 = res(ch, ch)
        self.mid_attn = SpatialTransformer(ch, cfg.context_dim, heads, groups) if cfg.mid_attention else None
        self.mid_res2 = res(ch, ch)

        # Up path: one more ResBlock per level than on the way down, each eating one skip tensor [DDPM], [LDM].
        up = []
        for level in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(ch + skips.pop(), base * cfg.channel_mult[level]))
                ch = base * cfg.channel_mult[level]
                attns.append(attn(ch, level))
            up.append(Level(blocks, [a for a in attns if a is not None], Upsample(ch) if level > 0 else None))
        self.up = nn.ModuleList(up)

        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))  # zero output at init [IDDPM]
        self.transformers = [m for m in self.modules() if isinstance(m, SpatialTransformer)]  # forward order

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        assert x.ndim == 4 and x.shape[1] == cfg.in_channels, f"x must be (B, {cfg.in_channels}, H, W)"
        assert t.shape == (x.shape[0],), "t must be (B,)"
        assert context.ndim == 3 and context.shape[2] == cfg.context_dim, f"context must be (B, L, {cfg.context_dim})"
        factor = 2 ** (len(cfg.channel_mult) - 1)
        assert x.shape[2] % factor == 0 and x.shape[3] % factor == 0, f"H, W must be divisible by {factor}"

        t_emb = self.t_mlp(timestep_embedding(t, cfg.base_channels))  # (B, 4·base)
        h = self.conv_in(x)  # (B, base, H, W)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(h, t_emb)
                h = level.attn[i](h, context) if level.attn else h
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C, H/2, W/2)
                skips.append(h)

        h = self.mid_res1(h, t_emb)
        h = self.mid_attn(h, context) if self.mid_attn is not None else h
        h = self.mid_res2(h, t_emb)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = block(torch.cat([h, skips.pop()], dim=1), t_emb)  # (B, C + C_skip, H, W) → (B, C', H, W)
                h = level.attn[i](h, context) if level.attn else h
            if level.resample is not None:
                h = level.resample(h)  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)

    # ------------------------------------------------------------------ cross-attention capture
    def set_attention_capture(self, enabled: bool) -> None:
        """Switch explicit, stored, differentiable cross-attention probabilities on or off (off: fused SDPA)."""
        for block in self.transformers:
            block.attn2.capture = enabled
        self.clear_attention()

    def clear_attention(self) -> None:
        """Drop stored maps (they hold the autograd graph of the last forward)."""
        for block in self.transformers:
            block.attn2.probs = None

    def cross_attention_maps(self) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Per cross-attention layer, in forward order: (probs (B, h, H_l·W_l, L), (H_l, W_l)) of the last forward.

        probs sum to 1 over the L tokens and carry gradients. Raises RuntimeError if capture is off or no forward
        has run since it was switched on or cleared.
        """
        maps = [(block.attn2.probs, block.hw) for block in self.transformers]
        if not maps or any(probs is None for probs, _ in maps):
            raise RuntimeError("no cross-attention maps stored: call set_attention_capture(True), then forward")
        return maps


class AttributeTokens(nn.Module):
    """Learned conditioning tokens [OURS]: attribute indices (B, K) → context (B, 1 + K, dim).

    Position 0 is the generic "nodule" token; position 1 + k holds the token of the k-th attribute's value
    (vocab order) or that attribute's null token when the index is −1 (unknown / dropped for CFG).
    Parameters: `generic` (dim,), `nulls[attribute]` (dim,), `values["attribute=value"]` (dim,), all N(0, 0.02²).
    Separate from the UNet so tokens, LoRAs and UNet can be saved and swapped independently.
    """

    def __init__(self, vocab: dict[str, list[str]], dim: int, init_std: float = 0.02):
        super().__init__()
        for name, values in vocab.items():
            if "." in name or any("." in v for v in values) or not values:
                raise DataError(f"attribute vocabulary: '{name}' needs ≥ 1 value and no '.' in names")
        self.vocab = {name: list(values) for name, values in vocab.items()}
        self.dim = dim

        def token():
            return nn.Parameter(torch.randn(dim) * init_std)

        self.generic = token()
        self.nulls = nn.ParameterDict({name: token() for name in vocab})
        self.values = nn.ParameterDict({f"{name}={v}": token() for name, values in vocab.items() for v in values})
        self.register_buffer("num_values", torch.tensor([len(v) for v in vocab.values()]), persistent=False)

    def token_position(self, attribute: str) -> int:
        """Context position (1 + k) of the k-th vocabulary attribute's token."""
        return 1 + list(self.vocab).index(attribute)

    def table(self) -> torch.Tensor:
        """(K, V_max + 1, dim): row 0 = null token, row 1 + j = token of value j, zero padding beyond V_k."""
        v_max = int(self.num_values.max())
        rows = []
        for name, values in self.vocab.items():
            tokens = [self.nulls[name]] + [self.values[f"{name}={v}"] for v in values]
            pad = [torch.zeros_like(self.generic)] * (v_max - len(values))
            rows.append(torch.stack(tokens + pad))  # (V_max + 1, dim)
        return torch.stack(rows)  # (K, V_max + 1, dim)

    def forward(self, attr_idx: torch.Tensor) -> torch.Tensor:
        """attr_idx (B, K) int64, column k in [−1, V_k) (−1 = null) → context (B, 1 + K, dim) float32."""
        B, K = attr_idx.shape
        assert K == len(self.vocab), f"attr_idx must have {len(self.vocab)} columns (one per attribute)"
        if ((attr_idx < -1) | (attr_idx >= self.num_values)).any():
            raise ValueError(f"attribute index out of range: {attr_idx.tolist()} vs sizes {self.num_values.tolist()}")
        table = self.table()  # (K, V_max + 1, dim)
        k = torch.arange(K, device=attr_idx.device).expand(B, K)  # (B, K)
        tokens = table[k, attr_idx + 1]  # (B, K, dim): advanced indexing picks table[k, idx + 1] per (b, k)
        generic = self.generic.expand(B, 1, self.dim)  # (B, 1, dim)
        return torch.cat([generic, tokens], dim=1)  # (B, 1 + K, dim)
