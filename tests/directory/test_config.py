"""Settings come from exactly the documented environment variables, with checked types."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from directory.config import PROJECT_ROOT, Settings


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.database_url.startswith("sqlite:///") and "var" in settings.database_url
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.per_destination_concurrency == 3
    assert settings.profile_max_age_seconds == 86400
    assert settings.search_all_users is False


def test_every_setting_is_read_from_its_upper_case_name() -> None:
    env = {
        "DATABASE_URL": "postgresql://u@h/db",
        "REDIS_URL": "redis://r:1/2",
        "SERVER_NAME": "example.org",
        "HOMESERVER_URL": "http://hs:8008",
        "AS_TOKEN": "as",
        "HS_TOKEN": "hs",
        "SEARCH_ALL_USERS": "true",
        "PER_DESTINATION_CONCURRENCY": "5",
        "MAX_FETCH_ATTEMPTS": "4",
        "PROFILE_MAX_AGE": "60",
        "FETCH_RETRY_BASE_SECONDS": "1.5",
    }
    settings = Settings.from_env(env)
    assert settings.database_url == "postgresql://u@h/db"
    assert settings.server_name == "example.org"
    assert settings.search_all_users is True
    assert settings.per_destination_concurrency == 5
    assert settings.max_fetch_attempts == 4
    assert settings.profile_max_age_seconds == 60.0
    assert settings.fetch_retry_base_seconds == 1.5


@pytest.mark.parametrize(
    "env",
    [
        {"SEARCH_ALL_USERS": "maybe"},
        {"PER_DESTINATION_CONCURRENCY": "0"},
        {"MAX_FETCH_ATTEMPTS": "x"},
    ],
)
def test_bad_values_are_refused_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Settings.from_env(env)


def test_the_readme_and_the_sample_env_document_every_setting() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    sample = Path(PROJECT_ROOT / "env.example").read_text()
    names = {f.name.upper() for f in dataclasses.fields(Settings)}
    names = {"PROFILE_MAX_AGE" if n == "PROFILE_MAX_AGE_SECONDS" else n for n in names}
    for name in names:
        assert f"`{name}`" in readme, name
        assert re.search(rf"^{name}=", sample, re.MULTILINE), name
