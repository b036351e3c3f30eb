"""Generated cells: the GAN, its samples, their quality figures, and how a run mixes them into training only."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from alnet.cli import app
from alnet.config import RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import GENERATED, scan
from alnet.data.protocols import make_splits
from alnet.data.transforms import Preprocessing
from alnet.gan.mixing import gan_for_split, mix
from alnet.gan.networks import Discriminator, Generator, diff_augment
from alnet.gan.quality import kid, two_sample_accuracy
from alnet.gan.sample import sample_cells
from alnet.gan.store import GAN_JSON, GENERATOR, GanError, generate, read_gan
from alnet.gan.training import GanConfig, train_gan
from alnet.labels import ALL, HEM, NAMES
from alnet.schema import read_predictions
from alnet.trust.subjects import paired_difference

TINY = GanConfig(resolution=64, width=4, z_dim=8, steps=3, batch_size=8)


@pytest.fixture(scope="module")
def mini_64(mini_root, tmp_path_factory):
    """The real cells at the GAN's 64 px, and their subject splits."""
    prepared = prepare(scan(mini_root).cells, tmp_path_factory.mktemp("cache-64"), Preprocessing(size=64))
    return prepared, make_splits("subject", prepared.cells, seed=0)


@pytest.fixture(scope="module")
def gan_dir(mini_64, tmp_path_factory) -> Path:
    """A tiny GAN per subject split, trained for a few steps on each split's real training cells."""
    prepared, splits = mini_64
    folder = tmp_path_factory.mktemp("gans")
    for split in splits:
        train_gan(prepared, split, TINY, folder / split.name, log=lambda m: None)
    return folder


@pytest.mark.parametrize("resolution", [64, 128, 224])
def test_generator_makes_square_rgb_cells_at_each_resolution(resolution):
    generator = Generator(resolution, width=2, z_dim=4).eval()
    cells = generate(generator, np.array([ALL, HEM, ALL]), seed=1)
    assert cells.shape == (3, resolution, resolution, 3) and cells.dtype == np.uint8
    assert np.array_equal(cells, generate(generator, np.array([ALL, HEM, ALL]), seed=1))  # same seed, same cells
    scores = Discriminator(resolution, width=2)(torch.rand(2, 3, resolution, resolution) * 2 - 1,
                                                torch.tensor([ALL, HEM]))
    assert scores.shape == (2,)


def test_generator_refuses_a_resolution_it_was_not_built_for():
    with pytest.raises(ValueError, match="resolution must be one of 64, 128, 224"):
        Generator(100)


def test_diff_augment_keeps_gradients_and_fills_with_black():
    images = torch.full((4, 3, 64, 64), 0.5, requires_grad=True)
    out = diff_augment(images, torch.Generator().manual_seed(0))
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert (out == -1).any()  # cutout and the translated border are black, C-NMC's background


def test_a_gan_learns_only_from_its_splits_training_cells(gan_dir, mini_64):
    prepared, splits = mini_64
    for split in splits:
        gan = read_gan(gan_dir / split.name)
        train_subjects = {prepared.cells[i].subject for i in split.train}
        held_out = {prepared.cells[i].subject for i in np.r_[split.val, split.test]}
        assert gan.seen_subjects == train_subjects and not gan.seen_subjects & held_out
        assert gan.record["trained_on"]["images"] == len(split.train)
        assert (gan_dir / split.name / "samples.png").is_file() and (gan_dir / split.name / "history.csv").is_file()


def test_sampled_cells_have_the_right_shape_labels_and_names_and_are_never_data(gan_dir, tmp_path):
    gan = read_gan(gan_dir / "fold_0")
    rows = sample_cells(gan, 3, tmp_path, seed=4)
    assert [r["label"] for r in rows] == [NAMES[ALL]] * 3 + [NAMES[HEM]] * 3
    dataset = scan(tmp_path)
    assert dataset.cells == [] and len(dataset.generated) == 6
    assert {c.split for c in dataset.generated} == {GENERATED}
    assert sorted(c.label for c in dataset.generated) == [HEM] * 3 + [ALL] * 3
    for cell in dataset.generated:
        assert cell.path.name.startswith(f"GAN_{gan.gan_id}_s4_")
        assert np.asarray(Image.open(cell.path)).shape == (64, 64, 3)


