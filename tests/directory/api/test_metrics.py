"""directory_searches_total counts every search by the status it was answered with,
errors included, and nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from directory.config import Settings
from tests.conftest import with_settings
from tests.directory.api.conftest import RunningApi, serve
from tests.support.fake_homeserver import FakeHomeserver

SEARCH = "/_matrix/client/v3/user_directory/search"
TOKEN = {"Authorization": "Bearer as-secret"}


@pytest.fixture
def limited_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    # Four searches, then 429.
    settings = with_settings(api_settings, search_rate_burst=4, search_rate_per_second=0.01)
    yield from serve(settings, db, homeserver)


def test_every_search_is_counted_by_its_status(limited_api: RunningApi) -> None:
    with limited_api.client() as client:
        statuses = [
            client.post(SEARCH, json={"search_term": "a"}, headers=TOKEN).status_code,
            client.post(SEARCH, content=b"{oops", headers=TOKEN).status_code,
            client.post(SEARCH, json={"search_term": 1}, headers=TOKEN).status_code,
            client.post(SEARCH, content=b"x" * 70_000, headers=TOKEN).status_code,
            client.post(SEARCH, json={"search_term": "a"}, headers=TOKEN).status_code,
            client.post(SEARCH, json={"search_term": "a"}).status_code,
            client.post(
                "/_matrix/client/r0/user_directory/search",
                json={"search_term": "a"},
                headers={"Authorization": "Bearer unknown"},
            ).status_code,
            # Not searches: a transaction refused, a query about a user.
            client.put("/_matrix/app/v1/transactions/1", json={"events": []}).status_code,
            client.get(
                "/_matrix/app/v1/users/@a:b", headers={"Authorization": "Bearer hs-secret"}
            ).status_code,
        ]
        text = client.get("/metrics").text
    assert statuses == [200, 400, 400, 413, 429, 401, 401, 403, 404]
    searches = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "directory_searches_total"
    }
    assert searches == {"200": 1.0, "400": 2.0, "413": 1.0, "429": 1.0, "401": 2.0}
    assert "directory_search_seconds_count 1.0" in text
