import csv
import json
import shutil

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from alnet.cli import app
from alnet.data.cnmc import scan
from alnet.infer.export import export_onnx
from alnet.infer.predict import expand_paths, load_predictor, predict_files

runner = CliRunner()


def test_onnx_gives_the_same_probabilities_as_pytorch_on_real_cells(mini_checkpoint, mini_root, tmp_path):
    path = export_onnx(mini_checkpoint, tmp_path / "alnet.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["alnet_preprocessing"])["size"] == 136 and meta["alnet_model"] == "alnet"
    files = [c.path for c in scan(mini_root).cells]
    torch_rows, _ = predict_files(load_predictor(mini_checkpoint, precision="32"), files, batch_size=20)
    onnx_rows, _ = predict_files(load_predictor(path), files, batch_size=7)  # another batch size: dynamic axis
    a = np.array([float(r["probability_all"]) for r in torch_rows])
    b = np.array([float(r["probability_all"]) for r in onnx_rows])
    assert len(a) == len(b) == 52
    np.testing.assert_allclose(b, a, atol=1e-4)  # stated tolerance: 1e-4 in probability, fp32 on both sides
    assert [r["label"] for r in torch_rows] == [r["label"] for r in onnx_rows]


def test_predict_preprocesses_any_size_and_format_like_training(mini_checkpoint, mini_root, tmp_path):
    from PIL import Image

    from alnet.data.transforms import Preprocessing, load_image

    source = next((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_1" / "hem").iterdir())
    Image.open(source).save(tmp_path / "cell.png")
    Image.open(source).convert("RGB").resize((300, 300)).save(tmp_path / "small.jpg", quality=95)
    predictor = load_predictor(mini_checkpoint, precision="32")
    rows, failed = predict_files(predictor, [source, tmp_path / "cell.png", tmp_path / "small.jpg"])
    assert not failed
    assert rows[0]["probability_all"] == rows[1]["probability_all"]  # lossless PNG: identical input
    expected = predictor(load_image(source, Preprocessing(size=136))[0][None])[0]
    assert float(rows[0]["probability_all"]) == pytest.approx(float(expected), abs=1e-6)


def test_predict_command_lists_unreadable_files_and_writes_one_row_per_image(mini_checkpoint, mini_root, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(mini_root / "C-NMC_Leukemia" / "training_data" / "fold_1", folder)
    (folder / "broken.bmp").write_bytes(b"BM garbage")
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(mini_checkpoint), str(folder), str(tmp_path / "none*.png"),
                                 "--out", str(out), "--tta", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    assert "broken.bmp" in result.output and "matches no file" in result.output
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert set(rows[0]) == {"path", "label", "probability_all", "model", "checkpoint"}
    assert {r["label"] for r in rows} <= {"ALL", "HEM"} and rows[0]["model"] == "alnet"
    assert all(0 <= float(r["probability_all"]) <= 1 for r in rows)


def test_tta_averages_the_four_flips(mini_checkpoint, mini_root):
    predictor = load_predictor(mini_checkpoint, precision="32")
    files, _ = expand_paths([str(mini_root / "C-NMC_Leukemia" / "training_data" / "fold_2" / "all" / "*.png")])
    from alnet.data.transforms import Preprocessing, load_image

    images = np.stack([load_image(f, Preprocessing(size=136))[0] for f in files[:4]])
    flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    expected = np.mean([predictor(np.ascontiguousarray(f)) for f in flips], axis=0)
    np.testing.assert_allclose(predictor(images, tta=True), expected, rtol=1e-6)


def test_export_and_predict_refuse_what_they_cannot_use(tmp_path, mini_checkpoint):
    result = runner.invoke(app, ["export", str(tmp_path / "missing.ckpt"), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "no such checkpoint" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "missing.onnx"), str(mini_checkpoint)])
    assert result.exit_code == 2 and "alnet export" in result.output


def test_inference_loads_a_checkpoint_as_a_plain_module_without_the_training_code(mini_checkpoint):
    import subprocess
    import sys

    code = ("import sys; from alnet.checkpoint import load_trained_model; from alnet.infer.predict import "
            "load_predictor; from alnet.infer.serve import create_app; from alnet.infer.export import export_onnx; "
            "trained = load_trained_model(sys.argv[1]); load_predictor(sys.argv[1]); "
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