def test_info_and_verify_count_generated_cells_apart(gan_dir, tmp_path, mini_root):
    data = Path(shutil.copytree(mini_root, tmp_path / "data"))
    sample_cells(read_gan(gan_dir / "fold_0"), 2, tmp_path / "made")
    for made in (tmp_path / "made" / "C-NMC_Leukemia" / "training_data" / "fold_0").glob("*/*.png"):
        shutil.copy(made, data / "C-NMC_Leukemia" / "training_data" / "fold_0" / made.parent.name / made.name)
    info = CliRunner().invoke(app, ["info", str(data), "--json"])
    summary = json.loads(info.stdout)
    assert summary["images"] == 52 and summary["generated"] == 4 and summary["by_split"][GENERATED]["fold_0"] == {
        "all": {"images": 2, "subjects": 0}, "hem": {"images": 2, "subjects": 0}}
    assert len(scan(data).cells) == 52  # never data
    from alnet.data.verify import EXTRA, verify
    from alnet.data.verify import GENERATED as GENERATED_STATUS

    checks = verify(data, quick=True, manifest=[]).checks
    generated = [c for c in checks if c.status == GENERATED_STATUS]
    assert len(generated) == 4 and all(Path(c.name).name.startswith("GAN_") for c in generated)
    assert not [c for c in checks if c.status == EXTRA and "GAN_" in c.name]


def test_generated_cells_join_the_training_rows_only(gan_dir, mini_64):
    prepared, splits = mini_64
    split = splits[0]
    images = torch.from_numpy(np.array(prepared.images))
    labels = torch.tensor([c.label for c in prepared.cells])
    mixed = mix(read_gan(gan_dir / split.name), split, images, labels, ratio=1.0, seed=0, size=64)
    added = mixed.train[len(split.train):]
    assert len(added) == len(split.train) and added.min() == len(images)  # after every real row
    assert torch.equal(mixed.images[: len(images)], images)  # validation and test rows point at real cells
    assert not set(added) & set(np.r_[split.val, split.test])
    made = mixed.labels[torch.from_numpy(added)]
    assert int((made == ALL).sum()) == int((labels[torch.from_numpy(split.train)] == ALL).sum())  # class shares


def test_a_gan_that_saw_a_test_subject_is_refused(gan_dir, mini_64, tmp_path):
    prepared, splits = mini_64
    # fold_0's GAN learned from folds 1 and 2: their subjects are fold_1's test subjects.
    forged = tmp_path / "fold_1"
    shutil.copytree(gan_dir / "fold_0", forged)
    record = json.loads((forged / GAN_JSON).read_text())
    record["split"] = "fold_1"
    (forged / GAN_JSON).write_text(json.dumps(record))
    with pytest.raises(GanError, match="validation or test cell"):
        gan_for_split(tmp_path, splits[1], prepared.cells, RunConfig())
    with pytest.raises(GanError, match="no GAN for split fold_0"):
        gan_for_split(tmp_path, splits[0], prepared.cells, RunConfig())


