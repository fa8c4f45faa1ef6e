import pytest
import timm
import torch
from safetensors.torch import save_file

from maskcls import models
from maskcls.config import ModelConfig
from maskcls.errors import ConfigError
from maskcls.models import build

TINY = "mobilenetv3_small_050"


def test_multi_head_outputs_valid_18_class_log_probabilities():
    model = build(ModelConfig(name=TINY, head="multi")).eval()
    out = model(torch.randn(4, 3, 32, 24))
    assert out.shape == (4, 18)
    assert torch.allclose(out.logsumexp(1), torch.zeros(4), atol=1e-5)
    mask, gender, age = (
        torch.log_softmax(h(model.backbone(torch.zeros(1, 3, 32, 24))), 1) for h in model.heads
    )
    joint = model(torch.zeros(1, 3, 32, 24))[0]
    assert torch.allclose(joint[2 * 6 + 1 * 3 + 2], mask[0, 2] + gender[0, 1] + age[0, 2], atol=1e-5)


def test_single_head_and_multi_sample_dropout():
    model = build(ModelConfig(name=TINY, dropout=0.5, dropout_samples=4))
    assert model(torch.randn(2, 3, 32, 24)).shape == (2, 18)
    model.eval()
    x = torch.randn(2, 3, 32, 24)
    assert torch.equal(model(x), model(x))  # no dropout at inference


def test_unknown_model_and_missing_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown timm model 'resnet999'"):
        build(ModelConfig(name="resnet999"))
    with pytest.raises(ConfigError, match="not found"):
        build(ModelConfig(name=TINY, pretrained=str(tmp_path / "none.safetensors")))


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    source = timm.create_model(TINY, num_classes=1000)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build(ModelConfig(name=TINY, pretrained=str(path)))
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)
    assert not torch.equal(build(ModelConfig(name=TINY)).backbone.conv_stem.weight, source.conv_stem.weight)


def test_an_ensemble_votes_with_its_weights():
    torch.manual_seed(0)
    a, b = (models.build(ModelConfig(name="mobilenetv3_small_050")).eval() for _ in range(2))
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        pa, pb = (torch.softmax(m(x), 1) for m in (a, b))
        weighted = torch.softmax(models.Ensemble([a, b], [3.0, 1.0]).eval()(x), 1)
    assert torch.allclose(weighted, 0.75 * pa + 0.25 * pb, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit 2 members"):
        models.Ensemble([a, b], [1.0])
