"""Batched on-device image augmentation (the report's per-image PIL pipeline is in
model/reference_pipeline.py).

Every function takes NCHW images, uint8 (0..255) or float (0..1), on any device, and returns
a new tensor of the same dtype and device. Random parameters are drawn per image, in batched
calls, from `generator` (on the images' device; None for its global RNG), so one seed gives
bit-identical output and nothing reads back to the host: on a GPU the pipeline queues without
a sync, in a few dozen ops whatever the batch size, since there launches set the cost.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from model.reference_pipeline import CIFAR10_MEAN, CIFAR10_STD

# ITU-R 601-2 luma, the grayscale torchvision and PIL blend with for contrast and saturation.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


# --- validation and dtype plumbing ------------------------------------------------------------


def _check_images(x: torch.Tensor, caller: str, rgb: bool = False) -> None:
    if x.dim() != 4:
        raise ValueError(f"{caller} expects an NCHW batch, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise TypeError(f"{caller} expects uint8 (0..255) or float (0..1) images, got {x.dtype}")
    if rgb and x.shape[1] != 3:
        raise ValueError(f"{caller} expects 3 RGB channels, got {x.shape[1]} in {tuple(x.shape)}")


def _check_generator(x: torch.Tensor, generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on "
                         f"{x.device}; create it with torch.Generator(device=images.device)")


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    # Division (not multiplication by 1/255) so values match torchvision's ToTensor bit for bit.
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them from Python floats on every call would be a host-to-device
    # copy, which on CUDA waits for the queued work to finish.
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                 for v in (CIFAR10_MEAN, CIFAR10_STD))


# --- normalization ------------------------------------------------------------------------------


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NCHW images -> the report's mean/std normalization, computed in float32 exactly as
    ToTensor then Normalize would, then cast to `dtype`. Training and prediction share it."""
    _check_images(x, "normalize", rgb=True)
    mean, std = _constants(x.device)
    return ((_to_unit_float(x) - mean) / std).to(dtype)


# --- crop, flip, cutout -------------------------------------------------------------------------


