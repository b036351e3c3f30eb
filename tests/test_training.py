import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import steps_that_show_the_loss
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from alnet.config import RunConfig
from alnet.data.augment import make_augment
from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing
from alnet.pipeline import torch_network
from alnet.schema import PREDICTION_FIELDS
from alnet.train.batches import PADDING, BatchOrder, CellData, shard, tensors
from alnet.train.loggers import read_history
from alnet.train.module import CellClassifier
from alnet.train.run import RunError, train_run
from alnet.train.trainer import quiet_lightning

SMALL = dict(image_size=136, batch_size=8, bn_momentum=0.5, seed=7)


@pytest.fixture(scope="module")
def small_prepared(synthetic_root, tmp_path_factory):
    return prepare(scan(synthetic_root).cells, tmp_path_factory.mktemp("cache"), Preprocessing(size=136))


def test_shards_are_disjoint_and_cover_every_row():
    order = np.arange(11)
    shards = [shard(order, rank, 3, pad_with_repeats=False) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1
    real = np.concatenate([s[s != PADDING] for s in shards])
    assert sorted(real.tolist()) == list(range(11))
    training = [shard(order, rank, 3, pad_with_repeats=True) for rank in range(3)]
    assert PADDING not in np.concatenate(training)


def test_batch_order_reshuffles_per_epoch_reproducibly():
    order = BatchOrder(np.arange(50), 8, shuffle=True, seed=1)
    first = np.concatenate(list(order))
    order.set_epoch(1)
    second = np.concatenate(list(order))
    order.set_epoch(0)
    assert np.array_equal(first, np.concatenate(list(order)))
    assert not np.array_equal(first, second) and sorted(second.tolist()) == list(range(50))
    assert len(order) == 7


def test_augmentation_draws_parameters_per_sample():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64)
    out = make_augment()(image.repeat(4, 1, 1, 1))
    assert out.shape == (4, 3, 64, 64)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_augmentation_draws_the_papers_ranges_uniformly():
    torch.manual_seed(0)
    p = make_augment(rotation=15, zoom=0.1, contrast=0.2).draw(200_000, torch.device("cpu"))
    for name, low, high in (("angle", -15, 15), ("scale", 0.9, 1.1), ("contrast", 0.8, 1.2)):
        values = p[name].double()
        assert low <= values.min() and values.max() <= high, name
        assert abs(values.mean().item() - (low + high) / 2) < 0.002 * (high - low), name  # uniform: centred,
        assert abs(values.std().item() - (high - low) / 12 ** 0.5) < 0.003 * (high - low), name  # its spread
        deciles = torch.quantile(values[:100_000], torch.linspace(0.1, 0.9, 9, dtype=torch.float64))
        assert torch.allclose(deciles, low + (high - low) * torch.linspace(0.1, 0.9, 9, dtype=torch.float64),
                              atol=0.01 * (high - low)), name
    assert abs(p["flip"].double().mean().item() - 0.5) < 0.005


def test_augmentation_matrix_rotates_zooms_and_mirrors_about_the_centre():
    from alnet.data.augment import BatchAugment

    image = torch.zeros(1, 3, 64, 64)
    image[..., 2:8, 44:60] = 1  # a bar near the upper right corner
    theta = BatchAugment.matrices(torch.tensor([0.0, 90.0, 0.0]), torch.tensor([1.0, 1.0, 2.0]),
                                  torch.tensor([True, False, False]))
    grid = torch.nn.functional.affine_grid(theta, [3, 3, 64, 64], align_corners=False)
    out = torch.nn.functional.grid_sample(image.repeat(3, 1, 1, 1), grid, align_corners=False)
    assert torch.allclose(out[0], image[0].flip(-1))  # flip only: mirrored left-right
    assert torch.allclose(out[1], torch.rot90(image[0], 1, (1, 2)), atol=1e-5) or \
        torch.allclose(out[1], torch.rot90(image[0], -1, (1, 2)), atol=1e-5)  # a quarter turn about the centre
    assert out[2].sum() == 0  # zoom ×2 about the centre: the bar, far from it, leaves the picture
    zoomed = torch.nn.functional.grid_sample(torch.ones(1, 1, 64, 64), grid[2:], align_corners=False)
    assert zoomed.min() > 0.99  # zooming in never reaches the border: no black corners


