"""Tests for nodule_diffusion.compose: merging identities, TIES/DARE, sampling-time rules, objective, diagnostics."""

import math

import pytest
import torch
import torch.nn as nn

from conftest import oracle
from nodule_diffusion import compose, lora

LAYERS = ("blocks.0.attn2.to_k", "blocks.0.attn2.to_v")


def random_adapters(n, r=3, d_in=9, d_out=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{l: (torch.randn(r, d_in, generator=generator), torch.randn(d_out, r, generator=generator))
             for l in LAYERS} for _ in range(n)]


def delta(factors, layer):
    A, B = factors[layer]
    return B @ A


def weighted_sum(adapters, weights, layer):
    return sum(w * delta(a, layer) for a, w in zip(adapters, weights))


def test_linear_and_cat_are_the_exact_weighted_sum():
    adapters, weights = random_adapters(3), [0.5, -1.2, 2.0]
    merged = compose.linear(adapters, weights)
    for layer in LAYERS:
        torch.testing.assert_close(delta(merged, layer), weighted_sum(adapters, weights, layer))
        assert merged[layer][0].shape == (9, 9)  # rank Σ r_i = 3·3
    assert compose.cat is compose.linear


def test_svd_at_full_rank_is_exact_and_truncation_is_optimal():
    adapters, weights = random_adapters(2), [0.7, 1.3]
    merged = compose.svd(adapters, weights, rank=6)  # rank of the sum ≤ 6
    for layer in LAYERS:
        torch.testing.assert_close(delta(merged, layer), weighted_sum(adapters, weights, layer), atol=1e-4, rtol=1e-4)
    truncated = compose.svd(adapters, weights, rank=2)
    target = weighted_sum(adapters, weights, LAYERS[0])
    singular = torch.linalg.svdvals(target)
    error = torch.linalg.matrix_norm(delta(truncated, LAYERS[0]) - target)
    torch.testing.assert_close(error, singular[2:].square().sum().sqrt(), atol=1e-4, rtol=1e-4)  # Eckart–Young
    clamped = compose.svd(adapters, weights, rank=2, clamp=0.5)
    assert clamped[LAYERS[0]][0].shape == (2, 9)


@pytest.mark.parametrize("strategy", ["linear", "svd", "ties", "dare", "magnitude_prune"])
def test_one_adapter_at_weight_one_is_reproduced(strategy):
    adapters = random_adapters(1)
    merged = {"linear": lambda: compose.linear(adapters, [1.0]),
              "svd": lambda: compose.svd(adapters, [1.0]),
              "ties": lambda: compose.ties(adapters, [1.0], density=1.0),
              "dare": lambda: compose.dare(adapters, [1.0], density=1.0, seed=0),
              "magnitude_prune": lambda: compose.magnitude_prune(adapters, [1.0], density=1.0)}[strategy]()
    for layer in LAYERS:
        torch.testing.assert_close(delta(merged, layer), delta(adapters[0], layer), atol=1e-4, rtol=1e-4)


