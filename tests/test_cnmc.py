import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alnet.cli import app
from alnet.data.cnmc import ALL, HEM, DatasetError, parse_name, scan, summarize


def test_names_parse_to_subject_and_label_with_case_normalised():
    assert parse_name("UID_h3_1_2_hem.bmp") == ("H3", HEM)
    assert parse_name("UID_H3_10_1_hem.bmp") == ("H3", HEM)
    assert parse_name("UID_3_1_1_all.bmp") == ("3", ALL)
    assert parse_name("uid_57_29_1_ALL.BMP") == ("57", ALL)


def test_all_and_hem_subjects_with_the_same_number_never_collide():
    assert parse_name("UID_3_1_1_all.bmp")[0] != parse_name("UID_H3_1_1_hem.bmp")[0]


@pytest.mark.parametrize("name", ["IMG_0001.bmp", "UID_x_1_1_all.bmp", "UID_3_1_all.bmp", "UID_H3_1_1_all.bmp"])
def test_names_off_the_scheme_are_rejected(name):
    with pytest.raises(ValueError):
        parse_name(name)


def test_cnmc_mini_has_52_images_of_13_plus_13_subjects_in_three_disjoint_folds(mini_root):
    dataset = scan(mini_root)
    assert dataset.layout.name == "kaggle"
    assert dataset.problems == []
    cells = dataset.cells
    assert len(cells) == 52
    assert len({c.subject for c in cells if c.label == ALL}) == 13
    assert len({c.subject for c in cells if c.label == HEM}) == 13
    subjects_by_fold = {f: {c.subject for c in cells if c.fold == f} for f in (0, 1, 2)}
    assert sorted(subjects_by_fold) == [0, 1, 2]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not subjects_by_fold[a] & subjects_by_fold[b]


def test_cnmc_mini_lower_case_h3_is_subject_H3(mini_root):
    h3 = [c for c in scan(mini_root).cells if c.path.name.lower().startswith("uid_h3_")]
    assert h3 and {c.subject for c in h3} == {"H3"}
    assert any(c.path.name.startswith("UID_h3_") for c in h3)


