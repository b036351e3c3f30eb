"""ALNet (Jawahar et al., Comput. Biol. Med. 2022), layer for layer as the paper's Table 2.

    CL1   Conv 5×5×32 → Conv 5×5×32 → MaxPool 2 → MaxPool 2 → BatchNorm     224 → 54×54×32
    CL2   Conv 5×5×64 → Conv 5×5×64 → MaxPool 2 → MaxPool 2 → BatchNorm      54 → 11×11×64
    CL3   Conv 5×5×128 → MaxPool 2 → BatchNorm                                11 → 3×3×128
    head  Flatten 1152 → Dropout → Dense 128 ReLU → Dense 2 (sigmoid)

Valid padding and ReLU after every convolution; 535,010 trainable parameters. The text's "3×3 pooling"
contradicts the table's shapes, so pooling is 2×2 stride 2 (docs/design.md, "What the paper specifies").

The model was written in Keras; to be faithful, weights are Glorot-uniform with zero biases and BatchNorm
uses Keras' momentum 0.99 (PyTorch: 0.01) and epsilon 1e-3. With so slow running statistics a model needs a
few hundred steps before its evaluation-mode output means anything; short runs lower `bn_momentum`.

`forward` returns logits: the paper's sigmoid (or a softmax, with `head="softmax"`) is applied by the loss
and by `probability_all`. The model keeps the registry's contract (`spec.py`): the three clusters are
`forward_features`, the dense layers `forward_head`.
"""

from __future__ import annotations

import copy
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from .head import HEADS
from .spec import CellModel, ModelSpec

# oneDNN's convolution with a fused activation: x86 CPU builds (where it has been checked; elsewhere, plain).
_FUSED_CONVOLUTION = (getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
                      if torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
                      else None)


