"""The CUDA path: training, the cache on the device, prediction and the service on a GPU.

Run on a machine with a CUDA GPU (`benchmarks/gpu_check.sh` runs them); elsewhere they are skipped."""

import base64
import io

import numpy as np
import pytest
import torch
from conftest import steps_that_show_the_loss
from lightning.pytorch.callbacks import Callback
from PIL import Image

from alnet.config import RunConfig
from alnet.data.cache import prepare
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing, load_image
from alnet.train.batches import CellData, tensors
from alnet.train.module import LOSS_SHOWN_EVERY
from alnet.train.run import train_run

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class WhereItRan(Callback):
    """Records the device of the weights and of the training batches, and the autocast dtype."""

    def __init__(self):
        self.weights, self.batches, self.autocast = set(), set(), set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.weights.add(next(module.parameters()).device.type)
        self.batches.add(batch["image"].device.type)

    def on_before_backward(self, trainer, module, loss):
        self.autocast.add(loss.dtype)


@pytest.fixture(scope="module")
def mini_prepared(mini_root, tmp_path_factory):
    return prepare(scan(mini_root).cells, tmp_path_factory.mktemp("cache"), Preprocessing(size=136))


def test_training_runs_on_the_gpu_with_batches_gathered_on_the_device(mini_prepared, tmp_path):
    seen = WhereItRan()
    config = RunConfig(protocol="paper", epochs=2, image_size=136, batch_size=16)
    result = train_run(config, mini_prepared, tmp_path / "run", callbacks=[seen], progress=False,
                       log=lambda m: None)
    assert seen.weights == {"cuda"} and seen.batches == {"cuda"}
    assert result["folds"] and (tmp_path / "run" / "metrics.json").is_file()


def test_the_whole_uint8_cache_moves_to_the_gpu_once(mini_prepared):
    import lightning as L

    images, labels = tensors(mini_prepared)
    rows = np.arange(len(images))
    data = CellData(images, labels, rows, [], rows, RunConfig(batch_size=8, image_size=136))
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, max_epochs=1)
    data.trainer = trainer
    data.setup("test")
    assert data.images.device.type == "cuda" and data.images.dtype == torch.uint8
    batch = next(iter(data.test_dataloader()))
    assert batch["image"].device.type == "cuda" and batch["image"].shape == (8, 136, 136, 3)


def test_predict_runs_on_the_gpu_and_agrees_with_the_cpu(mini_checkpoint, mini_root):
    from conftest import predict_rows

    from alnet.infer.predict import expand_paths, load_pipeline

    files, _ = expand_paths([mini_root])
    files = files[:24]
    gpu = load_pipeline(mini_checkpoint)
    assert next(gpu.trained.model.parameters()).device.type == "cuda"
    cpu = load_pipeline(mini_checkpoint, precision="32", accelerator="cpu")
    gpu_rows, _ = predict_rows(gpu, files)
    cpu_rows, _ = predict_rows(cpu, files)
    p_gpu = np.array([float(r["probability_all"]) for r in gpu_rows])
    p_cpu = np.array([float(r["probability_all"]) for r in cpu_rows])
    assert np.abs(p_gpu - p_cpu).max() < 0.02  # bf16 AMP against exact fp32
    assert [r["path"] for r in gpu_rows] == [r["path"] for r in cpu_rows]


def test_the_service_answers_from_the_gpu(mini_checkpoint, mini_root):
    from fastapi.testclient import TestClient

    from alnet.infer.predict import load_pipeline
    from alnet.infer.serve import create_app

    cell = sorted((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "hem").iterdir())[0]
    client = TestClient(create_app(mini_checkpoint))
    with open(cell, "rb") as handle:
        answer = client.post("/predict?gradcam=true", files={"file": (cell.name, handle, "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    pixels, _ = load_image(cell, Preprocessing(size=136))
    expected = float(load_pipeline(mini_checkpoint, precision="32", accelerator="cpu").probabilities(pixels[None])[0])
    assert abs(body["probability_all"] - expected) < 0.02
    assert Image.open(io.BytesIO(base64.b64decode(body["gradcam_png"]))).format == "PNG"


def test_compiled_training_on_the_gpu_gives_the_gradients_of_eager_fp64():
    """`compile: auto` compiles ALNet on a GPU: its gradients must be those of the network (on the CPU the
    inductor backend's are not, so CPU runs never compile)."""
    import copy

    from alnet.models import create_model

    torch.manual_seed(0)
    model = create_model("alnet", input_size=136, dropout=0.0).cuda()
    x = torch.rand(4, 3, 136, 136, device="cuda")
    reference = copy.deepcopy(model).double()
    reference.train()
    reference(x.double()).sum().backward()
    compiled = copy.deepcopy(model)
    compiled.compile()
    compiled.train()
    compiled(x).sum().backward()
    for (name, ref), got in zip(reference.named_parameters(), compiled.parameters()):
        scale = ref.grad.abs().max().clamp(min=1e-6)
        assert float((got.grad.double() - ref.grad).abs().max() / scale) < 1e-2, name


def test_a_gpu_loss_is_read_for_the_progress_bar_once_every_loss_shown_every_steps():
    """Each read makes the host wait for the GPU; between reads, the host queues steps ahead of the device."""
    steps = 2 * LOSS_SHOWN_EVERY + 1
    assert steps_that_show_the_loss("cuda", steps) == [0, LOSS_SHOWN_EVERY, 2 * LOSS_SHOWN_EVERY]
