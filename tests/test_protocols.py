from pathlib import Path

import numpy as np
import pytest

from alnet.data.cnmc import Cell, scan
from alnet.data.protocols import (
    PAPER_NOTE,
    LeakageError,
    Split,
    check_no_leakage,
    make_splits,
    paper_splits,
    paper_test_size,
    subject_splits,
)


def _cells(folds: dict[int, tuple[int, int]], per_subject: int = 10) -> list[Cell]:
    """Fake cells: fold → (ALL images, HEM images), per_subject images per subject, subjects unique per fold."""
    cells, subject = [], 0
    for fold, (n_all, n_hem) in folds.items():
        for label, n in ((1, n_all), (0, n_hem)):
            for i in range(n):
                if i % per_subject == 0:
                    subject += 1
                name = f"{'H' if label == 0 else ''}{subject}"
                cells.append(Cell(Path(f"f{fold}/{name}_{i}.bmp"), label, name, fold, "train"))
    return cells


@pytest.mark.parametrize("n, train, test", [(3527, 2821, 706), (3581, 2864, 717), (3554, 2843, 711)])
def test_paper_rule_reproduces_table_3_fold_sizes(n, train, test):
    assert paper_test_size(n) == test and n - paper_test_size(n) == train


def test_paper_split_is_stratified_80_20_per_fold_and_labelled_image_level():
    # Full C-NMC training folds (Kaggle): ALL/HEM images per fold.
    cells = _cells({0: (2397, 1130), 1: (2418, 1163), 2: (2457, 1096)})
    splits = paper_splits(cells, seed=0)
    assert [(len(s.train), len(s.test)) for s in splits] == [(2821, 706), (2864, 717), (2842, 711)]
    for split in splits:
        assert split.note == PAPER_NOTE and not split.subject_disjoint
        labels = np.array([cells[i].label for i in split.test])
        fold_labels = np.array([cells[i].label for i in np.r_[split.train, split.test]])
        assert abs(labels.mean() - fold_labels.mean()) < 0.002
        assert {cells[i].fold for i in np.r_[split.train, split.test]} == {int(split.name[-1])}
        assert not set(split.train) & set(split.test)


def test_paper_split_mixes_subjects_across_train_and_test():
    cells = _cells({0: (200, 100), 1: (200, 100), 2: (200, 100)})
    split = paper_splits(cells)[0]
    assert {cells[i].subject for i in split.train} & {cells[i].subject for i in split.test}


def test_subject_split_never_puts_one_patient_on_both_sides(mini_root):
    cells = scan(mini_root).cells
    splits = subject_splits(cells, seed=0)
    assert [s.name for s in splits] == ["fold_0", "fold_1", "fold_2"]  # no labelled prelim set in cnmc-mini
    for split in splits:
        sides = [{cells[i].subject for i in rows} for rows in (split.train, split.val, split.test)]
        assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
        assert {cells[i].fold for i in split.test} == {int(split.name[-1])}
        assert len(split.val) > 0 and {cells[i].label for i in split.val} == {0, 1}
        assert len(split.train) + len(split.val) + len(split.test) == 52


def test_subject_protocol_adds_a_final_model_tested_on_the_prelim_set(synthetic_root):
    cells = scan(synthetic_root).cells
    splits = make_splits("subject", cells)
    prelim = splits[-1]
    assert prelim.name == "prelim"
    assert {cells[i].split for i in prelim.test} == {"prelim"}
    assert {cells[i].split for i in np.r_[prelim.train, prelim.val]} == {"train"}
    assert len(prelim.train) + len(prelim.val) == len([c for c in cells if c.split == "train"])


def test_folds_that_share_a_subject_fall_back_to_a_grouped_split():
    cells = _cells({0: (40, 40), 1: (40, 40), 2: (40, 40)})
    moved = cells[0]
    cells[0] = Cell(moved.path, moved.label, moved.subject, 1, "train")  # subject 1 now in folds 0 and 1
    splits = subject_splits(cells)
    assert "grouped" in splits[0].note
    for split in splits:
        check_no_leakage(cells, split)


def test_a_subject_on_both_sides_stops_the_run():
    cells = _cells({0: (20, 20), 1: (20, 20)})
    split = Split("fold_0", np.array([0, 1]), np.array([], dtype=int), np.array([2]))
    with pytest.raises(LeakageError, match="both train and test"):
        check_no_leakage(cells, split)


def test_splits_are_reproducible_by_seed(synthetic_root):
    cells = scan(synthetic_root).cells
    a, b = make_splits("paper", cells, seed=3), make_splits("paper", cells, seed=3)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="unknown protocol"):
        make_splits("random", cells)
