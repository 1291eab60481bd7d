"""The promotion guard against a real registry: `champion` moves only to a version that
beats the current champion measured on the same validation images. Versions are
registered directly (untrained networks with chosen accuracy tags), so nothing here
trains. The comparison itself is unit-tested in tests/unit/test_promotion_decision.py."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from prefect import flow

from model.config import TrainConfig as ModelConfig
from model.data import Dataset
from model.nets import build_model
from model.predict import predict
from model.train import FitResult
from tasks import registry
from tasks.promote import decide, promote
from tasks.settings import REGISTERED_MODEL, Settings
from tasks.training import VariantJob, VariantResult, register_version

OTHER_DIGEST = "0" * 64  # a validation split other than the one being promoted on


def _register(variant: str, val_acc: str | None, val_digest: str, seed: int = 0) -> str:
    """Register an untrained `variant` network with these tags; return its version."""
    torch.manual_seed(seed)
    network = build_model(variant)
    tags = {"recipe": "fast", "seed": str(seed), "val_digest": val_digest,
            "data_digest": "test-data"}
    if val_acc is not None:
        tags["val_acc"] = val_acc
    with mlflow.start_run(run_name=f"register {variant} {val_acc}"):
        mv = registry.register(network, variant=variant, tags=tags, tta=False)
    return str(mv.version)


def _candidate(version: str, val_acc: float, val_digest: str) -> VariantResult:
    """A training's result for `version`, with its registered run (promotion links it)."""
    try:
        run_id = mlflow.MlflowClient().get_model_version(REGISTERED_MODEL, version).run_id
    except mlflow.exceptions.MlflowException:  # not registered: only ever decided on
        run_id = f"run-{version}"
    return VariantResult(variant="light", seed=0, recipe="fast", run_id=run_id,
                         version=version, metrics={"val/acc": val_acc}, val_digest=val_digest)


def _champion() -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(REGISTERED_MODEL,
                                                                 "champion").version)


def _aliases() -> dict[str, str]:
    aliases = mlflow.MlflowClient().get_registered_model(REGISTERED_MODEL).aliases
    return {name: str(version) for name, version in aliases.items()}


def _run_promote(results: list[VariantResult], data: Dataset):
    """The promote task as the train flow runs it: inside a flow, under Prefect."""

    @flow(name="promote-under-test")
    def promote_flow():
        return promote(results, data, Settings.from_env())

    return promote_flow()


@pytest.mark.usefixtures("prefect_harness")
def test_worse_model_does_not_take_champion_and_better_one_does(
    tracking: mlflow.MlflowClient, small_data: Dataset
) -> None:
    digest = small_data.val.digest
    champion = _register("light", "0.900000", digest)
    registry.set_alias("champion", champion)
    worse = _register("light", "0.500000", digest, seed=1)

    decision = _run_promote([_candidate(worse, 0.5, small_data.val.digest)], small_data)
    assert not decision.promoted
    assert decision.champion_version == champion
    assert decision.previous_acc == pytest.approx(0.9)
    assert decision.candidate_version == worse
    # The registry agrees: champion stayed, while `light` names the newest light version.
    assert _aliases() == {"champion": champion, "light": worse}

    better = _register("light", "0.950000", digest, seed=2)
    decision = _run_promote([_candidate(better, 0.95, small_data.val.digest)], small_data)
    assert decision.promoted
    assert decision.previous_version == champion
    assert _aliases() == {"champion": better, "light": better}

    # An equal accuracy is not an improvement: the incumbent keeps the alias.
    assert not decide([_candidate("99", 0.95, small_data.val.digest)], small_data).promoted
    assert _champion() == better


def test_champion_from_another_validation_split_is_rescored(
    tracking: mlflow.MlflowClient, small_data: Dataset
) -> None:
    # The old champion's tag claims 0.99, but on other images: it must not count.
    champion = _register("light", "0.990000", OTHER_DIGEST, seed=5)
    registry.set_alias("champion", champion)
    # What the champion's weights (the network registered with seed 5) really score here.
    torch.manual_seed(5)
    labels, _ = predict(build_model("light"), small_data.val.images)
    rescored = float((labels == small_data.val.labels).mean())
    step = 1 / len(small_data.val)
    assert rescored + step < 0.99  # an untrained network: the tag would win otherwise

    same = decide([_candidate("2", rescored, small_data.val.digest)], small_data)
    assert not same.promoted
    assert same.champion_version == champion
    assert same.previous_acc == pytest.approx(rescored)

    better = decide([_candidate("2", rescored + step, small_data.val.digest)], small_data)
    assert better.promoted
    assert better.champion_version == "2"
    assert better.previous_acc == pytest.approx(rescored)
    assert _champion() == champion  # decide() only decides; promote() moves the alias


