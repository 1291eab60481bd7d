"""The summary the training commands print at the end: where everything landed."""

from __future__ import annotations

from tasks.settings import CHAMPION_URI


def print_summary(summary: dict, settings, self_check) -> None:
    print("\nsummary")
    from model.data.uri import redact

    rows = [("MLflow tracking", redact(settings.tracking_uri)),
            ("MLflow parent run", summary["mlflow_run_id"]),
            ("data digest", summary["data_digest"][:16])]
    for job, version in summary["versions"].items():
        rows.append((f"  {job}", f"version {version}, val acc "
                                 f"{100 * summary['val_acc'][job]:.2f}%"))
    rows.append(("champion", f"{CHAMPION_URI} = version "
                             f"{summary['champion']} ({summary['reason']})"))
    score = summary.get("score")
    if score:
        rows.append(("predictions", score["files"]["predictions.csv"]["uri"]))
        rows.append(("manifest", score["manifest_uri"]))
        if self_check is not None:
            accuracy = _csv_accuracy(score, self_check)
            rows.append(("self-check", f"{100 * accuracy:.2f}% of the validation split "
                                       "scored as a competition file"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _csv_accuracy(score: dict, labels) -> float:
    import numpy as np

    from tasks.storage import open_store

    text = open_store(score["store"]).get(f"{score['prefix']}/predictions.csv").decode()
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    ids = np.array([int(r[0]) for r in rows])
    predicted = np.array([int(r[1]) for r in rows])
    return float((predicted == labels[ids]).mean())
