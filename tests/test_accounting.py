import numpy as np
import pytest

from gmm_quant.core import accounting, han
from gmm_quant.core.codebook import Codebook


def test_huffman_lengths_of_a_textbook_example():
    # counts 5, 9, 12, 13, 16, 45 -> lengths 4, 4, 3, 3, 3, 1 (CLRS figure 16.5)
    lengths = han.huffman_lengths(dict(zip("abcdef", [45, 13, 12, 16, 9, 5], strict=True)))
    assert lengths == {"a": 1, "b": 3, "c": 3, "d": 3, "e": 4, "f": 4}
    assert han.huffman_lengths({"x": 7}) == {"x": 1}


def test_sparse_entries_insert_fillers_for_long_gaps():
    # 2-bit differences: largest difference 4. Non-zeros at positions 1, 2, 12.
    idx = np.zeros(14, np.uint8)
    idx[[1, 2, 12]] = [3, 1, 3]
    codes, diffs = han.sparse_entries(idx, diff_bits=2)
    # gap to 1 is 2; to 2 is 1; to 12 is 10 = 4 + 4 + 2 -> two fillers
    assert sorted(zip(codes.tolist(), diffs.tolist(), strict=True)) == sorted(
        [(3, 2), (1, 1), (3, 2), (0, 4), (0, 4)]
    )


def test_layer_cost_of_a_small_dense_matrix_by_hand():
    # 4x10 dense layer in Caffe's [out, in] layout (stored by Flax as its [in, out] transpose),
    # 3 centres (0, -0.5, 0.25); 5 non-zeros at flat positions 0, 3, 4, 39 and 20.
    idx = np.zeros((4, 10), np.uint8)
    flat = idx.reshape(-1)
    flat[[0, 3, 4, 20, 39]] = [1, 2, 2, 2, 1]
    cb = Codebook(np.array([0.0, -0.5, 0.25], np.float32), idx.T)
    cost = accounting.layer_cost("fc", cb)
    # gaps: 1, 3, 1, 16, 19 -> all <= 32 (5 bits): no fillers
    assert cost.fillers == 0 and cost.nonzero == 5 and cost.centres == 3
    # index symbols {1: 2, 2: 3} -> 1 bit each = 5 bits
    assert cost.index_bits == 5
    # diff symbols {1: 2, 3: 1, 16: 1, 19: 1} -> lengths 1 (1), 2 (one of the rest), 3, 3
    # Huffman: merge 3+16 (2), then 19 + (2) = 3, then 1 (count 2) + 3 -> lengths: 1:1, 19:2, 3:3, 16:3
    assert cost.diff_bits == 2 * 1 + 1 * 2 + 1 * 3 + 1 * 3
    assert cost.codebook_bits == 64
    assert cost.packed_bits == 40 * 2 + 64
    assert cost.han_bits == 5 + 10 + 64


def test_conv_layers_use_8_bit_differences():
    idx = np.zeros((20, 1, 5, 5), np.uint8)  # Caffe layout [out, in, h, w]
    idx.reshape(-1)[[0, 200]] = 1  # a gap of 200: fits in 8 bits, would need 6 fillers at 5 bits
    idx = idx.transpose(2, 3, 1, 0)  # Flax layout [h, w, in, out]
    cost = accounting.layer_cost("conv", Codebook(np.array([0.0, 0.1], np.float32), idx))
    assert cost.fillers == 0


def test_summary_counts_float_leaves_at_32_bits():
    idx = np.zeros((100,), np.uint8)
    idx[::10] = 1
    summary = accounting.summarize(
        {"w": Codebook(np.array([0.0, 1.0], np.float32), idx)}, {"b": np.zeros(10, np.float32)}
    )
    layer = summary["layers"][0]
    assert summary["original_bits"] == 32 * 110
    assert summary["han_bits"] == layer.han_bits + 320
    assert summary["compression_ratio"] == pytest.approx(3520 / (layer.han_bits + 320))
    assert summary["nonzero_fraction"] == pytest.approx(0.1)


def test_gzip_ratio_rewards_repeated_values():
    rng = np.random.default_rng(0)
    dense = {"w": rng.normal(size=10000).astype(np.float32)}
    sparse = {"w": np.where(rng.random(10000) < 0.05, 0.25, 0.0).astype(np.float32)}
    assert accounting.gzip_ratio(dense) < 1.2 < 10 < accounting.gzip_ratio(sparse)


def test_a_layer_pruned_to_zero_costs_nothing_and_reports_without_a_ratio():
    """Every weight zero: no entry, no codebook (Han: 0 bits); the report says so instead of dividing by 0."""
    from gmm_quant.run import report

    zero = Codebook(np.zeros(1, np.float32), np.zeros((6, 4), np.uint8))
    cost = accounting.layer_cost("z", zero)
    assert (cost.han_bits, cost.nonzero, cost.fillers) == (0, 0, 0)
    summary = accounting.summarize({"z": zero}, {"z": np.zeros((6, 4)), "b": np.zeros(4)})
    assert summary["compression_ratio"] == 32 * 28 / (32 * 4)
    metrics = report.metrics_dict({}, summary)
    assert metrics["layers"][0]["compression_ratio"] is None
    assert "all zero" in report.format_table(metrics)


def test_the_report_says_the_retrained_weights_are_unsnapped_when_training_saw_them_snapped():
    """With --snap-epochs the network trained on the snapped weights: the continuous weights' error
    (high, and not what ships) is labelled as such; without it the label stays "retrained"."""
    from gmm_quant.run import report

    cb = Codebook(np.array([0.0, 0.5], np.float32), np.ones((6, 4), np.uint8))
    summary = accounting.summarize({"w": cb}, {"w": np.full((6, 4), 0.5)})
    errors = {"retrained": 0.2845, "compressed": 0.012}
    plain = report.format_table(report.metrics_dict(errors, summary))
    snapped = report.format_table(report.metrics_dict(errors, summary, {"snap_epochs": 8}))
    assert "test error: retrained 28.45%  compressed 1.20%" in plain
    assert "test error: retrained (unsnapped) 28.45%  compressed 1.20%" in snapped
