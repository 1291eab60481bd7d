"""Batched augmentation: exactness against torchvision, determinism, per-image randomness.

The single steps of the report's pipeline live in tests/oracles/augment_oracles.py: checked
here against torchvision's tensor ops, they are the reference the fused report_augment is
replayed against; the PIL pipeline it stands in for checks it statistically.
"""

import colorsys
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torchvision import transforms as T

from model import augment as A
from model import reference_pipeline as R
from tests.oracles import augment_oracles as O

RANDOM_FNS = {
    "random_crop": lambda x, g: O.random_crop(x, 4, generator=g),
    "random_flip": lambda x, g: O.random_flip(x, 0.5, generator=g),
    "cutout": lambda x, g: A.cutout(x, 8, generator=g),
    "color_jitter": lambda x, g: O.color_jitter(x, generator=g),
    "random_affine": lambda x, g: O.random_affine(x, generator=g),
    "report_augment": lambda x, g: A.report_augment(x, generator=g),
    "crop_flip": lambda x, g: A.crop_flip(x, generator=g),
    "crop_flip_cutout": lambda x, g: A.crop_flip(x, generator=g, cutout_size=12),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 8, dtype: torch.dtype = torch.uint8, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen(seed))
    return x if dtype == torch.uint8 else (x.float() / 255).to(dtype)


@pytest.mark.parametrize("name", sorted(RANDOM_FNS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_shape_dtype_range_preserved_and_input_untouched(name, dtype):
    x = images(dtype=dtype)
    before = x.clone()
    out = RANDOM_FNS[name](x, gen(1))
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()
    if dtype.is_floating_point:
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(RANDOM_FNS))
def test_same_seed_same_output_other_seed_differs(name):
    x = images()
    fn = RANDOM_FNS[name]
    assert torch.equal(fn(x, gen(7)), fn(x, gen(7)))
    assert not torch.equal(fn(x, gen(7)), fn(x, gen(8)))


@pytest.mark.parametrize("name", sorted(RANDOM_FNS))
def test_identical_images_get_different_parameters(name):
    x = images(1).expand(16, -1, -1, -1)
    out = RANDOM_FNS[name](x, gen(3))
    assert any(not torch.equal(out[0], out[i]) for i in range(1, 16))


def test_global_rng_used_without_generator():
    x = images()
    torch.manual_seed(5)
    first = A.report_augment(x)
    torch.manual_seed(5)
    assert torch.equal(A.report_augment(x), first)


def test_flip_probability_one_and_zero_are_exact():
    x = images()
    assert torch.equal(O.random_flip(x, p=1.0, generator=gen(0)), x.flip(-1))
    assert torch.equal(O.random_flip(x, p=0.0, generator=gen(0)), x)


def test_flip_flags_say_which_images_flipped():
    x = images(32)
    out, flags = O.random_flip(x, generator=gen(0), return_flags=True)
    assert 0 < flags.sum() < 32
    for i in range(32):
        assert torch.equal(out[i], x[i].flip(-1) if flags[i] else x[i])


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_crop_is_the_window_of_the_zero_padded_image(padding):
    x = images(16)
    out, offsets = O.random_crop(x, padding, generator=gen(0), return_offsets=True)
    assert offsets.shape == (16, 2)
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    padded = F.pad(x, (padding,) * 4)
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, top : top + 32, left : left + 32])
    if padding:
        assert len({tuple(o) for o in offsets.tolist()}) > 1


def test_crop_offsets_cover_the_whole_range():
    _, offsets = O.random_crop(images(512), 4, generator=gen(0), return_offsets=True)
    assert set(offsets.flatten().tolist()) == set(range(9))


def test_crop_flip_at_flips_the_window():
    x = images(4)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4]])
    flips = torch.tensor([True, False, True, True])
    out = A.crop_flip_at(x, offsets, flips, 4)
    padded = F.pad(x, (4, 4, 4, 4))
    for i, ((top, left), flip) in enumerate(zip(offsets.tolist(), flips.tolist(), strict=True)):
        window = padded[i, :, top : top + 32, left : left + 32]
        assert torch.equal(out[i], window.flip(-1) if flip else window)
    assert torch.equal(out[3], x[3].flip(-1))


