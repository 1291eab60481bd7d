"""The summary the training commands print at the end: where everything landed."""

from __future__ import annotations

from model.stats import fmt, seed_statistics, verdict
from tasks.settings import CHAMPION_URI

LABELS = {"val/acc": "val acc", "val/acc_tta": "val acc TTA", "test/acc": "test acc"}
VERSION_TAGS = {"val/acc": "val_acc", "val/acc_tta": "val_acc_tta", "test/acc": "test_acc"}


def print_summary(summary: dict, settings, self_check) -> None:
    print("\nsummary")
    from model.data.uri import redact

    rows = [("MLflow tracking", redact(settings.tracking_uri)),
            ("MLflow parent run", summary["mlflow_run_id"]),
            ("data digest", summary["data_digest"][:16])]
    for job, version in summary["versions"].items():
        rows.append((f"  {job}", f"version {version}, val acc "
                                 f"{100 * summary['val_acc'][job]:.2f}%"))
    rows += seed_rows(summary.get("seed_stats") or {"variants": {}})
    rows.append(("champion", f"{CHAMPION_URI} = version "
                             f"{summary['champion']} ({summary['reason']})"))
    test = summary.get("champion_test_acc")
    rows.append(("", "chosen on validation accuracy, which therefore reads high for it; " + (
        f"its test accuracy, which took no part: {100 * test:.2f}%" if test is not None
        else "a source with a labelled test split would give an unbiased figure")))
    score = summary.get("score")
    if score:
        rows.append(("predictions", score["files"]["predictions.csv"]["uri"]))
        rows.append(("manifest", score["manifest_uri"]))
        if self_check is not None:
            accuracy = _csv_accuracy(score, self_check)
            rows.append(("self-check", f"{100 * accuracy:.2f}% of the validation split "
                                       "scored as a competition file"))
    print_rows(rows)


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def seed_rows(stats: dict) -> list[tuple[str, str]]:
    """Per variant: mean ± std (n) over seeds; then deep − light with its interval."""
    rows = [(f"{variant} over seeds", "; ".join(f"{LABELS[m]} {fmt(s, unit='%')}"
                                               for m, s in metrics.items() if s["n"]))
            for variant, metrics in stats["variants"].items()]
    return rows + [(f"deep − light {LABELS[m]}", verdict(d))
                   for m, d in stats.get("deep_minus_light", {}).items()]


def version_seed_rows(versions) -> list[tuple[str, str]]:
    """`models --compare`: the seed statistics over registered versions, one group per data
    digest and recipe; the newest version of each variant and seed counts once."""
    newest = {}
    for mv in sorted(versions, key=lambda v: int(v.version)):
        t = mv.tags
        if {"seed", "data_digest", "variant"} <= set(t):
            newest[(t["data_digest"], t.get("recipe", "?"), t["variant"], t["seed"])] = t
    groups: dict[tuple[str, str], list] = {}
    for (digest, recipe, variant, _), t in newest.items():
        metrics = {m: float(t[tag]) for m, tag in VERSION_TAGS.items() if tag in t}
        groups.setdefault((digest, recipe), []).append((variant, metrics))
    rows = []
    for (digest, recipe), group in sorted(groups.items()):
        rows += [(f"data {digest[:16]}", f"recipe {recipe}"),
                 *seed_rows(seed_statistics(group))]
    return rows


def _csv_accuracy(score: dict, labels) -> float:
    import numpy as np

    from tasks.storage import open_store

    text = open_store(score["store"]).get(f"{score['prefix']}/predictions.csv").decode()
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    ids = np.array([int(r[0]) for r in rows])
    predicted = np.array([int(r[1]) for r in rows])
    return float((predicted == labels[ids]).mean())
