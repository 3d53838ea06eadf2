"""Tests for nodule_diffusion/unet.py: shapes, zero-init, gradients, attention capture, tokens, config, and parity
with diffusers (Attention, timestep embedding, the whole UNet) where diffusers is installed."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import oracle
from nodule_diffusion.common import DataError
from nodule_diffusion.unet import (Attention, AttributeTokens, SpatialTransformer, UNet, UNetConfig,
                                   count_parameters, timestep_embedding)

VOCAB = {"texture": ["solid", "part_solid", "ground_glass"], "margin": ["smooth", "lobulated", "spiculated"],
         "calcification": ["none", "calcified"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they make them slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> UNetConfig:
    values = dict(base_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_heads=2, context_dim=16,
                  norm_groups=4, crop_size=16)
    values.update(overrides)
    return UNetConfig(**values)


def inputs(cfg: UNetConfig, batch=2, tokens=4, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size or (cfg.crop_size, cfg.crop_size)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, context


def perturbed(cfg: UNetConfig, seed=0) -> UNet:
    """A UNet whose zero-initialised layers are made non-zero, so every path carries signal."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("cfg, size", [
    (tiny(), None),
    (tiny(attention_levels=(0, 1)), None),                           # attention at full resolution
    (tiny(channel_mult=(1, 3, 2), attention_levels=(2,), crop_size=24), None),  # odd widths, odd level size
    (tiny(num_res_blocks=2, mid_attention=False, attention_levels=()), None),
    (tiny(channel_mult=(1,), attention_levels=(0,)), None),          # a single level: no resampling
    (tiny(out_channels=2, in_channels=5), (8, 12)),                  # non-square input, other channel counts
])
def test_output_shape(cfg, size):
    x, t, context = inputs(cfg, size=size)
    out = perturbed(cfg)(x, t, context)
    assert out.shape == (x.shape[0], cfg.out_channels, x.shape[2], x.shape[3])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_default_config_is_small():
    model = UNet(UNetConfig())
    assert count_parameters(model) < 2_000_000
    out = model(*inputs(UNetConfig(), batch=1))
    assert out.shape == (1, 1, 32, 32)


def test_zero_init_gives_exactly_zero_output():
    cfg = tiny()
    out = UNet(cfg)(*inputs(cfg))
    assert torch.equal(out, torch.zeros_like(out))


def test_gradient_reaches_every_parameter():
    cfg = tiny(attention_levels=(0, 1), dropout=0.1)
    model, tokens = perturbed(cfg), AttributeTokens(VOCAB, cfg.context_dim)
    x, t, _ = inputs(cfg)
    context = tokens(torch.tensor([[0, 1, -1], [2, -1, 1]]))
    loss = (model(x, t, context) - 1.0).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    # tokens: the ones picked by the indices get gradient, the others none
    used = {"generic", "values.texture=solid", "values.texture=ground_glass", "values.margin=lobulated",
            "nulls.margin", "nulls.calcification", "values.calcification=calcified"}
    for name, p in tokens.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == (name in used), name


def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 9)
    assert emb.shape == (3, 9) and torch.equal(emb[:, -1], torch.zeros(3))  # odd dim: zero pad
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    angles = t.float()[:, None] * freqs
    torch.testing.assert_close(emb[:, :8], torch.cat([angles.cos(), angles.sin()], 1))


def test_sdpa_path_equals_explicit_capture_path():
    cfg = tiny(attention_levels=(0, 1))
    model = perturbed(cfg)
    x, t, context = inputs(cfg)
    fused = model(x, t, context)
    model.set_attention_capture(True)
    explicit = model(x, t, context)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)


def expected_sizes(cfg: UNetConfig) -> list[tuple[int, int]]:
    """Spatial sizes of the cross-attention layers in forward order, derived from the config."""
    levels, size = len(cfg.channel_mult), cfg.crop_size
    down = [size >> lv for lv in range(levels) if lv in cfg.attention_levels for _ in range(cfg.num_res_blocks)]
    mid = [size >> (levels - 1)] if cfg.mid_attention else []
    up = [size >> lv for lv in reversed(range(levels)) if lv in cfg.attention_levels
          for _ in range(cfg.num_res_blocks + 1)]
    return [(s, s) for s in down + mid + up]


def test_attention_maps_shapes_normalised_and_differentiable():
    cfg = tiny(channel_mult=(1, 2, 2), attention_levels=(0, 2), num_res_blocks=2, crop_size=16)
    model, tokens = perturbed(cfg), AttributeTokens(VOCAB, cfg.context_dim)
    model.set_attention_capture(True)
    x, t, _ = inputs(cfg, batch=3)
    context = tokens(torch.tensor([[0, 1, -1], [2, -1, 1], [-1, -1, -1]]))
    model(x, t, context)
    maps = model.cross_attention_maps()
    assert [hw for _, hw in maps] == expected_sizes(cfg)
    for probs, (h, w) in maps:
        assert probs.shape == (3, cfg.num_heads, h * w, 1 + len(VOCAB))
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert (probs >= 0).all()
    # a loss on the maps alone reaches the cross-attention keys and the tokens
    sum(probs[..., tokens.token_position("margin")].mean() for probs, _ in maps).backward()
    assert all(b.attn2.to_k.weight.grad.abs().sum() > 0 for b in model.transformers)
    assert tokens.values["margin=lobulated"].grad.abs().sum() > 0


