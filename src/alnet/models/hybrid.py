"""Hybrid models: frozen CNN features + a scikit-learn classifier (the paper's §6 "future work").

A hybrid's name says what it is built of, and is parsed here and nowhere else:

    BACKBONE[,BACKBONE…]+[pca+]CLASSIFIER      e.g. resnet50+svm, vgg16+pca+rf, alexnet,resnet50+knn

- BACKBONE: a registered model; its penultimate features (`forward_head(forward_features(x), pre_logits=True)`)
  are used as they are. Several backbones are an ensemble: their features are concatenated. A backbone without
  ImageNet weights (alnet) takes its weights from a trained checkpoint (`features_from`, loaded by training).
- pca: principal components before the classifier (the share of variance kept is searched).
- CLASSIFIER: `svm` (RBF kernel, Platt-calibrated), `rf` (random forest), `knn` (k nearest neighbours).

`HybridNet` keeps the model contract of `spec.py`: `forward_features` gives the (concatenated) features and
`forward_head` the classifier's P(ALL), returned as the two logits that the run's head turns back into exactly
that probability, so every inference path (predict, serve, evaluate) takes a hybrid as it takes a CNN.

The fitted classifier travels inside the module's state (`get_extra_state`: `{"format": "skops", "data": bytes}`),
so a checkpoint stays tensors and plain containers. It is read back with skops and an explicit list of trusted
types (`TRUSTED_TYPES`): a file naming any other type is refused, and nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .head import logits_for
from .spec import CellModel, ModelSpec

CLASSIFIERS = {
    "svm": "SVM with an RBF kernel, Platt-calibrated (sigmoid on cross-validated decision values)",
    "rf": "random forest",
    "knn": "k nearest neighbours (majority of k)",
}
PCA = "pca"
ENSEMBLE_SEPARATOR = ","  # backbones whose features are concatenated
PART_SEPARATOR = "+"

# What a stored classifier may unpack to: a k-NN keeps its training features (10,661 C-NMC cells × 6,144 features
# of an AlexNet + ResNet-50 ensemble, float64, is 524 MB), a PCA its components; a larger archive is not one alnet
# wrote.
MAX_CLASSIFIER_BYTES = 2**30
MAX_CLASSIFIER_MEMBERS = 100_000
# Types a saved classifier may contain besides skops' own defaults (numpy, builtins, scikit-learn estimators it
# deems safe). Exactly what the pipelines built by `make_search` hold; anything else in a file is refused.
TRUSTED_TYPES = [
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
]


class ClassifierError(ValueError):
    """A stored classifier cannot be loaded safely; the message says why."""


@dataclass(frozen=True)
class HybridName:
    backbones: tuple[str, ...]
    pca: bool
    classifier: str

    @property
    def name(self) -> str:
        return PART_SEPARATOR.join([ENSEMBLE_SEPARATOR.join(self.backbones), *([PCA] if self.pca else []),
                                    self.classifier])


def is_hybrid_name(name: str) -> bool:
    return PART_SEPARATOR in name


def parse_hybrid(name: str, backbones: dict[str, ModelSpec]) -> HybridName:
    """`name` → its parts, or a ValueError that shows the form."""
    form = (f"write BACKBONE[,BACKBONE…]+[pca+]CLASSIFIER with backbones from {', '.join(sorted(backbones))} and a "
            f"classifier from {', '.join(CLASSIFIERS)} (e.g. resnet50+svm, vgg16+pca+rf, alexnet,resnet50+knn)")
    parts = [p.strip() for p in name.lower().split(PART_SEPARATOR)]
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[1] != PCA) or parts[-1] not in CLASSIFIERS:
        raise ValueError(f"unknown model {name!r}: {form}")
    chosen = tuple(b.strip() for b in parts[0].split(ENSEMBLE_SEPARATOR))
    if not all(b in backbones for b in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"unknown or repeated backbone in {name!r}: {form}")
    return HybridName(chosen, len(parts) == 3, parts[-1])


def split_model_list(text: str) -> list[str]:
    """A list of model names as `--models` takes it: separated by semicolons or spaces when there are any (so an
    ensemble's own commas stay inside it: "alnet; alexnet,resnet50+svm"), else by commas."""
    separator = ";" if ";" in text else None if text.strip().count(" ") else ","
    return [m.strip().lower() for m in text.split(separator) if m.strip()]


# the classifier ---------------------------------------------------------------------------------------------------
def make_search(name: HybridName, n_fit: int, calibration_folds: int, seed: int):
    """(an unfitted scikit-learn pipeline, its small grid) for the classifier `name` names. `n_fit`: the fewest
    images any candidate is fitted on (k-NN's k must stay below it); `calibration_folds`: the SVM's Platt folds."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.decomposition import PCA as PrincipalComponents
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    steps: list = [("scale", StandardScaler())]
    grid: dict[str, list] = {}
    if name.pca:
        steps.append(("pca", PrincipalComponents(svd_solver="full", random_state=seed)))
        grid["pca__n_components"] = [0.9, 0.99]  # share of the variance kept
    if name.classifier == "svm":
        # SVC's own probability=True is deprecated; Platt scaling on cross-validated decision values is the same
        # idea, explicit.
        steps.append(("classifier", CalibratedClassifierCV(SVC(kernel="rbf", gamma="scale"), method="sigmoid",
                                                           cv=calibration_folds, ensemble=False)))
        grid["classifier__estimator__C"] = [0.1, 1.0, 10.0]
    elif name.classifier == "rf":
        steps.append(("classifier", RandomForestClassifier(n_estimators=200, random_state=seed)))
        grid["classifier__min_samples_leaf"] = [1, 3]
        grid["classifier__max_features"] = ["sqrt", 0.1]
    else:
        # Uniform votes: skl2onnx converts distance weighting as uniform, so an export would not agree.
        steps.append(("classifier", KNeighborsClassifier()))
        grid["classifier__n_neighbors"] = [k for k in (3, 5, 9, 15) if k < n_fit] or [max(1, n_fit - 1)]
    return Pipeline(steps), grid


def classifier_to_state(pipeline) -> dict:
    import skops.io as sio

    return {"format": "skops", "data": sio.dumps(pipeline)}


def _check_archive_sizes(data: bytes) -> None:
    """A skops file is a zip archive: every member's declared size and their total are bounded before anything is
    decompressed (zipfile never reads past a member's declared size), so a few MB cannot unpack to gigabytes."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ClassifierError(f"its classifier cannot be read ({type(err).__name__})") from None
    total = sum(member.file_size for member in members)
    if len(members) > MAX_CLASSIFIER_MEMBERS or total > MAX_CLASSIFIER_BYTES:
        raise ClassifierError(f"its classifier would unpack to {total:,} bytes in {len(members):,} part(s), over "
                              f"alnet's limit of {MAX_CLASSIFIER_BYTES:,} bytes in {MAX_CLASSIFIER_MEMBERS:,}; "
                              "refused, nothing was loaded")


def classifier_from_state(state) -> object:
    """The pipeline stored by `classifier_to_state`, loaded with the trusted types only."""
    import skops.io as sio

    if not (isinstance(state, dict) and state.get("format") == "skops" and isinstance(state.get("data"), bytes)):
        raise ClassifierError("its classifier is not stored as alnet stores one (skops bytes)")
    _check_archive_sizes(state["data"])
    try:
        untrusted = sorted(set(sio.get_untrusted_types(data=state["data"])) - set(TRUSTED_TYPES))
    except Exception as err:  # not a skops archive at all
        raise ClassifierError(f"its classifier cannot be read ({type(err).__name__})") from None
    if untrusted:
        shown = ", ".join(untrusted[:3]) + (" …" if len(untrusted) > 3 else "")
        raise ClassifierError(f"its classifier names types alnet does not trust ({shown}); refused, nothing was run")
    try:
        return sio.loads(state["data"], trusted=TRUSTED_TYPES)
    except Exception as err:
        raise ClassifierError(f"its classifier cannot be loaded ({type(err).__name__})") from None


# the model --------------------------------------------------------------------------------------------------------
def backbone_features(model: CellModel, x: torch.Tensor) -> torch.Tensor:
    """A registered model's penultimate features, one flat row per image."""
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1).float()


class HybridNet(CellModel):
    """Frozen backbone(s) → concatenated penultimate features → a fitted scikit-learn pipeline's P(ALL)."""

    def __init__(self, parts: HybridName, backbones: dict[str, nn.Module], head: str = "sigmoid"):
        super().__init__()
        self.parts, self.head_type = parts, head
        self.backbones = nn.ModuleDict(backbones)
        self.backbones.requires_grad_(False)
        self.num_features = sum(m.num_features for m in backbones.values())
        self.classifier = None  # a fitted scikit-learn pipeline (set by training or by load_state_dict)
        self.train()

    @property
    def frozen(self) -> bool:
        return True

    def train(self, mode: bool = True) -> "HybridNet":
        super().train(mode)
        self.backbones.eval()  # fixed feature extractors: running statistics kept, no dropout
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([backbone_features(m, x) for m in self.backbones.values()], dim=1)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(ALL) per feature row."""
        if self.classifier is None:
            raise RuntimeError(f"{self.parts.name}: the classifier has not been fitted")
        probabilities = self.classifier.predict_proba(np.asarray(features, dtype=np.float32))
        return probabilities[:, list(self.classifier.classes_).index(1)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x
        p = self.predict_proba(x.detach().float().cpu().numpy())
        return logits_for(torch.from_numpy(p).to(x.device), self.head_type)

    def get_extra_state(self) -> dict:
        return classifier_to_state(self.classifier) if self.classifier is not None else {}

    def set_extra_state(self, state) -> None:
        self.classifier = classifier_from_state(state) if state else None


def spec_for(name: str, registry: dict[str, ModelSpec]) -> ModelSpec:
    """The spec of the hybrid `name`, built from the registered specs of its backbones."""
    parts = parse_hybrid(name, {n: s for n, s in registry.items() if not s.hybrid})
    specs = {b: registry[b] for b in parts.backbones}

    def build(pretrained: bool = True, weights=None, head: str = "sigmoid", image_size: int = 224) -> HybridNet:
        if weights and len(parts.backbones) > 1:
            raise ValueError(f"{parts.name}: one weights file cannot serve several backbones; drop --weights")
        given = {"pretrained": pretrained, "weights": weights, "input_size": image_size}
        backbones = {b: s.build(**{k: v for k, v in given.items() if k in s.settings}) for b, s in specs.items()}
        return HybridNet(parts, backbones, head)

    first = parts.backbones[0]
    return ModelSpec(
        name=parts.name, build=build,
        settings={"pretrained": "pretrained", "weights": "weights", "head": "head", "image_size": "image_size"},
        gradcam_layer="",  # the classifier is not differentiable: no Grad-CAM
        feature_layers=tuple(f"backbones.{first}.{layer}" for layer in specs[first].feature_layers),
        frozen=True, pretrained=any(s.pretrained for s in specs.values()), hybrid=True,
        trained_backbones=tuple(b for b, s in specs.items() if not s.pretrained),
        description=f"{' + '.join(parts.backbones)} features{' → PCA' if parts.pca else ''} → "
                    f"{CLASSIFIERS[parts.classifier]} (scikit-learn)",
    )

