"""What several seeds say: mean, standard deviation and count per variant, and deep - light
with a 95% Welch interval. Standard library only (no scipy where the models train)."""

from __future__ import annotations

import math
import statistics

SEED_METRICS = ("val/acc", "val/acc_tta", "test/acc")  # summarised over seeds
LEVEL = 0.95  # confidence of the deep - light interval
PANELS = 2000  # Simpson panels: t_cdf's error stays under 1e-9 for df >= 1 (h^4 bound)


def spread(values) -> dict:
    """{"n", "mean", "std"} of the finite values; std (n - 1) is NaN under two values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {"n": len(xs), "mean": statistics.fmean(xs) if xs else math.nan,
            "std": statistics.stdev(xs) if len(xs) > 1 else math.nan}


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (any real df > 0): 1/2 plus
    Simpson's rule on the density over [0, x], which is smooth and bounded."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    h = x / PANELS
    inner = sum((4 if k % 2 else 2) * _t_pdf(k * h, df) for k in range(1, PANELS))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(x, df))


def _t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


def t_quantile(p: float, df: float) -> float:
    """The x with P(T <= x) = p, by Newton's method from the normal quantile (for p > 1/2 it
    starts below the root, where the CDF is concave, so the steps shrink monotonically)."""
    if not (0 < p < 1 and df > 0):
        raise ValueError(f"t quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    x = statistics.NormalDist().inv_cdf(p)
    for _ in range(100):
        step = (p - t_cdf(x, df)) / _t_pdf(x, df)
        x += step
        if abs(step) < 1e-10 * max(1.0, x):
            break
    return x


def welch(a, b, level: float = LEVEL) -> dict | None:
    """mean(a) - mean(b) with its Welch-Satterthwaite interval at `level`:
    {"diff", "low", "high", "df"}; None when either side has fewer than two values."""
    a, b = ([float(v) for v in xs if v is not None and math.isfinite(v)] for xs in (a, b))
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:  # every seed agreed exactly: no spread to widen the interval
        return {"diff": diff, "low": diff, "high": diff, "df": float(len(a) + len(b) - 2)}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df}


def seed_statistics(rows) -> dict:
    """rows: (variant, {metric: value}) per seed -> {"variants": {variant: {metric: spread}},
    "deep_minus_light": {metric: welch or None}} over the SEED_METRICS some row has."""
    by_variant: dict[str, list[dict]] = {}
    for variant, metrics in rows:
        by_variant.setdefault(variant, []).append(metrics)
    present = [m for m in SEED_METRICS if any(m in r for _, r in rows)]
    values = {v: {m: [r.get(m) for r in rs] for m in present} for v, rs in by_variant.items()}
    out: dict = {"variants": {v: {m: spread(xs) for m, xs in ms.items()}
                              for v, ms in sorted(values.items())}}
    if {"deep", "light"} <= set(values):
        out["deep_minus_light"] = {m: welch(values["deep"][m], values["light"][m])
                                   for m in present}
    return out


def as_metrics(stats: dict) -> dict[str, float]:
    """The statistics as MLflow metric keys: seeds/<variant>/<metric>/{mean,std,n} and
    deep_minus_light/<metric>/{diff,ci95_low,ci95_high,df}; NaNs left out."""
    out = {f"seeds/{variant}/{metric}/{k}": float(v)
           for variant, metrics in stats["variants"].items()
           for metric, s in metrics.items() for k, v in s.items()}
    names = {"diff": "diff", "low": "ci95_low", "high": "ci95_high", "df": "df"}
    out.update({f"deep_minus_light/{metric}/{names[k]}": float(v)
                for metric, d in stats.get("deep_minus_light", {}).items() if d
                for k, v in d.items()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def verdict(d: dict | None) -> str:
    """deep - light in words, in accuracy points."""
    if d is None:
        return "no interval: needs two or more seeds per variant"
    noise = d["low"] <= 0 <= d["high"]
    return (f"{100 * d['diff']:+.2f} points, 95% CI [{100 * d['low']:+.2f}, "
            f"{100 * d['high']:+.2f}] (Welch, {d['df']:.1f} df): "
            + ("not distinguishable from seed noise" if noise else
               f"distinguishable from seed noise, {'deep' if d['diff'] > 0 else 'light'} "
               "is more accurate"))


def fmt(s: dict, scale: float = 100, digits: int = 2, unit: str = "") -> str:
    """A spread as 'mean ± std (n=k)'; one value alone; '-' for none."""
    if not s["n"]:
        return "-"
    mean = f"{scale * s['mean']:.{digits}f}"
    if s["n"] == 1:
        return mean + unit
    return f"{mean} ± {scale * s['std']:.{digits}f}{unit} (n={s['n']})"