def test_tcia_layout_loads_like_kaggle(synthetic_root, tmp_path):
    kaggle = synthetic_root / "C-NMC_Leukemia"
    tcia = tmp_path / "tcia"
    shutil.copytree(kaggle / "training_data", tcia / "C-NMC_training_data")
    shutil.copytree(kaggle / "validation_data" / "C-NMC_test_prelim_phase_data", tcia / "C-NMC_test_prelim_phase_data")
    shutil.copy(kaggle / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv", tcia)
    shutil.copytree(kaggle / "testing_data" / "C-NMC_test_final_phase_data", tcia / "C-NMC_test_final_phase_data")
    a, b = scan(synthetic_root), scan(tcia)
    assert b.layout.name == "tcia"
    assert summarize(a.cells) == summarize(b.cells)


def test_a_root_that_is_the_training_folder_itself_loads(synthetic_root):
    dataset = scan(synthetic_root / "C-NMC_Leukemia" / "training_data")
    assert dataset.layout.name == "training_data"
    assert {c.split for c in dataset.cells} == {"train"}


def test_prelim_labels_and_subjects_come_from_the_csv(synthetic_root):
    prelim = scan(synthetic_root).select(split="prelim")
    assert len(prelim) == 8
    assert {c.label for c in prelim} == {ALL, HEM}
    assert {c.subject for c in prelim} == {"4", "H4"}
    final = scan(synthetic_root).select(split="final")
    assert len(final) == 3 and all(c.label is None and c.subject is None for c in final)


def test_summary_counts_images_and_subjects_per_split_fold_and_class(synthetic_root):
    summary = summarize(scan(synthetic_root).cells)
    assert summary["images"] == 3 * 2 * 4 + 8 + 3
    assert summary["subjects"] == 3 * 2 + 2
    assert summary["by_split"]["train"]["fold_1"]["hem"] == {"images": 4, "subjects": 1}
    assert summary["by_split"]["prelim"]["none"]["all"] == {"images": 4, "subjects": 1}
    assert summary["by_split"]["final"]["none"]["unlabelled"]["images"] == 3


def test_info_json_has_images_subjects_and_by_split(mini_root):
    result = CliRunner().invoke(app, ["info", str(mini_root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 52 and data["subjects"] == 26
    assert data["by_split"]["train"]["fold_2"]["all"] == {"images": 10, "subjects": 5}


# --- bad input: each gets a clear message naming the file ---------------------------------------------------

def test_a_root_without_any_cnmc_layout_is_a_one_line_error(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DatasetError, match="no C-NMC dataset found"):
        scan(tmp_path)
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert str(tmp_path) in result.output and "no C-NMC dataset found" in result.output


def test_an_empty_class_folder_is_reported(synthetic_copy):
    hem = synthetic_copy / "C-NMC_Leukemia" / "training_data" / "fold_1" / "hem"
    shutil.rmtree(hem)
    hem.mkdir()
    problems = scan(synthetic_copy).problems
    assert any(p.path == hem and "empty" in p.message for p in problems)


def test_a_name_that_does_not_parse_is_skipped_and_reported(synthetic_copy):
    folder = synthetic_copy / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all"
    shutil.copy(next(folder.iterdir()), folder / "cell-001.bmp")
    dataset = scan(synthetic_copy)
    assert all(c.path.name != "cell-001.bmp" for c in dataset.cells)
    assert any(p.path.name == "cell-001.bmp" and "rename" in p.message for p in dataset.problems)


def test_a_non_image_file_in_a_class_folder_is_reported(synthetic_copy):
    folder = synthetic_copy / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all"
    (folder / "notes.txt").write_text("hello")
    assert any(p.path.name == "notes.txt" for p in scan(synthetic_copy).problems)


def test_a_csv_row_whose_file_is_missing_is_reported(synthetic_copy):
    prelim = synthetic_copy / "C-NMC_Leukemia" / "validation_data" / "C-NMC_test_prelim_phase_data"
    (prelim / "3.bmp").unlink()
    dataset = scan(synthetic_copy)
    assert len(dataset.select(split="prelim")) == 7
    assert any("3.bmp is listed but not in" in p.message for p in dataset.problems)


def test_a_file_missing_from_the_csv_is_reported(synthetic_copy):
    prelim = synthetic_copy / "C-NMC_Leukemia" / "validation_data" / "C-NMC_test_prelim_phase_data"
    shutil.copy(prelim / "1.bmp", prelim / "99.bmp")
    dataset = scan(synthetic_copy)
    assert all(c.path.name != "99.bmp" for c in dataset.cells)
    assert any(p.path.name == "99.bmp" and "add a row" in p.message for p in dataset.problems)


# --- the preliminary labels CSV -----------------------------------------------------------------------------

def _labels_csv(root):
    return root / "C-NMC_Leukemia" / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv"


def _append_rows(root, *rows):
    with open(_labels_csv(root), "a") as handle:
        handle.writelines(f"{row}\n" for row in rows)


def test_a_labels_csv_with_a_byte_order_mark_loads(synthetic_copy):
    csv_path = _labels_csv(synthetic_copy)
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as spreadsheet programs save UTF-8
    dataset = scan(synthetic_copy)
    assert len(dataset.select(split="prelim", labelled=True)) == 8
    assert dataset.problems == []


def test_a_file_listed_twice_with_the_same_row_is_scored_once_and_the_repeat_reported(synthetic_copy):
    _append_rows(synthetic_copy, "UID_4_1_1_all.bmp,1.bmp,1")  # line 10 repeats line 2
    dataset = scan(synthetic_copy)
    prelim = dataset.select(split="prelim")
    assert len(prelim) == 8 and sum(c.path.name == "1.bmp" for c in prelim) == 1
    assert [(p.path.name, p.message) for p in dataset.problems] == [
        (f"{_labels_csv(synthetic_copy).name}:10", "1.bmp listed again on line 10 (first on line 2): "
         "duplicate row ignored")]


@pytest.mark.parametrize("row", ["UID_H4_1_1_hem.bmp,1.bmp,0", "UID_4_9_9_all.bmp,1.bmp,1"],
                         ids=["other label", "other Patient_ID"])
def test_a_file_listed_twice_with_conflicting_rows_is_not_used_and_both_rows_reported(synthetic_copy, row):
    _append_rows(synthetic_copy, row)
    dataset = scan(synthetic_copy)
    assert all(c.path.name != "1.bmp" for c in dataset.select(split="prelim"))
    assert len(dataset.select(split="prelim")) == 7
    assert sorted(p.path.name.rsplit(":", 1)[1] for p in dataset.problems) == ["10", "2"]
    assert all("1.bmp is listed on lines 2, 10 with different labels or Patient_ID: fix the CSV" in p.message
               for p in dataset.problems)


@pytest.mark.parametrize("value", ["2", "x", ""])
def test_a_label_that_is_not_0_or_1_is_reported_as_such(synthetic_copy, value):
    csv_path = _labels_csv(synthetic_copy)
    csv_path.write_text(csv_path.read_text().replace("UID_4_1_1_all.bmp,1.bmp,1", f"UID_4_1_1_all.bmp,1.bmp,{value}"))
    dataset = scan(synthetic_copy)
    assert all(c.path.name != "1.bmp" for c in dataset.select(split="prelim"))
    [problem] = dataset.problems
    assert problem.path.name == f"{csv_path.name}:2"
    assert "row for 1.bmp is malformed" in problem.message and "not 0 (HEM) or 1 (ALL)" in problem.message
    assert "fix the row" in problem.message


def test_an_unreadable_class_folder_is_reported_not_raised(synthetic_copy, monkeypatch):
    locked = synthetic_copy / "C-NMC_Leukemia" / "training_data" / "fold_1" / "hem"
    iterdir = Path.iterdir

    def refuse_locked(self):
        if self == locked:  # tests run as root, where chmod 000 would not stop the listing
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse_locked)
    dataset = scan(synthetic_copy)
    assert [p for p in dataset.problems if p.path == locked] == dataset.problems
    [problem] = dataset.problems
    assert problem.message == "cannot read this folder (Permission denied): check its permissions; skipped"
    assert not any(c.fold == 1 and c.label == HEM for c in dataset.cells)
    assert any(c.fold == 1 and c.label == ALL for c in dataset.cells)
