import numpy as np
import pytest
import torch

import model.predict as P
from model.nets import build_model
from model.predict import inference_model, logits, predict


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("light")
    # Non-trivial batch-norm statistics, so that evaluation mode matters.
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 32, 32))
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)


def test_predict_does_not_depend_on_the_batch_size(model, images):
    labels_1, probs_1 = predict(model, images, batch_size=1)
    for bs in (7, 1000):
        labels, probs = predict(model, images, batch_size=bs)
        np.testing.assert_array_equal(labels, labels_1)
        np.testing.assert_allclose(probs, probs_1, atol=1e-5)


def test_probabilities_are_a_distribution_and_labels_their_argmax(model, images):
    labels, probs = predict(model, images)
    assert labels.dtype == np.int64 and probs.dtype == np.float32 and probs.shape == (23, 10)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(1))


def test_tta_averages_the_image_and_its_mirror(model, images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    plain, mirrored = logits(model, x), logits(model, x.flip(-1))
    np.testing.assert_allclose(logits(model, x, tta=True), (plain + mirrored) / 2, atol=1e-5)
    assert not torch.allclose(plain, mirrored)


def test_predict_normalises_like_training(model, images):
    from model.augment import normalize

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = torch.softmax(model(normalize(x)), 1).numpy()
    np.testing.assert_allclose(predict(model, images)[1], expected, atol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 32, 32), np.uint8), np.zeros((2, 32, 32, 3))])
def test_predict_rejects_wrong_images(model, bad):
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 32, 32, 3\)"):
        predict(model, bad)


def test_predict_leaves_a_training_model_in_training_mode(images):
    m = build_model("light").train()
    predict(m, images[:2])
    assert m.training


def test_fast_path_matches_the_unfused_model(model, images):
    for tta in (False, True):
        labels, probs = predict(model, images, tta=tta)
        plain_labels, plain_probs = predict(model, images, tta=tta, fuse=False)
        np.testing.assert_array_equal(labels, plain_labels)
        np.testing.assert_allclose(probs, plain_probs, rtol=1e-5, atol=1e-6)


def test_cpu_forward_passes_are_capped_without_changing_results(model, images, monkeypatch):
    seen = []
    real_normalize = P.normalize
    monkeypatch.setattr(P, "CPU_BATCH", 8)
    monkeypatch.setattr(P, "normalize", lambda x: seen.append(len(x)) or real_normalize(x))
    labels, probs = predict(model, images, batch_size=1000)
    assert sorted(seen) == [7, 8, 8]  # streams run concurrently: any order
    seen.clear()
    predict(model, images, batch_size=5)
    assert sorted(seen) == [3, 5, 5, 5, 5]
    monkeypatch.undo()
    ref_labels, ref_probs = predict(model, images, batch_size=1000, fuse=False)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)


def test_predict_leaves_the_callers_model_as_it_was(images):
    torch.manual_seed(1)
    m = build_model("light").train()
    with torch.no_grad():
        m(torch.randn(16, 3, 32, 32))  # non-trivial running statistics
    before = {k: v.clone() for k, v in m.state_dict().items()}
    predict(m, images[:3])
    assert m.training and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.conv1.weight.is_contiguous()  # not switched to channels-last


def test_an_inference_model_is_prepared_once_and_predicts_alike(model, images):
    fast = inference_model(model, "cpu")
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    labels, probs = predict(fast, images, fuse=False)
    ref_labels, ref_probs = predict(model, images, fuse=False)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)


def test_predict_rejects_a_batch_size_below_one(model, images):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        predict(model, images, batch_size=0)


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_cpu_streams_cover_every_image_in_order(model, images, threads):
    fast = inference_model(model, "cpu")
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    one = P._cpu_logits(fast, x, 4, False, False, threads=1)
    many = P._cpu_logits(fast, x, 4, False, False, threads=threads)
    assert many.shape == (23, 10)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(P._cpu_logits(fast, x[:0], 4, False, False, threads), one[:0])


def test_cpu_streams_leave_the_callers_threads_and_a_training_model_alone(images):
    torch.manual_seed(2)
    m = build_model("light").train()
    with torch.no_grad():
        m(torch.randn(16, 3, 32, 32))
    running = m.bn1.running_mean.clone()
    threads = torch.get_num_threads()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = P._cpu_logits(m, x, 2, False, False, threads=4)
    assert torch.get_num_threads() == threads
    assert m.training and torch.equal(m.bn1.running_mean, running)  # evaluated in eval mode
    torch.testing.assert_close(y, logits(m, x), rtol=1e-5, atol=1e-6)
