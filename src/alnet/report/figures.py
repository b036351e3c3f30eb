"""Per-run figures: loss/accuracy curves, confusion matrices and ROC curves, per fold and pooled."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .. import metrics as M  # noqa: E402
from ..labels import ALL, HEM, NAMES, is_all  # noqa: E402
from ..schema import write_atomically  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A PNG as every file alnet writes into a run: beside its place, then renamed into it (never through a link)."""
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=dpi, format="png"))


def plot_history(history: list[dict], path: Path, title: str) -> None:
    epochs = [int(h["epoch"]) for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for side, style in (("train", "-"), ("val", "--")):
            values = [float(h[f"{side}_{name}"]) for h in history]
            if not all(np.isnan(values)):
                ax.plot(epochs, values, style, marker="o", markersize=3, label=side)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_confusion(confusion: dict, path: Path, title: str) -> None:
    # Rows: true class, columns: predicted class; ALL first as the positive class.
    matrix = np.array([[confusion["tp"], confusion["fn"]], [confusion["fp"], confusion["tn"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black", fontsize=13)
    ax.set_xticks([0, 1], [NAMES[ALL], NAMES[HEM]])
    ax.set_yticks([0, 1], [NAMES[ALL], NAMES[HEM]])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, (labels, probs) in curves.items():
        if len(set(labels.tolist())) < 2:
            continue
        fpr, tpr, _ = M.roc_curve(labels, probs)
        ax.plot(fpr, tpr, label=f"{name} (AUC {M.roc_auc(labels, probs):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_run_figures(out: Path, predictions: dict[str, list[dict]], history: list[dict]) -> list[Path]:
    if out.is_symlink():  # a run directory from elsewhere: its figures/ would lead the writes out of it
        raise ValueError(f"{out}: a link, not the run's own folder; remove it and resume the run again")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    curves = {}
    for fold, rows in predictions.items():
        labels, probs = M.columns(rows)
        curves[fold] = (labels, probs)
        fold_history = [h for h in history if h["fold"] == fold]
        if fold_history:
            plot_history(fold_history, out / f"curves_{fold}.png", f"{fold}: loss and accuracy per epoch")
            written.append(out / f"curves_{fold}.png")
        plot_confusion(M.confusion(labels, is_all(probs)), out / f"confusion_{fold}.png", fold)
        written.append(out / f"confusion_{fold}.png")
    folds = {k: v for k, v in curves.items() if k != "prelim"}
    if folds:
        pooled = (np.concatenate([v[0] for v in folds.values()]), np.concatenate([v[1] for v in folds.values()]))
        plot_confusion(M.confusion(pooled[0], is_all(pooled[1])), out / "confusion_pooled.png", "test folds pooled")
        curves_with_pooled = {**curves, "pooled folds": pooled}
        written.append(out / "confusion_pooled.png")
    else:
        curves_with_pooled = curves
    plot_roc(curves_with_pooled, out / "roc.png", "ROC per test set")
    written.append(out / "roc.png")
    from .trust import write_trust_figures

    written += write_trust_figures(out, predictions)  # reliability, subjects, risk–coverage
    return written
