"""Image augmentation: batched on-device pipelines, and the report's PIL pipeline.

The batched functions take NCHW images, uint8 (0..255) or float (0..1), on any device, and
return a new tensor of the same dtype and device; they never write into their input. Random
parameters are drawn per image, in one or two batched calls, from `generator` (a
`torch.Generator` on the images' device, or None for that device's global RNG), so one seed
gives bit-identical output, and nothing reads a value back to the host: on a GPU the whole
pipeline queues without a sync.

`reference_transform` and `PILDataset` are the report's per-image torchvision pipeline,
kept exactly as published for the `reference` recipe.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

# ITU-R 601-2 luma, the grayscale torchvision and PIL blend with for contrast and saturation.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Colour-jitter operation ids. A blend slot holding _HUE does nothing, since hue has its own step.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


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
        raise ValueError(
            f"generator is on {generator.device} but the images are on {x.device}; "
            "create it with torch.Generator(device=images.device)"
        )


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    # Division (not multiplication by 1/255) so values match torchvision's ToTensor bit for bit.
    if x.dtype == torch.uint8:
        return x.float().div(255)
    return x.float()


def _restore(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return y.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return y.to(dtype)


@functools.cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Cached per device: building them from Python floats on every call would be a host-to-device
    # copy, which on CUDA waits for the queued work to finish.
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    gray = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    return mean, std, gray


# --- normalization ------------------------------------------------------------------------------


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) NCHW -> normalized float of `dtype` with the report's
    mean/std. Used identically by training and prediction.

    Computed in float32 exactly as ToTensor then Normalize would, then cast to `dtype`.
    """
    _check_images(x, "normalize", rgb=True)
    mean, std, _ = _constants(x.device)
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
    """Crop each image at given offsets from its zero-padded copy, and mirror it where `flips`.

    `offsets` (N, 2) holds (top, left) of each HxW window in the image padded by `padding` on
    every side; `flips` (N,) bool, or None for no flips. One gather does both, so a crop and a
    flip cost a single pass over the batch. This is what the random versions apply; call it
    directly to replay known parameters.
    """
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


