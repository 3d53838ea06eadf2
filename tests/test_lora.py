"""Tests for nodule_diffusion.lora: LoRA layer algebra, injection, adapter files, orthogonality loss, peft parity."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn

from conftest import oracle
from nodule_diffusion import compose, lora
from nodule_diffusion.data import DataError


class Attention(nn.Module):
    def __init__(self, dim=8, context_dim=6):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)


class TinyNet(nn.Module):
    """Stand-in for the UNet: module names blocks.{0,1}.attn{1,2}.to_{q,k,v,out}, plus a non-target Linear."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn1": Attention(), "attn2": Attention()}) for _ in range(2)])
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x (B, 8)
        ctx = x[:, :6]
        for block in self.blocks:
            for attn in block.values():
                x = x + attn.to_out(torch.tanh(attn.to_q(x) + attn.to_k(ctx) * attn.to_v(ctx)))
        return self.proj(x)


def randomise_B(model, name, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            if name in layer.lora_B:
                B = layer.lora_B[name]
                B.copy_(torch.randn(B.shape, generator=generator))


def make_layer(seed=0, r=3, alpha=6.0):
    torch.manual_seed(seed)
    layer = lora.LoRALayer(nn.Linear(10, 7))
    layer.add_adapter("a", r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    return layer


def test_zero_init_adapter_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = lora.LoRALayer(copy.deepcopy(base))
    layer.add_adapter("a", r=4, alpha=4)
    x = torch.randn(5, 3, 10)
    assert torch.equal(layer(x), base(x))  # B = 0 ⇒ ΔW = 0 exactly
    assert layer.scaling["a"] == 1.0 and layer.active == {"a": 1.0}


def test_forward_equals_explicit_delta_with_merger():
    layer = make_layer()
    layer.add_merger("a")
    with torch.no_grad():
        layer.lora_m["a"].uniform_(0.0, 2.0)
    x = torch.randn(4, 10)
    A, B, m = layer.lora_A["a"], layer.lora_B["a"], layer.lora_m["a"]
    expected_delta = 2.0 * B @ A @ torch.diag(m)  # s = α/r = 6/3
    torch.testing.assert_close(layer.delta_weight("a"), expected_delta)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected_delta.T, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_idempotence():
    layer = make_layer()
    layer.add_adapter("b", r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B["b"].normal_()
    layer.set_active(["a", "b"], [0.7, -1.3])
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(6, 10)
    unmerged = layer(x)
    expected = x @ (W0 + 0.7 * layer.delta_weight("a") - 1.3 * layer.delta_weight("b")).T + layer.base.bias
    torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=1e-5)  # two adapters with weights
    layer.merge()
    merged_weight = layer.base.weight.detach().clone()
    layer.merge()  # second merge changes nothing
    assert torch.equal(layer.base.weight, merged_weight)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)  # forward while merged: no double count
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0)  # bit-exact (the contract asks atol 1e-6)
    layer.train(False)  # eval()/train() never merge
    assert not layer.merged
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_active(["a"])  # changing the active set while merged would desynchronise W


def test_unmerge_restores_W0_even_after_adapter_change():
    layer = make_layer()
    W0 = layer.base.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        layer.lora_B["a"].mul_(3.0)  # the adapter changes while merged
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0)


