import pytest
import torch
from torch import nn

from model.nets import VARIANTS, build_model, count_parameters, fuse_for_inference, summary


@pytest.mark.parametrize(
    ("variant", "params", "mb"), [("deep", 4_697_162, 17.92), ("light", 2_777_674, 10.60)]
)
def test_parameter_counts_match_the_report(variant, params, mb):
    model = build_model(variant)
    assert count_parameters(model) == params
    s = summary(model)
    assert s.trainable_params == params
    assert round(s.param_mb, 2) == mb


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown variant 'medium'.*\['deep', 'light'\]"):
        build_model("medium")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_gives_ten_logits(variant):
    out = build_model(variant).eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_stage_strides_and_shortcuts():
    model = build_model("light")
    assert model.layer1[0].shortcut.__class__.__name__ == "Identity"
    assert model.layer2[0].conv1.stride == (2, 2)
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert model.layer3[1].conv1.stride == (1, 1)
    assert model.linear.in_features == 256


def test_summary_table_and_memory_estimate():
    model = build_model("deep")
    s128, s256 = summary(model, batch_size=128), summary(model, batch_size=256)
    assert s128.rows[0].name == "conv1" and s128.rows[0].output_shape == (64, 32, 32)
    assert s128.rows[-1].name == "linear" and s128.rows[-1].output_shape == (10,)
    assert sum(r.params for r in s128.rows) == 4_697_162
    assert s256.activation_mb == pytest.approx(2 * s128.activation_mb)
    assert summary(build_model("light")).forward_flops < s128.forward_flops
    text = s128.table()
    assert "4,697,162" in text and "17.92 MB" in text and "layer3.2.conv2" in text
    # The model itself is untouched by the meta-device trace.
    assert next(model.parameters()).device.type == "cpu"


def trained_like(variant: str, seed: int = 0) -> nn.Module:
    """A network whose batch norms have non-trivial statistics and affine parameters, as after
    training, so that folding them changes every conv; left in training mode."""
    torch.manual_seed(seed)
    model = build_model(variant)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.linear.weight.mul_(10)  # logits of a trained net's size, not near 0
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_model_gives_the_eval_logits(variant):
    model = trained_like(variant)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
        fused = fuse_for_inference(model)(x)
    assert expected.std() > 1  # logits large enough for the tolerance to mean something
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fusion_folds_every_batch_norm_and_keeps_the_convs(variant):
    model = build_model(variant)
    fused = fuse_for_inference(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == (15 if variant == "light" else 25)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_bn and all(c.bias is not None for c in convs)
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())


def test_fusion_leaves_the_training_model_untouched():
    model = trained_like("light")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The copy shares no storage: changing it does not reach the original.
    with torch.no_grad():
        fused.linear.weight.add_(1.0)
        fused.conv1.weight.zero_()
    assert torch.equal(model.linear.weight, before["linear.weight"])
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None


def test_fusing_twice_changes_nothing():
    once = fuse_for_inference(trained_like("light"))
    twice = fuse_for_inference(once)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))


def test_fusion_rejects_other_networks():
    with pytest.raises(TypeError, match="supports ModifiedResNet, got Sequential"):
        fuse_for_inference(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
