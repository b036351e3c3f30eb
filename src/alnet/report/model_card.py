"""The model card (`model_card.md`): what a trained model is for, what it was trained and tested on, how well it
did and what it cannot do, in the order of a published reporting checklist for medical-imaging AI.

The card follows CLAIM, the Checklist for Artificial Intelligence in Medical Imaging (Mongan, Moy & Kahn,
Radiology: Artificial Intelligence 2020, doi:10.1148/ryai.2020200029); each section names the CLAIM items it
answers. `render_model_card` is pure (facts in, Markdown out); `card_facts` and `write_model_card` are the edges
that read a run directory and write the file.

The trust entries of metrics.json (`intervals`: subject-bootstrap intervals of accuracy and AUC, `calibration`,
`subject_level`; `alnet.trust.test_set`) are rendered when present and skipped when not (older runs).
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import platform
from dataclasses import dataclass, field
from pathlib import Path

from ..labels import THRESHOLD
from ..schema import stored_text, write_text
from . import paper
from .tables import METRIC_NAMES, number

CHECKLIST = ("CLAIM, the Checklist for Artificial Intelligence in Medical Imaging (Mongan, Moy & Kahn, Radiology: "
             "Artificial Intelligence 2020, doi:10.1148/ryai.2020200029)")
DATASET_CITATION = ("Gupta, A., & Gupta, R. (2019). ALL Challenge dataset of ISBI 2019 (C-NMC 2019). The Cancer "
                    "Imaging Archive. doi:10.7937/tcia.2019.dc64i46r (CC BY 3.0)")
NOT_A_DEVICE = ("**This is a research tool, not a diagnostic device.** It has not been validated for clinical use "
                "and must not be used to diagnose, screen for or rule out leukemia in any person.")
SOFTWARE = ("alnet", "torch", "torchvision", "lightning", "torchmetrics", "numpy", "onnx", "onnxruntime")
SETTINGS = ("model", "protocol", "epochs", "batch_size", "optimizer", "lr", "dropout", "head", "image_size", "crop",
            "augment", "double_offline", "rotation", "zoom", "contrast", "bn_momentum", "val_fraction", "precision",
            "pretrained", "finetune", "seed", "deterministic", "synthetic", "synthetic_ratio")
METRIC_ORDER = ("accuracy", "precision", "recall", "specificity", "f1", "weighted_f1", "auc")
CALIBRATION_SCORES = (("ece", "ECE"), ("brier", "Brier"), ("nll", "NLL"))


@dataclass
class CardFacts:
    """Everything a model card says, gathered from a run directory (or a checkpoint alone)."""

    config: dict
    metrics: dict | None = None  # metrics.json
    splits: list[dict] = field(default_factory=list)  # splits.json
    data: dict = field(default_factory=dict)  # data.json
    weights_name: str | None = None
    weights_sha256: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    calibration: dict | None = None  # a checkpoint's `calibration` key, when it has one
    run_name: str | None = None


# --- pure rendering --------------------------------------------------------------------------------------------

def _text(value) -> str:
    """Free text from a run's files or a checkpoint (a calibration's `note`, `fitted_on`) as one plain markdown
    line: no line breaks or terminal escapes (`schema.stored_text`), no HTML, no link or image (`[` escaped);
    "" for what is not text."""
    text = html.escape(stored_text(value) or "", quote=False)
    return text.replace("[", "\\[").replace("]", "\\]")


def _value(value) -> str:
    """A value from a run's files as the card shows it; what is not a number or text (a file from elsewhere may
    hold anything) is shown by its type only."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**15 else "(a huge integer)"
    if isinstance(value, str):
        return _text(value)
    return f"({type(value).__name__})"


