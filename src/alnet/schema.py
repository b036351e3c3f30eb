"""What each file alnet writes holds, in one place: the columns of every CSV, the entries a checkpoint carries
beyond its weights, and the metadata of an exported ONNX model (docs/design.md, "File schemas").

A column name means one thing in every file: `label` is always the true class (empty where it is not known),
`predicted` the model's call, `probability_all` the calibrated P(ALL), `status` one of `labels.Status`. Each file
is checked once, where it is read; a file a user hands in may be hostile, so every check names the file and the
fix in one line.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .labels import NAMES, Status, label_of


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as the design document's tables say it: text, integer, number, class, status
    meaning: str


def _columns(table: str) -> tuple[Column, ...]:
    """A table of `name  type  meaning` lines (two spaces or more between the first three fields)."""
    return tuple(Column(*re.split(r"\s{2,}", line.strip(), maxsplit=2)) for line in table.strip().splitlines())


def _names(columns: tuple[Column, ...]) -> list[str]:
    return [c.name for c in columns]


def markdown_table(columns: tuple[Column, ...]) -> str:
    """A file's columns as the design document shows them (a test checks that it does)."""
    return "\n".join(["| column | type | meaning |", "|---|---|---|",
                      *(f"| `{c.name}` | {c.type} | {c.meaning} |" for c in columns)])


# predictions.csv: a run's test cells (`fold`, `subject`, `label` known; refused cells keep their P(ALL), since the
# metrics count every cell) and `alnet predict`'s pictures (`model`, `checkpoint`, `note`; a refused picture has
# no call and no P(ALL)). Same columns, same meaning.
PREDICTIONS = _columns("""
fold             text    the test set (run) — empty for `alnet predict`
path             text    the image file
subject          text    the patient (C-NMC name, or `--subjects`); empty when not known
label            class   the true class, ALL or HEM; empty when not known
predicted        class   the model's call, ALL when probability_all > 0.5; empty when refused (predict)
probability_all  number  P(ALL), calibrated with the model's temperature when it has one
probability_raw  number  the network's own P(ALL)
status           status  ok, review (the call is given, look at it) or rejected (the input gate refused it)
reason           text    why review or rejected, in words; empty when ok
model            text    the model's name (`alnet (int8)` for the int8 form)
checkpoint       text    the checkpoint or ONNX file that answered
note             text    what had to be done to the image (e.g. resized from 600x600)
""")
PREDICTION_FIELDS = _names(PREDICTIONS)
# Headers of `alnet predict` CSVs written by earlier versions: still recognised as ours, so --out may replace them.
EARLIER_PREDICTION_HEADERS = (
    ["path", "label", "probability_all", "model", "checkpoint", "note"],
    ["path", "label", "probability_all", "model", "checkpoint", "note", "status", "reason"],
    ["path", "label", "probability_all", "probability_raw", "status", "reason", "model", "checkpoint", "note"],
)

# subjects.csv: one row per subject (and test set), whoever writes it (`alnet train`, `alnet predict --by-subject`).
SUBJECTS = _columns("""
fold                  text     the test set (run) — empty for `alnet predict`
subject               text     the patient; `(unknown)` for pictures with no subject (predict)
label                 class    the patient's true class; empty when not known
cells                 integer  pictures of this subject
cells_all             integer  cells called ALL, of those with a P(ALL)
fraction_all          number   cells_all over the cells with a P(ALL)
fraction_all_low      number   95 % Wilson interval of fraction_all, lower end
fraction_all_high     number   95 % Wilson interval of fraction_all, upper end
mean_probability_all  number   mean calibrated P(ALL) of the cells with one
predicted             class    the subject's call: ALL when mean_probability_all > 0.5
accuracy              number   share of the subject's cells called right; empty when the label is not known
cells_rejected        integer  cells the input gate refused
cells_review          integer  cells flagged for review
""")
SUBJECT_FIELDS = _names(SUBJECTS)
EARLIER_SUBJECT_HEADERS = (
    ["subject", "cells", "cells_all", "fraction_all", "fraction_all_low", "fraction_all_high", "mean_probability_all",
     "call", "cells_rejected", "cells_review"],
    ["fold", "subject", "label", "images", "mean_probability_all", "fraction_called_all", "accuracy"],
)

# <out>.refused.csv beside a challenge submission file: the refused pictures and what was written for them.
REFUSED = _columns("""
line             integer  the line of the submission file
path             text     the image file
predicted        class    the call written on that line
probability_all  number   its P(ALL)
status           status   rejected
reason           text     why the input gate refused it
""")
REFUSED_FIELDS = _names(REFUSED)

HISTORY = _columns("""
fold            text     the split
epoch           integer  1, 2, …
train_loss      number   mean training loss of the epoch
train_accuracy  number   training accuracy of the epoch (augmented images)
val_loss        number   validation loss after the epoch; empty without validation cells
val_accuracy    number   validation accuracy after the epoch
""")
HISTORY_FIELDS = _names(HISTORY)

