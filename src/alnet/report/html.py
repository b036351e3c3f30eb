"""One self-contained `report.html` per run and per comparison: figures embedded, no network, readable offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..models import model_spec
from ..schema import write_text
from . import paper
from .tables import COMPARISON, METRIC_COLUMNS, number

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

def _esc(value) -> str:
    return html.escape(str(value))


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
    header = ["test set", *(c.header for c in METRIC_COLUMNS), "images"]
    rows = [("", [_esc(f["fold"]), *(c.cell(f) for c in METRIC_COLUMNS), str(f["images"])]) for f in result["folds"]]
    if len(result["folds"]) > 1:
        s = result["summary"]
        rows.append(("strong", ["mean ± std", *(f"{number(s[c.key]['mean'])} ± {number(s[c.key]['std'])}"
                                                for c in METRIC_COLUMNS), ""]))
    if result.get("prelim"):
        rows.append(("strong", ["preliminary test set (unseen subjects)", *(c.cell(result["prelim"])
                                                                            for c in METRIC_COLUMNS),
                                str(result["prelim"]["images"])]))
    return _table(header, rows)


def _protocol_note(result: dict) -> str:
    warn = result.get("protocol") == "paper"
    text = _esc(result.get("note", ""))
    if warn:
        text = (f"<b>{text}.</b> This reproduces the paper's protocol; its accuracy is not an estimate of "
                "performance on new patients (use the subject protocol for that).")
    return f'<p class="note{" warn" if warn else ""}">protocol <b>{_esc(result.get("protocol"))}</b>: {text}</p>'


def trust_section(result: dict, figures: Path) -> list[str]:
    """Calibration, the subject-level view and review: a table per test set and the three figures."""
    from .trust import FIGURES, trust_table, uncalibrated_note

    header, rows = trust_table(result)
    if not rows:
        return []
    body = ["<h2>Calibration, subject-level view and review</h2>", _table(header, [("", r) for r in rows]),
            '<p class="small">Temperature fitted on each split\'s validation subjects (never its test subjects); '
            "ECE with 15 equal-width bins. Subject-level: a subject's score is the mean calibrated P(ALL) of its "
            "cells. Intervals: 1,000 bootstrap resamples of subjects, not cells. Review: cells within the band "
            "around the threshold are flagged (chosen on validation cells to answer 90% of them).</p>"]
    note = uncalibrated_note(result)
    if note:
        body.append(f'<p class="note warn">{_esc(note)}.</p>')
    titles = {"reliability.png": "Reliability diagram before and after calibration",
              "subjects.png": "One row per subject: its cells' calibrated P(ALL), coloured by true label",
              "risk_coverage.png": "Risk–coverage curve"}
    for name in FIGURES:
        if (figures / name).is_file():
            body += [f"<h3>{titles[name]}</h3>", _image(figures / name, titles[name], 640)]
    return body


def write_run_report(run, result: dict, config: dict) -> Path:
    """report.html of a run directory (`train.rundir.RunDir`), from its metrics and figures."""
    figures = run.figures
    body = [f"<h1>{_esc(config['model'])} — {_esc(result['protocol'])} protocol</h1>",
            f'<p class="small">{_esc(run.path.resolve())}</p>', _protocol_note(result)]
    if run.model_card.is_file():  # a relative link: the page and the card travel together
        body.append(f'<p>Model card (intended use, data, limitations): <a href="{run.model_card.name}">'
                    f"{run.model_card.name}</a>. A research tool, not a diagnostic device.</p>")
    if model_spec(config["model"]).pretrained and not config.get("pretrained", True):
        body.append('<p class="note warn">This baseline was trained <b>from scratch</b> (--no-pretrained), not '
                    "from ImageNet weights as in the paper.</p>")
    body += _generated_section(result)
    body += ["<h2>Metrics</h2>", metrics_table(result),
             '<p class="small">ALL is the positive class. Mean ± sample standard deviation over test folds.</p>']
    body += trust_section(result, figures)
    splits = [f["fold"] for f in result["folds"]] + (["prelim"] if result.get("prelim") else [])
    body += _classifier_section(run, splits)
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
    write_text(run.report, _page(f"alnet run {run.path.name}", "".join(body)))
    return run.report


def _generated_section(result: dict) -> list[str]:
    """With --synthetic: what joined each training side, and each GAN's cells beside real ones."""
    found = result.get("synthetic")
    if not found:
        return []
    body = ["<h2>Generated cells</h2>",
            f'<p class="note">Each split\'s training side got generated cells (ratio {_esc(found["ratio"])}) from a '
            "GAN trained on that split's training subjects only; validation, test, calibration and the input gate "
            "saw real cells only.</p>",
            _table(["split", "GAN", "generated", "real training cells"],
                   [("", [_esc(s["split"]), _esc(s["gan_id"]), str(s["generated"]), str(s["real_training_cells"])])
                    for s in found["splits"]])]
    for split in found["splits"]:
        grid = Path(split["gan"]) / "samples.png"
        if grid.is_file() and not grid.is_symlink() and grid.stat().st_size < 16 * 2**20:
            body += [f"<h3>{_esc(split['split'])}: generated and real cells</h3>", _image(grid, "samples", 900)]
    return body