def test_augmented_batch_keeps_the_layout_of_the_cache_batch():
    """Batches come from the uint8 cache as channels-last floats; the augmented batch stays so, and the model's
    input needs no copy."""
    from alnet.data.augment import BatchAugment
    from alnet.data.transforms import to_float

    batch = to_float(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    out = BatchAugment()(batch)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == batch.shape


def test_augmentation_is_reproducible_after_a_reseed_and_stays_in_range():
    augment = make_augment()
    images = torch.rand(8, 3, 32, 32)
    torch.manual_seed(3)
    first = augment(images)
    torch.manual_seed(3)
    assert torch.equal(first, augment(images))
    assert first.min() >= 0 and first.max() <= 1


def test_offline_doubling_appends_one_augmented_copy_per_training_image(small_prepared):
    images, labels = tensors(small_prepared)
    train = np.arange(10)
    data = CellData(images, labels, train, [], [], RunConfig(double_offline=True, augment=False, **SMALL))
    data.setup("fit")
    assert len(data.train_rows) == 20
    assert torch.equal(data.labels[data.train_rows[10:]], labels[train])
    assert not torch.equal(data.images[data.train_rows[10:]], images[train])


@pytest.mark.slow
def test_alnet_fits_the_cnmc_mini_training_images(mini_root, tmp_path):
    """Real cells: the training loss falls and the trained model classifies its own training images."""
    quiet_lightning()
    prepared = prepare(scan(mini_root).cells, tmp_path, Preprocessing(size=136))
    images, labels = tensors(prepared)
    rows = np.arange(len(prepared.cells))
    config = RunConfig(epochs=15, batch_size=8, augment=False, bn_momentum=0.5, seed=0, image_size=136)
    module = CellClassifier(asdict(config))
    log = CSVLogger(tmp_path, name="log")
    trainer = L.Trainer(accelerator="cpu", max_epochs=config.epochs, logger=log, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False)
    data = CellData(images, labels, rows, [], rows, config)
    trainer.fit(module, datamodule=data)
    losses = [float(h["train_loss"]) for h in read_history(tmp_path / "log")]
    assert len(losses) == 15
    assert losses[-1] < 0.5 * losses[0]
    network = torch_network(module.model, module.precision_path, config.head)
    predicted = network(images.numpy()).probability_raw > 0.5
    assert (predicted == labels.numpy()).mean() >= 0.9


class CrashAtEpoch(Callback):
    def __init__(self, fold: str, epoch: int):
        self.fold, self.epoch = fold, epoch

    def on_train_epoch_start(self, trainer, module):
        if self.fold in str(trainer.default_root_dir) and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_same_metrics_as_an_uninterrupted_one(small_prepared, tmp_path):
    config = RunConfig(protocol="subject", epochs=3, precision="32", deterministic=True, **SMALL)
    whole = train_run(config, small_prepared, tmp_path / "whole", progress=False, log=lambda m: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(config, small_prepared, tmp_path / "resumed", progress=False, log=lambda m: None,
                  callbacks=[CrashAtEpoch("fold_1", 2)])
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "fold_1" / "last.ckpt").is_file()
    messages = []
    resumed = train_run(config, small_prepared, tmp_path / "resumed", resume=True, progress=False,
                        log=messages.append)
    assert "fold_0: already finished, kept" in messages
    assert any(m.startswith("fold_1: resuming from") for m in messages)
    assert resumed == whole
    history = lambda run: (tmp_path / run / "history.csv").read_text()  # noqa: E731
    assert history("resumed") == history("whole")


def test_a_run_directory_is_never_overwritten(small_prepared, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: alnet\n")
    with pytest.raises(RunError, match="--resume"):
        train_run(RunConfig(epochs=1, **SMALL), small_prepared, tmp_path / "run", progress=False)


@pytest.mark.slow
def test_run_directory_holds_config_history_predictions_metrics_and_figures(small_prepared, tmp_path):
    config = RunConfig(protocol="paper", epochs=2, double_offline=True, augment=False, **SMALL)
    result = train_run(config, small_prepared, tmp_path / "run", progress=False, log=lambda m: None)
    run = tmp_path / "run"
    for name in ("config.yaml", "history.csv", "predictions.csv", "metrics.json", "subjects.csv", "splits.json",
                 "figures/roc.png", "figures/curves_fold_0.png", "figures/confusion_fold_2.png",
                 "checkpoints/fold_0/last.ckpt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["protocol"] == "paper" and "subjects appear in both train and test" in metrics["note"]
    assert [f["fold"] for f in metrics["folds"]] == ["fold_0", "fold_1", "fold_2"] and "prelim" not in metrics
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "weighted_f1", "auc"):
        assert set(metrics["summary"][key]) == {"mean", "std"}
        assert all(key in f for f in metrics["folds"])
    assert set(metrics["folds"][0]["confusion"]) == {"tp", "tn", "fp", "fn"}
    assert RunConfig.from_yaml(run / "config.yaml") == config
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0] == ",".join(PREDICTION_FIELDS)
    for fold in metrics["folds"]:  # the paper protocol has no data never used for testing: uncalibrated, said so
        assert fold["calibration"]["method"] == "none" and "paper protocol" in fold["calibration"]["note"]
        assert fold["calibration"]["after"] is None and fold["review"]["half_width"] is None
    assert len(rows) - 1 == sum(f["images"] for f in metrics["folds"])
    assert all(f["input_gate"]["images"] == f["images"] for f in metrics["folds"])  # every test cell screened
    assert "input_gate" in torch.load(run / "checkpoints" / "fold_0" / "last.ckpt", weights_only=True)
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3 * 2
    card = (run / "model_card.md").read_text()
    assert "research tool, not a diagnostic device" in card and "**yes**, in fold_0" in card
    from alnet.report.model_card import sha256_of

    assert sha256_of(run / "checkpoints" / "fold_0" / "last.ckpt") in card
    assert 'href="model_card.md"' in (run / "report.html").read_text()


@pytest.mark.slow
def test_two_process_ddp_run_shards_the_data_and_gathers_metrics_once(synthetic_root, tmp_path):
    alnet = Path(sys.executable).with_name("alnet")
    command = [str(alnet), "train", "--data", str(synthetic_root), "--protocol", "paper", "--epochs", "1",
               "--devices", "2", "--strategy", "ddp", "--precision", "32", "--image-size", "136",
               "--batch-size", "4", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    lines = (tmp_path / "run" / "predictions.csv").read_text().splitlines()[1:]
    for split, fold in zip(splits, metrics["folds"]):
        paths = [line.split(",")[1] for line in lines if line.startswith(split["name"] + ",")]
        assert len(paths) == len(set(paths)) == split["test"]["images"] == fold["images"]
    assert done.stdout.count("run directory:") == 1, "one process reports"


def test_a_run_that_cannot_start_writes_nothing(small_prepared, tmp_path):
    config = RunConfig(epochs=1, **{**SMALL, "image_size": 100})  # too small for ALNet's valid convolutions
    with pytest.raises(RunError, match="too small.*nothing was written to"):
        train_run(config, small_prepared, tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_dataset_an_edited_config_and_a_truncated_checkpoint(synthetic_copy, tmp_path):
    import os

    prepared = prepare(scan(synthetic_copy).cells, tmp_path / "cache", Preprocessing(size=136))
    config = RunConfig(protocol="paper", epochs=2, **SMALL)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(config, prepared, tmp_path / "run", progress=False, log=lambda m: None,
                  callbacks=[CrashAtEpoch("fold_0", 1)])
    last = tmp_path / "run" / "checkpoints" / "fold_0" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(RunError, match=f"{last}: not an alnet checkpoint.*delete {last}"):
        train_run(config, prepared, tmp_path / "run", resume=True, progress=False, log=lambda m: None)

    settings = tmp_path / "run" / "config.yaml"  # what the run computes may not change; where it runs may
    original = settings.read_text()
    assert "epochs: 2" in original and "deterministic: false" in original
    runtime_changed = original.replace("deterministic: false", "deterministic: true")
    settings.write_text(runtime_changed.replace("epochs: 2", "epochs: 5"))
    with pytest.raises(RunError, match=r"config.yaml: edited since this run started \(epochs 2 → 5\)"):
        train_run(config, prepared, tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    settings.write_text(runtime_changed)

    image = next((synthetic_copy / "C-NMC_Leukemia" / "training_data" / "fold_1" / "all").iterdir())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    changed = prepare(scan(synthetic_copy).cells, tmp_path / "cache", Preprocessing(size=136))
    with pytest.raises(RunError, match="the dataset changed since this run started"):
        train_run(config, changed, tmp_path / "run", resume=True, progress=False, log=lambda m: None)


def test_a_run_never_writes_into_a_folder_that_holds_other_files(small_prepared, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.html").write_text("my own report")
    with pytest.raises(RunError, match="not an empty folder"):
        train_run(RunConfig(epochs=1, **SMALL), small_prepared, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "report.html").read_text() == "my own report"


@pytest.mark.parametrize("settings, message", [
    ({"devices": 10_000}, "more than this machine has"),
    ({"strategy": "bogus"}, "strategy 'bogus' is not one Lightning knows"),
])
def test_settings_only_the_machine_can_judge_are_checked_before_writing(small_prepared, tmp_path, settings,
                                                                         message):
    with pytest.raises(RunError, match=message):
        train_run(RunConfig(epochs=1, **{**SMALL, **settings}), small_prepared, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_freed_activation_memory_is_reused_not_faulted_in_again():
    """alnet.memory: a block the size of CL1's maps, freed and asked for again, comes back without the kernel
    faulting in fresh pages (glibc unmaps such blocks on free by default; each step would pay for it)."""
    import resource

    from alnet.memory import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("glibc only")
    size = 2**26  # 64 MiB: over the largest mmap threshold glibc allows
    for _ in range(16):  # the heap's first rounds grow it (an aligned block does not fit the one just freed)
        torch.empty(size, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(size, dtype=torch.uint8).fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < size // 4096 // 4  # one fresh block alone would fault in 16,384 pages



def test_the_progress_bar_shows_every_steps_loss_on_a_cpu():
    """Reading a CPU loss costs nothing, so the bar's loss is that of the step just taken (on a GPU it is read
    every LOSS_SHOWN_EVERY steps: tests/test_cuda.py)."""
    assert steps_that_show_the_loss("cpu", 3) == [0, 1, 2]