def _draw_offsets(x: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    # (N, 2): (top, left) of each window in the padded image, each uniform in [0, 2 * padding].
    return torch.randint(0, 2 * padding + 1, (x.shape[0], 2), generator=generator, device=x.device)


def _draw_flips(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    # rand is in [0, 1), so p=1 always flips and p=0 never does.
    return torch.rand(x.shape[0], generator=generator, device=x.device) < p  # (N,) bool


def crop_flip_at(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None, padding: int
) -> torch.Tensor:
    """Crop each image at `offsets` (N, 2), the (top, left) of its window in the image
    zero-padded by `padding`, and mirror it where `flips` (N,) bool (None: no flips). One
    gather does both; crop_flip applies it, tests call it to replay known parameters."""
    _check_images(x, "crop_flip_at")
    n, c, h, w = x.shape
    if offsets.shape != (n, 2):
        raise ValueError(f"offsets must have shape ({n}, 2), got {tuple(offsets.shape)}")
    padded = F.pad(x, (padding, padding, padding, padding))  # (N, C, H + 2p, W + 2p)
    offsets = offsets.to(device=x.device, dtype=torch.long)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (N, W)
    if flips is not None:
        # A mirrored window reads its columns right to left.
        cols = torch.where(flips.to(x.device).view(n, 1), cols.flip(1), cols)
    index = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]  # (N, H, W) flat in padded
    index = index.view(n, 1, h * w).expand(n, c, h * w)  # (N, C, H*W), a view, no copy
    return padded.flatten(2).gather(2, index).view(n, c, h, w)  # (N, C, H, W)


def cutout(
    x: torch.Tensor, size: int, generator: torch.Generator | None = None, return_boxes: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Zero one size x size square per image, its centre uniform over the image's pixels and
    the square clipped at the borders (DeVries & Taylor, 2017). `size` 0 is the identity.

    The square spans rows [cy - size // 2, cy - size // 2 + size), so an odd size is exact where
    the original code would cut size - 1. With `return_boxes`, also returns the clipped squares,
    (N, 4) as (top, left, bottom, right) with bottom and right exclusive.
    """
    _check_images(x, "cutout")
    _check_generator(x, generator)
    if size < 0:
        raise ValueError(f"cutout size must be >= 0, got {size}")
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator, device=x.device)  # (N,)
    cx = torch.randint(0, w, (n,), generator=generator, device=x.device)  # (N,)
    top, left = (cy - size // 2).clamp(0, h), (cx - size // 2).clamp(0, w)
    bottom, right = (cy - size // 2 + size).clamp(0, h), (cx - size // 2 + size).clamp(0, w)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])  # (N, W)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    out = x.masked_fill(mask, 0)
    return (out, torch.stack((top, left, bottom, right), dim=1)) if return_boxes else out


def crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
              cutout_size: int = 0) -> torch.Tensor:
    """The fast recipe's augmentation: random crop (pad `padding`, zero fill, offsets uniform
    in [0, 2 * padding]) and flip (p = 0.5) in one gather, then cutout if `cutout_size` > 0.
    Draws the offsets, then the flips, then the cutout centres."""
    _check_images(x, "crop_flip")
    _check_generator(x, generator)
    offsets = _draw_offsets(x, padding, generator)
    out = crop_flip_at(x, offsets, _draw_flips(x, 0.5, generator), padding)
    return cutout(out, cutout_size, generator) if cutout_size > 0 else out


# --- the report's pipeline, batched -------------------------------------------------------------

# The report's parameters: RandomCrop(32, padding=4), RandomHorizontalFlip(), ColorJitter(0.3,
# 0.3, 0.3, 0.1), RandomRotation(20), RandomAffine(0, translate=(0.1, 0.1)).
_PAD, _DEGREES, _TRANSLATE, _JITTER, _HUE_SHIFT = 4, 20.0, 0.1, 0.3, 0.1

# Columns of the (N, 13) tensor report_params draws, one row per image. The first seven are
# whole numbers: flip (1 mirrors), the constant 1, the shift (dx, dy) right and down in pixels,
# the crop window's (top, left) in the image padded by 4, and perm, the jitter's order as an
# index into JITTER_ORDERS. Then the angle in degrees (counter-clockwise), the brightness,
# contrast and saturation factors, 1 again, and the hue shift as a fraction of the wheel. The
# ones let the apply step build its matrices with one product and a matmul.
REPORT_PARAMS = ("flip", "one", "dx", "dy", "top", "left", "perm",
                 "angle", "brightness", "contrast", "saturation", "one", "hue")
_WHOLE = 7  # columns [0, 7) are floored

# Colour-jitter op ids, as torchvision's ColorJitter numbers them, and every order of the four:
# ColorJitter applies them in the order of torch.randperm(4), uniform over these 24.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3
JITTER_ORDERS = tuple(itertools.permutations(range(4)))


def _jitter_slots(order: tuple[int, ...]) -> list[int]:
    """Six blend slots around the one hue step: the blends an order runs before its hue take
    the last of slots 0-2, the ones after it the first of slots 3-5, and the rest hold _HUE,
    which a slot treats as the identity. Every image then runs the same 6 blends and 1 hue
    shift, in its own order, with no branching on device values."""
    k = order.index(_HUE)
    slots = [_HUE] * 6
    slots[3 - k : 3] = order[:k]
    slots[3 : 6 - k] = order[k + 1 :]
    return slots


@functools.cache
def _report_constants(device: torch.device, h: int, w: int) -> dict[str, torch.Tensor]:
    """The report pipeline's constants for HxW images, once per device and size (see
    _constants for why)."""
    hp, wp = h + 2 * _PAD, w + 2 * _PAD
    max_dx, max_dy = _TRANSLATE * w, _TRANSLATE * h
    # lo + span * u with u uniform in [0, 1). Floored columns shrink their span a hair so that
    # float rounding never lifts u just under 1 onto the excluded top value; round(v) is
    # floor(v + 0.5), hence the + 0.5 on the shifts.
    def whole(count: int) -> tuple[float, float]:  # floors to 0 .. count - 1
        return 0.0, count * (1 - 1e-6)

    jitter = (1 - _JITTER, 2 * _JITTER)
    ranges = {"flip": whole(2), "one": (1.0, 0.0), "dx": (0.5 - max_dx, 2 * max_dx),
              "dy": (0.5 - max_dy, 2 * max_dy), "top": whole(2 * _PAD + 1),
              "left": whole(2 * _PAD + 1), "perm": whole(len(JITTER_ORDERS)),
              "angle": (-_DEGREES, 2 * _DEGREES), "brightness": jitter, "contrast": jitter,
              "saturation": jitter, "hue": (-_HUE_SHIFT, 2 * _HUE_SHIFT)}
    lo, span = zip(*(ranges[name] for name in REPORT_PARAMS), strict=True)

    # theta (F.affine_grid's 2x3 matrix, output to input in [-1, 1] coordinates) as a linear
    # map of the products [flip, one] x [cos, sin, 1] x [one, dx, dy, top, left]. In pixels
    # about the centres, output (X, Y) reads the flipped crop at R^-1 (X - dx, Y - dy), that
    # is Xs = cos (X - dx) - sin (Y - dy), Ys = sin (X - dx) + cos (Y - dy); mirroring is
    # a = 1 - 2 * flip, so the padded image is read at (a * Xs + left - 4, Ys + top - 4).
    # Each term: (theta entry, row-major; times a?; index in [cos, sin, 1]; index in
    # [one, dx, dy, top, left]; coefficient), with X = xn * w / 2 and Y = yn * h / 2.
    terms = [
        (0, True, 0, 0, w / 2), (1, True, 1, 0, -h / 2), (2, True, 0, 1, -1), (2, True, 1, 2, 1),
        (2, False, 2, 4, 1), (2, False, 2, 0, -_PAD),
        (3, False, 1, 0, w / 2), (4, False, 0, 0, h / 2), (5, False, 1, 1, -1),
        (5, False, 0, 2, -1), (5, False, 2, 3, 1), (5, False, 2, 0, -_PAD),
    ]
    theta = torch.zeros(2, 3, 5, 6, dtype=torch.float64)
    for entry, mirrored, trig, g, coef in terms:
        coef *= 2 / (wp if entry < 3 else hp)  # padded pixels -> [-1, 1]
        theta[1, trig, g, entry] += coef  # one * coef
        if mirrored:
            theta[0, trig, g, entry] -= 2 * coef  # flip * -2 coef

    # Per op id, (a, b, alpha) of the blend a * img + b * gray(img) + alpha * mean(gray(img)),
    # as linear maps of [brightness, contrast, saturation, one]. That is torchvision's
    # f * img + (1 - f) * ref, with ref black, the gray mean or the grayscale image.
    ops = torch.zeros(4, 4, 3, dtype=torch.float64)
    ops[0, _BRIGHTNESS, 0] = 1  # f * img
    ops[1, _CONTRAST, 0], ops[1, _CONTRAST, 2], ops[3, _CONTRAST, 2] = 1, -1, 1  # + (1-f) mean
    ops[2, _SATURATION, 0], ops[2, _SATURATION, 1], ops[3, _SATURATION, 1] = 1, -1, 1
    ops[3, _HUE, 0] = 1  # the identity
    gray = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float64)
    # (a, b, alpha) -> the slot's 3x3 colour matrix a * I + b * G and its 3x3 mean matrix
    # alpha * G / (H * W), G with each row the gray weights: applied to the window's colour sum
    # it gives the contrast term.
    blend = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    blend[0, 0], blend[1, 0], blend[2, 1] = torch.eye(3), gray.expand(3, 3), gray / (h * w)
    cyclic = torch.tensor([[0.0, 1, -1], [-1, 0, 1], [1, -1, 0]])  # row i: next - the one after

    def on(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=torch.float32).to(device)

    return {
        "lo": on(torch.tensor(lo)),
        "span": on(torch.tensor(span)),
        "angle_k": on(torch.tensor([math.pi / 180, math.pi / 180, 0.0])),
        "angle_phase": on(torch.tensor([0.0, -math.pi / 2, 0.0])),  # cos(t - pi/2) = sin(t)
        "theta": on(theta.view(30, 6)),
        "ops": on(ops.view(4, 12)),
        "slots": torch.tensor([_jitter_slots(o) for o in JITTER_ORDERS]).to(device),  # (24, 6)
        "blend": on(blend.view(3, 18)),
        "cyclic": on(cyclic),
        "sextant": on(torch.tensor([0.0, 2.0, 4.0]).view(1, 3, 1)),
        "hue_n": on(torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1)),
        "index": on(torch.arange(max(hp, wp))),
        "bound": on(torch.tensor([w - 1.0, h - 1.0, h - 1.0, w - 1.0]).view(1, 4, 1)),
        "zero": on(torch.zeros(1, 1, 1)),
        "uint8_scale": on(torch.tensor([1 / 255, 1, 1, 1, 1, 255]).view(1, 6, 1)),
    }


def report_params(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the report's augmentation parameters for a batch in one call: (N, 13), the columns
    named by REPORT_PARAMS."""
    _check_images(x, "report_params", rgb=True)
    _check_generator(x, generator)
    n, _, h, w = x.shape
    k = _report_constants(x.device, h, w)
    u = torch.rand(n, len(REPORT_PARAMS), generator=generator, device=x.device)
    params = torch.addcmul(k["lo"], u, k["span"])
    params[:, :_WHOLE].floor_()
    return params


def _shift_hue(y: torch.Tensor, shift: torch.Tensor, k: dict[str, torch.Tensor]) -> torch.Tensor:
    """torchvision's adjust_hue on (N, 3, P) floats in [0, 1]: RGB -> HSV, hue + shift, back.

    In sixths of the wheel the hue is 2i + (next - after next) / chroma, i the max channel
    (ties give the same hue either way), and channel n of the result is
    max - chroma * clamp(min(k, 4 - k), 0, 1) with k = (6 hue + 5, 3, 1 for R, G, B) mod 6.
    `shift` (N, 3, 1) holds 6 * shift + (5, 3, 1).
    """
    top = y.amax(1, keepdim=True)  # (N, 1, P)
    chroma = top - y.amin(1, keepdim=True)
    # Each channel's candidate hue, kept where that channel is the max. Where two channels tie
    # their candidates differ by 0 or 6, the same hue. Gray pixels (chroma 0) get hue 0 and
    # come back unchanged whatever the shift.
    sixths = torch.matmul(k["cyclic"], y).div_(chroma.clamp_min(1e-12)).add_(k["sextant"])
    sixths = sixths.masked_fill_(y < top, -7.0).amax(1, keepdim=True)  # (N, 1, P)
    wheel = (sixths + shift).remainder_(6.0)  # (N, 3, P)
    return torch.addcmul(top, chroma, torch.minimum(wheel, 4.0 - wheel).clamp_(0.0, 1.0), value=-1)


def report_augment_at(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply the report's augmentation with given parameters (see report_params).

    The colour jitter runs first, on the zero-padded image, then one affine_grid + grid_sample
    does crop, flip, rotation and shift. This computes what the report's order does (crop,
    flip, jitter, rotation, shift, each with torchvision's nearest sampling and zero fill):
    - crop and flip only move whole pixels, so the jitter sees the same pixels either way, and
      its contrast mean is taken over the crop window alone (its padding zeros included);
    - nearest sampling copies pixels, so pointwise colour ops commute with it;
    - crop and flip map pixel centres to pixel centres, so rounding the composed position
      picks the same pixel as rounding the rotation's position and then cropping, except on
      exact ties (half-pixel positions) and where float error moves a position across one;
    - what the rotation reads outside the crop window is zero in the report's order, hence
      the window mask before sampling; where the shift brings in pixels from outside the
      rotated frame it fills zero, hence the frame mask after.
    The tests replay the single steps with the same parameters and allow a few such pixels.
    With set_float32_matmul_precision("high") CUDA runs the matmuls here in TF32, which moves
    some colours by a uint8 level and positions by about a hundredth of a pixel (affine_grid's
    own matmul always did): noise far below the PIL pipeline's rounding at every step.
    """
    _check_images(x, "report_augment_at", rgb=True)
    n, _, h, w = x.shape
    if params.shape != (n, len(REPORT_PARAMS)):
        raise ValueError(f"params must have shape ({n}, {len(REPORT_PARAMS)}), "
                         f"got {tuple(params.shape)}")
    k = _report_constants(x.device, h, w)
    hp, wp = h + 2 * _PAD, w + 2 * _PAD
    params = params.to(device=x.device, dtype=torch.float32)

    # Which rows and columns are inside the frame after the shift (dx, dy) and inside the crop
    # window of the padded image (top, left).
    idx = k["index"] - params[:, 2:6, None]  # (N, 4, L): for dx, dy, top, left
    inside = (torch.clamp(idx, min=k["zero"], max=k["bound"]) == idx).float()
    frame = inside[:, 1, :h, None] * inside[:, 0, None, :w]  # (N, H, W) 1 or 0
    window = inside[:, 2, :hp, None] * inside[:, 3, None, :wp]  # (N, Hp, Wp)

    # The jitter: per slot (N,) (a, b, alpha) picked from each image's ops by its order.
    slots = k["slots"][params[:, 6].long()]  # (N, 6) op ids
    by_op = (params[:, 8:12] @ k["ops"]).view(n, 4, 3)
    coefs = by_op.gather(1, slots[:, :, None].expand(n, 6, 3))  # (N, 6, 3)
    if x.dtype == torch.uint8:  # the first slot reads 0..255, the last writes it
        coefs = coefs * k["uint8_scale"]
    matrices = (coefs.transpose(0, 1) @ k["blend"]).view(6, n, 2, 3, 3)  # colour, mean
    hue_shift = torch.add(k["hue_n"], params[:, 12, None, None], alpha=6)  # (N, 3, 1)
    high = 255.0 if x.dtype == torch.uint8 else 1.0

    y = torch.zeros(n, 3, hp, wp, dtype=torch.float32, device=x.device)
    y[:, :, _PAD : _PAD + h, _PAD : _PAD + w] = x  # float32, uint8 kept as 0..255
    y = y.view(n, 3, hp * wp)  # (N, 3, P)
    window = window.view(n, hp * wp, 1)
    for j in range(6):
        if j == 3:
            y = _shift_hue(y, hue_shift, k)
        mean = torch.bmm(matrices[j, :, 1], torch.bmm(y, window))  # (N, 3, 1)
        y = torch.baddbmm(mean, matrices[j, :, 0], y).clamp_(0.0, high if j == 5 else 1.0)
    y = (y * window.view(n, 1, -1)).view(n, 3, hp, wp)

    # The geometry: theta from products of the parameters, then one sampling op.
    trig = torch.cos(torch.addcmul(k["angle_phase"], params[:, 7:8], k["angle_k"]))  # (N, 3)
    products = params[:, 0:2, None, None] * trig[:, None, :, None] * params[:, None, None, 1:6]
    theta = (products.view(n, 30) @ k["theta"]).view(n, 2, 3)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)  # (N, H, W, 2)
    out = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out = out * frame[:, None]  # (N, 3, H, W)
    return (out.round_() if x.dtype == torch.uint8 else out).to(x.dtype)


def report_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The report's per-image pipeline (see _PAD and its neighbours), batched on device, as
    torchvision draws and applies it."""
    return report_augment_at(x, report_params(x, generator))
