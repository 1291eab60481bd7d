import pytest
import torch

from model.nets import VARIANTS, build_model, count_parameters, summary


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
