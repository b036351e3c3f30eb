"""Calibration, the patient-level view and "needs review": the pure functions."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from alnet import metrics as M
from alnet.schema import checked_calibration, checked_review
from alnet.trust.calibration import (
    apply_temperature,
    calibration_scores,
    fit_temperature,
    negative_log_likelihood,
)
from alnet.trust.review import (
    choose_half_width,
    flagged,
    review_entry,
    risk_coverage,
    statuses,
)
from alnet.trust.subjects import (
    SubjectMapError,
    bootstrap_interval,
    image_intervals,
    read_subject_map,
    resampled_auc,
    subject_from_name,
    subject_level,
    subject_rows,
    wilson_interval,
)


def _scores(seed: int, n: int = 400, sharpness: float = 3.0):
    """Labels and P(ALL) whose true log-odds are 2z, reported as σ(sharpness·z): over- or under-confident."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    z = (2 * labels - 1) + rng.normal(0, 1, n)
    return labels, 1 / (1 + np.exp(-sharpness * z))


@pytest.mark.parametrize("seed,sharpness", [(0, 3.0), (1, 0.5), (2, 2.0), (3, 8.0), (4, 1.0)])
def test_calibration_never_worsens_nll_on_the_data_it_was_fitted_on(seed, sharpness):
    labels, prob = _scores(seed, n=60, sharpness=sharpness)
    temperature = fit_temperature(prob, labels)
    assert negative_log_likelihood(labels, apply_temperature(prob, temperature)) <= \
        negative_log_likelihood(labels, prob) + 1e-12


def test_calibration_never_worsens_nll_even_on_perfectly_separated_or_one_class_data():
    separated = (np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    inverted = (np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1]))
    for prob, labels in (separated, inverted):
        t = fit_temperature(prob, labels)
        assert np.isfinite(t) and t > 0
        assert negative_log_likelihood(labels, apply_temperature(prob, t)) <= \
            negative_log_likelihood(labels, prob) + 1e-12
    assert fit_temperature(np.array([0.7, 0.9]), np.array([1, 1])) == 1.0


def test_calibration_leaves_t_at_1_where_every_validation_call_is_right():
    """Right calls only: the NLL falls without end as T → 0, so a fit would make every later answer 0 or 1
    (T at the range's end); the network's own probabilities are kept, and the run says why."""
    from alnet.fitting import fit_on_validation

    prob, labels = np.array([0.1, 0.45, 0.55, 0.9]), np.array([0, 0, 1, 1])
    assert fit_temperature(prob, labels) == 1.0
    assert "called right" in fit_on_validation(labels, prob, ["a", "b", "c", "d"])["calibration"]["note"]
    two_wrong = np.array([0.1, 0.55, 0.45, 0.9])  # the middle two called wrong: a best temperature exists
    assert 0.05 < fit_temperature(two_wrong, labels) < 1.0
    assert "note" not in fit_on_validation(labels, two_wrong, ["a", "b", "c", "d"])["calibration"]


def test_a_cell_at_exactly_one_half_does_not_let_the_fit_run_to_its_bound():
    """A cell at 0.5 costs log 2 at every temperature: with all others right, the NLL still falls without end."""
    labels = np.r_[np.ones(10), np.zeros(10), 1]
    prob = np.r_[np.linspace(0.6, 0.9, 10), np.linspace(0.1, 0.4, 10), 0.5]
    assert fit_temperature(prob, labels) == 1.0


def test_calibration_refuses_nothing_it_cannot_fit_and_never_worsens_the_nll_it_reports():
    from alnet.fitting import fit_on_validation

    assert fit_temperature([np.nan, 0.9, 0.1], [0, 1, 0]) == 1.0
    assert fit_on_validation([0, 1, 0], [np.nan, 0.9, 0.1], ["a", "b", "c"])["calibration"]["method"] == "none"
    with pytest.raises(ValueError, match="0 \\(HEM\\) or 1 \\(ALL\\)"):
        fit_temperature([0.9, 0.1], [2, 0])
    prob, labels = np.r_[np.ones(50), 0.5001], np.r_[np.ones(50), 0]  # saturated cells: the clipped NLL decides
    calibration = fit_on_validation(labels, prob, ["a"] * 51)["calibration"]
    assert calibration["validation_nll_after"] <= calibration["validation_nll_before"]


