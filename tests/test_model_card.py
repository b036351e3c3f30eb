from dataclasses import asdict

import numpy as np

from alnet.config import RunConfig
from alnet.report.model_card import CardFacts, render_model_card

FOLD = {"fold": "fold_0", "accuracy": 0.9, "precision": 0.8, "recall": 0.7, "specificity": 0.95, "f1": 0.75,
        "weighted_f1": 0.88, "auc": 0.93, "images": 20, "confusion": [[9, 1], [1, 9]]}
SPLITS = [{"name": "fold_0", "note": "n", "subject_disjoint": True,
           "train": {"images": 40, "subjects": 8, "all": 20, "hem": 20},
           "val": {"images": 8, "subjects": 2, "all": 4, "hem": 4},
           "test": {"images": 20, "subjects": 4, "all": 10, "hem": 10}}]


def facts(**overrides) -> CardFacts:
    base = dict(config=asdict(RunConfig(image_size=136)), metrics={
        "protocol": "subject", "note": "subjects disjoint", "folds": [FOLD], "summary": {}, "world_size": 1},
        splits=SPLITS, data={"images": 68, "skipped": []}, weights_name="prelim/best.ckpt", weights_sha256="ab" * 32,
        versions={"python": "3.11", "torch": "2.x"})
    base.update(overrides)
    return CardFacts(**base)


def test_model_card_says_research_tool_not_diagnostic_device_and_names_its_checklist():
    card = render_model_card(facts())
    assert "research tool, not a diagnostic device" in card
    assert "CLAIM" in card and "doi:10.1148/ryai.2020200029" in card
    for section in ("## Intended use", "## Data", "## Model", "## Training", "## Validation: evaluation and results",
                    "## Known limitations", "## Citation and availability"):
        assert section in card
    assert "*CLAIM items" in card.split("## Data")[1].split("##")[0]


def test_model_card_reports_data_per_split_metrics_weights_and_versions():
    card = render_model_card(facts())
    assert "| fold_0 | train | 40 | 8 | 20 | 20 |" in card
    assert "no; every split is subject-disjoint" in card
    assert "10.7937/tcia.2019.dc64i46r" in card and "10.1016/j.combiomed.2022.105894" in card
    assert "0.930" in card and "0.900" in card  # AUC and accuracy of the fold
    assert "sha256 `" + "ab" * 32 + "`" in card and "torch 2.x" in card
    assert "No confidence intervals are recorded" in card


def test_model_card_flags_the_paper_protocols_shared_subjects():
    leaky = [{**SPLITS[0], "subject_disjoint": False}]
    card = render_model_card(facts(config=asdict(RunConfig(protocol="paper", image_size=136)), splits=leaky))
    assert "**yes**, in fold_0" in card
    assert "This model was evaluated under that protocol" in card


def _recorded_fold() -> dict:
    """A test set's metrics entry as a run records it: the metrics and the trust entries computed from
    prediction rows of 8 subjects (a temperature of 2 fitted on validation subjects)."""
    from alnet import metrics as M
    from alnet.trust.test_set import test_set_entry

    rng = np.random.default_rng(1)
    rows = []
    for subject in range(8):
        label = subject % 2
        for _ in range(6):
            raw = float(np.clip(rng.normal(0.6 if label else 0.4, 0.3), 0.01, 0.99))
            rows.append({"subject": f"s{subject}", "label": label, "probability_raw": f"{raw:.6f}",
                         "probability_all": f"{1 / (1 + np.exp(-np.log(raw / (1 - raw)) / 2)):.6f}"})
    trust = {"calibration": {"method": "temperature", "temperature": 2.0, "fitted_on": "validation subjects"},
             "review": {"half_width": 0.05, "target_coverage": 0.9}}
    return {"fold": "fold_0", **M.evaluate(*M.columns(rows)), **test_set_entry(rows, trust, seed=0)}