def _interval(entry: dict, metric: str) -> tuple[float, float] | None:
    """The bootstrap interval of `metric` in a metrics entry (`intervals[metric]`: low, high, confidence,
    resamples, unit); None if absent or undefined."""
    found = (entry.get("intervals") or {}).get(metric) if isinstance(entry.get("intervals"), dict) else None
    if not isinstance(found, dict):
        return None
    low, high = found.get("low"), found.get("high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return float(low), float(high)
    return None


def _interval_note(entries: list[tuple[str, dict]]) -> str:
    """How the intervals of these entries were obtained, from the first one that has any."""
    for _, entry in entries:
        for found in (entry.get("intervals") or {}).values():
            if isinstance(found, dict) and found.get("confidence"):
                return (f"Values in brackets are {found['confidence']:.0%} percentile bootstrap intervals "
                        f"({found.get('resamples', '?')} resamples of whole {found.get('unit', 'subject')}s, so "
                        "that cells of one patient stay together), as recorded in metrics.json.")
    return "Values in brackets are confidence intervals as recorded in metrics.json."


def _with_interval(entry: dict, metric: str) -> str:
    value = entry.get(metric)
    text = number(value) if isinstance(value, (int, float)) else "–"
    interval = _interval(entry, metric)
    return f"{text} ({number(interval[0])}–{number(interval[1])})" if interval else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def _short(value) -> str:
    if isinstance(value, list):
        shown = ", ".join(_value(v) for v in value[:12])
        return f"[{shown}{', …' if len(value) > 12 else ''}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in list(value.items())[:12]) + "}"
    return _value(value)


def _section(title: str, items: str) -> list[str]:
    return ["", f"## {title}", "", f"*CLAIM items {items}.*", ""]


def _intended_use(facts: CardFacts) -> list[str]:
    c = facts.config
    return [*_section("Intended use", "1, 3, 4, 39"),
            f"`{c['model']}` classifies one segmented white-blood-cell image of the C-NMC 2019 kind (a single cell "
            "on a black background, bright-field microscopy of stained blood smears) as **ALL** (leukemic "
            f"lymphoblast, label 1, the positive class) or **HEM** (normal cell, label 0). Its output is P(ALL); "
            f"the label is ALL when P(ALL) > {THRESHOLD}.",
            "",
            "Intended for research: reproducing and studying ALNet (Jawahar et al. 2022) and its baselines, "
            "comparing evaluation protocols, and method development on C-NMC 2019.",
            "",
            NOT_A_DEVICE,
            "",
            "Out of scope: whole slides or fields of view with several cells, other stains, microscopes or "
            "laboratories than the dataset's, other leukemias, and any decision about a patient."]


def _split_rows(facts: CardFacts) -> list[list[str]]:
    rows = []
    for split in facts.splits:
        for side in ("train", "val", "test"):
            part = split.get(side) or {}
            if part.get("images"):
                rows.append([split.get("name", "?"), side, f"{part['images']:,}", str(part.get("subjects", "–")),
                             str(part.get("all", "–")), str(part.get("hem", "–"))])
    return rows


def _data(facts: CardFacts) -> list[str]:
    c = facts.config
    lines = [*_section("Data", "7, 8, 9, 10, 12, 13, 14, 16, 20, 21, 33"),
             f"- **Source**: {DATASET_CITATION}. Single-cell images segmented from microscope images of blood "
             "smears, stain-normalised by the dataset's authors, one source (one institution and acquisition "
             "setup); the ground-truth labels (ALL or HEM per subject) are those published with the dataset.",
             "- **De-identification**: as published by the dataset's curators; subjects appear only as ids in "
             "file names.",
             f"- **Preprocessing**: decoded to RGB, centre crop of {c.get('crop', 1.0)} × the short side, resized "
             f"to {c.get('image_size')}×{c.get('image_size')} (bilinear, antialiased), scaled to [0, 1]; "
             "model-specific normalisation happens inside the model."]
    if facts.data:
        skipped = facts.data.get("skipped") or []
        lines.append(f"- **Images used**: {facts.data.get('images', '–')}; unreadable images skipped: "
                     f"{len(skipped)}" + (f" ({', '.join(Path(s).name for s in skipped[:5])}"
                                          f"{', …' if len(skipped) > 5 else ''})" if skipped else "") + ".")
    protocol = c.get("protocol")
    lines.append(f"- **Protocol**: `{protocol}` — " + (
        "each training fold on its own, split 80/20 at image level (the paper's protocol); its validation set is "
        "its test set, used for curves only." if protocol == "paper"
        else "leave one subject-disjoint fold out, validation subjects held out of training, then a final model "
             "tested on the preliminary test set's unseen subjects."))
    if facts.splits:
        shared = [s["name"] for s in facts.splits if not s.get("subject_disjoint")]
        lines.append("- **Subjects shared between training and test**: " + (
            f"**yes**, in {', '.join(shared)}: images of one patient sit on both sides, so test accuracy is "
            "image-level accuracy on patients the model has seen, not an estimate on new patients." if shared
            else "no; every split is subject-disjoint (checked when the run started)."))
        lines += ["", "Images and subjects per split:", "",
                  *_table(["split", "side", "images", "subjects", "ALL", "HEM"], _split_rows(facts))]
    return lines