def random_crop(
    x: torch.Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    return_offsets: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Like torchvision RandomCrop(size, padding) with zero fill, per image: pad by `padding`,
    then take an HxW window at a random offset in [0, 2 * padding] on each axis.

    With `return_offsets`, also returns the offsets, (N, 2) as (top, left) in the padded image.
    """
    _check_images(x, "random_crop")
    _check_generator(x, generator)
    offsets = _draw_offsets(x, padding, generator)
    out = crop_flip_at(x, offsets, None, padding)
    return (out, offsets) if return_offsets else out


def random_flip(
    x: torch.Tensor,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    return_flags: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mirror each image left-right with probability `p`.

    With `return_flags`, also returns which images were flipped, (N,) bool.
    """
    _check_images(x, "random_flip")
    _check_generator(x, generator)
    flips = _draw_flips(x, p, generator)
    out = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    return (out, flips) if return_flags else out


def cutout(
    x: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    return_boxes: bool = False,
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
    if return_boxes:
        return out, torch.stack((top, left, bottom, right), dim=1)
    return out


def crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    cutout_size: int = 0,
) -> torch.Tensor:
    """The fast recipe's augmentation: random crop and flip in one gather, then cutout if
    `cutout_size` > 0. Draws exactly what random_crop, random_flip and cutout would in turn,
    so the same generator state gives the same images as calling them one after another."""
    _check_images(x, "crop_flip")
    _check_generator(x, generator)
    offsets = _draw_offsets(x, padding, generator)
    flips = _draw_flips(x, 0.5, generator)
    out = crop_flip_at(x, offsets, flips, padding)
    if cutout_size > 0:
        out = cutout(out, cutout_size, generator)
    return out


def crop_flip_cutout(
    x: torch.Tensor,
    padding: int = 4,
    cutout_size: int = 12,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """crop_flip with a cutout square; 12 px is about 1/3 of the side, a common CIFAR choice."""
    return crop_flip(x, padding, generator, cutout_size=cutout_size)


# --- colour jitter ------------------------------------------------------------------------------


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float RGB in [0, 1] -> HSV, each in [0, 1]; hue is a fraction of the wheel
    and 0 where the pixel is gray."""
    r, g, b = x.unbind(1)  # each (N, H, W)
    maxc = x.amax(1)
    delta = maxc - x.amin(1)
    safe_delta = torch.where(delta > 0, delta, 1.0)  # gray pixels: numerators are 0 anyway
    hue = torch.where(
        maxc == r,
        (g - b) / safe_delta,
        torch.where(maxc == g, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta),
    )  # in sextants, [-1, 5)
    hue = (hue / 6.0).remainder(1.0)
    saturation = delta / torch.where(maxc > 0, maxc, 1.0)
    return torch.stack((hue, saturation, maxc), dim=1)  # (N, 3, H, W)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv: (N, 3, H, W) HSV in [0, 1] -> RGB in [0, 1].

    Uses the closed form c = V - V*S*clamp(min(k, 4 - k), 0, 1) with k = (n + 6H) mod 6 and
    n = 5, 3, 1 for R, G, B: a few elementwise ops instead of a six-way sextant select.
    """
    hue, saturation, value = x.unbind(1)  # each (N, H, W)
    chroma = value * saturation
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (hue * 6.0 + n).remainder(6.0)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)  # (N, 3, H, W)


def _factor_range(name: str, value: float) -> tuple[float, float]:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return max(0.0, 1.0 - value), 1.0 + value


def _draw_jitter(
    y: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5] (a fraction of the colour wheel), got {hue}")
    ranges = [
        _factor_range("brightness", brightness),
        _factor_range("contrast", contrast),
        _factor_range("saturation", saturation),
        (-hue, hue),
    ]
    u = torch.rand(y.shape[0], 8, generator=generator, device=y.device)  # (N, 8)
    factors = torch.stack(
        [lo + (hi - lo) * u[:, i] for i, (lo, hi) in enumerate(ranges)], dim=1
    )  # (N, 4): brightness, contrast, saturation factors and hue shift
    order = u[:, 4:].argsort(dim=1)  # (N, 4): op ids in the order each image applies them
    return factors, order


def _blend(
    y: torch.Tensor, op: torch.Tensor, table: torch.Tensor, gray_w: torch.Tensor
) -> torch.Tensor:
    """One brightness, contrast or saturation step, chosen per image by `op` (N,): torchvision's
    blend f*img + (1-f)*ref with ref = 0, the gray mean, or the gray image."""
    n = y.shape[0]
    f = table.gather(1, op.view(n, 1)).view(n, 1, 1, 1)
    gray = (y * gray_w).sum(1, keepdim=True)  # (N, 1, H, W)
    gray_mean = gray.mean((2, 3), keepdim=True)  # (N, 1, 1, 1)
    ref = torch.where(
        (op == _SATURATION).view(n, 1, 1, 1),
        gray,
        torch.where((op == _CONTRAST).view(n, 1, 1, 1), gray_mean, 0.0),
    )  # (N, 1, H, W)
    # f = 1 (a skipped slot) gives 1*y + 0*ref, exactly y.
    return (f * y + (1.0 - f) * ref).clamp_(0.0, 1.0)


def _shift_hue(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(y)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)).remainder(1.0)  # (N, H, W)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1)).clamp_(0.0, 1.0)