# GAN_DIR/<split>/history.csv: how a GAN's training went (`alnet gan train`).
GAN_HISTORY = _columns("""
step     integer  the training step (one discriminator and one generator update)
d_loss   number   the discriminator's hinge loss at that step
g_loss   number   the generator's loss at that step
d_real   number   the discriminator's mean score of real cells (above 1: sure they are real)
d_fake   number   its mean score of generated cells (below -1: sure they are generated)
seconds  number   time since training started
""")
GAN_HISTORY_FIELDS = _names(GAN_HISTORY)

# generated.csv beside cells written by `alnet gan sample`: where each came from.
GENERATED = _columns("""
path    text     the generated cell, below the folder of generated.csv
label   class    the class it was generated as, ALL or HEM
gan_id  text     the GAN that drew it (the first 8 hex digits of its generator file's sha256)
split   text     the split whose training cells the GAN learned from
seed    integer  the seed of the draw (with gan_id and index, it gives the same cell again)
index   integer  its place in the draw
""")
GENERATED_FIELDS = _names(GENERATED)

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula


PLAIN_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")  # as alnet writes numbers: -0.5, 1e-07


def _cell(value) -> object:
    """A value as written into a CSV: text that a spreadsheet would take as a formula gets a leading quote
    (plain numbers, negative ones included, stay numbers)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_atomically(path: Path | str, write) -> None:
    """`write(temporary path)`, then rename into place: a killed process never leaves a half-written file, and a
    link or pipe standing at `path` (in a run directory from elsewhere, say) is replaced, never written through.
    A folder standing there is a ValueError naming it."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise ValueError(f"{path}: a folder stands where alnet writes this file; move it away")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.")  # a legal long name too
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~umask)  # as an ordinary file (mkstemp makes it private)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: Path | str, text: str) -> None:
    """Every text file alnet writes into a run or output folder (JSON, Markdown, HTML) goes through here."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_csv(path: Path | str, rows: list[dict], fields: list[str]) -> None:
    """Every CSV alnet writes goes through here: the schema's columns in order, formulas neutralised, written
    atomically (`write_atomically`)."""
    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)

    write_atomically(path, write)


def read_csv(path: Path | str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def header_of(path: Path) -> list[str] | None:
    """The first line of a CSV as column names (at most 4 KiB of it), or None when it cannot be read as one (never
    opens a FIFO)."""
    if not Path(path).is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return handle.readline(4096).strip().split(",")
    except (OSError, UnicodeDecodeError):
        return None


def read_predictions(path: Path | str) -> list[dict]:
    """A run's predictions.csv (or a fold's), this version's or an earlier one's: `label` and `predicted` as class
    names (earlier runs wrote 1/0), every column of PREDICTIONS present; a ValueError naming the file and line for
    anything else."""
    fix = "it is not a predictions.csv alnet wrote; delete the fold's folder to run it again"
    out, line = [], 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = {"path", "label", "probability_all"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"no {', '.join(sorted(missing))} column")
            for line, row in enumerate(reader, 2):
                for key in ("label", "predicted"):
                    known = label_of(row.get(key) or "")
                    row[key] = NAMES[known] if known is not None else ""
                Status(row.get("status") or Status.OK.value)
                if not (0 <= float(row["probability_all"]) <= 1):
                    raise ValueError(f"probability_all {row['probability_all']} is not a probability")
                out.append({field: row.get(field) or "" for field in PREDICTION_FIELDS})
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"{path}, line {line}: {str(err)[:200]}; {fix}") from None
    return out


# Checkpoint entries beyond the weights -------------------------------------------------------------------------
# Top-level keys, plain containers and tensors only, so the file stays loadable with torch.load(weights_only=True).
CALIBRATION_KEY = "calibration"  # {"method": "temperature", "temperature": T, "fitted_on", …} or None
REVIEW_KEY = "review"  # {"threshold", "half_width", "target_coverage", "validation_coverage", "fitted_on"} or None
INPUT_GATE_KEY = "input_gate"  # {"features": FeatureGate.to_state()}
INT8_KEY = "int8"  # the int8 form's calibration (alnet.int8.calibrate); checked by alnet.int8.quantized
TEMPERATURE_RANGE = (1e-3, 1e3)
HALF_WIDTH_RANGE = (0.0, 0.5)


def _number(value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a {type(value).__name__} is not a number in [{low}, {high}]")  # no str() of a file's object
    if not low <= value <= high or (isinstance(value, int) and abs(value) > 10**300) or not math.isfinite(value):
        # the range and the size first: a 400-digit int has no float
        shown = f"{value:.6g}" if isinstance(value, float) or abs(value) < 10**15 else "a huge integer"
        raise TypeError(f"{shown} is not a number in [{low}, {high}]")
    return float(value)


STORED_TEXT_LIMIT = 300  # characters kept of a stored free-text entry (`fitted_on`, `note`)


def stored_text(value) -> str | None:
    """A stored free-text entry as one line of plain text: control characters (line breaks, terminal escapes)
    become spaces, at most STORED_TEXT_LIMIT characters; None when it is not a string. Model cards and the ONNX
    metadata print it."""
    if not isinstance(value, str):
        return None
    text = " ".join("".join(c if c.isprintable() else " " for c in value[:STORED_TEXT_LIMIT]).split())
    return text or None


def _stored_entry(value: dict, numbers: dict[str, tuple[float, float]], texts: tuple[str, ...]) -> dict:
    """The entries of a stored mapping that alnet writes, each of its type: numbers within their range (others
    left out) and texts (`stored_text`); anything else a file may hold is dropped, so that it reaches no model
    card, JSON or metadata."""
    kept = {}
    for key, (low, high) in numbers.items():
        try:
            kept[key] = _number(value.get(key), low, high)
        except TypeError:
            pass
    kept.update({key: text for key in texts if (text := stored_text(value.get(key)))})
    return kept


def checked_calibration(value) -> dict | None:
    """A stored `calibration`, or None when there is none; TypeError when it is malformed. Only what alnet writes
    is kept (`_stored_entry`): the temperature (which must be sane), the validation NLLs, `fitted_on`, `note`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("calibration is not a mapping")
    if value.get("temperature") is None:
        return None  # stored as "not calibrated", with a note
    method = value.get("method", "temperature")
    if not isinstance(method, str) or method != "temperature":
        raise TypeError(f"calibration method {str(method)[:40]!r} with a temperature")
    temperature = _number(value["temperature"], *TEMPERATURE_RANGE)
    nll = (0.0, float("inf"))
    return {"method": "temperature", "temperature": temperature,
            **_stored_entry(value, {"validation_nll_before": nll, "validation_nll_after": nll}, ("fitted_on", "note"))}


