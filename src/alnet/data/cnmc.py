"""Find a C-NMC 2019 dataset on disk and list its cells.

Both public layouts load (docs/design.md, "The dataset"):

    Kaggle  C-NMC_Leukemia/training_data/fold_{0,1,2}/{all,hem}/UID_*.bmp
            C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data/<n>.bmp (+ _labels.csv beside it)
            C-NMC_Leukemia/testing_data/C-NMC_test_final_phase_data/<n>.bmp   (unlabelled)
    TCIA    C-NMC_training_data/fold_{0,1,2}/{all,hem}/UID_*.bmp
            C-NMC_test_prelim_phase_data/<n>.bmp (+ C-NMC_test_prelim_phase_data_labels.csv)
            C-NMC_test_final_phase_data/<n>.bmp

A root that is itself `training_data` (it holds `fold_*` folders) loads too. Everything the scan could not
use is returned as a `Problem` (file + what to do), never dropped silently.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..labels import ALL, HEM

CLASS_NAMES = {ALL: "all", HEM: "hem"}  # folder names and summary keys
IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
LABELS_CSV = "C-NMC_test_prelim_phase_data_labels.csv"

# UID_<subject>_<image>_<cell>_all.bmp (ALL) and UID_H<subject>_<image>_<cell>_hem.bmp (HEM); case varies.
_NAME = re.compile(r"^UID_(H?)(\d+)_(\d+)_(\d+)_(all|hem)$", re.IGNORECASE)
# Cells written by `alnet gan sample`: GAN_<gan id>_s<seed>_<index>_all|hem. No real C-NMC name starts this way, so a
# generated cell is never taken for a real one: a scan counts them apart and never uses them as data.
GENERATED_NAME = re.compile(r"^GAN_([0-9a-f]{8})_s(\d+)_(\d+)_(all|hem)$", re.IGNORECASE)
GENERATED = "generated"  # the split of generated cells in a scan's summary


class DatasetError(Exception):
    """The dataset cannot be used at all (no layout, nothing labelled). The message is one line for the user."""


@dataclass(frozen=True)
class Cell:
    path: Path
    label: int | None  # 1 ALL, 0 HEM, None for the unlabelled final test set
    subject: str | None  # "13" for ALL subjects, "H13" for HEM subjects; None when unknown
    fold: int | None  # training fold, None outside the training data
    split: str  # "train", "prelim" or "final"


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str  # says what is wrong and what to do

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Layout:
    name: str  # "kaggle", "tcia" or "training_data"
    training: Path | None = None
    prelim: Path | None = None
    prelim_labels: Path | None = None
    final: Path | None = None


@dataclass
class Dataset:
    root: Path
    layout: Layout
    cells: list[Cell] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    generated: list[Cell] = field(default_factory=list)  # GAN cells found among the training folders: never data

    def select(self, split: str | None = None, labelled: bool | None = None) -> list[Cell]:
        return [
            c
            for c in self.cells
            if (split is None or c.split == split) and (labelled is None or (c.label is not None) == labelled)
        ]


def parse_name(name: str) -> tuple[str, int]:
    """`UID_h3_1_2_hem.bmp` -> ("H3", 0); raises ValueError when the name does not follow the C-NMC scheme."""
    match = _NAME.match(Path(name).stem)
    if not match:
        raise ValueError(f"{name!r} is not a C-NMC cell name (UID_<subject>_<image>_<cell>_all|hem)")
    hem_prefix, number, _image, _cell, kind = match.groups()
    label = ALL if kind.lower() == "all" else HEM
    if bool(hem_prefix) != (label == HEM):
        raise ValueError(f"{name!r} mixes an {'HEM' if hem_prefix else 'ALL'} subject id with a {kind} suffix")
    return subject_id(label == HEM, number), label


def generated_name(gan_id: str, seed: int, index: int, label: int, suffix: str = ".png") -> str:
    """The file name of a generated cell (GENERATED_NAME)."""
    return f"GAN_{gan_id}_s{seed}_{index:06d}_{CLASS_NAMES[label]}{suffix}"


def subject_id(hem: bool, number: str) -> str:
    """The normalised subject id of a file name's number: HEM subjects carry the H prefix (so an ALL and a HEM
    subject can never share an id), leading zeros go (`UID_h03_…` → H3, `UID_057_…` → 57)."""
    return f"H{int(number)}" if hem else str(int(number))


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _has_folds(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() and p.name.lower().startswith("fold_") for p in path.iterdir())


def locate(root: Path) -> Layout:
    """Find the parts of a C-NMC dataset under `root` (the root itself, C-NMC_Leukemia/ or one folder down)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory; pass the folder that holds the C-NMC data")
    bases = [root, root / "C-NMC_Leukemia"] + sorted(p for p in root.iterdir() if p.is_dir())
    for base in bases:
        if _has_folds(base):  # the root is the training folder itself
            return Layout("training_data", training=base)
        kaggle = _first_dir(base / "training_data")
        tcia = _first_dir(base / "C-NMC_training_data")
        if not (kaggle or tcia):
            continue
        layout = Layout("kaggle" if kaggle else "tcia", training=kaggle or tcia)
        layout.prelim = _first_dir(
            base / "validation_data" / "C-NMC_test_prelim_phase_data", base / "C-NMC_test_prelim_phase_data"
        )
        if layout.prelim is not None:
            for csv_path in (layout.prelim.parent / LABELS_CSV, layout.prelim / LABELS_CSV, base / LABELS_CSV):
                if csv_path.is_file():
                    layout.prelim_labels = csv_path
                    break
        layout.final = _first_dir(
            base / "testing_data" / "C-NMC_test_final_phase_data", base / "C-NMC_test_final_phase_data"
        )
        return layout
    raise DatasetError(
        f"{root}: no C-NMC dataset found; expected C-NMC_Leukemia/training_data/fold_0/all/*.bmp (Kaggle) "
        "or C-NMC_training_data/fold_0/all/*.bmp (TCIA) below it"
    )


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in {"thumbs.db", "desktop.ini"}


