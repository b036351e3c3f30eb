import numpy as np
import pytest
from sklearn import metrics as sk

from alnet import metrics as M


def _from_counts(tp, tn, fp, fn):
    labels = np.r_[np.ones(tp + fn), np.zeros(tn + fp)].astype(int)
    predicted = np.r_[np.ones(tp), np.zeros(fn), np.zeros(tn), np.ones(fp)].astype(int)
    return labels, predicted


@pytest.mark.parametrize("counts, accuracy", [((470, 180, 49, 6), 0.922), ((450, 170, 46, 45), 0.872)])
def test_paper_table_7_confusion_matrices_give_its_accuracies(counts, accuracy):
    tp, tn, fp, fn = counts
    labels, predicted = _from_counts(*counts)
    c = M.confusion(labels, predicted)
    assert c == {"tp": tp, "tn": tn, "fp": fp, "fn": fn}
    result = M.from_confusion(c)
    assert round(result["accuracy"], 3) == accuracy
    assert result["precision"] == pytest.approx(tp / (tp + fp))
    assert result["recall"] == pytest.approx(tp / (tp + fn))
    assert result["specificity"] == pytest.approx(tn / (tn + fp))


def test_paper_table_9_mean_accuracy_is_91_13():
    assert M.summarize([{m: 0.0 for m in M.METRICS} | {"accuracy": a} for a in (0.922, 0.940, 0.872)])[
        "accuracy"]["mean"] == pytest.approx(0.9113, abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_scikit_learn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(labels * 0.3 + rng.random(300) * 0.8, 0, 1).round(2)  # rounded: ties happen
    predicted = (scores > 0.5).astype(int)
    ours = M.evaluate(labels, scores)
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(labels, predicted))
    assert ours["precision"] == pytest.approx(sk.precision_score(labels, predicted))
    assert ours["recall"] == pytest.approx(sk.recall_score(labels, predicted))
    assert ours["specificity"] == pytest.approx(sk.recall_score(labels, predicted, pos_label=0))
    assert ours["f1"] == pytest.approx(sk.f1_score(labels, predicted))
    assert ours["weighted_f1"] == pytest.approx(sk.f1_score(labels, predicted, average="weighted"))
    assert ours["auc"] == pytest.approx(sk.roc_auc_score(labels, scores))
    fpr, tpr, _ = M.roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sk.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_with_only_all_images_specificity_and_auc_are_undefined_and_the_rest_defined():
    result = M.evaluate([1, 1, 1], [0.9, 0.2, 0.7])
    assert np.isnan(result["auc"]) and np.isnan(result["specificity"])
    assert result["precision"] == 1.0 and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(0.8) and result["accuracy"] == pytest.approx(2 / 3)
    # HEM has no images, so it weighs nothing: the weighted F1 is the ALL F1, not NaN.
    assert result["weighted_f1"] == pytest.approx(0.8)


def test_with_only_hem_images_recall_and_f1_are_undefined_and_the_weighted_f1_is_hems():
    result = M.evaluate([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.9])
    assert np.isnan(result["recall"]) and np.isnan(result["f1"])
    assert result["precision"] == 0.0 and result["specificity"] == 0.75
    assert result["weighted_f1"] == pytest.approx(sk.f1_score([0] * 4, [0, 0, 0, 1], pos_label=0))


def test_when_nothing_is_called_all_precision_is_undefined_and_f1_is_0():
    result = M.evaluate([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4])
    assert np.isnan(result["precision"])
    assert result["recall"] == 0.0 and result["f1"] == 0.0 and result["specificity"] == 1.0
    assert result["weighted_f1"] == pytest.approx(sk.f1_score([1, 1, 0, 0], [0] * 4, average="weighted",
                                                              zero_division=0))


def test_with_no_images_every_metric_is_undefined():
    result = M.evaluate([], [])
    assert all(np.isnan(result[name]) for name in M.METRICS)
    assert result["images"] == 0


def test_a_fold_without_hem_images_does_not_pull_down_the_mean_specificity():
    folds = [M.evaluate([1, 0, 0], [0.9, 0.1, 0.1]), M.evaluate([1, 1], [0.9, 0.8]),
             M.evaluate([1, 0], [0.9, 0.9])]
    summary = M.summarize(folds)
    assert summary["specificity"] == {"mean": pytest.approx(0.5), "std": pytest.approx(np.std([1, 0], ddof=1))}
    assert summary["accuracy"]["mean"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_summary_is_mean_and_sample_std_over_folds():
    folds = [{m: v for m in M.METRICS} for v in (0.8, 0.9, 1.0)]
    summary = M.summarize(folds)
    assert summary["f1"]["mean"] == pytest.approx(0.9)
    assert summary["f1"]["std"] == pytest.approx(0.1)