class ConvReLU(torch.autograd.Function):
    """relu(conv(x)) with the ReLU applied by oneDNN as the convolution writes its output: one pass over CL1's
    largest map instead of two. Backward is autograd's own for the pair, so gradients are the plain path's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation, groups):
        out = _FUSED_CONVOLUTION(x, weight, bias, padding, stride, dilation, groups, "relu", [None], "")
        ctx.save_for_backward(x, weight, out)
        ctx.shape = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.shape
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grads = torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]], stride, padding, dilation,
                                                    False, [0, 0], groups, list(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None)


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run hooks (Grad-CAM's, feature maps', a profiler's): the fused operator
    does not call the module, so such a call keeps the plain path."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    every = (getattr(module_hooks, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                      "_global_backward_hooks", "_global_backward_pre_hooks"))
    return any(own) or any(every)


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """F.relu(conv(x)), fused where oneDNN can: a CPU batch laid out channels-last (as the CPU path lays it out)
    in fp32 or bf16 autocast. Traced, compiled and exported graphs, and a convolution with hooks, keep the two
    plain operators."""
    tracing = (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.jit.is_scripting()
               or torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())
    if tracing or _FUSED_CONVOLUTION is None or _hooked(conv):
        return F.relu(conv(x))
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    fusable = (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
               and {x.dtype, dtype} <= {torch.float32, torch.bfloat16} and conv.bias is not None
               and not isinstance(conv.padding, str) and conv.padding_mode == "zeros")
    if not fusable:
        return F.relu(conv(x))
    with torch.autocast("cpu", enabled=False):  # the casts autocast would make, done here for the fused operator
        return ConvReLU.apply(x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), list(conv.stride),
                              list(conv.padding), list(conv.dilation), conv.groups)


class ClusterLayer(nn.Module):
    """One cluster of Table 2: `convs` × (Conv 5×5, valid, ReLU) → `pools` × MaxPool 2×2/2 → BatchNorm.

    `forward` computes exactly what the table's layer order computes, faster: ReLU commutes with
    max-pooling and stacked 2×2/2 pools equal one 2^k×2^k pool (floor sizes agree: 46 → 23 → 11 = 46 // 4),
    so the last ReLU runs after pooling, on 16× fewer values. `table_rows` runs the layers one by one in the
    paper's order; a test checks that both give the same output.
    """

    def __init__(self, in_channels: int, out_channels: int, convs: int, pools: int, bn_momentum: float = 0.99):
        super().__init__()
        for i in range(1, convs + 1):
            self.add_module(f"conv{i}", nn.Conv2d(in_channels if i == 1 else out_channels, out_channels, 5))
        self.num_convs, self.num_pools = convs, pools
        # Keras' BatchNorm momentum m keeps m of the old running statistics; PyTorch's momentum is 1 - m.
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=1 - bn_momentum)

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{i}") for i in range(1, self.num_convs + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *first, last = self.convs
        for conv in first:
            x = conv_relu(conv, x)
        x = last(x)
        size = 2**self.num_pools
        x = F.max_pool2d(x, size, size)
        return self.bn(F.relu(x))  # out of place: in place, bf16 channels-last maps take a kernel ~2× slower

    def table_rows(self, x: torch.Tensor):
        """Yield (name, output) for each layer in Table 2's order: conv1, relu1, …, pool1, pool2, bn."""
        for i, conv in enumerate(self.convs, start=1):
            x = conv(x)
            yield f"conv{i}", x
            x = F.relu(x)
            yield f"relu{i}", x
        for i in range(1, self.num_pools + 1):
            x = F.max_pool2d(x, 2, 2)
            yield f"pool{i}", x
        x = self.bn(x)
        yield "bn", x


class ALNet(CellModel):
    num_features = 128  # width of fc1, the last layer before the two outputs

    def __init__(self, num_classes: int = 2, dropout: float = 0.2, input_size: int = 224, head: str = "sigmoid",
                 bn_momentum: float = 0.99):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        self.head_type = head
        self.input_size = input_size
        self.cl1 = ClusterLayer(3, 32, convs=2, pools=2, bn_momentum=bn_momentum)  # Table 2, cluster layer 1
        self.cl2 = ClusterLayer(32, 64, convs=2, pools=2, bn_momentum=bn_momentum)  # cluster layer 2
        self.cl3 = ClusterLayer(64, 128, convs=1, pools=1, bn_momentum=bn_momentum)  # cluster layer 3
        side = self.feature_side(input_size)
        if side < 1:
            raise ValueError(f"input_size {input_size} is too small for ALNet's valid convolutions (min 136)")
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(128 * side * side, 128)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(128, num_classes)
        self.reset_parameters()

    @staticmethod
    def feature_side(input_size: int) -> int:
        """Spatial side after CL3: 224 → 3 (Table 2)."""
        side = input_size
        for convs, pools in ((2, 2), (2, 2), (1, 1)):
            side -= 4 * convs
            for _ in range(pools):
                side //= 2
        return side

    def reset_parameters(self) -> None:
        """Keras defaults: Glorot-uniform kernels, zero biases, BatchNorm gamma 1 / beta 0."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """CL1 → CL2 → CL3: N×128×3×3 maps at 224 px."""
        return self.cl3(self.cl2(self.cl1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Flatten → Dropout → Dense 128 ReLU (→ Dense 2 unless `pre_logits`)."""
        x = self.relu(self.fc1(self.dropout(self.flatten(x))))
        return x if pre_logits else self.fc2(x)

    @torch.no_grad()
    def fold_batchnorm(self) -> ALNet:
        """A copy for inference (evaluation mode, fp32, on the CPU) whose BatchNorm layers are folded into the
        layer after them, which then computes the same.

        A BatchNorm in evaluation mode is x·a + b per channel. Every convolution after one has valid padding, so
        each of its outputs reads real inputs only and conv(x·a + b) = conv'(x) with the kernel scaled by a per
        input channel and b's contribution added to the bias; CL3's BatchNorm folds into fc1 the same way,
        through the channel-major flatten. The int8 model (`alnet.int8`) starts from this copy: no
        BatchNorm is left to quantize on its own."""
        folded = copy.deepcopy(self).float().cpu().eval()
        for cluster, after in ((folded.cl1, folded.cl2.conv1), (folded.cl2, folded.cl3.conv1),
                               (folded.cl3, folded.fc1)):
            bn = cluster.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            weight = after.weight.view(after.weight.shape[0], scale.numel(), -1)  # out × channel × (kernel or 3×3)
            after.bias += (weight * shift.view(1, -1, 1)).sum((1, 2))
            weight *= scale.view(1, -1, 1)
            cluster.bn = nn.Identity()
        return folded

    @torch.no_grad()
    def feature_maps(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Activations of Table 2's rows (`cl1.conv1`, `cl1.pool2`, `cl2.bn`, …); a convolution is shown after
        its ReLU, as Keras counts a convolution with its activation as one layer."""
        rows = dict(self.table_rows(x))
        unknown = [name for name in layers if name not in rows]
        if unknown:
            raise ValueError(f"unknown layer(s) {', '.join(unknown)}; ALNet's layers are {', '.join(rows)}")
        relu_of = {name: name.replace("conv", "relu") for name in layers if ".conv" in name}
        return {name: rows[relu_of.get(name, name)] for name in layers}

    def table_rows(self, x: torch.Tensor):
        """Yield (layer name, output) for every row of Table 2, layer by layer: `cl1.conv1`, …, `fc2`."""
        for cluster_name in ("cl1", "cl2", "cl3"):
            for name, x in getattr(self, cluster_name).table_rows(x):
                yield f"{cluster_name}.{name}", x
        for name in ("flatten", "dropout", "fc1", "relu", "fc2"):
            x = getattr(self, name)(x)
            yield name, x


SPECS = [ModelSpec(
    name="alnet", build=ALNet,
    settings={"dropout": "dropout", "input_size": "image_size", "head": "head", "bn_momentum": "bn_momentum"},
    # CL2's second convolution: 46×46 maps at 224 px, sharper than CL3's 7×7.
    gradcam_layer="cl2.conv2",
    # Fig. 5's "first and sixth layer": Keras counts conv+ReLU, pool, pool, BN as layers, so the sixth is CL2's
    # first convolution.
    feature_layers=("cl1.conv1", "cl2.conv1"),
    description="ALNet (Jawahar et al. 2022), Table 2: three cluster layers and a dense head, trained from scratch",
)]
