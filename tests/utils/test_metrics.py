import math

import numpy as np
import torch

from utils.evaluation.metrics import compute_metrics, confusion_matrix, format_table


def test_confusion_matrix_counts_and_ignore():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    hist = confusion_matrix(pred, target, 3)
    assert hist.dtype == torch.int64
    expected = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    assert np.array_equal(hist.numpy(), expected)


def test_metrics_against_hand_computed_values():
    # A worked example: gt road 960 px, predicted road 935 px, 900 correct.
    hist = np.array([[900, 60], [35, 5]])  # rows gt, cols pred
    m = compute_metrics(hist, ["road", "other"])
    road = m["per_class"][0]
    assert road["precision"] == 900 / 935
    assert road["recall"] == 900 / 960
    assert (road["tp"], road["fp"], road["fn"]) == (900, 35, 60)
    assert road["iou"] == 900 / (960 + 935 - 900)
    other_iou = 5 / (65 + 40 - 5)
    assert math.isclose(m["miou"], (900 / 995 + other_iou) / 2)
    assert math.isclose(m["acc"], 905 / 1000)
    assert math.isclose(m["acc_cls"], (900 / 960 + 5 / 40) / 2)
    assert math.isclose(m["fwavacc"], 0.96 * 900 / 995 + 0.04 * other_iou)
    assert "road" in format_table(m)


def test_absent_class_is_left_out_of_the_mean():
    hist = np.array([[10, 0, 0], [0, 5, 0], [0, 0, 0]])
    m = compute_metrics(hist)
    assert math.isnan(m["per_class"][2]["iou"])
    assert m["miou"] == 1.0


def test_large_counts_stay_exact():
    big = 3 * 10**8 + 1  # above float32's exact integer range
    hist = torch.tensor([[big, 1], [0, 1]], dtype=torch.int64)
    assert compute_metrics(hist)["per_class"][0]["tp"] == big


def test_autolabel_probability_png_truncates_as_the_original(tmp_path):
    """uint8(255 · p) as the original writes it: p = 0.501 (127.76) is 127, below a 0.5 threshold (127.5/255)."""
    import cv2
    import numpy as np
    import torch

    from utils.evaluation.dumps import LabelIdWriter

    p = torch.tensor([0.501, 0.499])
    logits = p.log().view(2, 1, 1).expand(2, 2, 3)  # softmax over the two classes gives back p
    writer = LabelIdWriter(str(tmp_path), np.array([7, 8], np.uint8), with_prob=True)
    writer.add("img", logits)
    prob = cv2.imread(str(tmp_path / "img_prob.png"), cv2.IMREAD_UNCHANGED)
    ids = cv2.imread(str(tmp_path / "img.png"), cv2.IMREAD_UNCHANGED)
    assert (prob == 127).all() and (ids == 7).all()