def _model(facts: CardFacts) -> list[str]:
    from ..models import create_model_from, model_spec, trainable_parameters

    c = facts.config
    spec = model_spec(c["model"])
    try:  # the count does not depend on the weights: built without reading any
        from ..config import RunConfig

        parameters = f"{trainable_parameters(create_model_from(RunConfig(**c), pretrained=False)):,}"
    except Exception:  # a configuration this version cannot build: the card still says what it can
        parameters = "–"
    if not spec.pretrained:
        start = "the model's own initialisation (ALNet: Glorot-uniform kernels, zero biases, as Keras)."
    elif c.get("pretrained", True):
        start = "ImageNet weights for the backbone (torchvision)."
    else:
        start = "random: trained from scratch, not from ImageNet weights."
    frozen = spec.pretrained and not c.get("finetune")
    lines = [*_section("Model", "22, 23, 24"),
             f"- **Architecture**: `{c['model']}` — {spec.description}"
             + ("; backbone frozen" if frozen else "; backbone fine-tuned" if spec.pretrained else "")
             + f". Trainable parameters: {parameters}.",
             f"- **Input**: one RGB image, 3×{c.get('image_size')}×{c.get('image_size')}, values in [0, 1].",
             f"- **Output**: two logits (HEM, ALL) → P(ALL) by the `{c.get('head', 'sigmoid')}` head rule.",
             f"- **Initialisation**: {start}"]
    if facts.weights_sha256:
        lines.append(f"- **Weights**: `{_value(facts.weights_name).replace('`', '')}`, sha256 `{facts.weights_sha256}`")
    if facts.versions:
        lines.append("- **Software**: " + ", ".join(f"{k} {v}" for k, v in facts.versions.items()))
    return lines


def _training(facts: CardFacts) -> list[str]:
    c = facts.config
    rows = [[key, _short(c[key])] for key in SETTINGS if key in c]
    selection = ("the checkpoint with the lowest validation loss (`best.ckpt`), validation subjects held out of "
                 "training" if c.get("protocol") == "subject" else "the last epoch (`last.ckpt`), as the paper did")
    return [*_section("Training", "25, 26, 27"),
            f"Binary cross-entropy, {c.get('optimizer', 'rmsprop')} optimiser. Model selection: {selection}. "
            "No ensembling. Every setting is in the run's `config.yaml`.", "", *_generated(facts),
            *_table(["setting", "value"], rows)]


def _generated(facts: CardFacts) -> list[str]:
    """With --synthetic: how many generated cells joined each split's training side, from which GAN."""
    found = (facts.metrics or {}).get("synthetic")
    if not isinstance(found, dict):
        return []
    splits = [s for s in found.get("splits", []) if isinstance(s, dict)]
    rows = [[_short(s.get("split")), _short(s.get("gan_id")), _short(s.get("generated")),
             _short(s.get("real_training_cells")), _short(s.get("gan_resolution"))] for s in splits]
    return [f"**Generated cells** (a GAN per split, trained on that split's training subjects only; ratio "
            f"{_short(found.get('ratio'))}) joined the training side; validation, test, calibration and the input "
            "gate saw real cells only.", "",
            *_table(["split", "GAN", "generated cells", "real training cells", "GAN resolution (px)"], rows), ""]


def _metric_rows(entries: list[tuple[str, dict]]) -> list[list[str]]:
    return [[name, *(_with_interval(e, m) for m in METRIC_ORDER), str(e.get("images", "–"))] for name, e in entries]