def test_peft_linear_has_cross_terms():
    adapters, weights = random_adapters(2), [1.0, 1.0]
    merged = compose.peft_linear(adapters, weights)
    for layer in LAYERS:
        (A1, B1), (A2, B2) = adapters[0][layer], adapters[1][layer]
        exact = weighted_sum(adapters, weights, layer)
        torch.testing.assert_close(delta(merged, layer), exact + B1 @ A2 + B2 @ A1, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(delta(merged, layer), exact, atol=1e-2)
    single = compose.peft_linear(adapters[:1], [1.0])  # one adapter: no cross terms
    torch.testing.assert_close(delta(single, LAYERS[0]), delta(adapters[0], LAYERS[0]))


def as_adapter(delta_matrix):
    """Factor a full matrix exactly as (A = I, B = ΔW), so that B·A = ΔW."""
    return {"l": (torch.eye(delta_matrix.shape[1]), delta_matrix)}


def test_ties_hand_computed():
    tau1 = torch.tensor([[3.0, -1.0, 0.5, 0.0]])
    tau2 = torch.tensor([[-1.0, -2.0, 4.0, 0.1]])
    # density 0.5 keeps 2 of 4 entries: τ1 → [3, -1, 0, 0], τ2 → [0, -2, 4, 0]
    # total sign: [3, -3, 4, 0] → γ = [+, −, +, +]; agreeing entries: col0 τ1, col1 both, col2 τ2, col3 none
    # weighted mean with w = (1, 2): col0 3/1, col1 (−1 − 4)/2, col2 8/1, col3 0
    merged = compose.ties([as_adapter(tau1), as_adapter(tau2)], [1.0, 2.0], density=0.5)
    torch.testing.assert_close(delta(merged, "l"), torch.tensor([[3.0, -2.5, 8.0, 0.0]]), atol=1e-5, rtol=0)
    # frequency election: signs [+1, −2, +1, 0] → same γ here; a case where they differ:
    a, b, c = torch.tensor([[5.0]]), torch.tensor([[-1.0]]), torch.tensor([[-1.0]])
    total = compose.ties([as_adapter(a), as_adapter(b), as_adapter(c)], [1, 1, 1], density=1.0)
    freq = compose.ties([as_adapter(a), as_adapter(b), as_adapter(c)], [1, 1, 1], density=1.0, majority="frequency")
    torch.testing.assert_close(delta(total, "l"), torch.tensor([[5.0]]))  # Σ = 3 > 0: only the 5 agrees
    torch.testing.assert_close(delta(freq, "l"), torch.tensor([[-1.0]]))  # two of three negative: mean(−1, −1)


def test_ties_matches_peft_merge_utils():
    oracle("peft", reason="peft's merge_utils is the TIES/DARE oracle")
    from peft.utils import merge_utils
    adapters, weights = random_adapters(3, seed=3), [0.5, 1.0, -0.7]
    for majority in ("total", "frequency"):
        merged = compose.ties(adapters, weights, density=0.3, majority=majority)
        for layer in LAYERS:
            expected = merge_utils.ties([delta(a, layer) for a in adapters], torch.tensor(weights), 0.3, majority)
            torch.testing.assert_close(delta(merged, layer), expected, atol=1e-4, rtol=1e-4)
    merged = compose.magnitude_prune(adapters, weights, density=0.3)
    expected = merge_utils.magnitude_prune([delta(a, LAYERS[0]) for a in adapters], torch.tensor(weights), 0.3)
    torch.testing.assert_close(delta(merged, LAYERS[0]), expected, atol=1e-4, rtol=1e-4)


def test_dare_seeded_and_unbiased():
    adapters, weights = random_adapters(2, seed=1), [1.0, 0.5]
    first = compose.dare(adapters, weights, density=0.5, seed=11)
    again = compose.dare(adapters, weights, density=0.5, seed=11)
    other = compose.dare(adapters, weights, density=0.5, seed=12)
    assert torch.equal(delta(first, LAYERS[0]), delta(again, LAYERS[0]))
    assert not torch.allclose(delta(first, LAYERS[0]), delta(other, LAYERS[0]))
    exact = weighted_sum(adapters, weights, LAYERS[0])
    draws = torch.stack([delta(compose.dare(adapters, weights, density=0.5, seed=s), LAYERS[0]) for s in range(400)])
    # E[m⊙τ/p] = τ; the mean of 400 draws has standard error ≈ |τ|·√((1−p)/p)/√400 = |τ|/20 per entry
    stderr = torch.stack([w * delta(a, LAYERS[0]) for a, w in zip(adapters, weights)]).norm(dim=0) / 20
    assert ((draws.mean(0) - exact).abs() <= 5 * stderr + 1e-4).all()
    ties_variant = compose.dare(adapters, weights, density=0.5, seed=11, ties=True)
    assert ties_variant[LAYERS[0]][0].shape == (7, 9)  # full-rank re-factorisation


def test_switch_schedule_and_composite():
    names = ["tex", "mar"]
    assert [compose.switch_schedule(k, names, tau=5) for k in (0, 4, 5, 9, 10, 15)] == \
        ["tex", "tex", "mar", "mar", "tex", "mar"]
    eps = [torch.full((1, 1, 2, 2), v) for v in (1.0, 2.0, 6.0)]
    torch.testing.assert_close(compose.composite_eps(eps), torch.full((1, 1, 2, 2), 3.0))


def test_klora_toy():
    # ΔW_a = diag(4, 1), ΔW_b = diag(2, 2): top-1 sums S_a = 4, S_b = 2; γ = ‖ΔW_a‖₁/‖ΔW_b‖₁ = 5/4
    fa = {"l": (torch.eye(2), torch.diag(torch.tensor([4.0, 1.0])))}
    fb = {"l": (torch.eye(2), torch.diag(torch.tensor([2.0, 2.0])))}
    S_a, S_b, gamma = compose.klora_scores(fa, fb, k=1)["l"]
    assert (S_a, S_b) == (4.0, 2.0) and gamma == pytest.approx(1.25)
    # S_a/γ = 3.2 against S_b·s(t) = 2·(1.5·t/T + 0.5): a wins while s < 1.6, i.e. t/T < 0.733
    assert compose.klora_choose(S_a, S_b, gamma, call_index=0, total_calls=100) == 0
    assert compose.klora_choose(S_a, S_b, gamma, call_index=72, total_calls=100) == 0
    assert compose.klora_choose(S_a, S_b, gamma, call_index=74, total_calls=100) == 1


def test_ziplora_penalty():
    layer = lora.LoRALayer(nn.Linear(4, 3))
    layer.add_adapter("tex", 2, 2), layer.add_adapter("mar", 2, 2)
    layer.add_merger("tex"), layer.add_merger("mar")
    with torch.no_grad():
        layer.lora_m["tex"].copy_(torch.tensor([1.0, 0.0, 2.0, -1.0]))
        layer.lora_m["mar"].copy_(torch.tensor([0.0, 3.0, 1.0, 1.0]))
    model = nn.Sequential(layer)
    penalty = compose.ziplora_penalty(model, ["tex", "mar"])
    torch.testing.assert_close(penalty, torch.tensor((0 + 0 + 2 + 1) / 4))
    penalty.backward()
    assert layer.lora_m["tex"].grad is not None


def test_attention_overlap():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 16, generator=generator).softmax(-1)
    region = torch.ones(2, 16, dtype=torch.bool)
    torch.testing.assert_close(compose.attention_overlap(maps, maps, region), torch.tensor(1.0))
    left, right = torch.zeros(2, 16), torch.zeros(2, 16)
    left[:, :8], right[:, 8:] = 1 / 8, 1 / 8
    assert compose.attention_overlap(left, right, region).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.rand(2, 16, generator=generator).softmax(-1)
    value = compose.attention_overlap(maps, other, region).item()
    assert 0.0 < value < 1.0
    # only R counts: identical inside R, different outside ⇒ 1
    inside = torch.zeros(2, 16, dtype=torch.bool)
    inside[:, :6] = True
    changed = maps.clone()
    changed[:, 6:] = torch.rand(2, 10, generator=generator)
    torch.testing.assert_close(compose.attention_overlap(maps, changed, inside), torch.tensor(1.0))


