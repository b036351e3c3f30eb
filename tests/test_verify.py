import csv
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from alnet.cli import app
from alnet.data import verify as V

runner = CliRunner()
TRAINING = Path("C-NMC_Leukemia") / "training_data"
CHANGED_FILE = TRAINING / "fold_1" / "hem" / "UID_H10_1_1_hem.bmp"
DELETED_FILE = TRAINING / "fold_2" / "all" / "UID_13_3_1_all.bmp"


def _originals(mini_root: Path, out: Path) -> Path:
    """The 52 original BMPs of tests/data/cnmc-mini: the two kept as BMP copied, the 50 stored as lossless PNG
    written back as BMP (the originals' header says 3,779 pixels per metre, Pillow's default 3,780)."""
    for path in sorted(mini_root.rglob("*")):
        if path.suffix not in (".bmp", ".png"):
            continue
        target = out / path.relative_to(mini_root).with_suffix(".bmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".bmp":
            shutil.copyfile(path, target)
        else:
            Image.open(path).save(target, format="BMP", dpi=(3779 * 0.0254,) * 2)
    return out


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    return _originals(Path(__file__).resolve().parent / "data" / "cnmc-mini", tmp_path_factory.mktemp("originals"))


@pytest.fixture
def damaged(originals, tmp_path) -> Path:
    """The originals with one byte changed in one file and another file deleted."""
    copy = Path(shutil.copytree(originals, tmp_path / "copy"))
    with open(copy / CHANGED_FILE, "r+b") as f:
        f.seek(10_000)
        byte = f.read(1)
        f.seek(10_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    (copy / DELETED_FILE).unlink()
    return copy


def test_the_packaged_list_holds_every_file_of_the_kaggle_copy():
    listed = V.read_manifest()
    groups = Counter(V.group_of(tuple(e.path.split("/"))) for e in listed)
    assert len(listed) == 15_115 and sum(n for (_, cls), n in groups.items() if cls != "labels CSV") == 15_114
    assert [groups[(f"fold_{k}", "ALL")] + groups[(f"fold_{k}", "HEM")] for k in range(3)] == [3527, 3581, 3553]
    assert (groups[("fold_2", "ALL")], groups[("fold_2", "HEM")]) == (2457, 1096)
    assert groups[("prelim", "images")] == 1867 and groups[("prelim", "labels CSV")] == 1
    final = [e for e in listed if V.group_of(tuple(e.path.split("/"))) == ("final", "images")]
    assert len(final) == 2586 and {e.size for e in final} == {1_080_054}


def test_the_original_test_cells_match_and_the_rest_of_the_dataset_is_missing(originals):
    verification = V.verify(originals, workers=2)
    total = verification.total()
    assert (total[V.MATCH], total[V.MISSING], total[V.CHANGED], total[V.EXTRA]) == (52, 15_115 - 52, 0, 0)
    assert not verification.ok and not verification.tcia
    assert verification.counts()[("fold_1", "HEM")][V.MATCH] == 6

    result = runner.invoke(app, ["verify", str(originals), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "52 of 15,115 listed files match" in result.output
    assert "missing entirely: prelim images (1,867), prelim labels CSV (1), final images (2,586)" in result.output


def test_the_repositorys_png_conversions_are_extra_and_their_originals_missing(mini_root):
    verification = V.verify(mini_root, quick=True)
    total = verification.total()
    assert (total[V.MATCH], total[V.MISSING]) == (2, 15_115 - 2)
    extra = verification.with_status(V.EXTRA)
    assert sum(c.name.endswith(".png") for c in extra) == 50
    assert [(c.group, c.name) for c in extra if c.group == V.OTHER] == [(V.OTHER, "README.md")]


def test_a_copy_holding_every_listed_file_passes(originals):
    listed = [e for e in V.read_manifest() if (originals / e.path).is_file()]
    verification = V.verify(originals, manifest=listed)
    assert verification.ok and verification.total()[V.MATCH] == 52 == len(listed)


def test_a_changed_byte_and_a_deleted_file_are_both_named(damaged, tmp_path):
    verification = V.verify(damaged, workers=3)
    assert [c.name for c in verification.with_status(V.CHANGED)] == [CHANGED_FILE.as_posix()]
    assert DELETED_FILE.as_posix() in {c.name for c in verification.with_status(V.MISSING)}
    assert verification.total()[V.MATCH] == 50

    report = tmp_path / "report.csv"
    result = runner.invoke(app, ["verify", str(damaged), "--no-progress", "--report", str(report)])
    assert result.exit_code == 1, result.output
    assert f"{CHANGED_FILE.as_posix()} (found as {CHANGED_FILE.as_posix()}): same size, another sha256" in \
        result.output
    rows = {row["file"]: row for row in csv.DictReader(report.open())}
    assert rows[CHANGED_FILE.as_posix()]["status"] == "changed"
    assert rows[DELETED_FILE.as_posix()]["status"] == "missing"
    assert len(rows) == 1 + 15_115 - 51  # the changed file and every missing one

    again = runner.invoke(app, ["verify", str(damaged), "--no-progress", "--report", str(report), "--limit", "0"])
    assert again.exit_code == 1, again.output  # its own report is replaced without --force
    stranger = tmp_path / "notes.csv"
    stranger.write_text("keep me\n")
    refused = runner.invoke(app, ["verify", str(damaged), "--report", str(stranger)])
    assert refused.exit_code == 2 and stranger.read_text() == "keep me\n"
    image = next(damaged.rglob("*.bmp"))  # --force never turns a dataset image into a report
    before = image.read_bytes()
    refused = runner.invoke(app, ["verify", str(damaged), "--report", str(image), "--force"])
    assert refused.exit_code == 2 and "inside the dataset" in refused.output and image.read_bytes() == before
    os.mkfifo(tmp_path / "pipe.csv")  # a pipe would block the writer forever
    refused = runner.invoke(app, ["verify", str(damaged), "--report", str(tmp_path / "pipe.csv"), "--force"])
    assert refused.exit_code == 2 and "not a regular file" in refused.output


def test_quick_compares_names_and_sizes_only(damaged):
    quick = V.verify(damaged, quick=True)
    assert quick.total()[V.CHANGED] == 0  # one byte changed, same size: only the hash sees it
    assert DELETED_FILE.as_posix() in {c.name for c in quick.with_status(V.MISSING)}
    with open(damaged / CHANGED_FILE, "ab") as f:
        f.write(b"x")
    changed = V.verify(damaged, quick=True).with_status(V.CHANGED)
    assert [(c.name, c.note) for c in changed] == [(CHANGED_FILE.as_posix(), "608,455 bytes, the list says 608,454")]


def test_a_tcia_copy_is_matched_by_name_and_its_differences_are_not_called_damage(originals, tmp_path):
    tcia = tmp_path / "tcia"
    shutil.copytree(originals / TRAINING, tcia / "C-NMC_training_data")
    with open(tcia / "C-NMC_training_data" / "fold_0" / "all" / "UID_4_1_1_all.bmp", "r+b") as f:
        f.seek(38)  # the resolution field of the header: another writer, same pixels
        f.write(b"\xc4")
    verification = V.verify(tcia)
    assert verification.tcia and verification.total()[V.MATCH] == 51
    result = runner.invoke(app, ["verify", str(tcia), "--no-progress"])
    assert result.exit_code == 1
    assert "differ from Kaggle" in result.output and "this is a TCIA copy: 1 file(s) differ" in result.output
    assert "not mean they are damaged" in result.output


def test_links_out_of_data_are_not_followed_and_fifos_are_skipped(originals, tmp_path):
    data = tmp_path / "data"
    (data / TRAINING / "fold_0").mkdir(parents=True)
    (data / TRAINING / "fold_0" / "all").symlink_to(originals / TRAINING / "fold_0" / "all")  # a folder link
    hem = data / TRAINING / "fold_0" / "hem"
    hem.mkdir()
    (hem / "UID_H6_1_1_hem.bmp").symlink_to(originals / TRAINING / "fold_0" / "hem" / "UID_H6_1_1_hem.bmp")
    os.mkfifo(hem / "UID_H6_1_2_hem.bmp")
    inside = hem / "UID_H7_1_1_hem.bmp"
    shutil.copyfile(originals / TRAINING / "fold_0" / "hem" / "UID_H7_1_1_hem.bmp", inside)
    (hem / "UID_H7_1_2_hem.bmp").symlink_to(inside)  # a link inside DATA is read, and finds another file

    verification = V.verify(data)
    assert [c.name.split("/")[-1] for c in verification.with_status(V.MATCH)] == ["UID_H7_1_1_hem.bmp"]
    assert [c.name.split("/")[-1] for c in verification.with_status(V.CHANGED)] == ["UID_H7_1_2_hem.bmp"]
    reasons = {s.path.name: s.reason for s in verification.skipped}
    assert reasons["all"].startswith("a link to a folder, not followed")
    assert reasons["UID_H6_1_1_hem.bmp"] == "a link out of DATA, not followed"
    assert reasons["UID_H6_1_2_hem.bmp"].startswith("not a regular file")


def test_an_unreadable_file_is_reported_and_fails_the_check(originals, monkeypatch):
    real = V.sha256_of

    def sha256_of(path):
        if path.name == "UID_5_1_1_all.bmp":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(V, "sha256_of", sha256_of)
    verification = V.verify(originals)
    unreadable = verification.with_status(V.UNREADABLE)
    assert [c.name.split("/")[-1] for c in unreadable] == ["UID_5_1_1_all.bmp"]
    assert unreadable[0].note == "cannot be read (Permission denied); check its permissions"


def test_a_missing_folder_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere: no such directory" in result.output


def test_info_points_at_verify(originals):
    result = runner.invoke(app, ["info", str(originals)])
    assert result.exit_code == 0 and f"alnet verify {originals}" in result.output
