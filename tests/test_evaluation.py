

def test_report_markdown_columns_follow_the_header_whatever_the_key_order():
    """A report read back from sorted-key JSON lists its metrics in another order; the table must not shift."""
    import json

    from nodule_diffusion import evaluation

    metrics = list(evaluation.METRICS)
    entry = lambda base: {"mean": {k: base + i for i, k in enumerate(metrics)},  # noqa: E731
                          "std": {k: 0.0 for k in metrics}, "ci": {k: {"low": 0.0, "high": 1.0} for k in metrics},
                          "n_train_images": 10}
    arm = {**entry(0.0), "diff_vs_real_only": {k: {"estimate": 0.01 * (i + 1), "low": 0.0, "high": 0.1}
                                               for i, k in enumerate(metrics)}}
    report = {"n_test_images": 5, "config": {"seeds": 1, "det_steps": 2}, "arms": {"real_only": entry(0.0), "b": arm}}
    shuffled = json.loads(json.dumps(report, sort_keys=True))
    table = evaluation.report_markdown(shuffled, "t")
    diff_row = [line for line in table.splitlines() if line.startswith("| b |")][-1]
    cells = [c.strip().split(" ")[0] for c in diff_row.strip("|").split("|")[1:]]
    assert cells == [f"+{0.01 * (i + 1):.3f}" for i in range(len(metrics))]


def _png(path, array):
    import numpy as np
    from PIL import Image
    Image.fromarray((np.clip(array, 0, 1) * 65535).astype(np.uint16)).save(path)
    return path


def test_mask_dice_finds_the_inserted_body_at_any_pixel_spacing(tmp_path):
    """_dice_of segments the density an insertion added; the window and blur follow the image's own spacing."""
    import numpy as np

    from nodule_diffusion import evaluation, phantom
    from nodule_diffusion.data import ImageRecord, Nodule

    for spacing, diameter in ((1.4, 9.0), (0.7, 18.0)):  # the same 12.6 mm nodule at two spacings
        rng = np.random.default_rng(1)
        source = 0.4 + 0.01 * rng.standard_normal((96, 96)).astype(np.float32)
        synthetic = source.copy()
        mask = phantom.draw_nodule(synthetic, (48.3, 47.6), diameter, {"texture": "ground_glass"}, rng)
        ys, xs = np.nonzero(mask)
        nodule = Nodule(box=(xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0),
                        mask=_png(tmp_path / f"m{spacing}.png", mask.astype(float)),
                        extra={"source": str(_png(tmp_path / f"s{spacing}.png", source))})
        record = ImageRecord(image=_png(tmp_path / f"x{spacing}.png", synthetic), nodules=[nodule], spacing_mm=spacing)
        assert evaluation._dice_of(nodule, record, 1.4) > 0.8
        # a nodule inserted elsewhere (here: none at all) shows up as no overlap, not as a perfect score
        empty = ImageRecord(image=nodule.extra["source"], nodules=[nodule], spacing_mm=spacing)
        assert evaluation._dice_of(nodule, empty, 1.4) < 0.3


def test_segmentation_ceiling_is_high_for_every_phantom_value():
    """The measured Dice can only be read against what the segmentation reaches on known bodies."""
    from nodule_diffusion import evaluation, phantom

    ceiling = evaluation.segmentation_ceiling(phantom.PhantomConfig().vocab, n=4)
    assert set(ceiling) == {f"{a}={v}" for a, values in phantom.PhantomConfig().vocab.items() for v in values}
    assert min(ceiling.values()) > 0.75


def test_lacking_nodules_takes_the_first_n_without_the_value():
    import torch

    from nodule_diffusion import evaluation

    attrs = torch.tensor([[0, 1], [1, 1], [0, 0], [2, 1], [1, 0]])  # (N, A) value indices
    assert evaluation.lacking_nodules(attrs, 0, 0, 2) == [1, 3]
    assert evaluation.lacking_nodules(attrs, 1, 1, 5) == [2, 4]
    assert evaluation.lacking_nodules(attrs, 0, 3, 0) == []