def test_crop_flip_equals_the_single_steps_in_turn():
    x = images(16)
    g = gen(11)
    expected = A.cutout(O.random_flip(O.random_crop(x, 4, g), 0.5, g), 12, g)
    assert torch.equal(A.crop_flip(x, 4, gen(11), cutout_size=12), expected)
    g = gen(11)
    assert torch.equal(A.crop_flip(x, 4, gen(11)), O.random_flip(O.random_crop(x, 4, g), 0.5, g))


def test_cutout_zeroes_exactly_the_clipped_square():
    x = images(64).clamp(min=1)  # no zeros of its own
    out, boxes = A.cutout(x, 12, generator=gen(0), return_boxes=True)
    top, left, bottom, right = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (bottom <= 32).all() and (right <= 32).all()
    heights, widths = bottom - top, right - left
    assert (heights <= 12).all() and (widths <= 12).all() and (heights > 0).all()
    assert (heights < 12).any(), "some squares should be clipped at a border"
    assert (heights == 12).any() and (widths == 12).any()
    for i, (t, lf, b, r) in enumerate(boxes.tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[t:b, lf:r] = True
        assert (out[i][:, inside] == 0).all()
        assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])


def test_cutout_size_zero_is_identity():
    x = images()
    assert torch.equal(A.cutout(x, 0, generator=gen(0)), x)
    g = gen(0)
    unpadded = O.random_crop(x, 0, g)
    assert torch.equal(unpadded, x)
    assert torch.equal(A.crop_flip(x, 0, gen(0), cutout_size=0), O.random_flip(unpadded, 0.5, g))


