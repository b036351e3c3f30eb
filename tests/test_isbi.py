import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alnet.cli import app
from alnet.infer import isbi

runner = CliRunner()


@pytest.fixture
def final_test_set(mini_root, tmp_path) -> Path:
    """Twelve real cells renamed 1 … 12 as in the final test set (BMP and PNG mixed)."""
    folder = tmp_path / "C-NMC_test_final_phase_data"
    folder.mkdir()
    cells = sorted(mini_root.rglob("UID_*"))[:12]
    for number, cell in enumerate(cells, 1):
        shutil.copyfile(cell, folder / f"{number}{cell.suffix}")
    return folder


def _paths(*names):
    return [Path("final") / name for name in names]


def test_images_are_ordered_by_the_number_in_their_name_not_as_text():
    ordered = isbi.submission_order(_paths("10.bmp", "2.bmp", "1.bmp", "3.png", "4.bmp", "5.bmp", "6.bmp", "7.bmp",
                                           "8.bmp", "9.bmp"))
    assert [p.name for p in ordered][:4] == ["1.bmp", "2.bmp", "3.png", "4.bmp"] and ordered[-1].name == "10.bmp"


@pytest.mark.parametrize("names, message", [
    (("1.bmp", "cell.bmp"), r"final/cell\.bmp: not named <number>\.<ext>"),
    (("1.bmp", "02.bmp"), r"final/02\.bmp: not named <number>\.<ext>"),
    (("1.bmp", "2\n.bmp"), r"not named <number>\.<ext>"),  # a line break is not part of a number
    (("1.bmp", "2.bmp", "2.png"), r"final/2\.png: image number 2 given twice \(also final/2\.bmp\)"),
    (("1.bmp", "2.bmp", "5.bmp"), r"images numbered up to 5 but 2 number\(s\) missing \(3, 4\)"),
    (("2.bmp",), r"1 number\(s\) missing \(1\)"),
    (("1.bmp", "999999999.bmp"), r"999999997 number\(s\) missing \(2, 3, 4, 5, 6 and 999999992 more\)"),
])
def test_names_that_cannot_make_a_submission_are_a_one_line_error(names, message):
    with pytest.raises(isbi.SubmissionError, match=message):
        isbi.submission_order(_paths(*names))


def test_a_refused_image_keeps_the_models_call_and_is_listed_with_its_line():
    from alnet.infer.predict import Predicted
    from alnet.labels import Status
    from alnet.pipeline import Answer

    ordered = _paths("1.bmp", "2.bmp", "3.bmp")
    results = [Predicted(ordered[0], Answer(0.9, 0.9, Status.OK)),
               Predicted(ordered[1], Answer(0.7, 0.6, Status.REJECTED, "not a cell")),
               Predicted(ordered[2], Answer(0.2, 0.3, Status.REVIEW, "close"))]
    lines, refused = isbi.submission_lines(list(reversed(results)), ordered, [])
    assert lines == ["1", "1", "0"]
    assert refused == [{"line": 2, "path": str(ordered[1]), "predicted": "ALL", "probability_all": "0.700000",
                        "status": "rejected", "reason": "not a cell"}]


def test_an_unreadable_image_makes_the_submission_impossible():
    with pytest.raises(isbi.SubmissionError, match=r"final/2\.bmp: cannot decode \(broken\).*one line per image"):
        isbi.submission_lines([], _paths("1.bmp", "2.bmp"), [(Path("final/2.bmp"), "broken")])


def test_predict_writes_one_line_per_image_in_the_order_of_the_numbers(mini_checkpoint, final_test_set, tmp_path):
    out = tmp_path / "isbi_valid.predict"
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--format", "isbi",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and set(lines) <= {"0", "1"}

    table = tmp_path / "predictions.csv"
    assert runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--out", str(table)]
                         ).exit_code == 0
    call_of = {Path(row["path"]).stem: row["predicted"] for row in csv.DictReader(table.open())}
    assert lines == ["1" if call_of[str(n)] == "ALL" else "0" for n in range(1, 13)]
    assert (tmp_path / "isbi_valid.refused.csv").read_text().strip() == ",".join(isbi.REFUSED_FIELDS)

    # A file of 0/1 lines has no header to tell alnet's from a list of true labels: replaced only with --force.
    again = runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--format", "isbi",
                                "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output and out.read_text().splitlines() == lines
    again = runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--format", "isbi",
                                "--out", str(out), "--force"])
    assert again.exit_code == 0, again.output


def test_images_the_gate_refuses_are_written_and_listed_beside_the_submission(mini_checkpoint, final_test_set,
                                                                              tmp_path):
    from PIL import Image

    third = next(final_test_set.glob("3.*"))
    Image.new("RGB", (450, 450), "white").save(third)  # not a cell: the input gate refuses it
    out = tmp_path / "isbi_valid.predict"
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--format", "isbi",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 refused by the input gate" in result.output
    refused = list(csv.DictReader((tmp_path / "isbi_valid.refused.csv").open()))
    assert len(refused) == 1
    assert (refused[0]["line"], Path(refused[0]["path"]).stem) == ("3", "3")
    assert refused[0]["status"] == "rejected" and refused[0]["reason"].startswith("saturated")
    assert refused[0]["predicted"] in ("ALL", "HEM")  # the line still needs the model's answer
    assert out.read_text().splitlines()[2] == ("1" if refused[0]["predicted"] == "ALL" else "0")


def test_a_gap_in_the_numbers_stops_before_the_model_runs_and_writes_nothing(mini_checkpoint, final_test_set,
                                                                            tmp_path):
    next(final_test_set.glob("7.*")).unlink()
    out = tmp_path / "isbi_valid.predict"
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--format", "isbi",
                                 "--out", str(out)])
    assert result.exit_code == 2 and "1 number(s) missing (7)" in result.output
    assert not out.exists() and not (tmp_path / "isbi_valid.refused.csv").exists()


def test_a_submission_never_replaces_a_file_alnet_did_not_write(mini_checkpoint, final_test_set, tmp_path):
    out = tmp_path / "isbi_valid.predict"
    out.write_text("my notes\n")
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--format", "isbi",
                                 "--out", str(out)])
    assert result.exit_code == 2 and out.read_text() == "my notes\n"
    assert runner.invoke(app, ["predict", str(mini_checkpoint), str(final_test_set), "--format", "xml"]
                         ).exit_code == 2