def _results(facts: CardFacts) -> list[str]:
    lines = [*_section("Validation: evaluation and results", "28, 29, 31, 32, 35, 36, 37")]
    m = facts.metrics
    if not m:
        return lines + ["No metrics are recorded with this model (its run directory was not available)."]
    header = ["test set", *(METRIC_NAMES[k][0] for k in METRIC_ORDER), "images"]
    entries = [(f["fold"], f) for f in m.get("folds", [])]
    if m.get("prelim"):
        entries.append(("prelim (unseen subjects)", m["prelim"]))
    lines += [f"ALL is the positive class; threshold P(ALL) > {THRESHOLD}. Protocol `{m.get('protocol')}`: "
              f"{m.get('note', '')}.", "", *_table(header, _metric_rows(entries))]
    summary = m.get("summary") or {}
    if len(m.get("folds", [])) > 1 and summary:
        lines += ["", "Mean ± sample standard deviation over test folds: " + ", ".join(
            f"{METRIC_NAMES[k][0]} {number(summary[k]['mean'])} ± {number(summary[k]['std'])}"
            for k in METRIC_ORDER if isinstance(summary.get(k), dict))]
    has_interval = any(_interval(e, k) for _, e in entries for k in METRIC_ORDER)
    lines += ["", _interval_note(entries) if has_interval else
              "No confidence intervals are recorded for these metrics (CLAIM item 29 not met by this run); the "
              "spread over folds above is the only measure of uncertainty."]
    paper_row = paper.table8_row(facts.config["model"])
    if paper_row:
        lines += ["", f"The paper reports accuracy {paper_row['accuracy']:.2f}, recall {paper_row['recall']:.2f}, "
                      f"precision {paper_row['precision']:.2f}, F1 {paper_row['f1']:.2f} for this model (Table 8, "
                      "image-level split), shown for reference only."]
    lines += _subject_level(entries, summary) + _test_calibration(entries)
    lines += ["", "Per-image predictions are in `predictions.csv` and per-subject results in `subjects.csv` "
                  "(failure analysis: the misclassified rows); explanations: `alnet explain` (Grad-CAM). No "
                  "robustness analysis and no external test set (data from another source) were run."]
    return lines


def _between(entry: dict, value: str, interval: str) -> str:
    found = entry.get(interval) or {}
    text = number(entry[value]) if isinstance(entry.get(value), (int, float)) else "–"
    if isinstance(found.get("low"), (int, float)) and isinstance(found.get("high"), (int, float)):
        text += f" ({number(found['low'])}–{number(found['high'])})"
    return text


def _subject_level(entries: list[tuple[str, dict]], summary: dict) -> list[str]:
    """Per test set: the subjects, AUC of their mean P(ALL) and accuracy of their call, with intervals."""
    found = [(name, e["subject_level"]) for name, e in entries if isinstance(e.get("subject_level"), dict)]
    if not found:
        return []
    rows = [[name, str(level.get("subjects", "–")), _between(level, "auc", "auc_interval"),
             _between(level, "accuracy", "accuracy_interval")] for name, level in found]
    rule = found[0][1].get("rule")
    lines = ["", "### Subject-level results", "", (f"{rule[0].upper()}{rule[1:]}; " if rule else "")
             + "values in brackets bootstrap the subjects.", "", *_table(["test set", "subjects", "AUC", "accuracy"],
                                                                          rows)]
    overall = summary.get("subject_level") or {}
    if len(found) > 1 and all(isinstance(overall.get(k), dict) for k in ("auc", "accuracy")):
        lines += ["", f"Mean ± sample standard deviation over test folds: AUC {number(overall['auc']['mean'])} ± "
                      f"{number(overall['auc']['std'])}, accuracy {number(overall['accuracy']['mean'])} ± "
                      f"{number(overall['accuracy']['std'])}."]
    return lines


def _test_calibration(entries: list[tuple[str, dict]]) -> list[str]:
    """Per test set: the calibration applied and its scores on the test cells before → after."""
    found = [(name, e["calibration"]) for name, e in entries if isinstance(e.get("calibration"), dict)]
    if not found:
        return []
    rows = []
    for name, c in found:
        before, after = c.get("before") or {}, c.get("after") or {}
        scores = [f"{number(before[k])} → {number(after[k])}" if after else number(before.get(k))
                  for k, _ in CALIBRATION_SCORES]
        note = _text(c.get("note"))
        method = (f"temperature, T = {_value(c.get('temperature'))}" + (f" ({note})" if note else "")
                  if c.get("method") == "temperature" else note or _text(c.get("method")))
        rows.append([name, method, *scores])
    return ["", "### Calibration", "",
            "Scores of P(ALL) on the test cells, the network's own → calibrated (lower is better); the temperature "
            "was fitted on validation subjects only.", "",
            *_table(["test set", "calibration", *(title for _, title in CALIBRATION_SCORES)], rows)]


def _calibration(facts: CardFacts) -> list[str]:
    """The checkpoint's own calibration (its `calibration` key), applied to every P(ALL) it gives."""
    c = facts.calibration
    if not c or c.get("temperature") is None:
        return []
    fitted_on, note = _text(c.get("fitted_on")), _text(c.get("note"))
    lines = [*_section("Calibration of the output", "28, 36"),
             f"The model's P(ALL) is temperature-scaled, σ(logit(P(ALL)) / T) with T = {_value(c['temperature'])}"
             + (f", fitted on {fitted_on}" if fitted_on else "") + (f" ({note})" if note else "") + "."]
    if isinstance(c.get("validation_nll_before"), (int, float)) and isinstance(c.get("validation_nll_after"),
                                                                               (int, float)):
        lines[-1] += (f" Validation negative log-likelihood {number(c['validation_nll_before'])} → "
                      f"{number(c['validation_nll_after'])}.")
    return lines