def test_equal_accuracy_is_not_promoted_whatever_its_decimals(
    tracking: mlflow.MlflowClient, small_data: Dataset
) -> None:
    """Versions registered by the training task, with one accuracy on the same images:
    the recorded tag must not round the incumbent below an equal newcomer."""
    acc = 9 / 128  # 0.0703125, as a 128-image validation split gives
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = ModelConfig(variant="light", epochs=1, seed=seed)
        result = FitResult(build_model("light"), config, history=[], metrics={"val/acc": acc})
        with mlflow.start_run():
            job = VariantJob(training=config, run_key="equal-accuracy")
            mv = register_version(job, small_data, result)
        versions.append(str(mv.version))
    registry.set_alias("champion", versions[0])
    decision = decide([_candidate(versions[1], acc, small_data.val.digest)], small_data)
    assert decision.previous_acc == acc
    assert not decision.promoted


def test_champion_without_recorded_accuracy_is_replaced(
    tracking: mlflow.MlflowClient, small_data: Dataset
) -> None:
    champion = _register("light", None, small_data.val.digest)
    registry.set_alias("champion", champion)
    decision = decide([_candidate("2", 0.1, small_data.val.digest)], small_data)
    assert decision.promoted
    assert decision.previous_acc is not None and math.isnan(decision.previous_acc)



def test_a_candidate_validated_on_other_images_is_rescored_on_these(
    tracking: mlflow.MlflowClient, small_data: Dataset
) -> None:
    # The candidate claims 0.99, measured on other images: a child that trained on other data.
    candidate = _register("light", "0.990000", OTHER_DIGEST, seed=5)
    torch.manual_seed(5)
    labels, _ = predict(build_model("light"), small_data.val.images)
    rescored = float((labels == small_data.val.labels).mean())
    champion = _register("light", repr(rescored + 1 / len(small_data.val)),
                         small_data.val.digest, seed=6)
    registry.set_alias("champion", champion)
    decision = decide([_candidate(candidate, 0.99, OTHER_DIGEST)], small_data)
    assert decision.candidate_acc == pytest.approx(rescored)
    assert not decision.promoted and decision.champion_version == champion


def test_a_candidate_that_cannot_be_rescored_is_not_compared(
    tracking: mlflow.MlflowClient, small_data: Dataset
) -> None:
    _register("light", "0.5", small_data.val.digest)
    with pytest.raises(registry.RegistryError, match=r"version 77 was validated on other "
                       r"images \(000000000000\) and cannot be re-scored on validation "
                       f"{small_data.val.digest[:12]}.*has no version 77"):
        decide([_candidate("77", 0.99, OTHER_DIGEST)], small_data)


def test_an_alias_set_by_two_runs_at_once_is_set_again_not_failed(
    tracking: mlflow.MlflowClient, small_data: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL, two promotions adding one alias at once meet on its primary key (the
    server reads, then inserts); the loser's call is made again and points the alias."""
    version = _register("light", "0.500000", small_data.val.digest)
    real = mlflow.MlflowClient.set_registered_model_alias
    calls = []

    def clash_once(self, name, alias, version):
        calls.append(alias)
        if calls == ["light"]:
            raise mlflow.exceptions.MlflowException(
                "BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates "
                'unique constraint "registered_model_alias_pk"\nDETAIL: Key (workspace, name, '
                f"alias)=(default, {name}, {alias}) already exists.")
        return real(self, name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", clash_once)
    registry.set_alias("light", version)
    assert calls == ["light", "light"] and _aliases() == {"light": version}

    # Any other refusal is the caller's to see, at once.
    calls.clear()
    with pytest.raises(mlflow.exceptions.MlflowException, match="version=999"):
        registry.set_alias("deep", "999")
    assert calls == ["deep"]
