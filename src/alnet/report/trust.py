"""The report's view of trust: reliability diagrams (before/after calibration), one row per subject with its
cells' probabilities, risk–coverage curves, and the table of calibration, subject-level and review figures."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .. import metrics as M  # noqa: E402
from ..labels import ALL, HEM, NAMES, THRESHOLD  # noqa: E402
from ..trust.calibration import reliability  # noqa: E402
from ..trust.review import risk_coverage  # noqa: E402
from ..trust.test_set import raw_probabilities  # noqa: E402
from .figures import save_figure  # noqa: E402
from .tables import number  # noqa: E402

COLOURS = {ALL: "#c0392b", HEM: "#2e6fb7"}
FIGURES = ("reliability.png", "subjects.png", "risk_coverage.png")


def plot_reliability(sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path) -> None:
    """sets: name → (labels, raw P(ALL), calibrated P(ALL)). Two panels: before and after calibration."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, (title, which) in zip(axes, (("before calibration (raw)", 1), ("after calibration", 2))):
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
        for name, values in sets.items():
            mean_p, share, counts = reliability(values[0], values[which])
            ax.plot(mean_p, share, marker="o", markersize=3, label=name)
        ax.set_xlabel("mean P(ALL) in bin (15 equal-width bins)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of ALL cells")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_subjects(sets: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], path: Path) -> None:
    """One row per (test set, subject): its cells' calibrated P(ALL) as points, coloured by the true label,
    with the subject's mean as a bar."""
    rows = []
    for name, (labels, prob, subjects) in sets.items():
        for subject in sorted(set(subjects)):
            idx = [i for i, s in enumerate(subjects) if s == subject]
            rows.append((f"{name} · {subject}" if len(sets) > 1 else subject, int(labels[idx[0]]), prob[idx]))
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(rows) + 1)))
    rng = np.random.default_rng(0)  # vertical jitter only, so that overlapping cells stay visible
    for y, (_, label, values) in enumerate(rows):
        ax.scatter(values, y + rng.uniform(-0.18, 0.18, len(values)), s=9, color=COLOURS[label], alpha=0.6)
        ax.plot([values.mean()] * 2, [y - 0.35, y + 0.35], color="black", linewidth=1.5)
    ax.axvline(THRESHOLD, color="grey", linestyle=":")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_ylim(-1, len(rows))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("calibrated P(ALL) per cell (black bar: the subject's mean)")
    for label in (ALL, HEM):
        ax.scatter([], [], color=COLOURS[label], label=f"true {NAMES[label]}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_risk_coverage(sets: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: Path) -> None:
    """sets: name → (labels, calibrated P(ALL), coverage at the review band or None)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (labels, prob, at_band) in sets.items():
        coverage, risk = risk_coverage(labels, prob)
        line, = ax.plot(coverage, risk, label=name)
        if at_band is not None and len(coverage):
            k = max(int(round(at_band * len(coverage))) - 1, 0)
            ax.plot([coverage[k]], [risk[k]], "o", color=line.get_color())
    ax.set_xlabel("coverage (share of cells answered without review)")
    ax.set_ylabel("error rate among answered cells")
    ax.set_title("risk–coverage (dot: the review band)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _coverage_at_band(rows: list[dict]) -> float | None:
    """The share of a test set's cells answered without review (None for rows written without a status)."""
    if not rows or "status" not in rows[0] or not rows[0]["status"]:
        return None
    return float(np.mean([r["status"] != "review" for r in rows]))


def write_trust_figures(out: Path, predictions: dict[str, list[dict]]) -> list[Path]:
    """The three trust figures of a run (reliability, subjects, risk–coverage), from its prediction rows."""
    labelled = {name: rows for name, rows in predictions.items() if rows}
    if not labelled:
        return []
    coverage = {name: _coverage_at_band(rows) for name, rows in labelled.items()}
    columns = {name: M.columns(rows) for name, rows in labelled.items()}
    plot_reliability({n: (columns[n][0], raw_probabilities(r), columns[n][1]) for n, r in labelled.items()},
                     out / FIGURES[0])
    plot_subjects({n: (*columns[n], [row["subject"] for row in r]) for n, r in labelled.items()}, out / FIGURES[1])
    plot_risk_coverage({n: (*columns[n], coverage.get(n)) for n in labelled}, out / FIGURES[2])
    return [out / name for name in FIGURES]


def _interval(entry: dict) -> str:
    return f"[{number(entry['low'])}, {number(entry['high'])}]"


def trust_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (escaped HTML cells): per test set its calibration, subject-level and review figures."""
    header = ["test set", "temperature", "ECE before → after", "Brier before → after", "NLL before → after",
              "image AUC [95% CI]", "subjects", "subject AUC [95% CI]", "subject accuracy [95% CI]",
              "review band", "coverage", "error answered / all"]
    rows = []
    for entry in result["folds"] + ([result["prelim"]] if result.get("prelim") else []):
        if "calibration" not in entry:
            continue
        c, s, r = entry["calibration"], entry["subject_level"], entry["review"]
        after = c.get("after") or {}

        def pair(key):
            return f"{number(c['before'][key])} → {number(after.get(key)) if after else '–'}"

        width = r.get("half_width")
        rows.append([html.escape(str(entry["fold"])), number(c.get("temperature")) if c.get("temperature") else "none",
                     pair("ece"), pair("brier"), pair("nll"),
                     f"{number(entry['auc'])} {_interval(entry['intervals']['auc'])}", str(s["subjects"]),
                     f"{number(s['auc'])} {_interval(s['auc_interval'])}",
                     f"{number(s['accuracy'])} {_interval(s['accuracy_interval'])}",
                     f"{THRESHOLD} ± {number(width)}" if width is not None else "none", number(r["coverage"]),
                     f"{number(r['error_answered'])} / {number(r['error_all'])}"])
    return header, rows


def uncalibrated_note(result: dict) -> str | None:
    """Why a run's probabilities are not calibrated, when they are not."""
    notes = {e["calibration"].get("note") for e in result["folds"] + ([result["prelim"]] if result.get("prelim")
                                                                       else [])
             if "calibration" in e and e["calibration"]["method"] == "none"}
    return "; ".join(sorted(n for n in notes if n)) or None
