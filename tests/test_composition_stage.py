"""Composition training, the fixed-orthogonal-bases LoRA, the CFG baseline and the diagnostics, on tiny models.

The core claim tested: `ortho` composition training lowers both failure measures, L_orth (squared cosine of the
adapters' ΔW) and L_attn (overlap of the attribute tokens' attention inside the mask), on a small case.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_loop

from nodule_diffusion import compose, datasets, diffusion, evaluation, lora, synthesis, training
from nodule_diffusion.synthesis import Request

NAMES = ["texture=solid", "margin=well_defined"]
CPU = torch.device("cpu")


def _with_random_adapters(tiny_base, seed=0, scale=0.05):
    """The tiny base with two LoRAs whose B is random (a trained LoRA is non-zero; B = 0 makes every cosine 0)."""
    model, payload = diffusion.load_model(tiny_base, CPU)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name in NAMES:
        lora.inject_lora(model.unet, diffusion.LORA_TARGETS, name, 4, 4)
        for layer in lora.lora_layers(model.unet).values():
            layer.lora_B[name].data = torch.randn(layer.lora_B[name].shape, generator=gen) * scale
    # Make the two adapters overlap on purpose: a shared direction in every layer raises the cosine.
    for layer in lora.lora_layers(model.unet).values():
        layer.lora_A[NAMES[1]].data[:2] = layer.lora_A[NAMES[0]].data[:2]
        layer.lora_B[NAMES[1]].data[:, :2] = layer.lora_B[NAMES[0]].data[:, :2]
    return model, payload


def _measures(model, crops):
    """(L_orth, L_attn) of the current mergers on a fixed batch."""
    factors = [lora.adapter_factors(model.unet, n) for n in NAMES]
    orth = float(lora.orthogonality_loss(factors).detach())
    batch = crops.get(torch.arange(8))
    attrs = diffusion.attr_tensor({"texture": "solid", "margin": "well_defined"}, model.vocab, 8, CPU)
    t = torch.full((8,), 500, dtype=torch.long)
    model.unet.set_attention_capture(True)
    with torch.no_grad():
        model(batch["x0"], t, batch["mask"], batch["context"], attrs)
    per_token = compose.token_attention(model, [n.split("=")[0] for n in NAMES])
    attn = float(compose.mean_pair_overlap(per_token, batch["mask"]))
    model.unet.set_attention_capture(False)
    return orth, attn


def test_ortho_composition_lowers_orthogonality_and_attention_overlap(tiny_base, disk_crops):
    model, _ = _with_random_adapters(tiny_base)
    before = _measures(model, disk_crops)  # no mergers yet: m = 1, the plain sum of the adapters
    gen = torch.Generator().manual_seed(0)
    training.train_compose(model, disk_crops, NAMES, "ortho", tiny_loop(30, lr=2e-2, ema_decay=0.0), CPU, gen,
                         lambda_orth=10.0, lambda_attn=10.0, lambda_zip=0.0)
    after = _measures(model, disk_crops)
    assert before[0] > 1e-3, "the constructed adapters must start non-orthogonal"
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] < before[1], (before, after)


def _no_single_batch(k):
    raise AssertionError("at λ_p = 0 with λ_d > 0 no per-adapter batch is drawn")


def test_denoising_term_is_the_composed_models_loss_on_nodules_carrying_both(tiny_base, disk_crops):
    """λ_d·L_denoise [OURS Eq. 1]: with λ_p = λ_o = λ_a = 0 the objective is exactly diffusion.denoising_loss of
    the composed model, told both values, on the batch draw_joint gives (the generator in the same state)."""
    model, _ = _with_random_adapters(tiny_base)
    for layer in lora.lora_layers(model.unet).values():
        for name in NAMES:
            layer.add_merger(name)
    joint = disk_crops.get(torch.arange(4))
    total, parts = compose.composition_objective(model, NAMES, _no_single_batch, torch.Generator().manual_seed(3),
                                                 "ortho", 0.0, 0.0, 0.0, lambda_denoise=2.0, lambda_preserve=0.0,
                                                 draw_joint=lambda: joint)
    generator = torch.Generator().manual_seed(3)  # at λ_p = 0 steps 1–5 do not run: no draw comes first
    scheduler = model.diffusion.scheduler()
    lora.set_active(model.unet, NAMES)
    attrs = diffusion.attr_tensor({"texture": "solid", "margin": "well_defined"}, model.vocab, 4, CPU)
    expected = diffusion.denoising_loss(model, scheduler, joint, model.diffusion.mask_weight, generator, attrs)
    torch.testing.assert_close(total, 2.0 * expected)
    assert parts["denoise"] == pytest.approx(float(expected.detach()))
    assert parts["preserve"] == 0.0  # λ_p = 0: the teacher is not run, and nothing is logged as preserved


def test_at_zero_preserve_weight_the_joint_forward_gives_the_attention_term(tiny_base, disk_crops):
    """train.py's default (λ_p = 0, λ_d > 0): one forward a step, on nodules carrying both values; L_attn is the
    token-pair overlap of that forward's cross-attention maps [OURS Eq. 3], L_denoise its loss, no teacher runs."""
    model, _ = _with_random_adapters(tiny_base)
    for layer in lora.lora_layers(model.unet).values():
        for name in NAMES:
            layer.add_merger(name)
    joint = disk_crops.get(torch.arange(4))
    total, parts = compose.composition_objective(model, NAMES, _no_single_batch, torch.Generator().manual_seed(5),
                                                 "ortho", 0.0, 0.5, 0.0, lambda_denoise=1.0, lambda_preserve=0.0,
                                                 draw_joint=lambda: joint)
    generator, scheduler = torch.Generator().manual_seed(5), model.diffusion.scheduler()
    lora.set_active(model.unet, NAMES)
    model.unet.set_attention_capture(True)
    attrs = diffusion.attr_tensor({"texture": "solid", "margin": "well_defined"}, model.vocab, 4, CPU)
    denoise = diffusion.denoising_loss(model, scheduler, joint, model.diffusion.mask_weight, generator, attrs)
    attn = compose.mean_pair_overlap(compose.token_attention(model, ["texture", "margin"]), joint["mask"])
    model.unet.set_attention_capture(False)
    assert float(attn.detach()) > 0 and parts["preserve"] == 0.0
    torch.testing.assert_close(total, denoise + 0.5 * attn)
    assert parts["attn"] == pytest.approx(float(attn.detach()))
    assert parts["denoise"] == pytest.approx(float(denoise.detach()))