def test_token_maps_region_and_mean_map():
    probs = torch.rand(2, 4, 16, 3).softmax(-1)  # (B, h, H·W, L)
    maps = compose.token_maps([probs, probs[:, :, :4]], position=1)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 4), (2, 2, 2)]
    torch.testing.assert_close(maps[0], probs[..., 1].mean(1).reshape(2, 4, 4))
    mean = compose.mean_token_map(maps, size=4)
    assert mean.shape == (2, 16)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask[:, :, 14:18, 14:18] = True
    region = compose.attention_region(mask, size=8, dilation=3)  # 11..20 after dilation → cells 2..5 of 8
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(region[0].reshape(8, 8), expected)


def test_composition_loss_and_preserve():
    student, teacher = torch.ones(2, 1, 4, 4, requires_grad=True), torch.zeros(2, 1, 4, 4)
    preserve = compose.preserve_loss([(student, teacher), (student, teacher + 2)])
    torch.testing.assert_close(preserve, torch.tensor(1.0 + 1.0))
    total, parts = compose.composition_loss(preserve, torch.tensor(0.5), torch.tensor(0.25), 0.1, 2.0)
    torch.testing.assert_close(total, torch.tensor(2.0 + 0.05 + 0.5))
    assert parts == pytest.approx({"preserve": 2.0, "orth": 0.5, "attn": 0.25, "denoise": 0.0, "total": 2.55})
    # the denoising term and the weight of L_preserve [OURS Eq. 1]: 0.5·2 + 0.05 + 0.5 + 3·0.2
    total, parts = compose.composition_loss(preserve, torch.tensor(0.5), torch.tensor(0.25), 0.1, 2.0,
                                            torch.tensor(0.2), 3.0, 0.5)
    torch.testing.assert_close(total, torch.tensor(1.0 + 0.05 + 0.5 + 0.6))
    assert parts["denoise"] == pytest.approx(0.2)
    total.backward()
    assert student.grad is not None