def _apply_jitter(
    y: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    blends: bool,
    hue: bool,
) -> torch.Tensor:
    """Apply jitter to float32 images in [0, 1] in a per-image random order.

    Hue is the costly op, so rather than trying all four ops at each of four positions, each
    image's order is laid out as three blend slots, the hue step, three blend slots: the ops
    before its hue fill the first slots, the ones after fill the last, and the rest are skipped.
    Every image then runs 6 cheap blends and 1 hue shift, with no branching on device values.
    """
    n = y.shape[0]
    slot = torch.arange(3, device=y.device)
    hue_pos = (order == _HUE).int().argmax(dim=1, keepdim=True)  # (N, 1)
    before = torch.where(slot < hue_pos, order[:, :3], _HUE)  # (N, 3)
    after_pos = hue_pos + 1 + slot  # (N, 3)
    after = torch.where(after_pos < 4, order.gather(1, after_pos.clamp(max=3)), _HUE)  # (N, 3)
    # Factor per op id; a slot holding _HUE reads 1, the identity blend.
    table = torch.cat((factors[:, :3], torch.ones(n, 1, device=y.device)), dim=1)  # (N, 4)
    _, _, gray_w = _constants(y.device)
    if blends:
        for j in range(3):
            y = _blend(y, before[:, j], table, gray_w)
    if hue:
        y = _shift_hue(y, factors[:, 3])
    if blends:
        for j in range(3):
            y = _blend(y, after[:, j], table, gray_w)
    return y


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """torchvision ColorJitter with its parameter ranges and semantics, drawn per image.

    Brightness factor uniform in [max(0, 1-b), 1+b] scales the image; contrast in
    [max(0, 1-c), 1+c] blends with the image's gray mean; saturation in [max(0, 1-s), 1+s]
    blends with its grayscale; hue shift uniform in [-h, h] of the colour wheel, through
    RGB -> HSV -> RGB. Each step clamps to [0, 1]. The order of the four is a random
    permutation drawn PER IMAGE, as torchvision draws one per call on each PIL image.
    uint8 input is computed in float and rounded back.

    With `return_params`, also returns {"factors": (N, 4) brightness, contrast, saturation
    factors and hue shift, "order": (N, 4) op ids 0..3 in that order, as applied}.
    """
    _check_images(x, "color_jitter", rgb=True)
    _check_generator(x, generator)
    y = _to_unit_float(x)  # (N, 3, H, W) float32
    factors, order = _draw_jitter(y, brightness, contrast, saturation, hue, generator)
    blends = bool(brightness or contrast or saturation)
    y = _apply_jitter(y, factors, order, blends=blends, hue=hue > 0)
    out = _restore(y, x.dtype)
    if return_params:
        return out, {"factors": factors, "order": order}
    return out


# --- rotation and translation -------------------------------------------------------------------


