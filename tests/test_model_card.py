from dataclasses import asdict

import pytest

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


@pytest.mark.parametrize("spelling", [
    {"accuracy_ci": [0.85, 0.95]},
    {"ci": {"accuracy": {"low": 0.85, "high": 0.95}}},
    {"intervals": {"accuracy": {"lower": 0.85, "upper": 0.95}}},
])
def test_model_card_renders_confidence_intervals_calibration_and_subject_results_when_present(spelling):
    fold = {**FOLD, **spelling, "calibration": {"method": "temperature", "ece": 0.031},
            "subject_level": {"accuracy": 0.75, "subjects": 4}}
    metrics = {"protocol": "subject", "note": "n", "folds": [fold], "summary": {}}
    card = render_model_card(facts(metrics=metrics))
    assert "0.900 (0.850–0.950)" in card
    assert "### Calibration" in card and "ece: 0.031" in card and "temperature" in card
    assert "### Subject-level results" in card and "subjects: 4" in card
    assert "No confidence intervals" not in card


def test_model_card_without_metrics_or_weights_still_renders():
    card = render_model_card(facts(metrics=None, splits=[], data={}, weights_sha256=None))
    assert "No metrics are recorded" in card and "sha256" not in card