def test_delta_cosines_and_principal_angles():
    A = torch.eye(6)[:2]  # rows e0, e1
    B = torch.eye(5)[:, :2]
    same = {"l": (A, B)}
    scaled = {"l": (3.0 * A, B)}
    orth_in = {"l": (torch.eye(6)[2:4], B)}  # row spaces orthogonal
    orth_out = {"l": (A, torch.eye(5)[:, 2:4])}  # column spaces orthogonal
    assert compose.delta_cosines(same, scaled)["l"] == pytest.approx(1.0)
    assert compose.delta_cosines(same, orth_in)["l"] == pytest.approx(0.0)
    torch.testing.assert_close(compose.principal_angles(same, scaled)["l"], torch.zeros(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(compose.principal_angles(same, orth_out)["l"], torch.full((2,), 90.0))
    torch.testing.assert_close(compose.principal_angles(same, orth_in, space="row")["l"], torch.full((2,), 90.0))
    torch.testing.assert_close(compose.principal_angles(same, orth_in, space="column")["l"], torch.zeros(2),
                               atol=1e-3, rtol=0)  # same output directions
    # 45° between span(e0) and span(e0 + e1)
    tilted = {"l": (A[:1], (torch.eye(5)[:, 0] + torch.eye(5)[:, 1])[:, None] / math.sqrt(2))}
    first = {"l": (A[:1], torch.eye(5)[:, :1])}
    torch.testing.assert_close(compose.principal_angles(first, tilted)["l"], torch.tensor([45.0]))
    zero = {"l": (A, torch.zeros(5, 2))}  # B = 0 at init: no directions, no angles
    assert compose.principal_angles(same, zero)["l"].numel() == 0


def test_add_factors_loads_a_composed_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    lora.inject_lora(model, ["0"], "tex", r=2, alpha=4)
    lora.inject_lora(model, ["0"], "mar", r=3, alpha=3)
    with torch.no_grad():
        for B in model[0].lora_B.values():
            B.normal_()
    x = torch.randn(4, 6)
    lora.set_active(model, ["tex", "mar"], [0.5, 1.5])
    expected = model(x)
    composed = compose.linear([lora.adapter_factors(model, "tex"), lora.adapter_factors(model, "mar")], [0.5, 1.5])
    lora.add_factors(model, "both", composed)
    lora.set_active(model, ["both"])
    assert model[0].scaling["both"] == 1.0
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
