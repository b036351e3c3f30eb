"""What the result tables show and how their numbers are written, for the terminal, Markdown and HTML alike."""

from __future__ import annotations

from dataclasses import dataclass

from ..metrics import METRICS

# Each metric: (long name for reports, short name for terminal columns).
METRIC_NAMES = {
    "accuracy": ("accuracy", "acc"), "precision": ("precision", "prec"), "recall": ("recall (sensitivity)", "recall"),
    "specificity": ("specificity", "spec"), "f1": ("F1", "F1"), "weighted_f1": ("weighted F1", "wF1"),
    "auc": ("ROC AUC", "AUC"),
}
SHORT_NAMES_LEGEND = ("acc accuracy, prec precision, recall sensitivity (ALL positive), spec specificity, "
                      "wF1 weighted F1; – undefined for that test set (e.g. specificity without HEM cells), "
                      "left out of the mean")


def number(value, digits: int = 3) -> str:
    """A table cell: `digits` decimals, or an en dash where there is no value."""
    return "–" if value is None else f"{value:.{digits}f}"


def count(value) -> str:
    return "–" if value is None else f"{int(value):,}"


@dataclass(frozen=True)
class Column:
    key: str
    header: str  # in reports
    short: str  # in the terminal
    digits: int | None = 3  # None: a whole count with thousands separators

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if isinstance(value, str):
            return value
        return count(value) if self.digits is None else number(value, self.digits)


# The comparison, in the column order of the paper's Table 8 (parameters, recall, precision, accuracy, F1), then
# what the paper did not report.
COMPARISON = [
    Column("model", "model", "model"),
    Column("trainable_parameters", "trainable parameters", "params", None),
    *(Column(m, METRIC_NAMES[m][0], METRIC_NAMES[m][1]) for m in
      ("recall", "precision", "accuracy", "f1", "specificity", "auc", "weighted_f1")),
    Column("training_seconds", "training time (s)", "time s", 0),
    Column("images_per_s", "images/s", "img/s", 1),
]
METRIC_COLUMNS = [Column(m, METRIC_NAMES[m][0], METRIC_NAMES[m][1]) for m in METRICS]
