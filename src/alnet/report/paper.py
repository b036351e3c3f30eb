"""The paper's published figures, in one place (Jawahar et al., Comput. Biol. Med. 2022). They are shown beside
ours, always labelled as the paper's, never mixed into our numbers.

The paper's protocol is an image-level 80/20 split of each fold (subjects on both sides); its parameter counts
for the baselines are those of the full ImageNet networks, not of a frozen backbone's trainable head.
"""

from __future__ import annotations

CITATION = ("Jawahar, H, Anbarasi, Gandomi (2022). ALNet: A Cluster Layer Deep Convolutional Neural Network for "
            "Acute Lymphoblastic Leukemia classification. Computers in Biology and Medicine. "
            "doi:10.1016/j.combiomed.2022.105894")

# Table 8, keyed by our model names: parameters, recall, precision, accuracy, F1 (two decimals, as published).
TABLE_8 = {
    "alexnet": {"paper_name": "AlexNet", "trainable_parameters": 62_378_344, "recall": 0.75, "precision": 0.83,
                "accuracy": 0.90, "f1": 0.78},
    "vgg16": {"paper_name": "VGG16", "trainable_parameters": 138_423_208, "recall": 0.61, "precision": 0.92,
              "accuracy": 0.88, "f1": 0.74},
    "googlenet": {"paper_name": "GoogleNet", "trainable_parameters": 6_414_360, "recall": 0.60, "precision": 0.89,
                  "accuracy": 0.87, "f1": 0.71},
    "resnet50": {"paper_name": "ResNet-50", "trainable_parameters": 25_636_712, "recall": 0.81, "precision": 0.78,
                 "accuracy": 0.89, "f1": 0.79},
    "alnet": {"paper_name": "ALNet", "trainable_parameters": 535_010, "recall": 0.98, "precision": 0.93,
              "accuracy": 0.91, "f1": 0.96},
}
TABLE_8_DIGITS = 2

# Table 9 (ALNet only): training and testing accuracy per fold, and their average.
TABLE_9 = {"alnet": {"fold_0": (0.9975, 0.9220), "fold_1": (0.9989, 0.9400), "fold_2": (0.9954, 0.8720),
                     "mean": (0.9973, 0.9113)}}

# ROC AUC reported for ALNet (§4): folds 0 and 1.
AUC = {"alnet": {"fold_0": 0.972, "fold_1": 0.979}}

# Table 10: other published work on C-NMC 2019 (accuracy).
TABLE_10 = [
    ("Shi et al.: 3×PNASNet-5 + vote", 0.879),
    ("Shah et al.: AlexNet + LSTM + DCT-LSTM", 0.866),
    ("Mondal et al.: ensemble of CNNs", 0.862),
]


def table8_row(model: str) -> dict | None:
    """The paper's Table 8 row for one of our models, None where the paper has none."""
    return TABLE_8.get(model)


def auc(model: str, fold: str) -> float | None:
    """The paper's ROC AUC of a fold, None where the paper gives none."""
    return AUC.get(model, {}).get(fold)


def table9_test_accuracy(model: str, fold: str) -> float | None:
    """The paper's Table 9 test accuracy of a fold (or `mean`), None where the paper gives none."""
    row = TABLE_9.get(model, {}).get(fold)
    return row[1] if row else None