def test_only_adapter_parameters_train():
    torch.manual_seed(0)
    model = TinyNet()
    for p in model.parameters():
        p.requires_grad_(False)
    lora.inject_lora(model, ["to_q", "to_v"], "a", r=2, alpha=2)
    before = {k: v.clone() for k, v in lora.base_state_dict(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):  # step 1 moves B away from 0, step 2 then also moves A
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
    after = lora.base_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # base bit-identical
    layer = model.blocks[0]["attn1"].to_q
    assert layer.lora_B["a"].abs().sum() > 0 and layer.base.weight.grad is None


def test_inject_suffix_rule_and_second_adapter():
    model = TinyNet()
    names = lora.inject_lora(model, ["attn2.to_k", "to_out"], "a", r=2, alpha=2)
    assert names == sorted([f"blocks.{i}.attn2.to_k" for i in range(2)]
                           + [f"blocks.{i}.attn{j}.to_out" for i in range(2) for j in (1, 2)])
    assert not isinstance(model.blocks[0]["attn1"].to_k, lora.LoRALayer)  # "attn2.to_k" is not a suffix of it
    again = lora.inject_lora(model, ["to_k"], "b", r=3, alpha=3)
    assert len(again) == 4
    wrapped = model.blocks[1]["attn2"].to_k
    assert set(wrapped.lora_A) == {"a", "b"} and wrapped.lora_A["b"].shape == (3, 6)
    assert isinstance(wrapped.base, nn.Linear)  # wrapped once, never a wrapper around a wrapper
    with pytest.raises(DataError, match="no nn.Linear"):
        lora.inject_lora(model, ["to_nothing"], "c", r=2, alpha=2)


def test_model_helpers_set_active_factors_remove():
    torch.manual_seed(0)
    model = TinyNet()
    lora.inject_lora(model, ["to_q"], "a", r=2, alpha=4)
    lora.inject_lora(model, ["to_q", "to_k"], "b", r=2, alpha=2)
    randomise_B(model, "a", 1), randomise_B(model, "b", 2)
    lora.set_active(model, ["a", "b"], [0.5, 2.0])
    assert model.blocks[0]["attn1"].to_q.active == {"a": 0.5, "b": 2.0}
    assert model.blocks[0]["attn1"].to_k.active == {"b": 2.0}  # a layer activates the names it holds
    for layer_name, (A, B) in lora.adapter_factors(model, "a").items():
        torch.testing.assert_close(B @ A, model.get_submodule(layer_name).delta_weight("a"))
    state = lora.adapter_state(model, "b")
    assert len(state) == 2 * 8 and all(k.endswith(("lora_A", "lora_B")) for k in state)
    lora.remove_adapter(model, "a")
    assert "a" not in model.blocks[0]["attn1"].to_q.lora_A
    with pytest.raises(DataError):
        lora.set_active(model, ["a"])


def _model_with_adapter(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    fingerprint = lora.fingerprint_state_dict(model.state_dict())
    lora.inject_lora(model, ["to_q", "to_v"], "tex", r=2, alpha=4)
    randomise_B(model, "tex", seed)
    model.blocks[0]["attn2"].to_q.add_merger("tex")
    with torch.no_grad():
        model.blocks[0]["attn2"].to_q.lora_m["tex"].uniform_(0.5, 1.5)
    return model, fingerprint


def test_adapter_file_round_trip(tmp_path):
    model, fingerprint = _model_with_adapter()
    assert lora.fingerprint_state_dict(lora.base_state_dict(model)) == fingerprint
    path = tmp_path / "tex.pt"
    token = torch.randn(1, 6)
    lora.save_adapter(path, model, "tex", fingerprint, {"attribute": "texture", "value": "solid", "r": 2},
                      extra={"token": token})
    raw = torch.load(path, weights_only=True)
    assert set(raw["tensors"]) == set(lora.adapter_state(model, "tex"))  # only this adapter's tensors
    assert not (tmp_path / "tex.pt.tmp").exists()
    fresh = TinyNet()
    fresh.load_state_dict(lora.base_state_dict(model))
    config, extra = lora.load_adapter(path, fresh, "tex", fingerprint)
    assert config["value"] == "solid" and torch.equal(extra["token"], token)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x))
    assert torch.equal(fresh.blocks[0]["attn2"].to_q.lora_m["tex"], model.blocks[0]["attn2"].to_q.lora_m["tex"])