def _list_files(folder: Path, problems: list[Problem]) -> list[Path] | None:
    """The visible files of `folder`, sorted; None, reported, when it cannot be read."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and not _is_hidden(p))
    except OSError as err:  # one unreadable folder must not hide the rest of the dataset
        problems.append(Problem(folder, f"cannot read this folder ({err.strerror or err}): check its permissions; "
                                "skipped"))
        return None


def _scan_training(training: Path, cells: list[Cell], problems: list[Problem], generated: list[Cell]) -> None:
    fold_dirs = sorted((p for p in training.iterdir() if p.is_dir() and p.name.lower().startswith("fold_")),
                       key=lambda p: p.name)
    for fold_dir in fold_dirs:
        try:
            fold = int(fold_dir.name.split("_", 1)[1])
        except ValueError:
            problems.append(Problem(fold_dir, "fold folder name is not fold_<number>: rename it; skipped"))
            continue
        for label, class_name in CLASS_NAMES.items():
            class_dir = _first_dir(fold_dir / class_name, fold_dir / class_name.upper())
            if class_dir is None:
                problems.append(Problem(fold_dir / class_name, "class folder missing: this fold has no "
                                        f"{class_name.upper()} images"))
                continue
            files = _list_files(class_dir, problems)
            if files is None:
                continue
            if not files:
                problems.append(Problem(class_dir, f"class folder is empty: this fold has no {class_name.upper()} "
                                        "images"))
            for path in files:
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    problems.append(Problem(path, "not an image file: move it out of the dataset; skipped"))
                    continue
                made = GENERATED_NAME.match(path.stem)
                if made:
                    if (ALL if made.group(4).lower() == "all" else HEM) != label:
                        problems.append(Problem(path, f"a generated cell in the {class_name} folder whose name says "
                                                "otherwise: move it; skipped"))
                    else:
                        generated.append(Cell(path, label, None, fold, GENERATED))
                    continue
                if _looks_generated(path):
                    problems.append(Problem(path, "named like a generated cell but not GAN_<8 hex digits>_s<seed>_"
                                            "<n>_all|hem: not used; remove it or give it its real name"))
                    continue
                try:
                    subject, name_label = parse_name(path.name)
                except ValueError as err:
                    problems.append(Problem(path, f"{err}; rename it to the C-NMC scheme; skipped"))
                    continue
                if name_label != label:
                    problems.append(Problem(path, f"name says {CLASS_NAMES[name_label].upper()} but the file is "
                                            f"in the {class_name} folder: move it; skipped"))
                    continue
                cells.append(Cell(path, label, subject, fold, "train"))


def _parse_label(text: str | None) -> int:
    text = (text or "").strip()
    if text not in ("0", "1"):
        raise ValueError(f"labels is {repr(text) if text else 'empty'}, not 0 (HEM) or 1 (ALL)")
    return int(text)


def _read_labels_csv(path: Path) -> dict[str, list[tuple[int, dict]]]:
    """new_names -> its rows as (line, row), in file order. A byte-order mark (spreadsheets write one) is skipped."""
    rows: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"Patient_ID", "new_names", "labels"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path}: header lacks {', '.join(sorted(missing))}; expected "
                               "Patient_ID,new_names,labels")
        for row in reader:
            rows[(row["new_names"] or "").strip()].append((reader.line_num, row))
    return rows


def _row_key(row: dict) -> tuple[str, str]:
    return (row["labels"] or "").strip(), (row["Patient_ID"] or "").strip()


def _single_row(csv_path: Path, name: str, rows: list[tuple[int, dict]],
                problems: list[Problem]) -> tuple[int, dict] | None:
    """The row of an image listed once or repeated identically; None when its rows disagree. Repeats are reported."""
    # An image listed twice must never be scored twice, and when its rows disagree neither can be trusted.
    if len({_row_key(row) for _, row in rows}) > 1:
        lines = ", ".join(str(line) for line, _ in rows)
        problems.extend(Problem(Path(f"{csv_path}:{line}"), f"{name} is listed on lines {lines} with different "
                                "labels or Patient_ID: fix the CSV so that it is listed once; skipped")
                        for line, _ in rows)
        return None
    problems.extend(Problem(Path(f"{csv_path}:{line}"), f"{name} listed again on line {line} (first on line "
                            f"{rows[0][0]}): duplicate row ignored") for line, _ in rows[1:])
    return rows[0]


def _prelim_cell(path: Path, where: Path, row: dict, problems: list[Problem]) -> Cell | None:
    try:
        label = _parse_label(row["labels"])
        subject, name_label = parse_name((row["Patient_ID"] or "").strip())
    except ValueError as err:
        problems.append(Problem(where, f"row for {path.name} is malformed ({err}): fix the row; skipped"))
        return None
    if name_label != label:
        problems.append(Problem(where, f"labels={label} contradicts Patient_ID {row['Patient_ID']}: "
                                "the labels column is used"))
    return Cell(path, label, subject, None, "prelim")


def _looks_generated(path: Path) -> bool:
    return path.name[:4].upper() == "GAN_"


def _test_images(folder: Path, generated: list[Cell]) -> list[Path]:
    """The images of a test folder; generated cells (GAN_…) among them go to `generated`, never to the test set."""
    images = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if _looks_generated(path):
                made = GENERATED_NAME.match(path.stem)
                generated.append(Cell(path, (ALL if made.group(4).lower() == "all" else HEM) if made else None, None,
                                      None, GENERATED))
            else:
                images.append(path)
    return images


def _scan_prelim(layout: Layout, cells: list[Cell], problems: list[Problem], generated: list[Cell]) -> None:
    images = {p.name: p for p in _test_images(layout.prelim, generated)}
    csv_path = layout.prelim_labels
    if csv_path is None:
        problems.append(Problem(layout.prelim, f"{LABELS_CSV} not found beside this folder: the preliminary "
                                "test images are used as unlabelled"))
        cells.extend(Cell(p, None, None, None, "prelim") for p in images.values())
        return
    listed = _read_labels_csv(csv_path)
    for name, rows in listed.items():
        if name not in images and _looks_generated(Path(name)):
            problems.extend(Problem(Path(f"{csv_path}:{line}"), f"{name} names a generated cell (GAN_…), which is "
                                    "never a test cell; delete the row") for line, _ in rows)
            continue
        if name not in images:
            problems.extend(Problem(Path(f"{csv_path}:{line}"), f"{name or '(empty)'} is listed but not in "
                                    f"{layout.prelim.name}/: restore the image or delete the row; skipped")
                            for line, _ in rows)
            continue
        single = _single_row(csv_path, name, rows, problems)
        if single is None:
            continue
        cell = _prelim_cell(images[name], Path(f"{csv_path}:{single[0]}"), single[1], problems)
        if cell is not None:
            cells.append(cell)
    for name, path in images.items():
        if name not in listed:
            problems.append(Problem(path, f"not listed in {csv_path.name}: add a row for it; skipped"))


def scan(root: Path | str) -> Dataset:
    """List every cell of the C-NMC dataset under `root`, with the problems found on the way."""
    root = Path(root)
    layout = locate(root)
    dataset = Dataset(root, layout)
    if layout.training is not None:
        _scan_training(layout.training, dataset.cells, dataset.problems, dataset.generated)
    if layout.prelim is not None:
        _scan_prelim(layout, dataset.cells, dataset.problems, dataset.generated)
    if layout.final is not None:
        dataset.cells.extend(Cell(p, None, None, None, "final")
                             for p in _test_images(layout.final, dataset.generated))
    if not dataset.cells and not dataset.generated:
        raise DatasetError(f"{root}: a C-NMC layout was found ({layout.name}) but it holds no usable images; "
                           "check the problems listed by `alnet info`")
    return dataset


def summarize(cells: list[Cell]) -> dict:
    """Images and subjects per split, fold and class: {"images", "subjects", "by_split": split -> fold -> class}.

    Folds are keyed `fold_<n>` (`none` outside the training data); classes `all`, `hem` (`unlabelled` when
    the label is unknown, as in the final test set)."""
    tree: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: [0, set()])))
    for c in cells:
        fold = f"fold_{c.fold}" if c.fold is not None else "none"
        cls = CLASS_NAMES.get(c.label, "unlabelled")
        entry = tree[c.split][fold][cls]
        entry[0] += 1
        if c.subject is not None:
            entry[1].add(c.subject)
    by_split = {
        split: {fold: {cls: {"images": n, "subjects": len(s)} for cls, (n, s) in sorted(classes.items())}
                for fold, classes in sorted(folds.items())}
        for split, folds in tree.items()
    }
    return {
        "images": len(cells),
        "subjects": len({c.subject for c in cells if c.subject is not None}),
        "by_split": by_split,
    }