def test_train_with_a_gan_of_other_subjects_stops_before_writing_anything(gan_dir, mini_root, tmp_path):
    wrong = tmp_path / "gans"
    shutil.copytree(gan_dir, wrong)
    record = json.loads((wrong / "fold_2" / GAN_JSON).read_text())
    record["trained_on"]["subjects"].append(json.loads((gan_dir / "fold_2" / GAN_JSON).read_text())
                                            ["held_out_subjects"][0])
    (wrong / "fold_2" / GAN_JSON).write_text(json.dumps(record))
    result = CliRunner().invoke(app, ["train", "--data", str(mini_root), "--epochs", "1", "--image-size", "136",
                                      "--synthetic", str(wrong), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2 and "saw subject(s)" in result.output
    assert not (tmp_path / "run").exists()


def _edit_record(folder: Path, edit) -> None:
    record = json.loads((folder / GAN_JSON).read_text())
    edit(record)
    (folder / GAN_JSON).write_text(json.dumps(record))


def _bomb(path: Path) -> None:
    """A small generator file whose compressed zip member unpacks to more than 1 GiB (the limit)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            chunk = bytes(2**24)
            for _ in range(65):
                member.write(chunk)


def _with_weights(folder: Path, write) -> None:
    """Replace generator.pt and point gan.json's id at the new file (so only the attack itself is tested)."""
    import hashlib

    write(folder / GENERATOR)
    _edit_record(folder, lambda r: r.update(gan_id=hashlib.sha256((folder / GENERATOR).read_bytes()).hexdigest()[:8]))


@pytest.mark.parametrize("damage", ["not json", "huge number", "pickle", "too big", "zip bomb", "wrong shapes",
                                    "not finite", "swapped weights", "link", "giant settings", "float resolution",
                                    "split elsewhere", "bad id"])
def test_a_damaged_or_hostile_gan_folder_is_a_one_line_error(gan_dir, tmp_path, damage):
    folder = Path(shutil.copytree(gan_dir / "fold_0", tmp_path / "fold_0"))
    if damage == "not json":
        (folder / GAN_JSON).write_text("{nope")
    elif damage == "huge number":
        (folder / GAN_JSON).write_text('{"settings": ' + "9" * 5000 + "}")
    elif damage == "pickle":
        import pickle

        _with_weights(folder, lambda p: p.write_bytes(pickle.dumps(print, protocol=2)))
    elif damage == "too big":
        with open(folder / GAN_JSON, "ab") as handle:
            handle.truncate(65 * 2**20)
    elif damage == "zip bomb":
        _with_weights(folder, _bomb)
    elif damage == "wrong shapes":
        _edit_record(folder, lambda r: r["settings"].update(width=8))
    elif damage == "not finite":
        state = torch.load(folder / GENERATOR, weights_only=True)
        state["state_dict"]["to_rgb.0.weight"].fill_(float("nan"))
        _with_weights(folder, lambda p: torch.save(state, p))
    elif damage == "swapped weights":  # another split's generator under this record: its id no longer matches
        shutil.copy(gan_dir / "fold_1" / GENERATOR, folder / GENERATOR)
    elif damage == "link":
        (folder / GENERATOR).unlink()
        (folder / GENERATOR).symlink_to(gan_dir / "fold_1" / GENERATOR)
    elif damage == "giant settings":  # a few bytes must not build a network of gigabytes
        _edit_record(folder, lambda r: r["settings"].update(resolution=224, width=512, z_dim=1024))
    elif damage == "float resolution":
        _edit_record(folder, lambda r: r["settings"].update(resolution=64.0))
    elif damage == "split elsewhere":
        _edit_record(folder, lambda r: r.update(split="../x"))
    else:
        _edit_record(folder, lambda r: r.update(gan_id="../../x"))
    with pytest.raises(GanError, match=str(folder)) as refused:
        read_gan(folder)
    if damage == "zip bomb":  # the reason, not only that it failed
        assert "would unpack to" in str(refused.value)


def test_a_gan_trained_on_another_copy_of_the_test_cells_is_refused_whatever_their_format(gan_dir, mini_64, tmp_path):
    prepared, splits = mini_64
    forged = tmp_path / "fold_0"
    shutil.copytree(gan_dir / "fold_0", forged)
    paper = make_splits("paper", prepared.cells, seed=0)
    test_name = prepared.cells[paper[0].test[0]].path.name  # a test cell of fold_0, as a .bmp of another copy
    _edit_record(forged, lambda r: (r["trained_on"]["names"].append(Path(test_name).stem.upper() + ".bmp"),
                                    r.update(protocol="paper"), r["settings"].update(protocol="paper")))
    with pytest.raises(GanError, match="validation or test cell"):
        gan_for_split(tmp_path, paper[0], prepared.cells, RunConfig(protocol="paper"))


def test_a_ratio_that_draws_no_generated_cell_is_refused_before_anything_is_written(gan_dir, mini_64):
    from alnet.train.run import check_gans

    prepared, splits = mini_64
    with pytest.raises(GanError, match="gives no generated cell"):
        check_gans(RunConfig(synthetic=str(gan_dir), synthetic_ratio=0.01), splits, prepared.cells)
    check_gans(RunConfig(synthetic=str(gan_dir), synthetic_ratio=0.1), splits, prepared.cells)


def test_a_gan_of_another_seed_is_refused(gan_dir, mini_64):
    prepared, splits = mini_64
    with pytest.raises(GanError, match="seed"):
        gan_for_split(gan_dir, splits[0], prepared.cells, RunConfig(seed=1))


def test_gan_train_never_writes_through_a_link_or_into_the_dataset(mini_root, tmp_path):
    precious = tmp_path / "precious.csv"
    precious.write_text("mine")
    (tmp_path / "gans" / "fold_0").mkdir(parents=True)
    (tmp_path / "gans" / "fold_0" / "history.csv").symlink_to(precious)
    runner = CliRunner()
    linked = runner.invoke(app, ["gan", "train", "--data", str(mini_root), "--out", str(tmp_path / "gans"),
                                 "--split", "fold_0", "--steps", "1", "--width", "2", "--no-progress"])
    assert linked.exit_code == 2 and "history.csv" in linked.output and precious.read_text() == "mine"
    data = Path(shutil.copytree(mini_root, tmp_path / "data"))
    inside = runner.invoke(app, ["gan", "train", "--data", str(data), "--out", str(data / "gans"), "--steps", "1",
                                 "--no-progress"])
    assert inside.exit_code == 2 and "inside the dataset" in inside.output and not (data / "gans").exists()


def test_generated_cells_in_the_test_folders_are_never_test_cells(tmp_path, synthetic_copy):
    layout = scan(synthetic_copy).layout
    shutil.copy(next(layout.prelim.glob("*.bmp")), layout.prelim / "GAN_0123abcd_s0_000001_all.bmp")
    shutil.copy(next(layout.final.glob("*.bmp")), layout.final / "gan_0123ABCD_s0_000002_hem.bmp")
    with open(layout.prelim_labels, "a") as labels:  # a labels row naming a generated cell
        labels.write("99,GAN_0123abcd_s0_000001_all.bmp,1\n")
    dataset = scan(synthetic_copy)
    assert not [c for c in dataset.cells if c.path.name.lower().startswith("gan_")]
    assert len(dataset.generated) == 2
    assert [p.message for p in dataset.problems if "GAN_" in str(p.path) or "GAN_" in p.message] == \
        ["GAN_0123abcd_s0_000001_all.bmp names a generated cell (GAN_…), which is never a test cell; delete the row"]


def test_kid_and_the_two_sample_test_tell_real_from_noise_but_not_real_from_real(mini_root):
    from alnet.models import create_model, penultimate

    prepared = prepare(scan(mini_root).cells, preprocessing=Preprocessing(size=136))
    model = create_model("alnet", input_size=136).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        real = penultimate(model, torch.from_numpy(np.array(prepared.images)).permute(0, 3, 1, 2).float() / 255)[1]
        noise = penultimate(model, torch.rand(52, 3, 136, 136))[1]
    real, noise = real.numpy(), noise.numpy()
    subjects = np.array([c.subject for c in prepared.cells])
    half = np.isin(subjects, sorted(set(subjects))[::2])
    same_kid, _ = kid(real[half], real[~half])
    noise_kid, _ = kid(real, noise)
    assert abs(same_kid) < 0.2 < 1.0 < noise_kid
    same = two_sample_accuracy(real[half], subjects[half], real[~half])["accuracy"]
    assert 0.25 <= same <= 0.75
    assert two_sample_accuracy(real, subjects, noise)["accuracy"] > 0.9


def test_paired_difference_of_one_model_with_itself_is_zero_and_of_a_better_one_positive():
    rows = [{"fold": "fold_0", "path": f"{s}_{k}.bmp", "subject": s, "label": "ALL" if s.isdigit() else "HEM",
             "probability_all": str(p)}
            for s, p in (("1", 0.6), ("2", 0.4), ("3", 0.7), ("H1", 0.3), ("H2", 0.6), ("H3", 0.2)) for k in range(2)]
    same = paired_difference(rows, rows)
    assert same["image"]["accuracy"]["difference"] == 0 and same["subject"]["auc"]["interval"]["high"] == 0
    better = [{**r, "probability_all": "0.9" if r["label"] == "ALL" else "0.1"} for r in rows]
    found = paired_difference(rows, better)
    assert found["image"]["accuracy"]["difference"] == pytest.approx(2 / 6)
    assert found["subject"]["accuracy"]["interval"]["low"] >= 0
    with pytest.raises(ValueError, match="same test cells"):
        paired_difference(rows, rows[:-1])


@pytest.mark.slow
def test_gan_train_sample_quality_and_compare_with_and_without_generated_cells_end_to_end(mini_root, tmp_path):
    """The user's path on the real cells: a GAN per split, cells drawn from it, ALNet with and without them under
    the same splits and seed, the paired difference, and the GAN's quality in the features of the ALNet without."""
    from alnet.checkpoint import load_trained_model
    from alnet.train.rundir import ComparisonDir

    runner, gans = CliRunner(), tmp_path / "gans"
    made = runner.invoke(app, ["gan", "train", "--data", str(mini_root), "--out", str(gans), "--steps", "2",
                               "--width", "4", "--batch-size", "8", "--no-progress"])
    assert made.exit_code == 0, made.output
    assert sorted(p.name for p in gans.iterdir()) == ["fold_0", "fold_1", "fold_2"]
    options = ["gan", "train", "--data", str(mini_root), "--out", str(gans), "--split", "fold_1", "--width", "4",
               "--batch-size", "8", "--no-progress"]
    again = runner.invoke(app, [*options, "--steps", "2"])
    assert again.exit_code == 0 and "already in" in again.output  # finished work is kept
    other = runner.invoke(app, [*options, "--steps", "3"])
    assert other.exit_code == 2 and "steps 2 → 3" in other.output  # and never replaced unasked

    sampled = runner.invoke(app, ["gan", "sample", str(gans), "--n", "2", "--out", str(tmp_path / "cells"),
                                  "--no-progress"])
    assert sampled.exit_code == 0, sampled.output
    assert len(list((tmp_path / "cells").rglob("GAN_*.png"))) == 4 and (tmp_path / "cells" / "generated.csv").is_file()

    from conftest import compare_on_mini

    rows, output = compare_on_mini(mini_root, tmp_path / "compare", "alnet", "--synthetic", str(gans),
                                   "--synthetic-ratio", "1")
    assert [r["model"] for r in rows] == ["alnet", "alnet + generated cells (ratio 1)"]
    assert "with generated cells minus without" in output
    comparison = ComparisonDir(tmp_path / "compare")
    difference = json.loads(comparison.generated.read_text())["difference"]["alnet"]
    assert difference["cells"] == 52 and set(difference["subject"]) == {"accuracy", "auc"}
    with_cells = comparison.run("alnet-with-generated")
    metrics = json.loads(with_cells.metrics.read_text())
    assert [s["generated"] for s in metrics["synthetic"]["splits"]] == [
        s["train"]["images"] for s in json.loads(with_cells.splits.read_text())]
    # The test pass answered real cells only, and the input gate learned from the real training cells only.
    assert all(Path(r["path"]).name.startswith("UID_") for r in read_predictions(with_cells.predictions))
    for split in json.loads(with_cells.splits.read_text()):
        gate = load_trained_model(with_cells.chosen_checkpoint(split["name"])).input_gate
        assert gate.cells == split["train"]["images"]
    assert "Generated cells" in with_cells.model_card.read_text()
    assert "Generated cells" in with_cells.report.read_text()

    quality = runner.invoke(app, ["gan", "quality", str(gans), "--data", str(mini_root), "--features-from",
                                  str(comparison.run("alnet").path), "--split", "fold_1", "--no-progress"])
    assert quality.exit_code == 0, quality.output
    figures = json.loads((gans / "fold_1" / "quality.json").read_text())
    assert figures["kid"] > 0 and 0 <= figures["two_sample"]["accuracy"] <= 1
