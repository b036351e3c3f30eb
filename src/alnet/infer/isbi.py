"""The C-NMC 2019 challenge's submission file (`alnet predict … --format isbi`; docs/design.md, "The challenge's
submission file").

The challenge's evaluation read one line per image of the final test set, `1` (ALL) or `0` (HEM), in the
numeric order of the file names `1.bmp … N.bmp` (`isbi_valid.predict`). Every image needs a line, so the names
are checked before the model runs: each must be a number, no number twice, none left out. Images the input
gate refuses (answers whose status is `rejected`) still get the model's call, since the file has
no way to say "no answer", and are listed in a side CSV so that nobody mistakes them for confident answers.
"""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path

from ..labels import label_of
from ..schema import REFUSED_FIELDS, header_of, write_csv

EARLIER_REFUSED_FIELDS = ["line", "path", "label", "probability_all", "status", "reason"]  # still ours
_NUMBER = re.compile(r"^[1-9][0-9]{0,8}$")  # 1 … 999,999,999; no sign, no leading zero


class SubmissionError(ValueError):
    """The images cannot make a submission file (names, gaps, duplicates, unreadable images). One line."""


def submission_order(files: list[Path]) -> list[Path]:
    """The files in the order of their numbers 1 … N; a one-line error for a name that is not a number, a
    number given twice and a number missing."""
    by_number: dict[int, Path] = {}
    for path in files:
        if not _NUMBER.fullmatch(path.stem):  # fullmatch: `$` would let "4\n" through as 4
            raise SubmissionError(f"{path}: not named <number>.<ext> (1.bmp … N.bmp as in the final test set); "
                                  "the submission file follows the numbers, so pass only the test set's images")
        number = int(path.stem)
        if number in by_number:
            raise SubmissionError(f"{path}: image number {number} given twice (also {by_number[number]}); pass "
                                  "each test image once")
        by_number[number] = path
    highest = max(by_number, default=0)
    if highest > len(by_number):  # numbers are distinct, so some are missing; name the first few only
        gaps = highest - len(by_number)
        first = list(islice((n for n in range(1, highest) if n not in by_number), 5))
        shown = ", ".join(f"{n}" for n in first) + (f" and {gaps - len(first)} more" if gaps > len(first) else "")
        raise SubmissionError(f"images numbered up to {highest} but {gaps} number(s) missing ({shown}); the "
                              "submission needs one line per image 1 … N, so pass the whole final test set")
    return [by_number[n] for n in sorted(by_number)]


def submission_lines(results: list, ordered: list[Path], failed: list[tuple[Path, str]]) -> tuple[list[str],
                                                                                          list[dict]]:
    """The file's lines in image order (each picture's call, refused ones included: the file has no way to say
    "no answer"), and the refused pictures (`REFUSED_FIELDS`, with their line number). `results`:
    `alnet.infer.predict.Predicted`. Unreadable images make the submission impossible: a one-line error that
    names the first."""
    if failed:
        path, error = failed[0]
        raise SubmissionError(f"{path}: cannot decode ({error}); the submission needs one line per image, so "
                              f"replace it{f' (and {len(failed) - 1} more unreadable)' if len(failed) > 1 else ''}"
                              " and run again")
    by_path = {result.path: result.answer for result in results}
    lines, refused = [], []
    for number, path in enumerate(ordered, 1):
        answer = by_path[path]
        lines.append(str(label_of(answer.predicted)))
        if not answer.answered:
            refused.append({"line": number, "path": str(path), "predicted": answer.predicted,
                            "probability_all": f"{answer.probability_all:.6f}", "status": answer.status.value,
                            "reason": answer.reason})
    return lines, refused


def refused_csv_of(out: Path) -> Path:
    """The side CSV beside a submission file: isbi_valid.predict → isbi_valid.refused.csv."""
    return out.with_name(f"{out.stem}.refused.csv")


def write_submission(lines: list[str], refused: list[dict], out: Path) -> Path:
    """The submission file and, always (so an old list is never left beside a new file), its side CSV."""
    out.write_text("".join(f"{line}\n" for line in lines))
    side = refused_csv_of(out)
    write_csv(side, refused, REFUSED_FIELDS)
    return side


def is_refused_csv(path: Path) -> bool:
    return header_of(path) in (REFUSED_FIELDS, EARLIER_REFUSED_FIELDS)
