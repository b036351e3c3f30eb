"""One self-contained `report.html` per run and per comparison: figures embedded, no network, readable offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..metrics import METRICS

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2rem auto;padding:0 1rem;
color:#1d2330;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #d5d9e3;padding:.25rem .55rem;
text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f1f3f8}tr.strong td{font-weight:600}
tr.paper td{color:#6a4b00;background:#fff8e6}.note{padding:.6rem .8rem;border-radius:6px;background:#eef4ff;
border:1px solid #c9d8f5}.warn{background:#fff4e5;border-color:#f3c98b}.figs{display:flex;flex-wrap:wrap;gap:12px}
.figs img{max-width:100%;height:auto;border:1px solid #e3e6ee;border-radius:4px}.small{color:#5b6475;font-size:.85rem}
"""

NAMES = {"accuracy": "accuracy", "precision": "precision", "recall": "recall (sensitivity)",
         "specificity": "specificity", "f1": "F1", "weighted_f1": "weighted F1", "auc": "ROC AUC"}

# What the paper reports for ALNet (Jawahar et al. 2022, Tables 7 and 9, §4): image-level split per fold.
PAPER_ALNET = {"fold_accuracy": {"fold_0": 0.9220, "fold_1": 0.9400, "fold_2": 0.8720}, "mean_accuracy": 0.9113,
               "auc": {"fold_0": 0.972, "fold_1": 0.979}, "trainable_parameters": 535_010}


def paper_fold_accuracy(fold: str) -> float | None:
    """The paper's Table 9 test accuracy of a fold (or of their mean)."""
    return PAPER_ALNET["mean_accuracy"] if fold == "mean" else PAPER_ALNET["fold_accuracy"].get(fold)


def _esc(value) -> str:
    return html.escape(str(value))


def number(value, digits: int = 3) -> str:
    """A table cell: `digits` decimals, or an en dash where there is no value."""
    return "–" if value is None else f"{value:.{digits}f}"


def _image(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}"{size}>'


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """rows: (css class, cells)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" for cls, cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{_esc(title)}</title><style>{STYLE}</style>'
            f"</head><body>{body}</body></html>")


def metrics_table(result: dict) -> str:
    header = ["test set", *(NAMES[m] for m in METRICS), "images"]
    rows = [("", [_esc(f["fold"]), *(number(f[m]) for m in METRICS), str(f["images"])]) for f in result["folds"]]
    if len(result["folds"]) > 1:
        s = result["summary"]
        rows.append(("strong", ["mean ± std", *(f"{number(s[m]['mean'])} ± {number(s[m]['std'])}" for m in METRICS),
                                ""]))
    if result.get("prelim"):
        p = result["prelim"]
        rows.append(("strong", ["preliminary test set (unseen subjects)", *(number(p[m]) for m in METRICS),
                                str(p["images"])]))
    return _table(header, rows)


def _protocol_note(result: dict) -> str:
    warn = result.get("protocol") == "paper"
    text = _esc(result.get("note", ""))
    if warn:
        text = (f"<b>{text}.</b> This reproduces the paper's protocol; its accuracy is not an estimate of "
                "performance on new patients (use the subject protocol for that).")
    return f'<p class="note{" warn" if warn else ""}">protocol <b>{_esc(result.get("protocol"))}</b>: {text}</p>'


def write_run_report(run_dir: Path, result: dict, config: dict) -> Path:
    run_dir = Path(run_dir)
    figures = run_dir / "figures"
    body = [f"<h1>{_esc(config.get('model', 'alnet'))} — {_esc(result['protocol'])} protocol</h1>",
            f'<p class="small">{_esc(run_dir.resolve())}</p>', _protocol_note(result)]
    if config.get("model") != "alnet" and not config.get("pretrained", True):
        body.append('<p class="note warn">This baseline was trained <b>from scratch</b> (--no-pretrained), not '
                    "from ImageNet weights as in the paper.</p>")
    body += ["<h2>Metrics</h2>", metrics_table(result),
             '<p class="small">ALL is the positive class. Mean ± sample standard deviation over test folds.</p>']
    pooled = [p for p in (figures / "roc.png", figures / "confusion_pooled.png") if p.is_file()]
    if pooled:
        body += ["<h2>ROC and pooled confusion matrix</h2>",
                 '<div class="figs">' + "".join(_image(p, p.stem, 460) for p in pooled) + "</div>"]
    for fold in [f["fold"] for f in result["folds"]] + (["prelim"] if result.get("prelim") else []):
        pictures = [p for p in (figures / f"curves_{fold}.png", figures / f"confusion_{fold}.png") if p.is_file()]
        if pictures:
            body += [f"<h2>{_esc(fold)}</h2>", '<div class="figs">' +
                     "".join(_image(p, p.stem, 640 if p.stem.startswith("curves") else 300) for p in pictures)
                     + "</div>"]
    body += ["<h2>Configuration</h2>", _table(["setting", "value"],
                                              [("", [_esc(k), _esc(v)]) for k, v in config.items()])]
    path = run_dir / "report.html"
    path.write_text(_page(f"alnet run {run_dir.name}", "".join(body)))
    return path


def write_comparison_report(out: Path, rows: list[dict], table9: list[dict], protocol: str, note: str) -> Path:
    out = Path(out)
    header = ["model", "trainable parameters", "recall", "precision", "accuracy", "F1", "specificity", "ROC AUC",
              "weighted F1", "training time (s)", "images/s"]
    body_rows = []
    for r in rows:
        body_rows.append(("", [_esc(r["model"]), f"{r['trainable_parameters']:,}", number(r["recall"]),
                               number(r["precision"]), number(r["accuracy"]), number(r["f1"]), number(r["specificity"]),
                               number(r["auc"]), number(r["weighted_f1"]), number(r["training_seconds"], 0),
                               number(r["images_per_s"], 1)]))
        if r["model"] == "alnet":
            body_rows.append(("paper", ["ALNet — paper (image-level split)", f"{PAPER_ALNET['trainable_parameters']:,}",
                                        "–", "–", number(PAPER_ALNET["mean_accuracy"]), "–", "–", "–", "–", "–", "–"]))
    body = [f"<h1>Model comparison — {_esc(protocol)} protocol</h1>",
            _protocol_note({"protocol": protocol, "note": note}),
            "<h2>Table 8 (shape of the paper's): metrics as mean over test folds</h2>", _table(header, body_rows),
            '<p class="small">Rows marked paper are the published figures, shown for reference; the baselines\' '
            "published values are not reproduced here. Training time is wall time for all folds; images/s is "
            "training images processed per second of it.</p>"]
    if table9:
        t9 = [("", [_esc(r["fold"]), number(r["train_accuracy"]), number(r["test_accuracy"]),
                    number(paper_fold_accuracy(r["fold"]))]) for r in table9]
        body += ["<h2>Table 9 (shape of the paper's): ALNet accuracy per fold</h2>",
                 _table(["fold", "train accuracy", "test accuracy", "paper test accuracy"], t9)]
    for r in rows:
        roc = out / r["model"] / "figures" / "roc.png"
        if roc.is_file():
            body += [f"<h2>{_esc(r['model'])}: ROC</h2>", _image(roc, f"{r['model']} ROC", 420)]
    path = out / "report.html"
    path.write_text(_page("alnet model comparison", "".join(body)))
    return path

