"""multieye_dist.track.metrics against independent computations (plain loops, hand-worked
numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from multieye_dist.track.metrics import evaluate, format_table, to_log_dict

# --- independent reference computations (plain Python loops, no sklearn) ---------------------


def loop_confusion(labels, preds, c):
    cm = [[0] * c for _ in range(c)]
    for t, p in zip(labels, preds, strict=True):
        cm[int(t)][int(p)] += 1
    return cm


def loop_counts(cm, k):
    """TP, FP, FN, TN of class k, one cell at a time."""
    tp = fp = fn = tn = 0
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            if i == k and j == k:
                tp += v
            elif j == k:
                fp += v
            elif i == k:
                fn += v
            else:
                tn += v
    return tp, fp, fn, tn


def safe_div(a, b):
    return a / b if b else 0.0


def pairwise_auc(y, s):
    """Mann-Whitney: fraction of (positive, negative) pairs ranked right, ties count 1/2."""
    pos = [v for v, t in zip(s, y, strict=True) if t]
    neg = [v for v, t in zip(s, y, strict=True) if not t]
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def ranked_ap(y, s):
    """Mean over positives of precision at the positive's rank (scores must be distinct)."""
    order = sorted(range(len(s)), key=lambda i: -s[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if y[i]:
            hits += 1
            total += hits / rank
    return total / hits


def hand_kappa(cm):
    n = sum(map(sum, cm))
    c = len(cm)
    po = sum(cm[i][i] for i in range(c)) / n
    pe = sum(sum(cm[i]) * sum(cm[r][i] for r in range(c)) for i in range(c)) / n**2
    return (po - pe) / (1 - pe)


def random_case(seed, n=300, c=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.0  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


# --- hand-worked example -------------------------------------------------------------------------

# labels = [0, 0, 1, 1, 2, 2]; argmax of HAND_PROBS gives preds = [0, 1, 1, 1, 2, 0].
# Confusion matrix (rows true): [[1,1,0],[0,2,0],[1,0,1]].
#   class 0: TP1 FP1 FN1 TN3 -> P 1/2, R 1/2, F1 1/2,   Spec 3/4
#   class 1: TP2 FP1 FN0 TN3 -> P 2/3, R 1,   F1 4/5,   Spec 3/4
#   class 2: TP1 FP0 FN1 TN4 -> P 1,   R 1/2, F1 2/3,   Spec 1
#   macro P 13/18, R 2/3, F1 (1/2+4/5+2/3)/3 = 59/90, Spec 5/6; accuracy 4/6.
# Kappa: po = 2/3; true marginals 2,2,2, pred marginals 2,3,1 -> pe = (4+6+2)/36 = 1/3;
#   kappa = (2/3 - 1/3) / (1 - 1/3) = 1/2.
# AUC (one-vs-rest on column k):
#   class 0: pos {.7,.3} vs neg {.1,.2,.1,.5}: 4 + 3 wins of 8 -> 7/8
#   class 1: pos {.8,.5} vs neg {.2,.6,.2,.1}: 4 + 3 of 8      -> 7/8
#   class 2: pos {.7,.4} vs neg {.1,.1,.1,.3}: 8 of 8          -> 1
#   macro AUC 11/12.
# AP: class 0 ranking .7(+) .5(-) .3(+) -> (1/1 + 2/3)/2 = 5/6; class 1 .8(+) .6(-) .5(+) -> 5/6;
#   class 2 .7(+) .4(+) -> 1; mAP = 8/9.
HAND_LABELS = [0, 0, 1, 1, 2, 2]
HAND_PROBS = [
    [0.7, 0.2, 0.1],
    [0.3, 0.6, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.5, 0.3],
    [0.1, 0.2, 0.7],
    [0.5, 0.1, 0.4],
]


def test_hand_worked_example():
    r = evaluate(np.array(HAND_LABELS), np.array(HAND_PROBS), ["A", "B", "C"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    expected = {
        "accuracy": 4 / 6,
        "precision": 13 / 18,
        "recall": 2 / 3,
        "specificity": 5 / 6,
        "f1": 59 / 90,
        "auc": 11 / 12,
        "map": 8 / 9,
        "kappa": 0.5,
    }
    for key, value in expected.items():
        assert r[key] == pytest.approx(value, abs=1e-12), key
    per_class = {
        "A": (1 / 2, 1 / 2, 3 / 4, 1 / 2, 7 / 8, 5 / 6, 2),
        "B": (2 / 3, 1.0, 3 / 4, 4 / 5, 7 / 8, 5 / 6, 2),
        "C": (1.0, 1 / 2, 1.0, 2 / 3, 1.0, 1.0, 2),
    }
    keys = ("precision", "recall", "specificity", "f1", "auc", "ap", "support")
    for name, values in per_class.items():
        for key, value in zip(keys, values, strict=True):
            assert r["per_class"][name][key] == pytest.approx(value, abs=1e-12), (name, key)
    assert r["absent_classes"] == []
    assert r["n"] == 6 and r["num_classes"] == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_loops(seed):
    labels, probs = random_case(seed)
    n, c = probs.shape
    preds = [max(range(c), key=lambda k, row=row: row[k]) for row in probs.tolist()]
    cm = loop_confusion(labels.tolist(), preds, c)
    r = evaluate(labels, probs)
    assert r["confusion_matrix"] == cm
    assert r["accuracy"] == pytest.approx(sum(cm[k][k] for k in range(c)) / n)
    sums = dict.fromkeys(("precision", "recall", "specificity", "f1", "auc", "map"), 0.0)
    for k in range(c):
        tp, fp, fn, tn = loop_counts(cm, k)
        p, rec, spec = safe_div(tp, tp + fp), safe_div(tp, tp + fn), safe_div(tn, tn + fp)
        f1 = safe_div(2 * p * rec, p + rec)
        y = [int(t == k) for t in labels.tolist()]
        s = probs[:, k].tolist()
        auc, ap = pairwise_auc(y, s), ranked_ap(y, s)
        row = r["per_class"][str(k)]
        assert row["precision"] == pytest.approx(p)
        assert row["recall"] == pytest.approx(rec)
        assert row["specificity"] == pytest.approx(spec)
        assert row["f1"] == pytest.approx(f1)
        assert row["auc"] == pytest.approx(auc)
        assert row["ap"] == pytest.approx(ap)
        assert row["support"] == tp + fn
        for key, v in zip(sums, (p, rec, spec, f1, auc, ap), strict=True):
            sums[key] += v / c
    for key, v in sums.items():
        assert r[key] == pytest.approx(v), key
    assert r["kappa"] == pytest.approx(hand_kappa(cm))


def test_specificity_is_tn_over_tn_plus_fp():
    # Binary: specificity of class 1 = recall of class 0 and vice versa.
    # labels [0,0,0,1,1], preds [0,1,1,1,0]: class 1 TN=1, FP=2 -> 1/3; class 0 TN=1, FP=1 -> 1/2.
    labels = [0, 0, 0, 1, 1]
    probs = [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]]
    r = evaluate(labels, probs)
    assert r["per_class"]["1"]["specificity"] == pytest.approx(1 / 3)
    assert r["per_class"]["0"]["specificity"] == pytest.approx(1 / 2)
    assert r["per_class"]["1"]["specificity"] == pytest.approx(r["per_class"]["0"]["recall"])
    assert r["specificity"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_kappa_against_hand_computation():
    # cm [[20,5],[10,15]]: po = 35/50 = 0.7; true marginals 25,25, pred marginals 30,20
    # -> pe = (25*30 + 25*20)/2500 = 0.5; kappa = (0.7-0.5)/(1-0.5) = 0.4.
    labels = [0] * 25 + [1] * 25
    preds = [0] * 20 + [1] * 5 + [0] * 10 + [1] * 15
    probs = np.eye(2)[preds] * 0.8 + 0.1
    r = evaluate(labels, probs)
    assert r["confusion_matrix"] == [[20, 5], [10, 15]]
    assert r["kappa"] == pytest.approx(0.4)
    assert r["kappa"] == pytest.approx(hand_kappa(r["confusion_matrix"]))


def test_auc_perfect_and_reversed():
    labels = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    perfect = evaluate(labels, np.stack([1 - p1, p1], axis=1))
    assert perfect["auc"] == 1.0 and perfect["map"] == 1.0
    assert perfect["per_class"]["0"]["auc"] == 1.0 and perfect["per_class"]["1"]["auc"] == 1.0
    reversed_ = evaluate(labels, np.stack([p1, 1 - p1], axis=1))
    assert reversed_["auc"] == 0.0
    assert reversed_["per_class"]["0"]["auc"] == 0.0 and reversed_["per_class"]["1"]["auc"] == 0.0
    assert reversed_["accuracy"] == 0.0


def test_auc_uses_probabilities_not_argmax():
    # All predictions are class 0 (same argmax), but column 1 ranks the positives perfectly.
    labels = [0, 0, 1, 1]
    probs = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]
    r = evaluate(labels, probs)
    assert r["per_class"]["1"]["auc"] == 1.0
    assert r["per_class"]["1"]["recall"] == 0.0


def test_absent_classes():
    # C=5; labels only use 0..2. Class 3 is predicted once (a false positive), class 4 never.
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.full((7, 5), 0.05)
    preds = [0, 0, 1, 3, 2, 2, 1]
    probs[np.arange(7), preds] = 0.8
    names = ["NOR", "AMD", "CSC", "DR", "GLC"]
    r = evaluate(labels, probs, names)
    cm = r["confusion_matrix"]
    assert len(cm) == 5 and all(len(row) == 5 for row in cm)
    assert cm[3] == [0, 0, 0, 0, 0] and cm[4] == [0, 0, 0, 0, 0]
    assert cm[1][3] == 1
    assert r["absent_classes"] == ["DR", "GLC"]
    for name in ("DR", "GLC"):
        row = r["per_class"][name]
        assert row["auc"] is None and row["ap"] is None
        assert row["support"] == 0 and row["recall"] == 0.0 and row["f1"] == 0.0
        assert row["precision"] == 0.0
    # macro P/R/F1/spec are over all 5 classes (absent ones count as 0 / their value) ...
    per = r["per_class"]
    for key in ("precision", "recall", "f1", "specificity"):
        assert r[key] == pytest.approx(sum(per[nm][key] for nm in names) / 5), key
    assert r["recall"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 5)
    # ... while AUC/mAP average only the 3 classes with positives and negatives.
    present = names[:3]
    assert r["auc"] == pytest.approx(sum(per[nm]["auc"] for nm in present) / 3)
    assert r["map"] == pytest.approx(sum(per[nm]["ap"] for nm in present) / 3)
    logged = to_log_dict(r)
    assert "dev/auc/DR" not in logged and "dev/ap/GLC" not in logged
    assert "dev/auc/NOR" in logged and logged["dev/recall/DR"] == 0.0
    assert "DR, GLC" in format_table(r)


def test_single_class_labels_leave_auc_undefined():
    labels = [1, 1, 1]
    probs = [[0.2, 0.8], [0.3, 0.7], [0.4, 0.6]]
    r = evaluate(labels, probs)
    assert r["per_class"]["1"]["auc"] is None  # no negatives
    assert r["per_class"]["1"]["ap"] == 1.0  # AP is defined with positives only
    assert r["per_class"]["0"]["ap"] is None
    assert r["auc"] is None and r["map"] == 1.0
    assert r["kappa"] is None  # both raters use one single class
    assert r["per_class"]["1"]["specificity"] == 0.0  # TN + FP == 0 -> 0
    assert "dev/auc" not in to_log_dict(r) and "dev/kappa" not in to_log_dict(r)
    assert "n/a" in format_table(r)


def test_plain_python_types_and_json():
    labels, probs = random_case(3, n=50, c=4)
    r = evaluate(labels, probs)
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "auc", "map", "kappa"):
        assert type(r[key]) is float, key
        assert -1.0 <= r[key] <= 1.0
    for row in r["per_class"].values():
        assert all(type(row[k]) is float for k in ("precision", "recall", "f1", "auc", "ap"))
        assert type(row["support"]) is int
    assert all(type(v) is int for row in r["confusion_matrix"] for v in row)
    json.dumps(r)


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    labels, probs = random_case(4, n=40, c=3)
    a = evaluate(labels, probs)
    b = evaluate(torch.from_numpy(labels), torch.from_numpy(probs).float())
    assert b["confusion_matrix"] == a["confusion_matrix"]
    assert b["auc"] == pytest.approx(a["auc"], abs=1e-6)


def test_format_table_and_log_dict():
    r = evaluate(HAND_LABELS, HAND_PROBS, ["NOR", "AMD", "WAMD"])
    text = format_table(r)
    lines = text.splitlines()
    assert lines[0].split() == ["Class", "Prec", "Rec", "Spec", "F1", "AUC", "AP", "Support"]
    assert lines[1].split() == ["NOR", "50.00", "50.00", "75.00", "50.00", "87.50", "83.33", "2"]
    assert lines[4].split()[0] == "Macro" and lines[4].split()[1] == "72.22"
    assert "Accuracy 66.67" in text and "Kappa 50.00" in text and "mAP 88.89" in text
    logged = to_log_dict(r, prefix="test/")
    assert logged["test/accuracy"] == pytest.approx(4 / 6)
    assert logged["test/kappa"] == pytest.approx(0.5)
    assert logged["test/f1/AMD"] == pytest.approx(0.8)
    assert all(k.startswith("test/") and type(v) is float for k, v in logged.items())
    assert len(logged) == 8 + 3 * 6


@pytest.mark.parametrize(
    ("labels", "probs", "names", "match"),
    [
        ([[0, 1]], [[0.5, 0.5]], None, "labels must be 1-D"),
        ([0, 1], [0.5, 0.5], None, "probs must be 2-D"),
        ([0, 1, 0], [[0.5, 0.5], [0.5, 0.5]], None, "N=3 but probs has N=2"),
        (np.zeros(0, int), np.zeros((0, 2)), None, "N must be > 0"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], None, r"labels must be in \[0, 1\]"),
        ([0, -1], [[0.5, 0.5], [0.5, 0.5]], None, r"labels must be in \[0, 1\]"),
        ([0, 0.5], [[0.5, 0.5], [0.5, 0.5]], None, "integer class indices"),
        ([0, 0], [[1.0], [1.0]], None, "at least 2 classes"),
        ([0, 1], [[np.nan, 0.5], [0.5, 0.5]], None, "NaN or inf"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a"], "1 names but probs has C=2"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "a"], "unique"),
    ],
)
def test_bad_inputs_raise(labels, probs, names, match):
    with pytest.raises(ValueError, match=match):
        evaluate(labels, probs, names)