def checked_review(value) -> dict | None:
    """A stored `review` band, or None; TypeError when it is malformed. Only what alnet writes is kept."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("review is not a mapping")
    half_width = _number(value.get("half_width"), *HALF_WIDTH_RANGE)
    return {"half_width": half_width, **_stored_entry(
        value, {"threshold": (0.0, 1.0), "target_coverage": (0.0, 1.0), "validation_coverage": (0.0, 1.0)},
        ("fitted_on",))}


# ONNX metadata --------------------------------------------------------------------------------------------------
# Keys `alnet export` writes into the graph's metadata_props (values are strings; JSON where structured).
ONNX_METADATA = {"model": "alnet_model", "checkpoint": "alnet_checkpoint", "preprocessing": "alnet_preprocessing",
                 "output": "alnet_output",
                 "calibration": "alnet_calibration", "review": "alnet_review", "input_gate": "alnet_input_gate",
                 "int8": "alnet_int8"}


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported model says of itself, checked: the preprocessing, the temperature, the review band, the
    feature gate (or None) and whether it is the int8 form."""

    model: str
    preprocessing: object  # data.transforms.Preprocessing
    calibration: dict | None
    review: dict | None
    input_gate: object  # trust.feature_check.FeatureGate | None
    int8: bool

    @classmethod
    def read(cls, meta: dict[str, str], path: Path) -> "OnnxMetadata":
        from .data.transforms import Preprocessing
        from .trust.feature_check import FeatureGate

        again = "export the model again with `alnet export`"
        if ONNX_METADATA["preprocessing"] not in meta:
            raise ValueError(f"{path}: not an ONNX model written by `alnet export` (no preprocessing metadata)")

        def parsed(key: str, check, what: str):
            if ONNX_METADATA[key] not in meta:
                return None
            try:
                return check(meta[ONNX_METADATA[key]])
            except (TypeError, ValueError, RecursionError, OverflowError) as err:  # JSON thousands deep: Recursion
                raise ValueError(f"{path}: unreadable {what} in its metadata ({type(err).__name__}); {again}") \
                    from None

        return cls(model=str(meta.get(ONNX_METADATA["model"], "?"))[:100],
                   preprocessing=parsed("preprocessing", Preprocessing.from_json, "preprocessing"),
                   calibration=parsed("calibration", lambda text: checked_calibration(json.loads(text)),
                                      "calibration"),
                   review=parsed("review", lambda text: checked_review(json.loads(text)), "review band"),
                   input_gate=parsed("input_gate", FeatureGate.from_json, "input gate"),
                   int8=meta.get(ONNX_METADATA["int8"], "").startswith("yes"))


def check_torch_file(path: Path | str, max_bytes: int, max_members: int = 100_000) -> None:
    """Refuse (ValueError, a short reason) a torch file that would unpack to more than `max_bytes`: a torch file
    is a zip archive whose members may be compressed, so a few MB on disk could ask for terabytes. Every member's
    declared size is summed before anything is read (zip readers never read past it); a file that is not a zip
    archive (torch's legacy format) is stored uncompressed, so its own size bounds it."""
    import zipfile

    path = Path(path)
    if not zipfile.is_zipfile(path):
        if path.stat().st_size > max_bytes:
            raise ValueError(f"larger than {max_bytes:,} bytes")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"a damaged archive ({type(err).__name__})") from None
    total = sum(member.file_size for member in members)
    if len(members) > max_members or total > max_bytes:
        raise ValueError(f"would unpack to {total:,} bytes in {len(members):,} part(s), over the limit of "
                         f"{max_bytes:,} bytes")
