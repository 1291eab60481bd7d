"""A loss that turns NaN fails the training flow: nothing is registered and `champion`
stays where it was."""

from __future__ import annotations

import mlflow
import pytest
import torch

from flows.train import TrainResnetsConfig, train
from model.nets import build_model
from tasks import registry
from tasks.settings import REGISTERED_MODEL, Settings
from tests.conftest import SHARED_PARQUET as PARQUET

pytestmark = pytest.mark.usefixtures("prefect_harness")


class DivergingLoss(torch.nn.CrossEntropyLoss):
    """Cross-entropy that blows up, as a too-large learning rate would."""

    def forward(self, logits, target):
        return super().forward(logits, target) * float("nan")


def test_a_nan_loss_fails_the_flow_registers_nothing_and_keeps_the_champion(
    state, monkeypatch
):
    monkeypatch.setenv("CIFAR_STATE_DIR", str(state))
    Settings.from_env().apply()
    with mlflow.start_run():
        champion = registry.register(build_model("light"), variant="light",
                                     tags={"val_acc": "0.1"}, tta=False)
    registry.set_alias(registry.CHAMPION, champion.version)

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", DivergingLoss)
    config = TrainResnetsConfig(variants=["light"], epochs=1, batch_size=32, train_size=64,
                         val_size=32, data_source=str(PARQUET))
    state_after = train(config, return_state=True)

    assert state_after.is_failed()
    with pytest.raises(RuntimeError, match=r"every training job failed.*NonFiniteLossError"):
        state_after.result()
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    assert [v.version for v in versions] == [champion.version]
    assert client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version == \
        champion.version


def test_one_failed_job_is_reported_and_the_others_are_still_registered(state, monkeypatch):
    import tasks.training
    from model.train import NonFiniteLossError

    monkeypatch.setenv("CIFAR_STATE_DIR", str(state))
    real_fit = tasks.training.fit

    def fit_failing_for_deep(config, data, **kwargs):
        if config.variant == "deep":
            raise NonFiniteLossError("epoch 0: training loss nan")
        return real_fit(config, data, **kwargs)

    monkeypatch.setattr(tasks.training, "fit", fit_failing_for_deep)
    config = TrainResnetsConfig(variants=["deep", "light"], epochs=1, batch_size=32, train_size=64,
                         val_size=32, data_source=str(PARQUET))
    state_after = train(config, return_state=True)

    assert state_after.is_failed()
    with pytest.raises(RuntimeError, match=r"1 of 2 jobs failed.*deep-seed0.*NonFiniteLoss"
                       r".*the others were registered.*light-seed0"):
        state_after.result()
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    assert [v.tags["variant"] for v in versions] == ["light"]
    model = client.get_registered_model(REGISTERED_MODEL)
    assert model.aliases == {"champion": versions[0].version, "light": versions[0].version}