def test_ziplora_student_gets_the_teachers_own_condition(tiny_base, disk_crops):
    """ZipLoRA Eq. 2: the merged model reproduces adapter k with adapter k's own prompt, here c_k; the objective
    with λ_z = 0 equals that mask-weighted MSE summed over k, and differs from the one told every value."""
    model, _ = _with_random_adapters(tiny_base)
    for layer in lora.lora_layers(model.unet).values():
        for name in NAMES:
            layer.add_merger(name)
    batch = disk_crops.get(torch.arange(4))
    total, _ = compose.composition_objective(model, NAMES, lambda k: batch, torch.Generator().manual_seed(1),
                                             "ziplora", lambda_zip=0.0)
    generator, scheduler = torch.Generator().manual_seed(1), model.diffusion.scheduler()
    weight = 1.0 + (model.diffusion.mask_weight - 1.0) * batch["region"]
    expected = {"own": 0.0, "all": 0.0}
    for name in NAMES:
        t = torch.randint(0, scheduler.num_train_timesteps, (4,), generator=generator)
        xt = scheduler.add_noise(batch["x0"], torch.randn(batch["x0"].shape, generator=generator), t)
        own = diffusion.attr_tensor(dict([name.split("=")]), model.vocab, 4, CPU)
        every = diffusion.attr_tensor(dict(n.split("=") for n in NAMES), model.vocab, 4, CPU)
        with torch.no_grad():
            lora.set_active(model.unet, [name])
            teacher = model(xt, t, batch["mask"], batch["context"], own)
            lora.set_active(model.unet, NAMES)
            for key, attrs in (("own", own), ("all", every)):
                student = model(xt, t, batch["mask"], batch["context"], attrs)
                expected[key] += float((weight * (student - teacher) ** 2).sum() / weight.sum())
    assert float(total.detach()) == pytest.approx(expected["own"], rel=1e-5)
    assert abs(expected["all"] - expected["own"]) > 1e-4 * expected["own"]  # the condition matters here


def test_denoising_term_needs_nodules_carrying_every_value(tiny_base, disk_records):
    """λ_d > 0 where no training nodule carries both values: a DataError naming them, before any step."""
    from dataclasses import replace

    from nodule_diffusion.data import DEFAULT_VOCAB, NoduleCrops
    apart = [replace(r, nodules=[replace(n, attributes={**n.attributes, "margin": "ill_defined" if
                                                        n.attributes["texture"] == "solid" else "well_defined"})
                                 for n in r.nodules]) for r in disk_records]
    crops = NoduleCrops(apart, DEFAULT_VOCAB, 16, 1.4)
    model, _ = _with_random_adapters(tiny_base)
    with pytest.raises(datasets.DataError, match="lambda_denoise.*texture=solid, margin=well_defined"):
        training.train_compose(model, crops, NAMES, "ortho", tiny_loop(2), CPU, torch.Generator().manual_seed(0),
                               1.0, 0.1, 0.0, lambda_denoise=1.0)
    training.train_compose(model, crops, NAMES, "ortho", tiny_loop(1), CPU, torch.Generator().manual_seed(0),
                           1.0, 0.1, 0.0)  # λ_d = 0 (the default) trains as before


def test_composed_adapter_equals_sum_of_merged_adapters(tiny_base, disk_crops, tmp_path):
    model, payload = _with_random_adapters(tiny_base)
    training.train_compose(model, disk_crops, NAMES, "ziplora", tiny_loop(3, lr=1e-2, ema_decay=0.0), CPU,
                         torch.Generator().manual_seed(0), 1.0, 0.1, 0.01)
    path = tmp_path / "compose" / "ziplora.pt"
    training.save_composed(path, model, NAMES, payload["fingerprint"], {"strategy": "ziplora"})
    factors = training.composed_factors(model, NAMES)
    expected = {k: sum(compose._delta(*lora.adapter_factors(model.unet, n)[k]) for n in NAMES) for k in factors}
    for k, (a, b) in factors.items():
        assert torch.allclose(b @ a, expected[k], atol=1e-5)
    assert (path.with_suffix(".parts") / f"{NAMES[0]}.pt").is_file()  # the "after" adapters for diagnose


