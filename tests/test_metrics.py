"""Metrics against values computed by hand on small label vectors."""
import math

import pytest

from dare_lab.taskpool import metrics as M

# TP = 2 (idx 0, 4), FP = 1 (idx 1), FN = 1 (idx 3), TN = 2 (idx 2, 5)
PRED = [1, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0]


def test_accuracy():
    assert M.accuracy(PRED, GOLD) == pytest.approx(4 / 6)
    assert M.accuracy([2, 2, 1], [2, 0, 1]) == pytest.approx(2 / 3)


def test_binary_f1():
    # 2TP / (2TP + FP + FN) = 4 / 6
    assert M.f1(PRED, GOLD) == pytest.approx(4 / 6)
    # positive class is 1: predicting all 0 gives F1 0
    assert M.f1([0, 0, 0], [1, 0, 1]) == 0.0
    # asymmetric case: TP=1, FP=2, FN=0 -> 2/(2+2) = 0.5
    assert M.f1([1, 1, 1, 0], [1, 0, 0, 0]) == pytest.approx(0.5)


def test_macro_f1():
    # class0 F1 = 1, class1: TP1 FN1 -> 2/3, class2: TP1 FP1 -> 2/3
    assert M.macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_matthews():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 − 1) / sqrt(3·3·3·3) = 1/3
    assert M.matthews(PRED, GOLD) == pytest.approx(1 / 3)
    assert M.matthews([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert M.matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert M.matthews([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0


def test_pearson_spearman():
    # x = [1,2,3], y = [1,2,4]: cov = 3, var_x = 2, var_y = 42/9 -> r = 9/sqrt(84)
    assert M.pearson([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(9 / math.sqrt(84))
    # ranks of y: [1,3,2,4] -> rho = 1 − 6·Σd²/(n(n²−1)) = 1 − 12/60
    assert M.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 30.0, 20.0, 40.0]) == pytest.approx(0.8)
    assert M.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(M.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_compute_metrics_and_glue_table():
    out = M.compute_metrics(M.GLUE_METRICS["mrpc"], PRED, GOLD)
    assert out == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(4 / 6)}
    assert M.GLUE_METRICS["cola"] == ("matthews",)
    assert M.GLUE_METRICS["stsb"] == ("pearson", "spearman")
    assert set(M.GLUE_METRICS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"}


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        M.accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="zero examples"):
        M.accuracy([], [])
    with pytest.raises(ValueError, match="bleu"):
        M.compute_metrics(["bleu"], [1], [1])