def test_capture_off_stores_nothing():
    cfg = tiny()
    model = perturbed(cfg)
    model(*inputs(cfg))
    assert all(m.probs is None for m in model.modules() if isinstance(m, Attention))
    with pytest.raises(RuntimeError):
        model.cross_attention_maps()
    model.set_attention_capture(True)
    model(*inputs(cfg))
    assert len(model.cross_attention_maps()) == len(expected_sizes(cfg))
    assert all(b.attn1.probs is None for b in model.transformers)  # self-attention is never captured
    model.clear_attention()
    with pytest.raises(RuntimeError):
        model.cross_attention_maps()
    model(*inputs(cfg))
    model.set_attention_capture(False)  # switching off drops what was stored
    model(*inputs(cfg))
    assert all(m.probs is None for m in model.modules() if isinstance(m, Attention))


def test_context_changes_output():
    cfg = tiny()
    model, tokens = perturbed(cfg), AttributeTokens(VOCAB, cfg.context_dim)
    x, t, _ = inputs(cfg)
    with torch.no_grad():
        base = model(x, t, tokens(torch.tensor([[0, 0, 0], [0, 0, 0]])))
        other = model(x, t, tokens(torch.tensor([[2, 0, 0], [0, 0, 0]])))  # only sample 0's texture changes
    assert (base[0] - other[0]).abs().max() > 1e-4
    torch.testing.assert_close(base[1], other[1])  # samples do not interact


def test_attribute_tokens_positions_and_nulls():
    tokens = AttributeTokens(VOCAB, dim=8)
    assert [tokens.token_position(a) for a in VOCAB] == [1, 2, 3]
    context = tokens(torch.tensor([[2, -1, 1], [-1, 0, -1]]))
    assert context.shape == (2, 4, 8)
    expected = [[tokens.generic, tokens.values["texture=ground_glass"], tokens.nulls["margin"],
                 tokens.values["calcification=calcified"]],
                [tokens.generic, tokens.nulls["texture"], tokens.values["margin=smooth"],
                 tokens.nulls["calcification"]]]
    for b in range(2):
        for pos in range(4):
            assert torch.equal(context[b, pos], expected[b][pos])
    assert len(tokens.values) == 8 and len(tokens.nulls) == 3
    assert len({p.data_ptr() for p in tokens.parameters()}) == 1 + 3 + 8  # all distinct parameters
    for bad in ([[3, 0, 0]], [[0, 0, 2]], [[-2, 0, 0]]):
        with pytest.raises(ValueError):
            tokens(torch.tensor(bad))
    with pytest.raises(DataError):
        AttributeTokens({"a.b": ["x"]}, dim=4)


def test_config_round_trip_and_validation():
    cfg = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(0, 2), dropout=0.1)
    again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.channel_mult, tuple) and isinstance(again.attention_levels, tuple)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DataError):
        UNetConfig.from_dict({"base_channel": 8})
    with pytest.raises(DataError):
        UNetConfig(attention_levels=(3,))  # only levels 0..2 exist
    with pytest.raises(DataError):
        UNetConfig(crop_size=30)  # not divisible by 2^2
    with pytest.raises(DataError):
        UNetConfig(base_channels=12)  # 12 is not divisible by 8 groups


def test_transformers_listed_in_forward_order():
    model = UNet(tiny(channel_mult=(1, 2, 2), attention_levels=(0, 1, 2)))
    assert all(isinstance(b, SpatialTransformer) for b in model.transformers)
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(b)] for b in model.transformers]
    assert order[0].startswith("down.0") and order[-1].startswith("up.2") and "mid_attn" in order


# ----------------------------------------------------------------------------------------------- diffusers oracle
@pytest.mark.parametrize("context_dim", [None, 12])
def test_attention_matches_diffusers(context_dim):
    oracle("diffusers", reason="diffusers is the reference for Attention")
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    torch.manual_seed(0)
    ours = Attention(16, context_dim, heads=4, dim_head=6)
    theirs = DiffusersAttention(16, cross_attention_dim=context_dim, heads=4, dim_head=6, out_bias=True)
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
        theirs.to_out[0].weight.copy_(ours.to_out.weight)
        theirs.to_out[0].bias.copy_(ours.to_out.bias)
    x = torch.randn(2, 10, 16)
    context = None if context_dim is None else torch.randn(2, 3, context_dim)
    expected = theirs(x, encoder_hidden_states=context)
    torch.testing.assert_close(ours(x, context), expected, atol=1e-6, rtol=1e-5)
    ours.capture = True
    torch.testing.assert_close(ours(x, context), expected, atol=1e-6, rtol=1e-5)


def test_timestep_embedding_matches_diffusers():
    oracle("diffusers", reason="diffusers is the reference for the timestep embedding")
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 10, 500, 999])
    expected = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 32), expected)


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_unet.py"
    spec = importlib.util.spec_from_file_location("bench_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cfg", [tiny(), tiny(channel_mult=(1, 2, 2), attention_levels=(0, 2), num_res_blocks=2)])
def test_unet_matches_diffusers(cfg):
    """Same weights in diffusers' UNet2DConditionModel with the matched architecture give the same output."""
    oracle("diffusers", reason="diffusers UNet2DConditionModel is the reference UNet")
    bench = _bench_module()
    ours = perturbed(cfg)
    theirs = bench.diffusers_twin(cfg)
    bench.copy_weights_to_diffusers(ours, theirs)  # raises if any parameter is unmatched
    x, t, context = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context), theirs(x, t, context).sample, atol=1e-5, rtol=1e-4)
