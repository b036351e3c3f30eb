import json
import re

import pytest
import torch
import torchvision
from conftest import compare_on_mini
from typer.testing import CliRunner

from alnet.cli import app
from alnet.models import TransferNet, WeightsError, create_model, trainable_parameters
from alnet.models.transfer import BACKBONES, weights_file

BASELINES = ["alexnet", "vgg16", "googlenet", "resnet50"]


pytestmark = pytest.mark.usefixtures("offline_weights")  # tests never download ImageNet weights


@pytest.mark.parametrize("name", BASELINES)
def test_frozen_baseline_trains_only_its_new_head(name):
    model = create_model(name, pretrained=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert trainable_parameters(model) == BACKBONES[name].features * 2 + 2
    model.train()
    assert not model.backbone.training, "a frozen backbone stays in eval mode (BatchNorm statistics, dropout)"
    logits = model(torch.rand(2, 3, 112, 112))
    assert logits.shape == (2, 2)
    logits.sum().backward()
    assert model.head[1].weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())


def test_finetune_unfreezes_the_backbone():
    model = create_model("resnet50", pretrained=False, finetune=True)
    assert trainable_parameters(model) == sum(p.numel() for p in model.parameters())


def test_missing_weights_offline_name_the_exact_file_and_folder():
    expected = weights_file("resnet50")
    assert expected.name == "resnet50-0676ba61.pth" and expected.parent.name == "checkpoints"
    with pytest.raises(WeightsError) as err:
        create_model("resnet50")
    assert str(expected) in str(err.value) and "resnet50-0676ba61.pth" in str(err.value)


def test_weights_are_read_from_the_torch_hub_folder_without_downloading(tmp_path):
    reference = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    path = weights_file("googlenet")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = create_model("googlenet")
    assert torch.equal(model.backbone.conv1.conv.weight, reference.conv1.conv.weight)
    assert model.backbone.transform_input, "ImageNet weights of GoogLeNet expect torchvision's input transform"


def test_an_explicit_weights_file_is_used_and_a_missing_one_is_named(tmp_path):
    reference = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    torch.save(reference.state_dict(), tmp_path / "mine.pth")
    model = create_model("googlenet", weights=tmp_path / "mine.pth")
    assert torch.equal(model.backbone.conv1.conv.weight, reference.conv1.conv.weight)
    with pytest.raises(WeightsError, match="nowhere.pth"):
        create_model("googlenet", weights=tmp_path / "nowhere.pth")


def test_imagenet_normalisation_happens_inside_the_baseline():
    model = create_model("alexnet", pretrained=False).eval()
    x = torch.rand(1, 3, 112, 112)
    normalised = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model.forward_features(x), model.backbone(normalised))
    assert isinstance(model, TransferNet)


@pytest.mark.slow
def test_compare_all_five_models_on_cnmc_mini(mini_root, tmp_path):
    """Every model trains and is tested under one protocol; the tables hold numbers from these runs."""
    out = tmp_path / "compare"
    # The paper's own protocol, as in its Tables 8 and 9 (and one checkpoint per fold instead of two: VGG16's is
    # half a gigabyte).
    rows, output = compare_on_mini(mini_root, out, "alnet,alexnet,vgg16,googlenet,resnet50", "--protocol", "paper")
    assert [r["model"] for r in rows] == ["alnet", "alexnet", "vgg16", "googlenet", "resnet50"]
    for row in rows:
        metrics = json.loads((out / row["model"] / "metrics.json").read_text())
        for name in ("accuracy", "precision", "recall", "specificity", "f1", "weighted_f1", "auc"):
            assert float(row[name]) == pytest.approx(metrics["summary"][name]["mean"])
        assert float(row["training_seconds"]) > 0
    assert int(rows[0]["trainable_parameters"]) == trainable_parameters(create_model("alnet", input_size=136))
    assert int(rows[4]["trainable_parameters"]) == 2048 * 2 + 2
    assert "features once" in output  # frozen baselines without augmentation train on cached features
    markdown = (out / "comparison.md").read_text()
    for paper_name in ("AlexNet", "VGG16", "GoogleNet", "ResNet-50", "ALNet"):
        assert f"| {paper_name} — paper, Table 8 (image-level split) |" in markdown
    assert "| 62,378,344 | 0.75 | 0.83 | 0.90 | 0.78 |" in markdown, "the paper's AlexNet row, as published"
    assert "| alnet | mean |" in markdown and "| 0.9113 |" in markdown  # Table 9 beside the paper's mean
    assert "Shi et al." in markdown  # Table 10
    report = (out / "report.html").read_text()
    assert report.count("paper, Table 8") == 5
    assert "data:image/png;base64," in report
    assert not re.search(r'(src|href)="https?://', report), "the report must open offline"
    run_report = (out / "alnet" / "report.html").read_text()
    assert "subject-level" in run_report and "data:image/png;base64," in run_report
    assert "from scratch" in (out / "resnet50" / "report.html").read_text()


