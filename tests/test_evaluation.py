

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