def _draw_affine(
    x: torch.Tensor,
    degrees: float,
    translate: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if degrees < 0:
        raise ValueError(f"degrees must be >= 0, got {degrees}")
    if not all(0.0 <= t <= 1.0 for t in translate):
        raise ValueError(f"translate fractions must be in [0, 1], got {translate}")
    _, _, h, w = x.shape
    u = torch.rand(x.shape[0], 3, generator=generator, device=x.device) * 2 - 1  # (N, 3)
    angles = u[:, 0] * degrees  # (N,) degrees
    # torchvision rounds the shift to whole pixels, which also keeps nearest sampling exact.
    shifts = torch.stack((u[:, 1] * (translate[0] * w), u[:, 2] * (translate[1] * h)), 1).round()
    return angles, shifts  # shifts (N, 2) as (dx, dy) pixels


def _affine_float(y: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    n, c, h, w = y.shape
    rad = torch.deg2rad(angles.to(device=y.device, dtype=torch.float32))
    cos, sin = rad.cos(), rad.sin()
    dx, dy = shifts.to(device=y.device, dtype=torch.float32).unbind(1)
    # grid_sample asks, for each output pixel, where to read the input: undo the shift, then
    # undo the counter-clockwise rotation, in pixels about the centre (y points down), with the
    # axes rescaled to [-1, 1] each, hence the H/W factors off the diagonal.
    theta = torch.stack(
        (
            torch.stack((cos, -sin * (h / w), -(cos * dx - sin * dy) * (2.0 / w)), dim=1),
            torch.stack((sin * (w / h), cos, -(sin * dx + cos * dy) * (2.0 / h)), dim=1),
        ),
        dim=1,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)  # (N, H, W, 2)
    # Done in turn, the rotation's frame clips the image before the shift moves it, so output
    # pixels whose pre-shift position is off the frame stay zero even where the rotated image
    # extends there. Sending them beyond [-1, 1] lets grid_sample's zero fill do that.
    src_x = torch.arange(w, device=y.device) - dx[:, None]  # (N, W)
    src_y = torch.arange(h, device=y.device) - dy[:, None]  # (N, H)
    off_frame = ((src_y < 0) | (src_y > h - 1))[:, :, None] | ((src_x < 0) | (src_x > w - 1))[
        :, None, :
    ]  # (N, H, W)
    grid = grid.masked_fill(off_frame[..., None], 2.0)
    return F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def affine_at(x: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by `angles` (N,) degrees about its centre, then shift
    it by `shifts` (N, 2) = (dx, dy) pixels, right and down; nearest sampling, zero fill.

    torchvision's rotate(angle) then affine(translate=(dx, dy)) for tensors, fused into one
    resampling. This is what random_affine applies; call it directly to replay known parameters.
    """
    _check_images(x, "affine_at")
    return _restore(_affine_float(_to_unit_float(x), angles, shifts), x.dtype)


def random_affine(
    x: torch.Tensor,
    degrees: float = 20.0,
    translate: tuple[float, float] = (0.1, 0.1),
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision RandomRotation(degrees) then RandomAffine(0, translate), per image, in one
    affine_grid + grid_sample: angle uniform in [-degrees, degrees], shift uniform in
    [-t*W, t*W] x [-t*H, t*H] rounded to whole pixels; nearest sampling, zero fill.

    With `return_params`, also returns the angles (N,) in degrees and shifts (N, 2) as (dx, dy).
    """
    _check_images(x, "random_affine")
    _check_generator(x, generator)
    angles, shifts = _draw_affine(x, degrees, translate, generator)
    out = affine_at(x, angles, shifts)
    return (out, angles, shifts) if return_params else out


# --- pipelines ----------------------------------------------------------------------------------


def report_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference report's per-image pipeline, in its order, batched on device: random crop
    (pad 4), horizontal flip, color jitter (0.3, 0.3, 0.3, 0.1), rotation by up to 20 degrees
    and shift by up to 10%. Draws as the single functions would in turn, so it equals
    random_affine(color_jitter(random_flip(random_crop(x)))) under the same generator state,
    but converts to float once and crops and flips in one pass.
    """
    _check_images(x, "report_augment", rgb=True)
    _check_generator(x, generator)
    offsets = _draw_offsets(x, 4, generator)
    flips = _draw_flips(x, 0.5, generator)
    # Crop and flip in the input dtype: for uint8 that moves a quarter of the bytes.
    y = _to_unit_float(crop_flip_at(x, offsets, flips, 4))  # (N, 3, H, W) float32
    factors, order = _draw_jitter(y, 0.3, 0.3, 0.3, 0.1, generator)
    y = _apply_jitter(y, factors, order, blends=True, hue=True)
    angles, shifts = _draw_affine(y, 20.0, (0.1, 0.1), generator)
    y = _affine_float(y, angles, shifts)
    return _restore(y, x.dtype)


def reference_transform(train: bool) -> Any:
    """The report's torchvision (PIL) transform, exactly, for the `reference` recipe's
    DataLoader: a PIL image in, a normalized (3, 32, 32) float tensor out."""
    # Imported here so the batched GPU path never pays for torchvision's import.
    from torchvision import transforms as T

    to_normalized = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if not train:
        return T.Compose(to_normalized)
    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
            T.RandomRotation(20),
            T.RandomAffine(0, translate=(0.1, 0.1)),
            *to_normalized,
        ]
    )


class PILDataset(Dataset):
    """uint8 (N, H, W, 3) RGB images and labels served as (transform(PIL image), int label).

    Holds only arrays and the transform, so it pickles into DataLoader worker processes.
    """

    def __init__(self, images_uint8_nhwc: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        images = np.asarray(images_uint8_nhwc)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match the images, "
                f"got {labels.shape}"
            )
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
