"""The promote task: move `champion` to the best new version if it beats the old one on the
same validation images, point `deep` and `light` at the newest of each, and publish the
comparison. `compare` is the decision, a pure function; `promote` writes it back."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from model.checkpoint import CheckpointError
from model.data import Dataset
from model.predict import predict
from model.stats import fmt, seed_statistics, spread, verdict
from tasks import registry
from tasks.settings import CHAMPION_URI, REGISTERED_MODEL, Settings
from tasks.tracking import run_links
from tasks.training import VariantResult

PROMOTED_EVENT = "cifar10-resnet.champion.promoted"


@dataclass(frozen=True)
class Promotion:
    champion_version: str | None  # the champion after this promotion
    promoted: bool
    reason: str
    previous_version: str | None = None
    previous_acc: float | None = None  # the old champion's accuracy on this validation split
    candidate_version: str | None = None
    candidate_acc: float | None = None


@task(name="promote", cache_policy=NONE, persist_result=False)
def promote(results: list[VariantResult], data: Dataset, settings: Settings) -> Promotion:
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    settings.apply()
    decision = decide(results, data)
    if decision.promoted:
        registry.set_alias(registry.CHAMPION, decision.champion_version)
        _emit_promoted(decision)
    logger.info(decision.reason)
    for variant in sorted({r.variant for r in results}):
        newest = max((r for r in results if r.variant == variant), key=lambda r: int(r.version))
        registry.set_alias(variant, newest.version)
    publish(results, decision)
    return decision


@dataclass(frozen=True)
class Champion:
    version: str
    val_acc: float  # on the validation images compared on; NaN when unknown


def decide(results: list[VariantResult], data: Dataset) -> Promotion:
    """Read the current champion from the registry, take every accuracy on these validation
    images (re-scoring a version validated on other images), then compare."""
    results = [_on_these_images(r, data) for r in results]
    old = registry.current_champion()
    if old is None:
        return compare(results, None, data.val.digest)
    # With no candidates there is nothing to compare, so nothing to measure.
    accuracy = _accuracy_on(old, data) if results else math.nan
    return compare(results, Champion(str(old.version), accuracy), data.val.digest)


def _on_these_images(result: VariantResult, data: Dataset) -> VariantResult:
    if result.val_digest == data.val.digest:
        return result
    accuracy = _rescore(result.version, result.val_digest, data)
    return replace(result, metrics={**result.metrics, "val/acc": accuracy},
                   val_digest=data.val.digest)


def _accuracy_on(version, data: Dataset) -> float:
    if version.tags.get("val_digest") == data.val.digest:
        return float(version.tags.get("val_acc", "nan"))
    return _rescore(str(version.version), version.tags.get("val_digest"), data)


def _rescore(version: str, validated_on: str | None, data: Dataset) -> float:
    try:
        loaded = registry.load(f"models:/{REGISTERED_MODEL}/{version}")
    except (registry.RegistryError, CheckpointError, OSError) as exc:
        was = (validated_on or "not recorded")[:12]
        raise registry.RegistryError(
            f"version {version} was validated on other images ({was}) and cannot be "
            f"re-scored on validation {data.val.digest[:12]} to compare it: {exc}") from exc
    labels, _ = predict(loaded.network, data.val.images)
    return float((labels == data.val.labels).mean())


def compare(candidates: list[VariantResult], champion: Champion | None,
            val_digest: str) -> Promotion:
    """Which version is champion: the best candidate, only if it beats the champion on
    the same validation images (`val_digest`). A tie keeps the champion; a champion
    whose accuracy is unknown (NaN) is replaced."""
    other = [r.version for r in candidates if r.val_digest != val_digest]
    if other:
        raise ValueError(f"versions {', '.join(other)} were validated on other images than "
                         f"{val_digest[:12]}: their accuracies cannot be compared")
    if not candidates:
        return Promotion(champion and champion.version, False, "no new versions to compare")
    best = max(candidates, key=lambda r: r.val_acc)
    new = {"candidate_version": best.version, "candidate_acc": best.val_acc}
    if champion is None:
        return Promotion(best.version, True,
                         f"version {best.version} ({best.variant}) is the first champion, "
                         f"validation accuracy {best.val_acc:.4f}", **new)
    old_acc = champion.val_acc
    old = {"previous_version": champion.version, "previous_acc": old_acc, **new}
    if champion.version == best.version:
        return Promotion(best.version, False, f"version {best.version} is already champion",
                         **old)
    if math.isnan(old_acc) or best.val_acc > old_acc:
        return Promotion(best.version, True,
                         f"version {best.version} ({best.variant}, {best.val_acc:.4f}) beats "
                         f"champion version {champion.version} ({old_acc:.4f}) on validation "
                         f"{val_digest[:12]}", **old)
    return Promotion(champion.version, False,
                     f"champion version {champion.version} ({old_acc:.4f}) stays: the best new "
                     f"version {best.version} ({best.variant}, {best.val_acc:.4f}) does not "
                     f"beat it on validation {val_digest[:12]}", **old)


def comparison_rows(results: list[VariantResult]) -> list[dict[str, str]]:
    """One row per variant: mean ± standard deviation (n) over seeds where there are
    several."""
    rows = []
    for variant in sorted({r.variant for r in results}):
        group = [r for r in results if r.variant == variant]

        def stat(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
            return fmt(spread(values), scale, digits)

        rows.append({
            "variant": variant,
            "versions": ", ".join(r.version for r in group),
            "seeds": str(len(group)),
            "params": f"{group[0].params:,}",
            "param MB": f"{group[0].param_mb:.2f}",
            "epochs": stat([r.metrics.get("epochs") for r in group], digits=0),
            "training s": stat([r.metrics.get("train_seconds") for r in group], digits=1),
            "val acc %": stat([r.metrics.get("val/acc") for r in group], 100),
            "val acc TTA %": stat([r.metrics.get("val/acc_tta", math.nan) for r in group], 100),
            "test acc %": stat([r.metrics.get("test/acc", math.nan) for r in group], 100),
        })
    return rows


def publish(results: list[VariantResult], decision: Promotion) -> None:
    rows = comparison_rows(results)
    gaps = seed_statistics([(r.variant, r.metrics) for r in results]).get("deep_minus_light")
    gap = "".join(f" deep − light {m}: {verdict(d)}." for m, d in (gaps or {}).items())
    create_table_artifact(key="variant-comparison", table=rows, description=(
        f"Variants compared over seeds.{gap} {decision.reason}; chosen on validation "
        "accuracy, which therefore reads high for the champion; test accuracy, where shown, "
        "took no part."))
    # The curves are MLflow artifacts: the page links them, it does not copy them.
    client = MlflowClient()
    lines = [f"{decision.reason}.\n", "| job | version | val acc | MLflow run | curves |",
             "|---|---|---|---|---|"]
    for r in results:
        run_page, curves = run_links(client.get_run(r.run_id).info, "curves.png")
        lines.append(f"| {r.variant}-seed{r.seed} | {r.version} | {100 * r.val_acc:.2f}% "
                     f"| [{r.run_id}]({run_page}) | [curves.png]({curves}) |")
    create_markdown_artifact(key="training-runs", markdown="\n".join(lines))


def _emit_promoted(decision: Promotion) -> None:
    from prefect.events import emit_event

    emit_event(event=PROMOTED_EVENT,
               resource={"prefect.resource.id": f"mlflow.model.{REGISTERED_MODEL}",
                         "prefect.resource.name": REGISTERED_MODEL},
               payload={"version": decision.champion_version, "model_uri": CHAMPION_URI,
                        "previous_version": decision.previous_version})