def test_orthogonal_bases_lora_is_exactly_orthogonal(tiny_base, disk_crops):
    factors = []
    for name in NAMES:
        model, _ = diffusion.load_model(tiny_base, CPU)  # each adapter on a fresh copy of the base
        attribute, value = name.split("=")
        training.train_lora(model, disk_crops, attribute, value, 2, 2, tiny_loop(3, lr=1e-2, ema_decay=0.0), CPU,
                          torch.Generator().manual_seed(1), init="orthogonal_bases")
        factors.append({k: (a.detach().clone(), b.detach().clone())
                        for k, (a, b) in lora.adapter_factors(model.unet, name).items()})
    assert any(float(b.abs().sum()) > 0 for _, b in factors[0].values()), "B must have trained"
    cos = compose.delta_cosines(factors[0], factors[1])
    assert max(abs(c) for c in cos.values()) < 1e-5
    assert float(lora.orthogonality_loss(factors)) < 1e-8


def test_cfg_stage_and_guided_sampling(tiny_base, disk_crops, tmp_path):
    model, _ = diffusion.load_model(tiny_base, CPU, raw=True)
    state = training.train_base(model, disk_crops, tiny_loop(3), CPU, torch.Generator().manual_seed(0),
                                cfg_dropout=0.1)
    diffusion.save_model(tmp_path / "cfg.pt", model, state, "cfg", {})
    attributes = {"texture": "solid", "margin": "well_defined"}
    mask = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    context = torch.zeros(2, 1, 16, 16)
    requests = [Request(0, 0, 5, attributes=attributes, seed=1, index=i) for i in range(2)]
    outs = []
    for compositional in (False, True):
        gen, _ = synthesis.build_generator(str(tmp_path / "cfg.pt"), "cfg", attributes, tmp_path, CPU, steps=4,
                                         guidance=3.0, compositional=compositional)
        outs.append(gen(mask, context, requests))
    assert all(torch.isfinite(o).all() and o.shape == (2, 1, 16, 16) for o in outs)
    with pytest.raises(Exception, match="needs a base checkpoint"):
        synthesis.build_generator(str(tmp_path / "cfg.pt"), "linear", attributes, tmp_path, CPU)


def test_diagnose_writes_json_and_png(tiny_base, disk_crops, tmp_path, monkeypatch):
    root = tmp_path / "run"
    root.mkdir()
    shutil.copy(tiny_base, root / "base.pt")  # lora/ and compose/ are written next to the checkpoint
    model, payload = _with_random_adapters(root / "base.pt")
    for n in NAMES:
        diffusion.save_lora(root / "lora" / f"{n}.pt", model, n, payload["fingerprint"], {})
    training.train_compose(model, disk_crops, NAMES, "ortho", tiny_loop(2, lr=1e-2, ema_decay=0.0), CPU,
                         torch.Generator().manual_seed(0), 1.0, 0.1, 0.0)
    training.save_composed(diffusion.composed_path(root, "ortho", NAMES), model, NAMES, payload["fingerprint"], {})
    # diagnose draws its crops from a phantom; use the disk crops instead (fast, same code path after loading).
    monkeypatch.setattr(evaluation, "NoduleCrops", lambda *a, **k: disk_crops)
    monkeypatch.setattr(datasets, "load_records", lambda *a, **k: [])
    result = evaluation.diagnose(str(root / "base.pt"), ",".join(NAMES), tmp_path, CPU, 0)
    saved = json.loads((tmp_path / "diagnose.json").read_text())
    assert set(saved) == {"before", "after"} and (tmp_path / "diagnose.png").is_file()
    assert 0.0 <= result["before"]["attention_overlap"] <= 1.0
    assert result["before"]["mean_abs_cosine"] > 0.0


def test_joint_subset_is_the_intersection_of_the_values_subsets():
    """The nodules L_denoise trains on: those carrying every composed value; none is an empty set, not an error."""
    from types import SimpleNamespace
    vocab = {"texture": ["solid", "ground_glass"], "margin": ["well_defined", "spiculated"]}
    crops = SimpleNamespace(attrs=torch.tensor([[0, 0], [0, 1], [1, 1], [0, 1], [1, -1]]))  # (N, K) value indices
    joint = diffusion.joint_subset(crops, vocab, ["texture=solid", "margin=spiculated"])
    assert joint.tolist() == [1, 3]
    assert diffusion.joint_subset(crops, vocab, ["texture=ground_glass", "margin=well_defined"]).numel() == 0
    with pytest.raises(diffusion.DataError):  # a value no crop carries at all: subset_of's error
        diffusion.joint_subset(SimpleNamespace(attrs=crops.attrs[:2]), vocab, ["texture=ground_glass"])
