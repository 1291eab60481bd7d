import numpy as np
import pytest
import torch

from model.nets import build_model
from model.predict import logits, predict


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