def test_adapter_file_refusals(tmp_path):
    model, fingerprint = _model_with_adapter()
    path = tmp_path / "tex.pt"
    lora.save_adapter(path, model, "tex", fingerprint, {"r": 2})
    fresh = TinyNet()
    with pytest.raises(DataError, match="another base"):
        lora.load_adapter(path, fresh, "tex", "0" * 64)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated.pt"):
        lora.load_adapter(truncated, fresh, "tex", fingerprint)
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    with pytest.raises(DataError, match="notes.pt"):
        lora.load_adapter(not_torch, fresh, "tex", fingerprint)

    class Wider(TinyNet):  # same names, one layer with another shape
        def __init__(self):
            super().__init__()
            self.blocks[1]["attn1"].to_v = nn.Linear(5, 8, bias=False)
    with pytest.raises(DataError, match="shape"):
        lora.load_adapter(path, Wider(), "tex", fingerprint)

    class Fewer(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict({"attn1": Attention(), "attn2": Attention()})])
    fewer = Fewer()
    with pytest.raises(DataError, match="missing"):
        lora.load_adapter(path, fewer, "tex", fingerprint)
    assert not lora.lora_layers(fewer)  # a refused file leaves the model untouched


def test_save_merged_equals_merged_model(tmp_path):
    model, _ = _model_with_adapter()
    x = torch.randn(3, 8)
    expected = model(x)
    lora.save_merged(tmp_path / "merged.pt", model)
    state = torch.load(tmp_path / "merged.pt", weights_only=True)["model"]
    assert not any("lora_" in k for k in state)
    plain = TinyNet()
    plain.load_state_dict(state)  # strict: names are the un-injected ones
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)
    lora.merge(model)  # the merged export does not depend on the merge state
    lora.save_merged(tmp_path / "merged2.pt", model)
    state2 = torch.load(tmp_path / "merged2.pt", weights_only=True)["model"]
    assert all(torch.allclose(state[k], state2[k], atol=1e-6) for k in state)


def _random_factors(n_adapters, layers=("l0", "l1"), r=3, d_in=9, d_out=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{l: (torch.randn(r, d_in, generator=generator), torch.randn(d_out, r, generator=generator))
             for l in layers} for _ in range(n_adapters)]


def test_orthogonality_loss_equals_explicit_frobenius_formula():
    factors = _random_factors(3)
    expected = []
    for layer in ("l0", "l1"):
        deltas = [B @ A for A, B in (f[layer] for f in factors)]
        expected.append(sum((di * dj).sum() ** 2 / (di.square().sum() * dj.square().sum() + 1e-8)
                            for di, dj in itertools.combinations(deltas, 2)))
    torch.testing.assert_close(lora.orthogonality_loss(factors), torch.stack(expected).mean())
    # invariant to scaling A or B of any adapter (a squared cosine)
    scaled = [{l: (A * 3.0, B) for l, (A, B) in factors[0].items()},
              {l: (A, B * -0.2) for l, (A, B) in factors[1].items()}, factors[2]]
    torch.testing.assert_close(lora.orthogonality_loss(scaled), lora.orthogonality_loss(factors))
    named = {"a": factors[0], "b": factors[1], "c": factors[2]}
    torch.testing.assert_close(lora.orthogonality_loss(named), lora.orthogonality_loss(factors))
    as_lists = [[f[layer] for layer in ("l0", "l1")] for f in factors]  # layers by position
    torch.testing.assert_close(lora.orthogonality_loss(as_lists), lora.orthogonality_loss(factors))


def test_orthogonality_loss_zero_for_disjoint_orthogonal_bases():
    bases = lora.orthogonal_bases(in_features=12, r=3, n_adapters=4, seed=7)
    stacked = torch.cat(bases)  # (12, 12)
    torch.testing.assert_close(stacked @ stacked.T, torch.eye(12), atol=1e-5, rtol=0)
    generator = torch.Generator().manual_seed(1)
    factors = [{"l": (A, torch.randn(5, 3, generator=generator))} for A in bases]
    assert lora.orthogonality_loss(factors).item() < 1e-10
    B = torch.randn(5, 3, generator=generator)
    parallel = [{"l": (bases[0], B)}, {"l": (bases[0], -2.0 * B)}]  # ΔW_2 = −2·ΔW_1: squared cosine 1
    torch.testing.assert_close(lora.orthogonality_loss(parallel), torch.tensor(1.0))
    assert torch.equal(lora.orthogonal_bases(12, 3, 4, seed=7)[2], bases[2])  # seeded


