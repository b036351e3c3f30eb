"""What a trained model looks at: feature maps (the paper's Fig. 5) and Grad-CAM overlays (grad-cam package)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .data.augment import to_float  # noqa: E402
from .data.preprocess import PrepareParams, load_image  # noqa: E402
from .models import ALNet  # noqa: E402

# The layer whose activations Grad-CAM weighs: late enough to be class-specific, early enough to be sharp.
GRADCAM_LAYERS = {"alnet": "cl2.conv2", "alexnet": "backbone.features.10", "vgg16": "backbone.features.28",
                  "googlenet": "backbone.inception5b", "resnet50": "backbone.layer4"}


def image_tensor(path: Path, size: int, crop: float = 1.0) -> tuple[np.ndarray, torch.Tensor]:
    """The image exactly as training saw it: uint8 H×W×3 and a float 1×3×H×W batch in [0, 1]."""
    pixels, _ = load_image(Path(path), PrepareParams(size=size, crop=crop))
    return pixels, as_batch(pixels)


def as_batch(pixels: np.ndarray) -> torch.Tensor:
    """One uint8 H×W×3 image → a float 1×3×H×W batch in [0, 1]."""
    return to_float(torch.from_numpy(pixels.copy())[None])


def default_feature_layers(model: nn.Module) -> list[str]:
    """The paper's Fig. 5 shows its first and sixth layer. Keras counts a convolution with its ReLU as one layer,
    so for ALNet these are CL1's first and CL2's first convolution, shown after their ReLU. For a baseline,
    the first and sixth convolution."""
    if isinstance(model, ALNet):
        return ["cl1.conv1", "cl2.conv1"]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [convs[0], convs[min(5, len(convs) - 1)]]


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Activations (C×H×W) of the named layers for one image; convolutions are shown after ReLU."""
    model.eval()
    if isinstance(model, ALNet):
        rows = dict(model.table_rows(x))
        unknown = [name for name in layers if name not in rows]
        if unknown:
            raise ValueError(f"unknown layer(s) {', '.join(unknown)}; ALNet's layers are {', '.join(rows)}")
        relu_of = {name: name.replace("conv", "relu") for name in layers if ".conv" in name}
        return {name: rows[relu_of.get(name, name)][0] for name in layers}
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(f"unknown layer(s) {', '.join(unknown)}; for example {', '.join(list(modules)[1:8])}")
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, torch.relu(out)[0].detach())) for name in layers]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


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
        fig.suptitle(f"{name}: {activation.shape[0]} maps of {activation.shape[1]}×{activation.shape[2]}"
                     f" (first {channels})")
        fig.tight_layout()
        path = out / f"feature_maps_{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def gradcam_overlay(model: nn.Module, model_name: str, pixels: np.ndarray, x: torch.Tensor,
                    layer: str | None = None, target: int = 1) -> tuple[np.ndarray, str]:
    """Grad-CAM of output `target` (1: ALL) at `layer` over the image: (uint8 H×W×3 overlay, layer name)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = layer or GRADCAM_LAYERS.get(model_name)
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"unknown layer {layer!r} for Grad-CAM; for example {', '.join(list(modules)[1:8])}")
    model.eval()
    x = x.clone().requires_grad_(True)  # a frozen backbone still needs gradients to flow to its activations
    with GradCAM(model=model, target_layers=[modules[layer]]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
    return show_cam_on_image(pixels.astype(np.float32) / 255, heat, use_rgb=True), layer


def gradcam(model: nn.Module, model_name: str, pixels: np.ndarray, x: torch.Tensor, out: Path,
            layer: str | None = None, target: int = 1) -> Path:
    """Grad-CAM beside the input image; writes gradcam.png into `out`."""
    overlay, layer = gradcam_overlay(model, model_name, pixels, x, layer, target)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gradcam.png"
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    axes[0].imshow(pixels)
    axes[0].set_title("input (as the model sees it)")
    axes[1].imshow(overlay)
    axes[1].set_title(f"Grad-CAM for {'ALL' if target == 1 else 'HEM'} at {layer}")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
