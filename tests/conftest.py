import shutil
from pathlib import Path

import pytest

from alnet.data.synthetic import write_dataset

# 52 real C-NMC cells kept in the repository (see tests/data/cnmc-mini/README.md).
MINI = Path(__file__).resolve().parent / "data" / "cnmc-mini"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets a cache folder of its own, never the user's."""
    monkeypatch.setenv("ALNET_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def offline_weights(monkeypatch, tmp_path):
    """Tests never download: an empty torch hub folder, and any attempt to fetch weights fails like offline."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)


def compare_on_mini(mini_root: Path, out: Path, models: str, *options: str) -> tuple[list[dict], str]:
    """`alnet compare` on the real cells with tiny settings (1 epoch, 136 px, no pretrained weights): the rows of
    comparison.csv and what the command printed."""
    import csv

    from typer.testing import CliRunner

    from alnet.cli import app

    result = CliRunner().invoke(app, [
        "compare", "--data", str(mini_root), "--models", models, "--no-pretrained", "--no-augment", "--epochs", "1",
        "--image-size", "136", "--batch-size", "16", *options, "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(out / "comparison.csv", newline="") as handle:
        return list(csv.DictReader(handle)), result.output


@pytest.fixture(scope="session")
def mini_root() -> Path:
    return MINI


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic C-NMC set: 3 folds, 3 subjects per class, 4 cells each, prelim + final sets."""
    return write_dataset(tmp_path_factory.mktemp("synthetic"), n_subjects=3, cells_per_subject=4,
                         prelim_subjects=1, final_images=3, seed=1)


@pytest.fixture
def synthetic_copy(synthetic_root, tmp_path) -> Path:
    """A writable copy of the synthetic set, for tests that damage it."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


@pytest.fixture(scope="session")
def mini_checkpoint(mini_root, tmp_path_factory) -> Path:
    """A small ALNet (136 px) trained for one epoch on the real cnmc-mini images (paper protocol, fold 0)."""
    from alnet.config import RunConfig
    from alnet.data.cache import prepare
    from alnet.data.cnmc import scan
    from alnet.data.transforms import Preprocessing
    from alnet.train.run import train_run

    base = tmp_path_factory.mktemp("mini-run")
    prepared = prepare(scan(mini_root).cells, base / "cache", Preprocessing(size=136))
    config = RunConfig(protocol="paper", epochs=1, image_size=136, batch_size=16, bn_momentum=0.5)
    train_run(config, prepared, base / "run", progress=False, log=lambda m: None)
    return base / "run" / "checkpoints" / "fold_0" / "last.ckpt"


def steps_that_show_the_loss(device: str, steps: int) -> list[int]:
    """The training steps (batch indices) whose loss a CellClassifier hands to the progress bar on `device`."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import torch

    from alnet.config import RunConfig
    from alnet.train.module import CellClassifier

    module = CellClassifier(asdict(RunConfig(image_size=136, augment=False))).to(device)
    module._trainer = SimpleNamespace(progress_bar_callback=object())  # a trainer that shows a progress bar
    batch = {"image": torch.rand(2, 3, 136, 136, device=device), "label": torch.tensor([0, 1], device=device)}
    shown = []
    for step in range(steps):
        module.log = lambda name, *args, step=step, **kwargs: shown.append(step)
        module.training_step(batch, step)
    return shown


def predict_rows(pipeline, files, **options) -> tuple[list[dict], list]:
    """What `alnet predict` writes for `files`: its predictions.csv rows (a refused picture with no call and no
    probability), and the files it could not read."""
    from alnet.infer.predict import predict_files, prediction_row

    results, failed = predict_files(pipeline, files, **options)
    return [prediction_row(result, pipeline) for result in results], failed


def statuses(pipeline, pictures) -> list[tuple[str, str]]:
    """(status, reason) of each picture, as the pipeline answers them."""
    return [(answer.status.value, answer.reason) for answer in pipeline.answer(pictures)]
