"""The summary the training commands print at the end: where everything landed."""

from __future__ import annotations

import json

from model.stats import fmt, seed_statistics, verdict
from tasks.settings import CHAMPION_URI

LABELS = {"val/acc": "val acc", "val/acc_tta": "val acc TTA", "test/acc": "test acc"}
VERSION_TAGS = {"val/acc": "val_acc", "val/acc_tta": "val_acc_tta", "test/acc": "test_acc"}


def summary_document(summary: dict, settings, self_check) -> dict:
    """What `train --json` and `run --json` print; its keys are listed in the README."""
    from model.data.uri import redact

    score = summary.get("score")
    return {
        "run_key": summary["run_key"],
        "tracking_uri": redact(settings.tracking_uri),
        "mlflow_run_id": summary["mlflow_run_id"],
        "data_digest": summary["data_digest"],
        "jobs": [{"job": job, "version": version, "val_acc": summary["val_acc"][job]}
                 for job, version in summary["versions"].items()],
        "champion": {"uri": CHAMPION_URI, "version": summary["champion"],
                     "promoted": summary["promoted"], "reason": summary["reason"],
                     "test_acc": summary.get("champion_test_acc")},
        "seed_stats": summary.get("seed_stats") or {"variants": {}},
        "predictions": score and {
            "csv": score["files"]["predictions.csv"]["uri"], "manifest": score["manifest_uri"],
            "self_check_acc": None if self_check is None else _csv_accuracy(score, self_check)},
    }


def print_json(doc) -> None:
    """One JSON document on stdout; a NaN (no spread from one seed) is null, valid JSON."""
    print(json.dumps(json.loads(json.dumps(doc), parse_constant=lambda _: None), indent=2))


def print_summary(doc: dict) -> None:
    print("\nsummary")
    rows = [("MLflow tracking", doc["tracking_uri"]), ("MLflow parent run", doc["mlflow_run_id"]),
            ("data digest", doc["data_digest"][:16])]
    rows += [(f"  {j['job']}", f"version {j['version']}, val acc {100 * j['val_acc']:.2f}%")
             for j in doc["jobs"]]
    rows += seed_rows(doc["seed_stats"])
    champion, test = doc["champion"], doc["champion"]["test_acc"]
    rows.append(("champion", f"{champion['uri']} = version {champion['version']} "
                             f"({champion['reason']})"))
    rows.append(("", "chosen on validation accuracy, which therefore reads high for it; " + (
        f"its test accuracy, which took no part: {100 * test:.2f}%" if test is not None
        else "a source with a labelled test split would give an unbiased figure")))
    if predictions := doc["predictions"]:
        rows += [("predictions", predictions["csv"]), ("manifest", predictions["manifest"])]
        if (accuracy := predictions["self_check_acc"]) is not None:
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


def version_seed_groups(versions) -> list[dict]:
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
    return [{"data_digest": digest, "recipe": recipe, "seed_stats": seed_statistics(group)}
            for (digest, recipe), group in sorted(groups.items())]


def _group_rows(group: dict) -> list[tuple[str, str]]:
    return [(f"data {group['data_digest'][:16]}", f"recipe {group['recipe']}"),
            *seed_rows(group["seed_stats"])]


def models_document(client, compare: bool) -> dict:
    """What `models --json` prints (keys in the README): every registered version, and
    with `compare` the seed statistics per data digest and recipe."""
    import mlflow

    from model.data.uri import redact
    from tasks.settings import REGISTERED_MODEL

    versions = sorted(client.search_model_versions(f"name='{REGISTERED_MODEL}'"),
                      key=lambda v: int(v.version))
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases if versions else {}
    return {"tracking_uri": redact(mlflow.get_tracking_uri()), "model": REGISTERED_MODEL,
            "versions": [{
                "version": str(mv.version), "variant": mv.tags.get("variant"),
                "recipe": mv.tags.get("recipe"), "run_id": mv.run_id,
                "val_acc": float(mv.tags["val_acc"]) if "val_acc" in mv.tags else None,
                "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version))}
                for mv in versions],
            "compare": version_seed_groups(versions) if compare else None}


def print_models(doc: dict) -> None:
    if not doc["versions"]:
        print(f"no versions of {doc['model']} at {doc['tracking_uri']}")
        return
    print(f"{'version':>7}  {'variant':<7} {'recipe':<9} {'val acc':>8}  {'aliases':<24} run")
    for v in doc["versions"]:
        acc = "-" if v["val_acc"] is None else f"{100 * v['val_acc']:.2f}%"
        print(f"{v['version']:>7}  {v['variant'] or '?':<7} {v['recipe'] or '?':<9} {acc:>8}  "
              f"{', '.join(v['aliases']):<24} {v['run_id']}")
    if rows := [row for group in doc["compare"] or [] for row in _group_rows(group)]:
        print("\nover seeds (validation accuracy chose the champion, so it reads high for it)")
        print_rows(rows)


def _csv_accuracy(score: dict, labels) -> float:
    import numpy as np

    from tasks.storage import open_store

    text = open_store(score["store"]).get(f"{score['prefix']}/predictions.csv").decode()
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    ids = np.array([int(r[0]) for r in rows])
    predicted = np.array([int(r[1]) for r in rows])
    return float((predicted == labels[ids]).mean())
