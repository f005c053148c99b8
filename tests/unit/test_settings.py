from __future__ import annotations

import pytest

from kontext_s3.settings import DEFAULT_FAL_MEDIA_URLS, Settings, SettingsError

BASE = {"JOBS_TABLE": "jobs", "WEBHOOK_URL": "https://abc.lambda-url.us-east-1.on.aws/"}


def test_environment_names_map_to_typed_fields() -> None:
    settings = Settings.from_env(
        {**BASE, "PRESIGN_EXPIRY_SECONDS": "900", "MAX_RECEIVE_COUNT": "7", "DEFAULT_NUM_IMAGES": "2", "DEFAULT_SEED": ""}
    )
    assert settings.presign_expiry_seconds == 900 and settings.max_receive_count == 7
    assert settings.webhook_url == "https://abc.lambda-url.us-east-1.on.aws"
    assert settings.model_defaults == {"num_images": "2"}
    assert settings.allowed_media_urls == tuple(DEFAULT_FAL_MEDIA_URLS.split(","))
    assert settings.fal_queue_url == "https://queue.fal.run"


def test_a_default_the_model_would_refuse_stops_the_function_at_cold_start() -> None:
    with pytest.raises(SettingsError, match="DEFAULT_GUIDANCE_SCALE"):
        Settings.from_env({**BASE, "DEFAULT_GUIDANCE_SCALE": "30"})


def test_overlapping_prefixes_are_refused() -> None:
    with pytest.raises(SettingsError, match="overlap"):
        Settings.from_env({**BASE, "INPUT_PREFIX": "data/", "OUTPUT_PREFIX": "data/out/"})


def test_a_missing_table_is_refused() -> None:
    with pytest.raises(SettingsError, match="JOBS_TABLE"):
        Settings.from_env({})
