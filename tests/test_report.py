from pipeline.report import Row, cell, markdown_table


def test_cell_formats_mean_and_spread():
    assert cell([], 2) == "–"
    assert cell([3.14159], 2) == "3.14"
    assert cell([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00"


def test_table_rows_order_and_caption():
    fp = Row("FP", "32/32", [{"fid": 10.0, "kid": 5.0, "isc": 8.0, "precision": 0.5, "recall": 0.9, "num_samples": 1000}])
    dmq = Row("dmq", "W4A6", [
        {"fid": 12.0, "kid": 6.0, "isc": 7.5, "precision": 0.4, "recall": 0.8, "num_samples": 1000},
        {"fid": 14.0, "kid": 8.0, "isc": 7.7, "precision": 0.6, "recall": 0.8, "num_samples": 1000},
    ])  # fmt: skip
    text = markdown_table([fp, dmq], steps=20, feature_note="digit-classifier features")
    lines = text.splitlines()
    assert lines[0] == "| Method | Bits | FID ↓ | KID ↓ | ISC ↑ | Precision ↑ | Recall ↑ | Steps | Samples |"
    assert lines[2] == "| FP | 32/32 | 10.00 | 5.0 | 8.00 | 0.500 | 0.900 | 20 | 1000 |"
    assert lines[3] == "| dmq | W4A6 | 13.00 ± 1.41 | 7.0 ± 1.4 | 7.60 ± 0.14 | 0.500 ± 0.141 | 0.800 ± 0.000 | 20 | 1000 × 2 seeds |"
    assert lines[-1] == "Metrics on digit-classifier features; DDIM with 20 steps."
