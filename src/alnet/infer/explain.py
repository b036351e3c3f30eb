"""What a trained model looks at: feature maps (the paper's Fig. 5) and Grad-CAM overlays (grad-cam package).

Which layers to show comes from the model's spec (`feature_layers`, `gradcam_layer`); the maps themselves from
the model's own `feature_maps`, so nothing here depends on which model it is.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from ..data.transforms import Preprocessing, as_batch, load_image  # noqa: E402
from ..labels import ALL, NAMES  # noqa: E402
from ..models import model_spec  # noqa: E402

GRADCAM_FILE = "gradcam.png"
WRITTEN_BY = {"Software": "alnet explain"}  # a PNG text entry: how explain knows a file in --out is its own


def feature_maps_file(layer: str) -> str:
    return f"feature_maps_{layer.replace('.', '_')}.png"


def written_by_explain(path: Path) -> bool:
    """Whether `path` is a PNG explain wrote (its text entry says so), so that it may be replaced."""
    if not path.is_file():  # never open a FIFO to find out
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") == WRITTEN_BY["Software"]
    except Exception:
        return False


def read_image(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """The image exactly as the model sees it, as uint8 H×W×3."""
    return load_image(Path(path), preprocessing)[0]


def default_feature_layers(model_name: str) -> list[str]:
    return list(model_spec(model_name).feature_layers)


@torch.no_grad()
def feature_maps(model: nn.Module, pixels: np.ndarray, layers: list[str]) -> dict[str, torch.Tensor]:
    """Activations (C×H×W) of the named layers for one image; convolutions are shown after ReLU."""
    return {name: maps[0] for name, maps in model.eval().feature_maps(as_batch(pixels), layers).items()}


def plot_feature_maps(maps: dict[str, torch.Tensor], out: Path, max_channels: int = 32) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, activation in maps.items():
        channels = min(max_channels, activation.shape[0])
        columns = 8
        rows = -(-channels // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.5))
        for i, ax in enumerate(np.atleast_1d(axes).ravel()):
            ax.axis("off")
            if i < channels:
                ax.imshow(activation[i].float().numpy(), cmap="viridis")
                ax.set_title(str(i), fontsize=7)
        shown = f" (first {channels})" if channels < activation.shape[0] else ""
        fig.suptitle(f"{name}: {activation.shape[0]} maps of {activation.shape[1]}×{activation.shape[2]}{shown}")
        fig.tight_layout()
        path = out / feature_maps_file(name)
        fig.savefig(path, dpi=100, metadata=WRITTEN_BY)
        plt.close(fig)
        written.append(path)
    return written


def gradcam_overlay(model: nn.Module, model_name: str, pixels: np.ndarray, layer: str | None = None,
                    target: int = ALL) -> tuple[np.ndarray, str]:
    """Grad-CAM of output `target` at `layer` (default: the model's spec) over the image:
    (uint8 H×W×3 overlay, layer name)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = layer or model_spec(model_name).gradcam_layer
    if not layer:
        raise ValueError(f"{model_name}: no Grad-CAM for this model (its scikit-learn classifier has no gradients to "
                         "follow); use --feature-maps")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"unknown layer {layer!r} for Grad-CAM; for example {', '.join(list(modules)[1:8])}")
    model.eval()
    device = next(model.parameters()).device  # the model may live on the GPU (`serve` on CUDA)
    # A frozen backbone still needs gradients to flow to its activations.
    x = as_batch(pixels).to(device).requires_grad_(True)
    with GradCAM(model=model, target_layers=[modules[layer]]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
    return show_cam_on_image(pixels.astype(np.float32) / 255, heat, use_rgb=True), layer


def gradcam(model: nn.Module, model_name: str, pixels: np.ndarray, out: Path, layer: str | None = None,
            target: int = ALL) -> Path:
    """Grad-CAM beside the input image; writes gradcam.png into `out`."""
    overlay, layer = gradcam_overlay(model, model_name, pixels, layer, target)
    out.mkdir(parents=True, exist_ok=True)
    path = out / GRADCAM_FILE
    side_by_side(pixels, overlay, ("input (as the model sees it)", f"Grad-CAM for {NAMES[target]} at {layer}"),
                 path, height=4.2, dpi=100)
    return path


def side_by_side(pixels: np.ndarray, overlay: np.ndarray, titles: tuple[str, str], path: Path,
                 height: float = 4.2, dpi: int = 100) -> None:
    """The image and its Grad-CAM overlay next to each other, written to `path`."""
    fig, axes = plt.subplots(1, 2, figsize=(8, height))
    for ax, picture, title in zip(axes, (pixels, overlay), titles):
        ax.imshow(picture)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, metadata=WRITTEN_BY)
    plt.close(fig)