def test_rgb_hsv_round_trip_and_colorsys_agreement():
    x = images(4, torch.float32)
    hsv = O.rgb_to_hsv(x)
    assert (hsv >= 0).all() and (hsv <= 1).all()
    assert torch.allclose(O.hsv_to_rgb(hsv), x, atol=2e-6)
    for n, i, j in [(0, 0, 0), (1, 5, 7), (2, 31, 31), (3, 16, 2)]:
        expected = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
        assert hsv[n, :, i, j].tolist() == pytest.approx(expected, abs=1e-6)
    gray = torch.full((1, 3, 2, 2), 0.4)
    assert torch.equal(O.rgb_to_hsv(gray)[:, :2], torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize("shift", [0.0, 0.1, -0.25, 0.5])
def test_hue_shift_matches_torchvision(shift):
    x = images(4, torch.float32)
    ours = O._shift_hue(x, torch.full((4,), shift))
    assert torch.allclose(ours, TF.adjust_hue(x, shift), atol=1e-5)
    if shift == 0.0:
        assert torch.allclose(ours, x, atol=2e-6)


def test_jitter_with_zero_ranges_is_identity():
    x = images()
    out = O.color_jitter(x, 0, 0, 0, 0, generator=gen(0))
    assert (out.int() - x.int()).abs().max() <= 1
    xf = images(dtype=torch.float32)
    assert torch.allclose(O.color_jitter(xf, 0, 0, 0, 0, generator=gen(0)), xf, atol=1e-6)


def test_brightness_factor_in_range_on_constant_image():
    x = torch.full((64, 3, 8, 8), 0.5)
    out, params = O.color_jitter(x, 0.3, 0, 0, 0, generator=gen(0), return_params=True)
    ratio = out.mean((1, 2, 3)) / 0.5
    assert (ratio >= 0.7 - 1e-6).all() and (ratio <= 1.3 + 1e-6).all()
    assert ratio.max() - ratio.min() > 0.3, "factors should spread over the range"
    assert torch.allclose(ratio, params["factors"][:, 0], atol=1e-6)


def test_jitter_parameters_follow_torchvision_ranges():
    _, params = O.color_jitter(
        images(256), 0.3, 0.2, 1.5, 0.1, generator=gen(0), return_params=True
    )
    f = params["factors"]
    for col, (lo, hi) in enumerate([(0.7, 1.3), (0.8, 1.2), (0.0, 2.5), (-0.1, 0.1)]):
        assert f[:, col].min() >= lo and f[:, col].max() <= hi
        assert f[:, col].max() - f[:, col].min() > 0.8 * (hi - lo)
    order = params["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(256, 4))
    assert len({tuple(o) for o in order.tolist()}) == 24, "all 24 orders should occur"


def test_jitter_equals_torchvision_ops_in_each_images_order():
    x = images(12, torch.float32)
    out, params = O.color_jitter(x, 0.4, 0.4, 0.4, 0.2, generator=gen(2), return_params=True)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(12):
        expected = x[i]
        for op in params["order"][i].tolist():
            expected = ops[op](expected, params["factors"][i, op].item())
        assert torch.allclose(out[i], expected, atol=1e-5), f"image {i}"


def test_affine_with_no_rotation_or_shift_is_identity():
    for dtype in (torch.uint8, torch.float32):
        x = images(dtype=dtype)
        assert torch.equal(O.random_affine(x, 0.0, (0.0, 0.0), generator=gen(0)), x)


def test_affine_matches_torchvision_rotate_then_translate():
    x = images(1)
    for angle, dx, dy in [(17.3, 3, -2), (-12.0, -3, 3), (5.5, 0, 0), (-19.9, 2, 1)]:
        ours = O.affine_at(x, torch.tensor([angle]), torch.tensor([[dx, dy]]))
        rotated = TF.rotate(x, angle, fill=0)
        expected = TF.affine(rotated, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0])
        assert torch.equal(ours, expected), (angle, dx, dy)


def test_affine_quarter_turn_and_small_rotation_keep_the_centre():
    x = images(2)
    turned = O.affine_at(x, torch.tensor([90.0, 90.0]), torch.zeros(2, 2))
    assert torch.equal(turned, torch.rot90(x, 1, dims=(2, 3)))
    tilted = O.affine_at(x, torch.tensor([3.0, -3.0]), torch.zeros(2, 2))
    assert torch.equal(tilted[:, :, 15:17, 15:17], x[:, :, 15:17, 15:17])
    assert not torch.equal(tilted, x)


def test_affine_shift_moves_content_right_and_down():
    x = images(1)
    out = O.affine_at(x, torch.zeros(1), torch.tensor([[2, 3]]))
    assert torch.equal(out[:, :, 3:, 2:], x[:, :, :-3, :-2])
    assert (out[:, :, :3] == 0).all() and (out[:, :, :, :2] == 0).all()


def test_affine_parameters_in_range_and_whole_pixels():
    _, angles, shifts = O.random_affine(images(256), generator=gen(0), return_params=True)
    assert angles.abs().max() <= 20 and angles.max() - angles.min() > 30
    assert torch.equal(shifts, shifts.round())
    assert shifts.abs().max() <= 3  # round(0.1 * 32)
    assert set(shifts.flatten().tolist()) == {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_report_augment_matches_the_single_steps_in_turn(dtype, size):
    # The fused pass and the steps one after another, crop, flip, jitter, rotation, shift,
    # with the same parameters. Rounding a position composed in one go may pick the
    # neighbouring pixel where it falls within float error of a half pixel, and float error in
    # the colour arithmetic may round a uint8 value the other way: a handful of values each.
    x = torch.randint(0, 256, (16, 3, *size), dtype=torch.uint8, generator=gen(1))
    x = x if dtype == torch.uint8 else x.float() / 255
    params = A.report_params(x, gen(4))
    fused, steps = A.report_augment_at(x, params), O.report_chain(x, params)
    assert torch.equal(A.report_augment(x, gen(4)), fused)
    diff = (fused.float() - steps.float()).abs()
    close = 1.0 if dtype == torch.uint8 else 1e-5
    assert (diff > close).sum() <= 6, "whole pixels read from elsewhere"
    assert (diff > 0).float().mean() < (1e-3 if dtype == torch.uint8 else 1.0)
    assert (fused == 0).float().mean() > 0.05, "rotation and shift should leave zero borders"


def test_report_params_follow_torchvision_ranges():
    p = A.report_params(images(4096), gen(0))
    col = {name: p[:, i] for i, name in enumerate(A.REPORT_PARAMS)}
    assert (col["one"] == 1).all() and p[:, A.REPORT_PARAMS.index("one", 2)].eq(1).all()
    assert set(col["flip"].tolist()) == {0.0, 1.0} and abs(col["flip"].mean() - 0.5) < 0.03
    for name, values in [("top", range(9)), ("left", range(9)), ("perm", range(24))]:
        assert set(col[name].tolist()) == set(map(float, values)), name
    for name in ("dx", "dy"):  # round(uniform(-3.2, 3.2)): 0 takes 1/6.4 of the draws, 3 0.7/6.4
        counts = Counter(col[name].tolist())
        assert set(counts) == {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0}, name
        assert abs(counts[0.0] / 4096 - 1 / 6.4) < 0.02, name
        assert abs(counts[3.0] / 4096 - 0.7 / 6.4) < 0.02, name
    for name, (lo, hi) in [("angle", (-20, 20)), ("brightness", (0.7, 1.3)),
                           ("contrast", (0.7, 1.3)), ("saturation", (0.7, 1.3)),
                           ("hue", (-0.1, 0.1))]:
        assert col[name].min() >= lo and col[name].max() <= hi, name
        assert col[name].max() - col[name].min() > 0.95 * (hi - lo), name


def test_jitter_slots_keep_every_order():
    for order in A.JITTER_ORDERS:
        slots = A._jitter_slots(order)
        blends = [[op for op in half if op != 3] for half in (slots[:3], slots[3:])]
        assert blends[0] + [3] + blends[1] == list(order)


def _launches(fn, *args) -> int:
    """The aten ops a call dispatches from Python, less those that only make views or convert
    nothing: on a GPU each of the rest is at least one kernel launch."""
    no_kernel = {"view", "reshape", "select", "slice", "unsqueeze", "squeeze", "expand",
                 "transpose", "t", "permute", "flatten", "unbind", "as_strided", "alias",
                 "detach", "resolve_conj", "resolve_neg", "_unsafe_view", "lift_fresh"}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return sum(1 for e in top if e.name[6:] not in no_kernel
               and not (e.name == "aten::to" and not e.cpu_children))


def test_report_augment_is_a_few_dozen_ops_per_batch():
    # Each step on its own took about 215 ops a batch; the fused pass about 70, whatever the
    # batch size.
    x = images(8)
    A.report_augment(x, gen(0))  # constants built once, outside the count
    small, large = _launches(A.report_augment, x, gen(0)), _launches(A.report_augment,
                                                                       images(32), gen(0))
    assert small == large and small < 80
    assert _launches(A.crop_flip, x, 4, gen(0)) < 20


def test_report_augment_matches_the_pil_pipeline_statistically():
    # One structured image through the report's PIL transforms and through report_augment, 256
    # draws each. Per draw: the mean of each channel (brightness, hue), the colour spread and
    # chroma (contrast, saturation), the share of black fill (crop, rotation, shift). Their
    # means and their spreads over the draws must agree within 4 standard errors.
    rows, cols = np.mgrid[0:32, 0:32] / 31.0
    scene = np.stack([cols, rows, 1 - cols * rows], -1)
    scene[8:20, 6:18], scene[20:28, 18:30] = [0.9, 0.2, 0.1], [0.1, 0.6, 0.9]
    scene = (scene * 255).round().astype(np.uint8)  # (32, 32, 3)
    torch.manual_seed(0)
    steps = T.Compose(R.reference_transform(True).transforms[:5])  # all but ToTensor, Normalize
    pil = np.stack([np.asarray(steps(Image.fromarray(scene))) for _ in range(256)])
    x = torch.from_numpy(scene).permute(2, 0, 1).expand(256, -1, -1, -1).contiguous()
    ours = A.report_augment(x, gen(0)).permute(0, 2, 3, 1).numpy()

    def per_draw(draws):  # (D, H, W, 3) uint8 -> (D, 6)
        draws = draws / 255.0
        return np.concatenate([draws.mean((1, 2)), draws.std((1, 2)).mean(-1, keepdims=True),
                               (draws.max(-1) - draws.min(-1)).mean((1, 2))[:, None],
                               (draws.max(-1) == 0).mean((1, 2))[:, None]], 1)

    a, b = per_draw(ours), per_draw(pil)
    z_mean = (a.mean(0) - b.mean(0)) / np.sqrt((a.var(0) + b.var(0)) / 256)
    z_spread = (a.std(0) - b.std(0)) / np.sqrt((a.var(0) + b.var(0)) / 512)
    assert np.abs(z_mean).max() < 4 and np.abs(z_spread).max() < 4, (z_mean, z_spread)
    assert b[:, -1].mean() > 0.1 and b[:, 0].std() > 0.03  # the statistics see the augmentation


def test_normalize_matches_torchvision_to_tensor_then_normalize():
    x = images(4)
    reference = T.Compose([T.ToTensor(), T.Normalize(A.CIFAR10_MEAN, A.CIFAR10_STD)])
    expected = torch.stack([reference(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in x])
    assert torch.allclose(A.normalize(x), expected, atol=1e-6)
    assert torch.allclose(A.normalize(x.float() / 255), expected, atol=1e-6)
    half = A.normalize(x, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), expected, atol=0.05)


def test_reference_transform_outputs_normalized_tensors():
    img = Image.fromarray(images(1)[0].permute(1, 2, 0).numpy())
    train, evaluate = R.reference_transform(True), R.reference_transform(False)
    for transform in (train, evaluate):
        out = transform(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(evaluate(img), A.normalize(images(1))[0], atol=1e-6)
    names = [type(t).__name__ for t in train.transforms]
    assert names == [
        "RandomCrop",
        "RandomHorizontalFlip",
        "ColorJitter",
        "RandomRotation",
        "RandomAffine",
        "ToTensor",
        "Normalize",
    ]


def test_pil_dataset_pickles_and_loads_batches():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 10)
    dataset = R.PILDataset(imgs, labels, R.reference_transform(True))
    restored = pickle.loads(pickle.dumps(dataset))
    assert len(restored) == 10
    x, y = restored[3]
    assert x.shape == (3, 32, 32) and y == int(labels[3]) and isinstance(y, int)
    batch_x, batch_y = next(iter(DataLoader(dataset, batch_size=4, num_workers=0)))
    assert batch_x.shape == (4, 3, 32, 32) and torch.equal(batch_y, torch.as_tensor(labels[:4]))
    evaluate = R.PILDataset(imgs, labels, R.reference_transform(False))
    expected = A.normalize(torch.from_numpy(imgs[:1]).permute(0, 3, 1, 2))[0]
    assert torch.allclose(evaluate[0][0], expected, atol=1e-6)


def test_pil_dataset_rejects_mismatched_arrays():
    imgs = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="labels"):
        R.PILDataset(imgs, np.zeros(3), None)
    with pytest.raises(ValueError, match="uint8"):
        R.PILDataset(imgs.astype(np.float32), np.zeros(4), None)


def test_bad_inputs_raise_actionable_errors():
    with pytest.raises(ValueError, match="NCHW"):
        A.crop_flip(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        A.report_augment(torch.zeros(1, 3, 32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="RGB"):
        A.report_augment(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="params"):
        A.report_augment_at(images(2), torch.zeros(3, len(A.REPORT_PARAMS)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_replay():
    x = images(64)
    xc = x.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out, offsets = O.random_crop(xc, 4, generator=g, return_offsets=True)
    assert out.is_cuda
    assert torch.equal(out.cpu(), A.crop_flip_at(x, offsets.cpu(), None, 4))
    flipped, flags = O.random_flip(xc, generator=g, return_flags=True)
    assert torch.equal(flipped.cpu(), A.crop_flip_at(x, torch.full((64, 2), 4), flags.cpu(), 4))
    g1 = torch.Generator(device="cuda").manual_seed(1)
    g2 = torch.Generator(device="cuda").manual_seed(1)
    assert torch.equal(A.crop_flip(xc, generator=g1, cutout_size=12),
                       A.crop_flip(xc, generator=g2, cutout_size=12))
    angles, shifts = torch.tensor([13.0, -7.5]), torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    turned = O.affine_at(xc[:2], angles.cuda(), shifts.cuda()).cpu()
    assert (turned == O.affine_at(x[:2], angles, shifts)).float().mean() > 0.999
    params = A.report_params(xc, g)
    assert params.is_cuda
    fused = A.report_augment_at(xc, params)
    assert (fused.cpu() == A.report_augment_at(x, params.cpu())).float().mean() > 0.999
    assert (fused == O.report_chain(xc, params)).float().mean() > 0.999
    for dtype in (torch.uint8, torch.float32, torch.bfloat16):
        xd = images(64, dtype).cuda()
        aug = A.report_augment(xd, generator=g)
        assert aug.dtype == dtype and aug.is_cuda
        assert A.normalize(aug, torch.bfloat16).dtype == torch.bfloat16
