import copy

import numpy as np
import pytest
import torch
from torch import nn

from alnet.models import ALNet, available_models, create_model, probability_all

# Table 2 of the paper: (layer, output shape H×W×C, trainable parameters).
TABLE_2 = [
    ("cl1.conv1", (220, 220, 32), 2432), ("cl1.relu1", (220, 220, 32), 0),
    ("cl1.conv2", (216, 216, 32), 25632), ("cl1.relu2", (216, 216, 32), 0),
    ("cl1.pool1", (108, 108, 32), 0), ("cl1.pool2", (54, 54, 32), 0), ("cl1.bn", (54, 54, 32), 64),
    ("cl2.conv1", (50, 50, 64), 51264), ("cl2.relu1", (50, 50, 64), 0),
    ("cl2.conv2", (46, 46, 64), 102464), ("cl2.relu2", (46, 46, 64), 0),
    ("cl2.pool1", (23, 23, 64), 0), ("cl2.pool2", (11, 11, 64), 0), ("cl2.bn", (11, 11, 64), 128),
    ("cl3.conv1", (7, 7, 128), 204928), ("cl3.relu1", (7, 7, 128), 0),
    ("cl3.pool1", (3, 3, 128), 0), ("cl3.bn", (3, 3, 128), 256),
    ("flatten", (1152,), 0), ("dropout", (1152,), 0), ("fc1", (128,), 147584), ("relu", (128,), 0),
    ("fc2", (2,), 258),
]


def _layer_parameters(model: ALNet, name: str) -> int:
    module = model.get_submodule(name) if not name.split(".")[-1].startswith(("relu", "pool")) else None
    return sum(p.numel() for p in module.parameters() if p.requires_grad) if module is not None else 0


def test_alnet_matches_table_2_row_by_row():
    model = create_model("alnet").eval()
    rows = list(model.table_rows(torch.zeros(1, 3, 224, 224)))
    print(f"\n{'layer':<12}{'output':>16}{'params':>10}")
    for (name, output), (paper_name, paper_shape, paper_params) in zip(rows, TABLE_2, strict=True):
        shape = tuple(output.shape[2:]) + (output.shape[1],) if output.dim() == 4 else tuple(output.shape[1:])
        params = _layer_parameters(model, name)
        print(f"{name:<12}{str(shape):>16}{params:>10}")
        assert (name, shape, params) == (paper_name, paper_shape, paper_params)


def test_alnet_has_535010_trainable_parameters_and_535458_in_all():
    model = create_model("alnet")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 535_010
    buffers = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert sum(p.numel() for p in model.parameters()) + buffers == 535_458


def test_fast_forward_equals_the_layer_by_layer_order_of_table_2():
    torch.manual_seed(0)
    model = create_model("alnet").eval()
    x = torch.rand(3, 3, 224, 224)
    assert torch.equal(list(model.table_rows(x))[-1][1], model(x))


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_convolution_and_relu_give_the_plain_paths_outputs_and_gradients(monkeypatch, bf16):
    """On the CPU, a cluster's first convolution and its ReLU run as one oneDNN operator (alnet.models.alnet
    .conv_relu); the network must compute, and train, exactly as with the two operators."""
    import alnet.models.alnet as alnet_module

    fused = alnet_module._FUSED_CONVOLUTION
    if fused is None:
        pytest.skip("this torch build has no oneDNN fused convolution")
    torch.manual_seed(0)
    model = create_model("alnet", input_size=136, dropout=0.0).to(memory_format=torch.channels_last).train()
    x = torch.rand(4, 3, 136, 136).contiguous(memory_format=torch.channels_last)
    calls = []
    results = []
    for operator in (lambda *args: calls.append(1) or fused(*args), None):
        monkeypatch.setattr(alnet_module, "_FUSED_CONVOLUTION", operator)
        copied = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = copied(x)
        out.float().square().sum().backward()
        results.append((out.float(), [p.grad for p in copied.parameters()]))
    assert len(calls) == 2  # cl1.conv1 and cl2.conv1 took the fused operator; the second pass did not
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    tolerance = 1e-2 if bf16 else 1e-5
    assert torch.allclose(fused_out, plain_out, rtol=tolerance, atol=tolerance * float(plain_out.abs().max()))
    for got, expected in zip(fused_grads, plain_grads):
        assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
    # A hooked convolution (Grad-CAM, feature maps) is called as a module, so its hooks run.
    monkeypatch.setattr(alnet_module, "_FUSED_CONVOLUTION", lambda *args: calls.append(1) or fused(*args))
    seen = []
    model.cl1.conv1.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x)
    assert seen == [(4, 32, 132, 132)] and len(calls) == 3  # cl2.conv1, unhooked, still fused


def test_keras_initialisation_glorot_uniform_zero_bias_and_batchnorm_settings():
    model = create_model("alnet")
    conv = model.cl2.conv2
    fan_in, fan_out = 64 * 25, 64 * 25
    limit = (6 / (fan_in + fan_out)) ** 0.5
    assert conv.weight.abs().max() <= limit and conv.weight.abs().max() > 0.9 * limit
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    bn = model.cl1.bn
    assert bn.eps == 1e-3 and abs(bn.momentum - 0.01) < 1e-12


def test_dropout_input_size_and_head_are_parameters():
    model = create_model("alnet", dropout=0.3, input_size=160, head="softmax")
    assert model.dropout.p == 0.3
    assert model(torch.zeros(2, 3, 160, 160)).shape == (2, 2)
    assert model.fc1.in_features == 128 * 1 * 1


def test_probability_of_all_is_above_half_exactly_when_the_all_output_wins():
    logits = torch.tensor([[2.0, -1.0], [-1.0, 2.0], [0.3, 0.3]])
    for head in ("sigmoid", "softmax"):
        p = probability_all(logits, head)
        assert p[0] < 0.5 < p[1] and torch.isclose(p[2], torch.tensor(0.5))


