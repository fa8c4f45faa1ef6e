"""A timm backbone with one of two heads.

single: one 18-way linear layer.
multi:  mask (3), gender (2) and age (3) heads whose log-probabilities are summed into the
        18 class log-probabilities (class = mask * 6 + gender * 3 + age_band), so each head
        learns from every image of its attribute, which helps the tiny 60+ band.
Both return log-probabilities-compatible scores: losses apply log_softmax, which leaves the
multi head's already-normalised output unchanged.
"""

from __future__ import annotations

from typing import cast

import timm
import torch
import torch.nn.functional as F
from torch import nn

from maskcls import weights
from maskcls.config import ModelConfig
from maskcls.labels import NUM_CLASSES

HEAD_SIZES = {"single": (NUM_CLASSES,), "multi": (3, 2, 3)}


class Classifier(nn.Module):
    def __init__(
        self, backbone: nn.Module, head: str, dropout: float, dropout_samples: int, age_head: bool = False
    ):
        super().__init__()
        self.backbone = backbone
        self.head_kind = head
        self.dropout = nn.Dropout(dropout)
        self.dropout_samples = dropout_samples
        # Models with a pre-logits layer (MobileNetV3, EfficientNet-V2...) pool to head_hidden_size.
        width = cast(int, getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.heads = nn.ModuleList(nn.Linear(width, k) for k in HEAD_SIZES[head])
        self.age = nn.Linear(width, 1) if age_head else None  # the auxiliary target, training only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scores(self.backbone(x))

    def forward_with_age(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 18 class scores and the age head's estimate (age / 100) from one backbone pass."""
        assert self.age is not None, "built without an age head (model.age_aux_weight = 0)"
        features = self.backbone(x)
        return self._scores(features), self.age(self.dropout(features)).squeeze(1)

    def _scores(self, features: torch.Tensor) -> torch.Tensor:
        samples = self.dropout_samples if self.training and self.dropout.p > 0 else 1
        outputs = [self._head(self.dropout(features)) for _ in range(samples)]
        return outputs[0] if samples == 1 else torch.stack(outputs).mean(0)

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "single":
            return self.heads[0](features)
        mask, gender, age = (F.log_softmax(h(features).float(), dim=1) for h in self.heads)
        joint = mask[:, :, None, None] + gender[:, None, :, None] + age[:, None, None, :]
        return joint.flatten(1)


def build(cfg: ModelConfig) -> Classifier:
    """The backbone from timm, randomly initialised or with `model.pretrained` weights (see
    maskcls.weights); its ImageNet classifier is dropped for our heads."""
    weights.check_name(cfg.name)
    backbone = timm.create_model(cfg.name, num_classes=0, **weights.timm_options(cfg))
    return Classifier(backbone, cfg.head, cfg.dropout, cfg.dropout_samples, age_head=cfg.age_aux_weight > 0)


class Ensemble(nn.Module):
    """One or more classifiers whose probabilities are averaged (k-fold models and the top trials
    of a study vote softly), equally or with the given weights.

    Returns log-probabilities plus the decision biases, so softmax of the output is the (weighted)
    mean of the members' probabilities, reweighted by exp(bias) per class when biases were fitted; a
    single model is an ensemble of one, and every saved model has this one format.
    """

    def __init__(
        self, members: list[Classifier], weights: list[float] | None = None, biases: list[float] | None = None
    ):
        super().__init__()
        self.members = nn.ModuleList(members)
        votes = [float(v) for v in weights] if weights is not None else [1.0] * len(members)
        if len(votes) != len(members) or min(votes) < 0 or sum(votes) <= 0:
            raise ValueError(f"ensemble weights {weights} do not fit {len(members)} members")
        # Not in the state dict: config.json records the weights, so older files load unchanged.
        self.weights: torch.Tensor
        self.register_buffer("weights", torch.tensor([v / sum(votes) for v in votes]), persistent=False)
        # Decision biases (maskcls.calibrate) added to the log-probabilities; zero unless fitted.
        if biases is not None and len(biases) != NUM_CLASSES:
            raise ValueError(f"{len(biases)} decision biases for {NUM_CLASSES} classes")
        self.biases: torch.Tensor
        self.register_buffer("biases", torch.tensor(biases or [0.0] * NUM_CLASSES), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([F.softmax(m(x).float(), dim=1) for m in self.members])
        mean = (probs * self.weights[:, None, None]).sum(0)
        return mean.clamp_min(1e-12).log() + self.biases
