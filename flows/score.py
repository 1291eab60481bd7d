"""The scoring flow: a registered model predicts the competition file into object storage
(tasks/scoring.py); rerunning it on the same input finds the stored result."""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.scoring import (
    CompetitionInput,
    competition_input,
    describe_result,
    encode_predictions,
    find_stored_result,
    log_scoring,
    predict_images,
    read_competition_file,
    resolve_model,
    result_prefix,
    scoring_result,
    write_predictions,
)
from tasks.settings import CHAMPION_URI, Settings
from tasks.storage import check_location, open_location


class ScoreConfig(BaseModel):
    """Parameters of the scoring flow; the Prefect UI renders them as its form."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_uri: str = Field(CHAMPION_URI,
                           description="models:/NAME@ALIAS or models:/NAME/VERSION")
    input_uri: str | None = Field(
        None, description="competition pickle: path, file:// or s3:// URI; "
        "default $CIFAR_COMPETITION_FILE")
    output: str = Field("predictions", description="a relative key prefix in the object "
                        "store, an absolute local directory, or an s3:// or file:// URI")
    batch_size: int = Field(1000, ge=1, le=65_536)
    tta: bool = Field(True, description="average each image with its mirror image")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    skip_without_input: bool = Field(False, description="with no input_uri and no "
                                     "$CIFAR_COMPETITION_FILE, end with an info line instead "
                                     "of failing (the promotion trigger sets it)")

    @field_validator("output")
    @classmethod
    def _usable_output(cls, output: str) -> str:
        return check_location(output)


@flow(name="score-competition", log_prints=True)
def score(config: ScoreConfig = ScoreConfig()) -> dict:  # noqa: B008 (a frozen default)
    settings = Settings.from_env()
    settings.apply()
    if config.skip_without_input and not (config.input_uri or settings.competition_file):
        get_run_logger().info("no competition file is configured (input_uri, "
                              "CIFAR_COMPETITION_FILE): nothing to score")
        return {"skipped": "no competition file is configured"}
    # A bad input or model URI fails here, before anything is written.
    scoring_input = read_competition_file(competition_input(config.input_uri, settings))
    return score_input(config, scoring_input, settings)


def score_input(config: ScoreConfig, scoring_input: CompetitionInput, settings: Settings) -> dict:
    """The scoring of an input already read: the training flow reads its competition file
    before it trains (a bad one fails then), and scores what it read."""
    logger = get_run_logger()
    model = resolve_model(config.model_uri)
    store, root = open_location(config.output, settings.object_store)
    prefix = result_prefix(root, model, scoring_input.digest, config.tta)

    stored = find_stored_result(store, prefix, model, scoring_input.digest, config.tta)
    if stored is not None:
        logger.info("already scored: %s", store.uri(prefix))
        return scoring_result(store, prefix, stored, reused=True)

    predictions = predict_images(model, scoring_input.images, batch_size=config.batch_size,
                                 tta=config.tta, device=config.device)
    files = encode_predictions(scoring_input.ids, predictions)
    manifest = describe_result(prefix, files, model, config.model_uri, scoring_input,
                               config.tta, predictions.seconds)
    manifest, written = write_predictions(store, prefix, files, manifest, model)
    result = scoring_result(store, prefix, manifest, reused=not written)
    log_scoring(result, predictions)
    if written:
        logger.info("wrote %d predictions: %s", result["rows"], result["manifest_uri"])
    else:
        logger.info("a concurrent run stored this result first; using it: %s",
                    result["manifest_uri"])
    return result