def test_temperature_recovers_a_known_overconfidence():
    labels, prob = _scores(0, n=20_000, sharpness=3.0)  # true log-odds 2z, reported 3z: T = 1.5
    assert fit_temperature(prob, labels) == pytest.approx(1.5, rel=0.05)
    before, after = calibration_scores(labels, prob), calibration_scores(labels, apply_temperature(prob, 1.5))
    assert after["ece"] < before["ece"] / 2 and after["brier"] < before["brier"] and after["nll"] < before["nll"]


def test_temperature_keeps_the_ranking_and_every_call_so_auc_and_accuracy_are_unchanged():
    labels, prob = _scores(5, sharpness=4.0)
    calibrated = apply_temperature(prob, 2.7)
    assert M.roc_auc(labels, calibrated) == pytest.approx(M.roc_auc(labels, prob), abs=1e-12)
    assert np.array_equal(calibrated > 0.5, prob > 0.5)
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(prob, kind="stable"))


def test_brier_and_nll_agree_with_scikit_learn_and_ece_with_its_definition():
    labels, prob = _scores(6, n=300)
    scores = calibration_scores(labels, prob)
    assert scores["brier"] == pytest.approx(brier_score_loss(labels, prob), abs=1e-6)
    assert scores["nll"] == pytest.approx(log_loss(labels, prob), abs=1e-6)
    bins = np.minimum((prob * 15).astype(int), 14)  # 15 equal-width bins: Σ |mean p − share of ALL| · weight
    ece = sum(abs(prob[bins == b].mean() - labels[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert scores["ece"] == pytest.approx(ece, abs=1e-4)


def test_review_band_answers_at_least_the_target_share_of_validation_cells():
    _, prob = _scores(7, n=503)
    for coverage in (0.5, 0.8, 0.9, 0.97, 1.0):
        width = choose_half_width(prob, coverage)
        answered = 1 - flagged(prob, width).mean()
        assert answered >= coverage
        assert answered - coverage < 2 / len(prob)  # and not much more: the band is as wide as allowed
    assert choose_half_width(prob, 1.0) == 0.0


def test_a_cell_near_the_threshold_or_with_disagreeing_flips_needs_review_and_keeps_its_label():
    prob = np.array([0.52, 0.95, 0.05, 0.9])
    variants = np.array([[0.5, 0.9, 0.1, 0.9], [0.6, 0.95, 0.1, 0.4], [0.5, 0.97, 0.0, 0.95], [0.5, 1.0, 0.0, 1.0]])
    result = statuses(prob, half_width=0.1, variants=variants)
    assert [s for s, _ in result] == ["review", "ok", "ok", "review"]
    assert "within 0.100 of the threshold" in result[0][1] and "flips disagree (3 of 4 call ALL)" in result[3][1]
    assert result[1][1] == ""


def test_risk_coverage_runs_from_the_most_confident_cell_to_the_overall_error():
    labels = np.array([1, 0, 1, 0, 1])
    prob = np.array([0.99, 0.6, 0.55, 0.02, 0.3])  # confident and right first; two errors near the middle
    coverage, risk = risk_coverage(labels, prob)
    assert coverage.tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert risk[0] == 0 and risk[-1] == pytest.approx(2 / 5)
    entry = review_entry(labels, prob, {"half_width": 0.15, "target_coverage": 0.9})
    assert entry["coverage"] == pytest.approx(0.6) and entry["error_answered"] == pytest.approx(1 / 3)
    assert entry["error_all"] == pytest.approx(0.4) and entry["flagged"] == 2


def test_wilson_interval_matches_published_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(np.isnan(wilson_interval(0, 0)))


def test_bootstrap_resamples_subjects_not_cells_and_is_seeded():
    # Two patients of 50 cells: one all right, one all wrong. Cells are not independent: resampling subjects
    # gives accuracies of 0, 0.5 or 1, so the interval spans [0, 1]; resampling cells would say 0.5 ± 0.1.
    subjects = ["a"] * 50 + ["b"] * 50
    labels = np.ones(100, dtype=int)
    prob = np.r_[np.full(50, 0.9), np.full(50, 0.1)]
    intervals = image_intervals(subjects, labels, prob, seed=3)
    assert intervals["accuracy"]["low"] == 0.0 and intervals["accuracy"]["high"] == 1.0
    assert intervals["accuracy"]["resamples"] == 1000 and intervals["accuracy"]["unit"] == "subject"
    assert intervals["accuracy"] == image_intervals(subjects, labels, prob, seed=3)["accuracy"]
    assert np.isnan(intervals["auc"]["low"]) and intervals["auc"]["undefined_resamples"] == 1000  # one class
    clusters = [np.array([k]) for k in range(30)]
    values = np.linspace(0, 1, 30)
    a = bootstrap_interval(clusters, lambda i: values[i].mean(), seed=1)
    b = bootstrap_interval(clusters, lambda i: values[i].mean(), seed=2)
    assert a != b and a["low"] < 0.5 < a["high"]


def test_the_bootstrap_auc_of_a_draw_equals_the_auc_of_the_drawn_cells():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 200)
    prob = np.round(rng.random(200), 2)  # rounded: many ties, counted one half
    auc = resampled_auc(labels, prob)
    for _ in range(20):
        drawn = rng.integers(0, 200, 200)
        assert auc(drawn) == pytest.approx(M.roc_auc(labels[drawn], prob[drawn]), abs=1e-6)  # torchmetrics: float32
    assert np.isnan(auc(np.flatnonzero(labels == 1)))


def test_subject_level_scores_each_patient_by_the_mean_calibrated_probability_of_its_cells():
    subjects = ["1", "1", "2", "2", "H3", "H3", "H4"]
    labels = [1, 1, 1, 1, 0, 0, 0]
    prob = [0.9, 0.7, 0.4, 0.45, 0.2, 0.6, 0.1]
    result = subject_level(subjects, labels, prob, seed=0)
    assert result["subjects"] == 4
    rows = {r["subject"]: r for r in result["per_subject"]}
    assert rows["1"]["mean_probability_all"] == pytest.approx(0.8) and rows["1"]["fraction_called_all"] == 1.0
    assert rows["H3"]["fraction_called_all"] == 0.5 and rows["H3"]["cells"] == 2
    assert result["accuracy"] == pytest.approx(3 / 4)  # subject 2 (mean 0.425) is called HEM
    assert result["auc"] == pytest.approx(M.roc_auc([1, 1, 0, 0], [0.8, 0.425, 0.4, 0.1]))
    assert result["auc_interval"]["low"] <= result["auc"] <= result["auc_interval"]["high"]


def test_subjects_come_from_cnmc_file_names_normalised_as_in_the_dataset():
    assert subject_from_name("some/dir/UID_h3_1_2_hem.bmp") == "H3"
    assert subject_from_name("UID_057_29_1_all.png") == "57"
    assert subject_from_name("UID_H15_anything.png") == "H15"
    assert subject_from_name("12.bmp") is None and subject_from_name("cell.png") is None


def test_subject_rows_count_cells_called_all_rejected_and_flagged_for_review():
    rows = [{"subject": "x", "predicted": "ALL", "probability_all": "0.9", "status": "ok"},
            {"subject": "x", "predicted": "HEM", "probability_all": "0.45", "status": "review"},
            {"subject": "x", "predicted": "", "probability_all": "", "status": "rejected"},  # predict's refusal
            {"subject": "", "predicted": "HEM", "probability_all": "0.1", "status": "ok"}]
    out = subject_rows(rows)
    assert [r["subject"] for r in out] == ["(unknown)", "x"]
    x = out[1]
    assert (x["cells"], x["cells_all"], x["cells_rejected"], x["cells_review"]) == (3, 1, 1, 1)
    assert float(x["fraction_all"]) == 0.5 and float(x["mean_probability_all"]) == pytest.approx(0.675)
    assert x["predicted"] == "ALL" and x["label"] == "" and x["accuracy"] == ""  # no true label known
    low, high = wilson_interval(1, 2)
    assert float(x["fraction_all_low"]) == pytest.approx(low, abs=1e-6) and float(x["fraction_all_high"]) == \
        pytest.approx(high, abs=1e-6)
    assert out[0]["predicted"] == "HEM" and out[0]["cells_all"] == 0


def test_a_run_s_subject_rows_keep_the_test_set_and_score_every_cell_with_a_probability():
    rows = [{"fold": "fold_0", "subject": "3", "label": "ALL", "predicted": "ALL", "probability_all": "0.9",
             "status": "ok"},
            {"fold": "fold_0", "subject": "3", "label": "ALL", "predicted": "HEM", "probability_all": "0.4",
             "status": "rejected"},  # a run keeps a refused cell's P(ALL): its metrics count every cell
            {"fold": "prelim", "subject": "3", "label": "ALL", "predicted": "ALL", "probability_all": "0.7",
             "status": "review"}]
    out = subject_rows(rows)
    assert [(r["fold"], r["subject"], r["cells"]) for r in out] == [("fold_0", "3", 2), ("prelim", "3", 1)]
    assert out[0]["label"] == "ALL" and float(out[0]["accuracy"]) == 0.5 and out[0]["cells_rejected"] == 1
    assert float(out[0]["mean_probability_all"]) == pytest.approx(0.65) and out[0]["predicted"] == "ALL"


def test_a_subject_map_is_read_as_a_hostile_file(tmp_path, monkeypatch):
    good = tmp_path / "map.csv"
    good.write_bytes("\ufeffpath,subject\ncells/a.png,P1\n/abs/b.png,P2\n".encode())
    mapping = read_subject_map(good)
    assert mapping[(tmp_path / "cells" / "a.png").resolve()] == "P1" and mapping[__import__("pathlib").Path(
        "/abs/b.png")] == "P2"
    cases = {
        "no-header.csv": (b"file,patient\na.png,1\n", "no `path` and `subject` columns"),
        "conflict.csv": (b"path,subject\na.png,1\na.png,2\n", "line 3: a.png is given two subjects"),
        "empty-subject.csv": (b"path,subject\na.png,\n", "line 2: empty path or subject"),
        "binary.csv": (b"path,subject\n\xff\xfe\x00garbage\n", "not UTF-8"),
        "control.csv": (b"path,subject\na.png,\x1b[31mred\n", "printable"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SubjectMapError, match=message) as err:
            read_subject_map(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr("alnet.trust.subjects.MAX_MAP_BYTES", 10)
    with pytest.raises(SubjectMapError, match="larger than"):
        read_subject_map(good)
    with pytest.raises(SubjectMapError, match="no such file"):
        read_subject_map(tmp_path / "missing.csv")


def test_calibration_and_review_read_from_a_checkpoint_are_checked():
    assert checked_calibration(None) is None and checked_review(None) is None
    assert checked_calibration({"method": "none", "temperature": None}) is None
    assert checked_calibration({"temperature": 2})["temperature"] == 2.0
    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": "2"}, [1], {"temperature": True}):
        with pytest.raises(TypeError):
            checked_calibration(bad)
    for bad in ({"half_width": 0.7}, {}, "wide"):
        with pytest.raises(TypeError):
            checked_review(bad)


def test_a_subject_map_may_not_name_a_subject_as_subjects_csv_names_pictures_without_one(tmp_path):
    mapping = tmp_path / "map.csv"
    mapping.write_text("path,subject\na.png,(unknown)\n")
    with pytest.raises(SubjectMapError, match=r"map.csv, line 2: \(unknown\) is how subjects.csv counts"):
        read_subject_map(mapping)
