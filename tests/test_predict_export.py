import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import predict_rows
from typer.testing import CliRunner

from alnet.cli import app
from alnet.data.cnmc import scan
from alnet.infer.export import export_onnx
from alnet.infer.predict import expand_paths, load_pipeline
from alnet.schema import PREDICTION_FIELDS

runner = CliRunner()


def test_onnx_gives_the_same_probabilities_as_pytorch_on_real_cells(mini_checkpoint, mini_root, tmp_path):
    path = export_onnx(mini_checkpoint, tmp_path / "alnet.onnx")
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["alnet_preprocessing"])["size"] == 136 and meta["alnet_model"] == "alnet"
    assert [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [
        "batch", 3, 136, 136]  # the batch axis stays symbolic through torch.export
    files = [c.path for c in scan(mini_root).cells]
    torch_rows, _ = predict_rows(load_pipeline(mini_checkpoint, precision="32"), files, batch_size=20)
    onnx_rows, _ = predict_rows(load_pipeline(path), files, batch_size=7)  # another batch size: dynamic axis
    a = np.array([float(r["probability_all"]) for r in torch_rows])
    b = np.array([float(r["probability_all"]) for r in onnx_rows])
    assert len(a) == len(b) == 52
    np.testing.assert_allclose(b, a, atol=1e-4)  # stated tolerance: 1e-4 in probability, fp32 on both sides
    assert [r["predicted"] for r in torch_rows] == [r["predicted"] for r in onnx_rows]


def test_predict_preprocesses_any_size_and_format_like_training(mini_checkpoint, mini_root, tmp_path):
    from PIL import Image

    from alnet.data.transforms import Preprocessing, load_image

    source = next((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_1" / "hem").iterdir())
    Image.open(source).save(tmp_path / "cell.png")
    Image.open(source).convert("RGB").resize((300, 300)).save(tmp_path / "small.jpg", quality=95)
    predictor = load_pipeline(mini_checkpoint, precision="32")
    rows, failed = predict_rows(predictor, [source, tmp_path / "cell.png", tmp_path / "small.jpg"])
    assert not failed
    assert rows[0]["probability_all"] == rows[1]["probability_all"]  # lossless PNG: identical input
    expected = predictor.probabilities(load_image(source, Preprocessing(size=136))[0][None])[0]
    assert float(rows[0]["probability_all"]) == pytest.approx(float(expected), abs=1e-6)


def test_predict_command_lists_unreadable_files_and_writes_one_row_per_image(mini_checkpoint, mini_root, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(mini_root / "C-NMC_Leukemia" / "training_data" / "fold_1", folder)
    (folder / "broken.bmp").write_bytes(b"BM garbage")
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(folder), str(tmp_path / "none*.png"),
                                 "--out", str(out), "--tta", "--batch-size", "5"])
    assert result.exit_code == 1, result.output  # one input could not be classified: say so in the status too
    assert "broken.bmp" in result.output and "matches no image file" in result.output
    assert result.output.rstrip().endswith("1 could not be read")
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert list(rows[0]) == PREDICTION_FIELDS  # one schema for every predictions.csv
    assert {r["predicted"] for r in rows} <= {"ALL", "HEM"} and rows[0]["model"] == "alnet"
    assert {r["label"] for r in rows} == {""}  # the true class is not known to predict
    assert {r["subject"] for r in rows} == {"16", "23", "2", "H10", "H14", "H22"}  # from the C-NMC names
    assert {(r["status"], r["reason"]) for r in rows} == {("ok", "")}  # real cells pass the input gate
    assert all(0 <= float(r["probability_all"]) <= 1 for r in rows)


def test_tta_averages_the_four_flips(mini_checkpoint, mini_root):
    predictor = load_pipeline(mini_checkpoint, precision="32")
    files, _ = expand_paths([str(mini_root / "C-NMC_Leukemia" / "training_data" / "fold_2" / "all" / "*.png")])
    from alnet.data.transforms import Preprocessing, load_image

    images = np.stack([load_image(f, Preprocessing(size=136))[0] for f in files[:4]])
    flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    expected = np.mean([predictor.probabilities(np.ascontiguousarray(f)) for f in flips], axis=0)
    np.testing.assert_allclose(predictor.probabilities(images, tta=True), expected, rtol=1e-6)


def test_export_and_predict_refuse_what_they_cannot_use(tmp_path, mini_checkpoint, mini_root):
    result = runner.invoke(app, ["export", str(tmp_path / "missing.ckpt"), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "no such checkpoint" in result.output
    (tmp_path / "gone.ckpt").symlink_to(tmp_path / "deleted.ckpt")
    for command in (["export", str(tmp_path / "gone.ckpt"), "--onnx", str(tmp_path / "m.onnx")],
                    ["explain", str(tmp_path / "gone.ckpt"), str(_a_cell(mini_root)), "--gradcam"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "gone.ckpt: a link to nothing" in result.output, command
    result = runner.invoke(app, ["predict", str(tmp_path / "missing.onnx"), str(_a_cell(mini_root))])
    assert result.exit_code == 2 and "alnet export" in result.output
    for content in (b"", b"\x08\x01garbage that is no protobuf"):
        (tmp_path / "bad.onnx").write_bytes(content)
        result = runner.invoke(app, ["predict", str(tmp_path / "bad.onnx"), str(_a_cell(mini_root)),
                                     "--out", str(tmp_path / "p.csv")])
        assert result.exit_code == 2 and "bad.onnx: not an ONNX model onnxruntime can load" in result.output


def _a_cell(mini_root):
    return sorted((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all").iterdir())[0]


def test_a_run_directory_cannot_send_a_command_to_a_checkpoint_outside_it(tmp_path, mini_checkpoint, mini_root):
    """folds/<fold>/checkpoint.txt names a file in the fold's checkpoint folder: a run directory from elsewhere
    whose record names a path elsewhere is refused, and `quantize` (which rewrites the checkpoint) writes nothing."""
    run = tmp_path / "run"
    shutil.copytree(mini_checkpoint.parents[2], run)
    victim = tmp_path / "elsewhere.ckpt"
    shutil.copy(mini_checkpoint, victim)
    before = victim.read_bytes()
    record = run / "folds" / "fold_0" / "checkpoint.txt"
    for named in (str(victim), "../../../elsewhere.ckpt"):
        record.write_text(named + "\n")
        result = runner.invoke(app, ["quantize", str(run), "--data", str(_a_cell(mini_root))])
        assert result.exit_code == 2 and "checkpoint.txt: does not name a file" in result.output, result.output
        assert victim.read_bytes() == before
    record.write_text(mini_checkpoint.name + "\n")  # a proper record, but the fold's folder is a link out
    shutil.rmtree(run / "checkpoints" / "fold_0")
    (run / "checkpoints" / "fold_0").symlink_to(victim.parent)
    victim.rename(victim.parent / mini_checkpoint.name)
    victim = victim.parent / mini_checkpoint.name
    result = runner.invoke(app, ["quantize", str(run), "--data", str(_a_cell(mini_root))])
    assert result.exit_code == 2 and "leads out of" in result.output, result.output
    assert victim.read_bytes() == before


def test_package_takes_its_test_image_only_from_the_cells_the_run_recorded(tmp_path, mini_checkpoint, mini_root):
    """A predictions.csv from elsewhere may name any file; the package (which is shared) shows a C-NMC cell under
    the run's data root, never a file like a private photo."""
    import csv

    from alnet.cli.infer import _test_image_of
    from alnet.train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(mini_checkpoint.parents[2], run.path)
    run.write_json(run.data, {**run.read_json(run.data), "root": str(mini_root)})  # as `alnet train --data` records
    with open(run.predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    photo = tmp_path / "holiday.jpg"
    photo.write_bytes(b"private")
    named = tmp_path / "UID_1_1_1_all.bmp"  # a cell's name, but outside the data root
    named.write_bytes(b"private")
    rows = [{**rows[0], "path": str(photo)}, {**rows[0], "path": str(named)}, *rows]
    with open(run.predictions, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chosen = _test_image_of(run)
    assert chosen == Path(rows[2]["path"]) and chosen.resolve().is_relative_to(run.data_root().resolve())
    for root in ("/", str(tmp_path), "."):  # the file system, a folder that is no C-NMC copy, a relative root
        run.write_json(run.data, {**run.read_json(run.data), "root": root})
        assert _test_image_of(run) is None, root


def test_a_run_directory_s_own_files_are_replaced_never_written_through(tmp_path, mini_checkpoint, mini_root):
    """RUN/evaluation.json (and every file alnet writes into a run) is written beside and renamed into place: a
    link standing there from elsewhere is refused before the work, and never followed."""
    run = tmp_path / "run"
    shutil.copytree(mini_checkpoint.parents[2], run)
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    (run / "evaluation.json").symlink_to(outside)
    result = runner.invoke(app, ["evaluate", str(run), "--data", str(mini_root), "--no-progress"])
    assert result.exit_code == 2 and "is a link" in result.output, result.output
    assert outside.read_text() == "precious"
    from alnet.schema import write_text

    write_text(run / "evaluation.json", "{}")  # the run's own writer replaces the link itself
    assert outside.read_text() == "precious" and not (run / "evaluation.json").is_symlink()
    import matplotlib.pyplot as plt

    from alnet.report.figures import save_figure, write_run_figures

    (run / "figures" / "roc.png").unlink()
    (run / "figures" / "roc.png").symlink_to(outside)  # figures too
    save_figure(plt.figure(), run / "figures" / "roc.png")
    assert outside.read_text() == "precious" and not (run / "figures" / "roc.png").is_symlink()
    shutil.rmtree(run / "figures")
    (run / "figures").symlink_to(tmp_path)  # a figures folder that leads out of the run
    with pytest.raises(ValueError, match="a link, not the run's own folder"):
        write_run_figures(run / "figures", {}, [])


def test_outputs_never_replace_what_alnet_did_not_write(tmp_path, mini_checkpoint, mini_root):
    import shutil

    cell = Path(shutil.copy(_a_cell(mini_root), tmp_path / "cell.png"))
    before = cell.read_bytes()
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(cell), "--out", str(cell)])
    assert result.exit_code == 2 and "is one of the inputs" in result.output and cell.read_bytes() == before
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own,table\n")
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(cell), "--out", str(notes)])
    assert result.exit_code == 2 and "--force" in result.output and notes.read_text() == "my,own,table\n"
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "nowhere" / "p.csv", "no such folder")):
        result = runner.invoke(app, ["predict", str(mini_checkpoint), str(cell), "--out", str(out)])
        assert result.exit_code == 2 and message in result.output
    ours = tmp_path / "predictions.csv"
    assert runner.invoke(app, ["predict", str(mini_checkpoint), str(cell), "--out", str(ours)]).exit_code == 0
    assert runner.invoke(app, ["predict", str(mini_checkpoint), str(cell), "--out", str(ours)]).exit_code == 0
    assert runner.invoke(app, ["predict", str(mini_checkpoint), str(cell), "--out", str(notes), "--force"]
                         ).exit_code == 0

    checkpoint_bytes = mini_checkpoint.read_bytes()
    result = runner.invoke(app, ["export", str(mini_checkpoint), "--onnx", str(mini_checkpoint), "--force"])
    assert result.exit_code == 2 and "is one of the inputs" in result.output
    assert mini_checkpoint.read_bytes() == checkpoint_bytes
    model = tmp_path / "m.onnx"
    model.write_text("someone else's model")
    result = runner.invoke(app, ["export", str(mini_checkpoint), "--onnx", str(model)])
    assert result.exit_code == 2 and "--force" in result.output and model.read_text() == "someone else's model"


def test_nothing_classified_writes_no_csv_and_exits_non_zero(tmp_path, mini_checkpoint):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    out = tmp_path / "predictions.csv"
    out.write_text(",".join(PREDICTION_FIELDS) + "\nkept\n")
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(broken), "--out", str(out)])
    assert result.exit_code == 1 and "none of the 1 image(s) could be classified" in result.output
    assert out.read_text().endswith("kept\n"), "an earlier result is not replaced by an empty one"


def test_globs_and_folders_take_image_files_only_and_never_follow_directory_links(tmp_path, mini_root):
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(_a_cell(mini_root), folder / "cell.png")
    (folder / "model.ckpt").write_bytes(b"x")
    (folder / "cache.npy").write_bytes(b"x")
    (folder / "up").symlink_to(tmp_path)  # a link back up: following it would list everything again, forever
    for pattern in (str(folder), str(folder / "**"), str(folder / "**" / "*")):
        files, missing = expand_paths([pattern])
        assert files == [folder / "cell.png"] and missing == []
    assert expand_paths([str(folder / "model.ckpt")]) == ([], [str(folder / "model.ckpt")])


def test_a_tiny_or_odd_image_is_noted_and_refused_as_not_a_cell(tmp_path, mini_checkpoint):
    from PIL import Image

    Image.new("RGB", (1, 1), (120, 60, 200)).save(tmp_path / "dot.png")
    Image.new("RGB", (5000, 20), (120, 60, 200)).save(tmp_path / "strip.png")
    rows, failed = predict_rows(load_pipeline(mini_checkpoint), [tmp_path / "dot.png", tmp_path / "strip.png"])
    assert not failed
    assert "resized from 1x1" in rows[0]["note"] and "very small image" in rows[0]["note"]
    assert "resized from 5000x20" in rows[1]["note"]
    assert [(r["status"], r["predicted"], r["probability_all"]) for r in rows] == [("rejected", "", "")] * 2
    assert all("near-black" in r["reason"] for r in rows)


def test_inference_loads_a_checkpoint_as_a_plain_module_without_the_training_code(mini_checkpoint):
    import subprocess
    import sys

    code = ("import sys; from alnet.checkpoint import load_trained_model; from alnet.infer.predict import "
            "load_pipeline; from alnet.infer.serve import create_app; from alnet.infer.export import export_onnx; "
            "trained = load_trained_model(sys.argv[1]); load_pipeline(sys.argv[1]); "
            "print(type(trained.model).__name__, trained.model.training, trained.preprocessing.size); "
            "print(sorted(m for m in sys.modules if m.startswith(('alnet.train', 'lightning'))))")
    done = subprocess.run([sys.executable, "-c", code, str(mini_checkpoint)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["ALNet False 136", "[]"]


def test_a_checkpoint_is_read_without_unpickling_objects(tmp_path, mini_checkpoint):
    """A checkpoint with an object that would run code when unpickled is refused, and the code never runs."""
    import pickle

    import torch

    from alnet.checkpoint import CheckpointError, load_trained_model

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = torch.load(mini_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["extra"] = Payload()
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not an alnet checkpoint"):
        load_trained_model(hostile)
    assert not marker.exists()


def test_hostile_metadata_in_a_model_file_is_a_one_line_error(tmp_path, mini_checkpoint, mini_root):
    import torch

    path = export_onnx(mini_checkpoint, tmp_path / "m.onnx")
    for value in ("{}", "[1, 2]", "not json", '{"size": 60000, "crop": 1.0}', '{"size": 136, "crop": 0}'):
        model = onnx.load(str(path))
        for entry in model.metadata_props:
            if entry.key == "alnet_preprocessing":
                entry.value = value
        onnx.save(model, str(tmp_path / "bad.onnx"))
        with pytest.raises(ValueError, match="bad.onnx: .*preprocessing.*export the model again"):
            load_pipeline(tmp_path / "bad.onnx")

    from alnet.checkpoint import CheckpointError, load_trained_model

    checkpoint = torch.load(mini_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["seen_subjects"] = 5
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match="odd.ckpt: not an alnet checkpoint this version can read"):
        load_trained_model(tmp_path / "odd.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alnet", "alexnet", "vgg16", "googlenet", "resnet50"])
def test_every_registered_model_exports_through_torch_export_and_matches_pytorch(name, tmp_path):
    import onnxruntime
    import torch

    from alnet.config import RunConfig
    from alnet.infer.export import ProbabilityOfAll, export_graph
    from alnet.models import Penultimate, create_model_from

    torch.manual_seed(19)  # a ResNet-50 whose two outputs are both far below 0 (P(ALL) was 0/0 in the graph)
    model = create_model_from(RunConfig(model=name, pretrained=False, image_size=136)).eval()
    wrapper = ProbabilityOfAll(Penultimate(model), "sigmoid").eval()
    export_graph(wrapper, 136, tmp_path / "m.onnx")
    images = torch.rand(3, 3, 136, 136, generator=torch.Generator().manual_seed(0))  # 3: not the example's 2
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected, raw, features = (t.numpy() for t in wrapper(images))
    probabilities, onnx_raw, onnx_features = session.run(None, {"image": images.numpy()})
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(onnx_raw, raw, atol=1e-5)  # no temperature here: equal to the calibrated ones
    np.testing.assert_allclose(probabilities, onnx_raw, atol=1e-7)
    np.testing.assert_allclose(onnx_features, features, rtol=1e-4, atol=1e-4)  # what the input gate measures


def test_brackets_and_escape_sequences_in_file_names_are_printed_as_text(mini_checkpoint, mini_root, tmp_path):
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(mini_checkpoint), "[/yellow]nope", "\x1b[31mred*.png",
                                 str(_a_cell(mini_root)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "[/yellow]nope: matches no image file" in result.output
    assert "\x1b" not in result.output and "\\x1b[31mred*.png" in result.output
    result = runner.invoke(app, ["predict", str(mini_checkpoint), "a\nerror: forged line", str(_a_cell(mini_root)),
                                 "--out", str(out)])
    assert "a\\nerror: forged line: matches no image file" in result.output  # one line, not two


def test_one_file_named_several_ways_is_one_row(tmp_path, mini_root, monkeypatch):
    import shutil

    shutil.copy(_a_cell(mini_root), tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    files, missing = expand_paths(["../a.png", str(tmp_path / "a.png"), "../sub/../a.png", str(tmp_path)])
    assert files == [Path("../a.png")] and missing == []


def test_a_picture_too_large_to_be_one_cell_is_refused_from_its_header(tmp_path):
    from PIL import Image

    from alnet.data.transforms import MAX_PIXELS, Preprocessing, load_image

    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")  # a few kB on disk, 81 million pixels
    assert 9000 * 9000 > MAX_PIXELS
    with pytest.raises(ValueError, match="9000x9000 pixels is over the limit"):
        load_image(tmp_path / "huge.png", Preprocessing(size=136))


def test_export_never_writes_through_a_link_even_with_force(tmp_path, mini_checkpoint):
    victim = tmp_path / "other-run.ckpt"
    victim.write_bytes(b"another run's checkpoint")
    (tmp_path / "link.onnx").symlink_to(victim)
    result = runner.invoke(app, ["export", str(mini_checkpoint), "--onnx", str(tmp_path / "link.onnx"), "--force"])
    assert result.exit_code == 2 and "is a link" in result.output
    assert victim.read_bytes() == b"another run's checkpoint"