def _limitations(facts: CardFacts) -> list[str]:
    lines = [*_section("Known limitations", "37, 38"),
             "- **Single-source data**: every image comes from one dataset (one laboratory, staining and "
             "acquisition); performance on other sources is unknown and likely lower.",
             "- **Segmented single cells only**: the model never saw whole smears, debris, overlapping cells or "
             "non-cell images; it gives an answer for any input.",
             "- **The paper's protocol leaks subjects**: its image-level split puts images of one patient in "
             "training and test, which overstates performance on new patients; only subject-disjoint results "
             "(the `subject` protocol, the preliminary test set) estimate it."
             + (" **This model was evaluated under that protocol.**" if facts.config.get("protocol") == "paper"
                else ""),
             "- **Few subjects**: C-NMC's training folds hold 73 subjects; estimates per fold are noisy.",
             "- **Class balance**: about two ALL cells per HEM cell; precision and F1 depend on this prevalence.",
             "- No demographic or clinical information is available, so no subgroup analysis is possible."]
    return lines


def _availability(facts: CardFacts) -> list[str]:
    return [*_section("Citation and availability", "41, 42"),
            f"- Method: {paper.CITATION}",
            f"- Data: {DATASET_CITATION}",
            "- Code: the alnet package; this card was written by it from the run's own files.",
            "- No funding or study registration applies to this model."]


def render_model_card(facts: CardFacts) -> str:
    """The model card as Markdown, from facts alone (no files, no clock)."""
    c = facts.config
    title = f"# Model card: {_value(c['model'])}" + (f" ({_value(facts.run_name)})" if facts.run_name else "")
    lines = [title, "",
             f"Reporting follows {CHECKLIST}; each section names the items it answers. "
             "Item 5: a retrospective use of a public dataset. Items 18 (inter-rater variability) and 19 "
             "(sample-size calculation) are not addressed by the dataset or this run.", "",
             NOT_A_DEVICE]
    for part in (_intended_use, _data, _model, _training, _results, _calibration, _limitations, _availability):
        lines += part(facts)
    return "\n".join(lines).rstrip() + "\n"


# --- edges: gathering facts, writing the file ------------------------------------------------------------------

def sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def card_facts(run, weights: Path | None = None, calibration: dict | None = None) -> CardFacts:
    """Facts from a run directory (`train.rundir.RunDir`); `weights` defaults to the run's final checkpoint."""
    from ..config import read_yaml

    weights = weights or run.final_checkpoint()
    return CardFacts(
        config=read_yaml(run.config),
        metrics=run.read_json(run.metrics) if run.metrics.is_file() else None,
        splits=run.read_json(run.splits) if run.splits.is_file() else [],
        data=run.read_json(run.data) if run.data.is_file() else {},
        weights_name=f"{weights.parent.name}/{weights.name}" if weights and weights.is_file() else None,
        weights_sha256=sha256_of(weights) if weights and weights.is_file() else None,
        versions=software_versions(), calibration=calibration, run_name=run.path.name)


def checkpoint_card(checkpoint: Path, config: dict, run=None, calibration: dict | None = None) -> str:
    """The card of one checkpoint (for a package): from its run directory when it has one, else from the
    checkpoint's own configuration."""
    checkpoint = Path(checkpoint)
    if run is None or not run.exists():
        return render_model_card(CardFacts(config=config, weights_name=checkpoint.name,
                                           weights_sha256=sha256_of(checkpoint), versions=software_versions(),
                                           calibration=calibration))
    try:
        return render_model_card(card_facts(run, weights=checkpoint, calibration=calibration))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as err:
        # A run directory from elsewhere, or edited by hand: its files are not as alnet writes them.
        raise ValueError(f"{run.path}: its metrics.json, splits.json or data.json is not as alnet writes them "
                         f"({type(err).__name__}); pass the checkpoint file itself, without its run") from None


def write_model_card(run) -> Path:
    """RUN/model_card.md from the run's files."""
    write_text(run.model_card, render_model_card(card_facts(run)))
    return run.model_card
