"""Test oracles for the batched augmentation: each step of the report's pipeline on its own,
as the training code ran it before the steps were fused into one pass.

Each function here is checked against torchvision's tensor ops in tests/unit/test_augment.py,
and report_chain replays model.augment.report_params through them, one step after another,
in the report's order, so the fused report_augment_at can be compared with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.augment import (
    _GRAY_WEIGHTS,
    JITTER_ORDERS,
    REPORT_PARAMS,
    _check_generator,
    _check_images,
    _draw_flips,
    _draw_offsets,
    _to_unit_float,
    crop_flip_at,
)


def _restore(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return y.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return y.to(dtype)


# Colour-jitter op ids, as torchvision's ColorJitter numbers them. A blend slot holding _HUE
# does nothing, since hue has its own step.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


# --- crop and flip ------------------------------------------------------------------------------


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
    gray_w = torch.tensor(_GRAY_WEIGHTS, device=y.device).view(1, 3, 1, 1)
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


# --- the report's pipeline, step by step --------------------------------------------------------


def decode(params: torch.Tensor) -> dict[str, torch.Tensor]:
    """model.augment.report_params' (N, 13) tensor as the single steps' parameters."""
    col = {name: params[:, i] for i, name in enumerate(REPORT_PARAMS)}
    orders = torch.tensor(JITTER_ORDERS, device=params.device)
    return {
        "offsets": torch.stack((col["top"], col["left"]), 1).long(),  # (N, 2)
        "flips": col["flip"] > 0.5,  # (N,) bool
        "factors": torch.stack(  # (N, 4): brightness, contrast, saturation, hue shift
            [col[name] for name in ("brightness", "contrast", "saturation", "hue")], 1
        ),
        "order": orders[col["perm"].long()],  # (N, 4) op ids in the order applied
        "angles": col["angle"],  # (N,) degrees
        "shifts": torch.stack((col["dx"], col["dy"]), 1),  # (N, 2)
    }


def report_chain(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The report's steps one after another, with the parameters report_params drew: crop
    (pad 4) and flip, colour jitter in each image's order, rotation, then shift."""
    p = decode(params)
    y = _to_unit_float(crop_flip_at(x, p["offsets"], p["flips"], 4))
    y = _apply_jitter(y, p["factors"], p["order"], blends=True, hue=True)
    return _restore(_affine_float(y, p["angles"], p["shifts"]), x.dtype)
