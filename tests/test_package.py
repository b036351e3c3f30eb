import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from alnet.cli import app
from alnet.infer.package import (
    FILES,
    Calibration,
    PackagedNetwork,
    PackageError,
    calibration_of,
)

CELL = "tests/data/cnmc-mini/C-NMC_Leukemia/training_data/fold_0/all/UID_5_1_1_all.bmp"
# bioimageio.core 0.11.0 pins bioimageio.spec 0.5.12.0, whose serializer fails under pydantic >= 2.12 (alnet's
# environment has a newer one): it gets an environment of its own, with these versions, which sees torch and
# onnxruntime from alnet's (a .pth file placed after its own packages, so its pydantic wins).
CORE_PINS = ("bioimageio.core==0.11.0", "bioimageio.spec==0.5.12.0", "pydantic==2.11.10")


class Logits(torch.nn.Module):
    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), x.flatten(1).mean(1) * 8 - 4], 1)


def test_calibration_is_read_in_the_form_training_stores_and_unknown_forms_are_refused():
    from alnet.fitting import fit_on_validation, not_fitted

    assert calibration_of(None) is None
    assert calibration_of(not_fitted()["calibration"]) is None  # the paper protocol: no temperature, a note
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0] * 4)
    raw = np.where(labels == 1, 0.97, 0.08)
    raw[::5] = 1 - raw[::5]  # overconfident and sometimes wrong: a temperature above 1
    stored = fit_on_validation(labels, raw, [f"s{i % 4}" for i in range(len(labels))])["calibration"]
    calibration = calibration_of(stored)
    assert calibration.temperature == pytest.approx(stored["temperature"]) and calibration.temperature > 1
    assert "temperature scaling" in calibration.description
    with pytest.raises(PackageError, match="'platt'"):
        calibration_of({"method": "platt", "slope": 1.5, "intercept": -0.2})
    with pytest.raises(PackageError, match="unreadable"):
        calibration_of({"method": "temperature", "temperature": -1.0})


def test_packaged_network_outputs_one_probability_column_calibrated_as_predict_calibrates():
    from alnet.trust.calibration import apply_temperature_torch

    x = torch.rand(4, 3, 8, 8)
    plain = PackagedNetwork(Logits(), "softmax", None)(x)
    assert plain.shape == (4, 1) and bool(((plain >= 0) & (plain <= 1)).all())
    tempered = PackagedNetwork(Logits(), "softmax", Calibration(2.0, "temperature scaling, T = 2"))(x)
    assert torch.allclose(tempered, apply_temperature_torch(plain, 2.0), atol=1e-6)
    assert not torch.allclose(tempered, plain)


@pytest.fixture(scope="module")
def package(mini_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "alnet-package"
    result = CliRunner().invoke(app, ["package", str(mini_checkpoint), "--out", str(out), "--image", CELL, "--zip",
                                      "--author", "A. Researcher"])
    assert result.exit_code == 0, result.output
    return out


def _apply_preprocessing(rdf: dict, tensor: np.ndarray) -> np.ndarray:
    """The input's preprocessing as the rdf writes it (the operations this package uses)."""
    for step in rdf["inputs"][0]["preprocessing"]:
        if step["id"] == "ensure_dtype":
            tensor = tensor.astype(step["kwargs"]["dtype"])
        elif step["id"] == "scale_linear":
            tensor = tensor * step["kwargs"]["gain"] + step["kwargs"]["offset"]
        else:
            raise AssertionError(f"unexpected operation {step['id']}")
    return tensor


@pytest.mark.slow
def test_package_holds_description_weights_test_tensors_cover_and_model_card(package):
    for name in FILES.values():
        assert (package / name).is_file(), name
    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5.")
    assert [a["type"] for a in rdf["inputs"][0]["axes"]] == ["batch", "channel", "space", "space"]
    assert rdf["inputs"][0]["data"]["type"] == "uint8"
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["probability_all"]
    assert {c["doi"] for c in rdf["cite"]} == {"10.1016/j.combiomed.2022.105894", "10.7937/tcia.2019.dc64i46r"}
    assert rdf["license"] == "CC-BY-4.0" and rdf["authors"] == [{"name": "A. Researcher"}]
    assert set(rdf["weights"]) == {"onnx", "torchscript"}
    card = (package / "model_card.md").read_text()
    assert "research tool, not a diagnostic device" in card and "## Validation" in card
    test_input = np.load(package / "test_input.npy")
    assert test_input.dtype == np.uint8 and test_input.shape == (1, 3, 136, 136)
    with zipfile.ZipFile(package.with_suffix(".zip")) as bundle:
        assert sorted(bundle.namelist()) == sorted(FILES.values())


@pytest.mark.slow
def test_both_weight_formats_reproduce_the_test_output_from_the_test_input(package):
    import onnxruntime

    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    x = _apply_preprocessing(rdf, np.load(package / "test_input.npy"))
    expected = np.load(package / "test_output.npy")
    assert expected.shape == (1, 1) and 0 <= expected[0, 0] <= 1
    session = onnxruntime.InferenceSession(str(package / "weights.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"image": x})[0], expected, atol=1e-5)
    scripted = torch.jit.load(str(package / "weights.pt"))
    with torch.no_grad():
        assert np.allclose(scripted(torch.from_numpy(x)).numpy(), expected, atol=1e-5)


@pytest.mark.slow
def test_bioimageio_spec_validates_the_package_folder_and_its_zip(package):
    spec = pytest.importorskip("bioimageio.spec", reason="the bioimage extra is missing: pip install 'alnet[bioimage]'")
    for source in (package / "rdf.yaml", package.with_suffix(".zip")):
        description = spec.load_description(source, perform_io_checks=True)
        summary = description.validation_summary
        errors = [e.msg for d in summary.details for e in d.errors]
        assert summary.status == "valid-format", errors
        assert type(description).__name__ == "ModelDescr"


def _bioimageio_core_env() -> Path:
    """A virtual environment with CORE_PINS, made once with venv and pip and kept in the user cache folder."""
    import os
    import subprocess
    import sys
    import sysconfig

    from platformdirs import user_cache_dir

    env = Path(os.environ.get("ALNET_TEST_ENVS", user_cache_dir("alnet-tests"))) / "bioimageio-core-0.11.0"
    python = env / "bin" / "python"
    if not (env / "ready").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True, capture_output=True)
        installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *CORE_PINS],
                                   capture_output=True, text=True)
        if installed.returncode != 0:
            pytest.skip(f"could not install {' '.join(CORE_PINS)} (no package index?): {installed.stderr[-300:]}")
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        (Path(site) / "zz-alnet-runtime.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        (env / "ready").write_text(" ".join(CORE_PINS))
    return env


@pytest.mark.slow
def test_bioimageio_core_runs_the_packages_test_tensors_in_both_weight_formats(package):
    import subprocess

    env = _bioimageio_core_env()
    for weight_format in ("onnx", "torchscript"):
        result = subprocess.run([str(env / "bin" / "bioimageio"), "test", str(package / "rdf.yaml"),
                                 "--weight-format", weight_format], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert "status           passed" in result.stdout
        assert f"✔️  weights.{weight_format}  Reproduce test outputs from test inputs ({weight_format})" in result.stdout


def test_package_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "x.ckpt").write_bytes(b"")
    result = CliRunner().invoke(app, ["package", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "out"),
                                      "--image", CELL])
    assert result.exit_code == 2
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