def _classifier_section(run, folds: list[str]) -> list[str]:
    """A hybrid's chosen hyper-parameters per fold, how they were chosen and the seconds it took."""
    chosen = [run.read_json(run.fold_classifier(f)) for f in folds if run.fold_classifier(f).is_file()]
    if not chosen:
        return []
    rows = [("", [_esc(c["fold"]), _esc(", ".join(f"{k.split('__')[-1]}={v}" for k, v in c["parameters"].items())),
                  _esc(c["chosen_by"]), f"{c['feature_seconds']:.1f}", f"{c['fit_seconds']:.1f}"]) for c in chosen]
    return ["<h2>Classifier</h2>", _table(["fold", "chosen", "chosen by", "features (s)", "fit (s)"], rows)]


def paper_row(model: str) -> dict | None:
    """The paper's Table 8 row for `model`, as table cells (its own two decimals), or None."""
    published = paper.table8_row(model)
    if published is None:
        return None
    return {"model": f"{published['paper_name']} — paper, Table 8 (image-level split)",
            "trainable_parameters": published["trainable_parameters"],
            **{k: number(published[k], paper.TABLE_8_DIGITS) for k in ("recall", "precision", "accuracy", "f1")}}


def comparison_rows(rows: list[dict]) -> list[tuple[str, dict]]:
    """(css class, row) for each of our models, each followed by the paper's row for it where there is one."""
    out = []
    for row in rows:
        out.append(("", row))
        published = paper_row(row["model"])
        if published is not None:
            out.append(("paper", published))
    return out


def write_comparison_report(comparison, rows: list[dict], table9: list[dict], protocol: str, note: str) -> Path:
    """report.html of a comparison folder (`train.rundir.ComparisonDir`)."""
    body_rows = [(cls, [_esc(c.cell(row)) for c in COMPARISON]) for cls, row in comparison_rows(rows)]
    body = [f"<h1>Model comparison — {_esc(protocol)} protocol</h1>",
            _protocol_note({"protocol": protocol, "note": note}),
            "<h2>Table 8 (shape of the paper's): metrics as mean over test folds</h2>",
            _table([c.header for c in COMPARISON], body_rows),
            '<p class="small">Rows marked paper are the published figures of the paper\'s Table 8 (its image-level '
            "split; its parameter counts are the full ImageNet networks), shown for reference and never mixed "
            "with ours. Training time is wall time for all folds; images/s is training images processed per "
            "second of it.</p>"]
    if table9:
        t9 = [("", [_esc(r["model"]), _esc(r["fold"]), number(r["train_accuracy"]), number(r["test_accuracy"]),
                    number(paper.table9_test_accuracy(r["model"], r["fold"]), 4),
                    number(paper.auc(r["model"], r["fold"]))]) for r in table9]
        body += ["<h2>Table 9 (shape of the paper's): accuracy per fold</h2>",
                 _table(["model", "fold", "train accuracy", "test accuracy", "paper test accuracy", "paper AUC"], t9)]
    body += ["<h2>Published results on C-NMC 2019 (the paper's Table 10)</h2>",
             _table(["work", "accuracy"], [("paper", [_esc(work), number(acc)]) for work, acc in paper.TABLE_10]),
             f'<p class="small">Paper: {_esc(paper.CITATION)}</p>']
    for r in rows:
        roc = comparison.run(r["model"]).figures / "roc.png"
        if roc.is_file():
            body += [f"<h2>{_esc(r['model'])}: ROC</h2>", _image(roc, f"{r['model']} ROC", 420)]
    write_text(comparison.report, _page("alnet model comparison", "".join(body)))
    return comparison.report