def test_orthogonality_loss_gradient_flows_to_adapters():
    model = TinyNet()
    lora.inject_lora(model, ["to_q"], "a", r=2, alpha=2)
    lora.inject_lora(model, ["to_q"], "b", r=2, alpha=2)
    randomise_B(model, "a", 1), randomise_B(model, "b", 2)
    loss = lora.orthogonality_loss([lora.adapter_factors(model, "a"), lora.adapter_factors(model, "b")])
    loss.backward()
    assert model.blocks[0]["attn1"].to_q.lora_B["a"].grad.abs().sum() > 0


def test_fixed_orthogonal_basis_adapter_freezes_A():
    layer = lora.LoRALayer(nn.Linear(12, 4))
    A = lora.orthogonal_bases(12, 3, 2, seed=0)[1]
    layer.add_adapter("a", r=3, alpha=3, A_init=A, train_A=False)
    assert torch.equal(layer.lora_A["a"], A) and not layer.lora_A["a"].requires_grad


def test_peft_parity():
    peft = oracle("peft", reason="peft is the LoRA oracle")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("to_k", nn.Linear(10, 7))
    ours = copy.deepcopy(model)
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["to_k"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config, adapter_name="tex")
    peft_model.add_adapter("mar", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["to_k"], lora_dropout=0.0))
    peft_layer = peft_model.base_model.model.to_k
    lora.inject_lora(ours, ["to_k"], "tex", r=3, alpha=6)
    lora.inject_lora(ours, ["to_k"], "mar", r=3, alpha=3)
    layer = ours.to_k
    with torch.no_grad():
        for name in ("tex", "mar"):
            peft_layer.lora_B[name].weight.normal_()
            layer.lora_A[name].copy_(peft_layer.lora_A[name].weight)
            layer.lora_B[name].copy_(peft_layer.lora_B[name].weight)
    x = torch.randn(4, 10)
    for name in ("tex", "mar"):
        torch.testing.assert_close(layer.delta_weight(name), peft_layer.get_delta_weight(name))
    layer.set_active(["tex"])
    peft_model.set_adapter("tex")
    torch.testing.assert_close(ours(x), peft_model(x))
    layer.merge(), peft_layer.merge(adapter_names=["tex"])
    torch.testing.assert_close(layer.base.weight, peft_layer.base_layer.weight)
    layer.unmerge(), peft_layer.unmerge()
    # peft's "cat" combination is our exact weighted sum (`compose.linear`)
    peft_model.add_weighted_adapter(["tex", "mar"], [0.6, -1.1], "ab", combination_type="cat")
    ab = compose.linear([{"to_k": layer.factors("tex")}, {"to_k": layer.factors("mar")}], [0.6, -1.1])
    A, B = ab["to_k"]
    torch.testing.assert_close(B @ A, peft_layer.get_delta_weight("ab"), atol=1e-5, rtol=1e-5)
    # peft's "linear" (cross terms) is `compose.peft_linear` when s = 1 ("mar": α = r)
    peft_model.add_adapter("cal", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["to_k"], lora_dropout=0.0))
    lora.inject_lora(ours, ["to_k"], "cal", r=3, alpha=3)
    with torch.no_grad():
        peft_layer.lora_B["cal"].weight.normal_()
        layer.lora_A["cal"].copy_(peft_layer.lora_A["cal"].weight)
        layer.lora_B["cal"].copy_(peft_layer.lora_B["cal"].weight)
    peft_model.add_weighted_adapter(["mar", "cal"], [0.6, -1.1], "lin", combination_type="linear")
    lin = compose.peft_linear([{"to_k": layer.factors("mar")}, {"to_k": layer.factors("cal")}], [0.6, -1.1])
    A, B = lin["to_k"]
    torch.testing.assert_close(B @ A, peft_layer.get_delta_weight("lin"), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- convolution adapters (LoCon)

class ConvNet(nn.Module):
    """A strided 3×3 conv, a 1×1 conv, and an Identity named like a target (which injection must pass over)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.skip = nn.Identity()

    def forward(self, x):  # (N, 3, H, W) → (N, 4, H/2, W/2)
        return self.conv2(torch.tanh(self.skip(self.conv1(x))))


def test_conv_adapter_equals_conv_with_delta_weight_with_merger():
    torch.manual_seed(0)
    layer = lora.LoRALayer(nn.Conv2d(3, 5, 3, stride=2, padding=1))
    layer.add_adapter("a", r=2, alpha=4.0)
    layer.add_merger("a")
    assert (layer.in_features, layer.out_features) == (27, 5)  # D_in = C_in·kh·kw
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_m["a"].uniform_(0.0, 2.0)
    A, B, m = layer.lora_A["a"], layer.lora_B["a"], layer.lora_m["a"]
    delta = 2.0 * B @ A @ torch.diag(m)  # (5, 27), s = α/r = 2
    torch.testing.assert_close(layer.delta_weight("a"), delta)
    x = torch.randn(2, 3, 9, 9)
    expected = nn.functional.conv2d(x, layer.base.weight + delta.view(5, 3, 3, 3), layer.base.bias, 2, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    unmerged, W0 = layer(x), layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, W0)


def test_conv_injection_skips_non_conv_and_refuses_grouped():
    model = ConvNet()
    assert lora.inject_lora(model, ["conv1", "conv2", "skip"], "a", r=2, alpha=2) == ["conv1", "conv2"]
    with pytest.raises(DataError, match="Conv2d"):
        lora.LoRALayer(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(DataError, match="Conv2d"):
        lora.LoRALayer(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


def test_conv_adapter_file_round_trip_and_orthogonal_bases(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    lora.inject_lora(model, ["conv1", "conv2"], "a", r=2, alpha=2)
    randomise_B(model, "a")
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    fp = lora.fingerprint_state_dict(lora.base_state_dict(model))
    lora.save_adapter(tmp_path / "a.pt", model, "a", fp, {})
    fresh = ConvNet()
    fresh.load_state_dict(lora.base_state_dict(model))
    lora.load_adapter(tmp_path / "a.pt", fresh, "a", fp)
    torch.testing.assert_close(fresh(x), expected)
    # disjoint orthogonal input bases give ⟨ΔW_i, ΔW_j⟩_F = 0 on a kernel as on a matrix [OrthoAdapt]
    bases = lora.orthogonal_bases(27, 3, 2, seed=0)
    layer = lora.LoRALayer(nn.Conv2d(3, 5, 3, padding=1))
    for name, A in zip("bc", bases):
        layer.add_adapter(name, r=3, alpha=3, A_init=A, train_A=False)
        with torch.no_grad():
            layer.lora_B[name].normal_()
    factors = [{"conv": layer.factors(n)} for n in "bc"]
    assert float(lora.orthogonality_loss(factors).detach()) < 1e-10


def test_peft_parity_conv():
    peft = oracle("peft", reason="peft is the LoRA oracle")
    torch.manual_seed(0)
    model = ConvNet()
    ours = copy.deepcopy(model)
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv1", "conv2"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config, adapter_name="tex")
    lora.inject_lora(ours, ["conv1", "conv2"], "tex", r=3, alpha=6)
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            theirs, mine = getattr(peft_model.base_model.model, name), getattr(ours, name)
            theirs.lora_B["tex"].weight.normal_()
            mine.lora_A["tex"].copy_(theirs.lora_A["tex"].weight.flatten(1))  # (r, C_in, kh, kw) → (r, D_in)
            mine.lora_B["tex"].copy_(theirs.lora_B["tex"].weight.flatten(1))  # (C_out, r, 1, 1) → (C_out, r)
            torch.testing.assert_close(mine.active_delta(), theirs.get_delta_weight("tex"))
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(ours(x), peft_model(x), atol=1e-5, rtol=1e-5)
    lora.merge(ours)
    peft_model.merge_adapter()
    torch.testing.assert_close(ours.conv1.base.weight, peft_model.base_model.model.conv1.base_layer.weight)