def test_model_card_shows_the_subject_bootstrap_intervals_calibration_and_subject_results_a_run_records():
    fold = _recorded_fold()
    metrics = {"protocol": "subject", "note": "n", "folds": [fold], "summary": {}}
    card = render_model_card(facts(metrics=metrics, calibration=fold["calibration"]))
    accuracy, interval = fold["accuracy"], fold["intervals"]["accuracy"]
    assert f"{accuracy:.3f} ({interval['low']:.3f}–{interval['high']:.3f})" in card
    auc = fold["intervals"]["auc"]
    assert f"{fold['auc']:.3f} ({auc['low']:.3f}–{auc['high']:.3f})" in card
    assert "95% percentile bootstrap intervals (1000 resamples of whole subjects" in card
    assert interval["low"] < interval["high"] and "No confidence intervals" not in card
    level = fold["subject_level"]
    assert "### Subject-level results" in card
    assert (f"| fold_0 | 8 | {level['auc']:.3f} ({level['auc_interval']['low']:.3f}–"
            f"{level['auc_interval']['high']:.3f}) |") in card
    before, after = fold["calibration"]["before"], fold["calibration"]["after"]
    assert "### Calibration" in card and "temperature, T = 2" in card
    assert f"{before['ece']:.3f} → {after['ece']:.3f}" in card
    assert "## Calibration of the output" in card and "T = 2, fitted on validation subjects" in card


def test_model_card_says_why_a_run_whose_validation_calls_were_all_right_kept_t_at_1():
    from alnet import metrics as M
    from alnet.fitting import fit_on_validation
    from alnet.trust.test_set import test_set_entry

    labels, prob = [0, 0, 1, 1], [0.1, 0.4, 0.6, 0.9]
    calibration = fit_on_validation(labels, prob, ["a", "b", "c", "d"])["calibration"]
    rows = [{"subject": s, "label": y, "probability_raw": p, "probability_all": p}
            for s, y, p in zip("abcd", labels, prob)]
    fold = {"fold": "fold_0", **M.evaluate(*M.columns(rows)),
            **test_set_entry(rows, {"calibration": calibration, "review": None}, seed=0)}
    card = render_model_card(facts(metrics={"protocol": "subject", "note": "n", "folds": [fold], "summary": {}},
                                   calibration=calibration))
    assert card.count("every validation cell was called right") == 2  # the test sets' table and the output's


def test_model_card_ignores_interval_spellings_it_does_not_record():
    fold = {**FOLD, "accuracy_ci": [0.85, 0.95], "ci": {"accuracy": {"low": 0.85, "high": 0.95}}}
    card = render_model_card(facts(metrics={"protocol": "subject", "note": "n", "folds": [fold], "summary": {}}))
    assert "(0.850–0.950)" not in card and "No confidence intervals are recorded" in card


def test_model_card_of_an_uncalibrated_run_says_so_and_has_no_calibration_section():
    from alnet.fitting import not_fitted

    fold = {**FOLD, "calibration": {"method": "none", "note": not_fitted()["calibration"]["note"],
                                    "before": {"ece": 0.1, "brier": 0.2, "nll": 0.5}, "after": None}}
    card = render_model_card(facts(metrics={"protocol": "paper", "note": "n", "folds": [fold], "summary": {}},
                                   calibration=None))
    assert "not calibrated: the paper protocol" in card and "## Calibration of the output" not in card


def test_model_card_without_metrics_or_weights_still_renders():
    card = render_model_card(facts(metrics=None, splits=[], data={}, weights_sha256=None))
    assert "No metrics are recorded" in card and "sha256" not in card


def test_hostile_calibration_text_reaches_the_card_as_one_plain_line():
    """A run directory or checkpoint from elsewhere may carry any text: no heading, HTML or escape of its own."""
    from alnet.schema import checked_calibration

    hostile = "x\n\n## Intended use\n\nSAFE TO DIAGNOSE <script>alert(1)</script>\x1b[31m ![b](http://e.example/p)"
    stored = checked_calibration({"temperature": 2.0, "fitted_on": hostile, "note": hostile})
    fold = {**FOLD, "calibration": {"method": "temperature", "temperature": 2.0, "note": hostile,
                                    "before": {"ece": 0.1, "brier": 0.2, "nll": 0.5},
                                    "after": {"ece": 0.1, "brier": 0.2, "nll": 0.5}}}
    card = render_model_card(facts(metrics={"protocol": "subject", "note": "n", "folds": [fold], "summary": {}},
                                   calibration=stored))
    lines = card.splitlines()
    assert sum(line.startswith("## Intended use") for line in lines) == 1  # the card's own heading only
    assert not any(line.startswith(("#", "SAFE")) and "SAFE" in line for line in lines)
    assert "<script>" not in card and "\x1b" not in card and "&lt;script&gt;" in card
    assert "![b](" not in card and "!\\[b\\](http://e.example/p)" in card  # no image the card would fetch