def test_probability_of_all_of_two_sigmoids_is_their_quotient_and_stays_finite_where_both_say_no():
    """σ(b) / (σ(a) + σ(b)), also where both outputs are so negative that both sigmoids round to 0 (0/0)."""
    logits = torch.tensor([[2.0, -1.0], [-3.5, 0.25], [-54.0, -23.0], [-1000.0, -1001.0]])
    s = torch.sigmoid(logits.double())
    quotient = (s[:, 1] / (s[:, 0] + s[:, 1])).float()
    p = probability_all(logits, "sigmoid")
    torch.testing.assert_close(p[:3], quotient[:3])
    assert torch.isfinite(p).all() and p[2] > 0.999 and torch.isclose(p[3], torch.sigmoid(torch.tensor(-1.0)))


def test_registry_is_the_one_way_in_and_names_unknown_models():
    assert "alnet" in available_models()
    with pytest.raises(ValueError, match="alnet"):
        create_model("lenet")


def test_too_small_inputs_are_refused_with_the_minimum():
    assert create_model("alnet", input_size=136).eval()(torch.zeros(1, 3, 136, 136)).shape == (1, 2)
    with pytest.raises(ValueError, match="min 136"):
        ALNet(input_size=135)


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_keeps_the_model_contract(name):
    """forward = forward_head ∘ forward_features; pre-logits have num_features values; the spec's layers exist;
    the spec's input normalisation is the one the model applies."""
    from alnet.config import RunConfig
    from alnet.models import create_model_from, model_spec

    spec = model_spec(name)
    model = create_model_from(RunConfig(model=name, pretrained=False, image_size=136)).eval()
    x = torch.rand(2, 3, 136, 136)
    features = model.forward_features(x)
    assert torch.allclose(model(x), model.forward_head(features), atol=1e-6)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    assert model(x).shape == (2, 2)
    assert model.frozen == spec.frozen and isinstance(model.frozen, bool)
    modules = dict(model.named_modules())
    assert spec.gradcam_layer in modules
    maps = model.feature_maps(x[:1], list(spec.feature_layers))
    assert list(maps) == list(spec.feature_layers) and all(m.dim() == 4 and (m >= 0).all() for m in maps.values())
    if spec.mean is None:
        assert not any(name in ("mean", "std") for name, _ in model.named_buffers())
    else:
        assert model.mean.flatten().tolist() == pytest.approx(spec.mean)
        assert model.std.flatten().tolist() == pytest.approx(spec.std)
    assert set(spec.settings.values()) <= set(RunConfig.__dataclass_fields__)


def test_no_module_outside_models_branches_on_a_model_name():
    """Model knowledge lives in models/: elsewhere code asks the model or its spec."""
    import re
    from pathlib import Path

    import alnet

    root = Path(alnet.__file__).parent
    names = "|".join(available_models())
    pattern = re.compile(rf"""(==|!=|\bin\b)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py") if "models" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_pipeline_answers_with_batchnorm_folded_and_the_same_outputs_in_fp32():
    from alnet.device import resolve_precision
    from alnet.models.spec import penultimate
    from alnet.pipeline import torch_network

    torch.manual_seed(0)
    model = create_model("alnet", input_size=136).eval()
    for bn in (model.cl1.bn, model.cl2.bn, model.cl3.bn):  # statistics far from the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3)
    pictures = (torch.rand(4, 136, 136, 3) * 255).to(torch.uint8).numpy()
    outputs = torch_network(model, resolve_precision("32"), "sigmoid")(pictures)
    with torch.no_grad():
        logits, features = penultimate(model, torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(outputs.features, features.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs.probability_raw, probability_all(logits, "sigmoid").numpy(), atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched


@pytest.mark.slow
def test_compiled_alnet_computes_what_eager_alnet_computes():
    """`compile: on` or `off` answers the same: a GPU run compiles its network (`compile: auto`); on a CPU,
    inductor's forward pass is exact where its gradients are not (test below), so the forward is checked here,
    against eager ALNet with its fused convolutions."""
    torch.manual_seed(0)
    model = create_model("alnet", input_size=136).eval().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 136, 136).contiguous(memory_format=torch.channels_last)  # eager: the fused convolutions
    compiled = copy.deepcopy(model)
    compiled.compile()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_compile_on_a_cpu_is_refused_before_anything_is_written(small_prepared_cpu, tmp_path):
    """torch.compile's CPU code generator (inductor) computes wrong gradients for ALNet's convolutions in this
    torch (up to a quarter of cl2.conv2's weight gradient, against fp64; its aot_eager backend is exact), so a
    CPU run never trains compiled: `auto` leaves it off there, and `on` is refused in one line."""
    from alnet.config import RunConfig
    from alnet.train.compare import compare
    from alnet.train.run import RunError, train_run

    config = RunConfig(compile="on", accelerator="cpu", image_size=136, epochs=1)
    with pytest.raises(RunError, match="compile on is refused on a CPU"):
        train_run(config, small_prepared_cpu, tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
    with pytest.raises(RunError, match="compile on is refused on a CPU"):
        compare(["alnet"], config, small_prepared_cpu, tmp_path / "comparison", progress=False, log=lambda m: None)
    assert not (tmp_path / "comparison").exists()


@pytest.fixture
def small_prepared_cpu(mini_root, tmp_path):
    from alnet.data.cache import prepare
    from alnet.data.cnmc import scan
    from alnet.data.transforms import Preprocessing

    return prepare(scan(mini_root).cells[:8], tmp_path / "cache", Preprocessing(size=136))