@pytest.mark.slow
def test_an_interrupted_comparison_continues_only_with_the_settings_it_started_with(mini_root, tmp_path):
    out = tmp_path / "compare"
    compare_on_mini(mini_root, out, "alnet")
    (out / "alnet" / "metrics.json").unlink()  # as if it had been stopped before the end
    changed = CliRunner().invoke(app, [
        "compare", "--data", str(mini_root), "--models", "alnet", "--no-pretrained", "--no-augment", "--epochs", "2",
        "--image-size", "136", "--batch-size", "16", "--out", str(out), "--no-progress"])
    assert changed.exit_code == 2
    assert "started with other settings (epochs 1 → 2)" in changed.output
    rows, output = compare_on_mini(mini_root, out, "alnet")  # the same settings: it continues
    assert [r["model"] for r in rows] == ["alnet"] and (out / "alnet" / "metrics.json").is_file()


def test_explain_writes_feature_maps_of_the_first_and_sixth_layer_and_gradcam(mini_root, tmp_path):
    from alnet.data.transforms import Preprocessing
    from alnet.infer.explain import (
        default_feature_layers,
        feature_maps,
        gradcam,
        read_image,
    )

    model = create_model("alnet").eval()
    image = next((mini_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all").iterdir())
    pixels = read_image(image, Preprocessing(size=224))
    layers = default_feature_layers("alnet")
    assert layers == ["cl1.conv1", "cl2.conv1"]
    maps = feature_maps(model, pixels, layers)
    assert maps["cl1.conv1"].shape == (32, 220, 220) and maps["cl2.conv1"].shape == (64, 50, 50)
    assert (maps["cl1.conv1"] >= 0).all(), "shown after ReLU, as Keras' conv layers output"
    with pytest.raises(ValueError, match="unknown layer"):
        feature_maps(model, pixels, ["cl9.conv1"])
    for name in ("alnet", "resnet50"):
        net = create_model(name, pretrained=False).eval() if name != "alnet" else model
        path = gradcam(net, name, pixels, tmp_path / name)
        assert path.is_file() and path.stat().st_size > 10_000
    baseline_maps = feature_maps(create_model("vgg16", pretrained=False), pixels, ["backbone.features.0"])
    assert baseline_maps["backbone.features.0"].shape[0] == 64


@pytest.mark.slow
def test_explain_command_on_a_run(synthetic_root, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--data", str(synthetic_root), "--protocol", "paper", "--epochs", "1",
                                  "--image-size", "136", "--out", str(run), "--no-progress"])
    assert trained.exit_code == 0, trained.output
    image = next((synthetic_root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "hem").iterdir())
    result = runner.invoke(app, ["explain", str(run), str(image), "--feature-maps", "--gradcam",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "P(ALL)" in result.output
    assert {p.name for p in (tmp_path / "x").iterdir()} == {
        "feature_maps_cl1_conv1.png", "feature_maps_cl2_conv1.png", "gradcam.png"}
    assert (run / "report.html").is_file()
