"""The Grafana dashboard (contrib/grafana/directory.json) only plots what /metrics
exposes: every PromQL expression in it is read, the metric names it uses extracted,
and each must be served by the running app's /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from directory.config import PROJECT_ROOT, Settings
from tests.conftest import with_settings
from tests.directory.api.conftest import RunningApi, serve
from tests.support.events import member
from tests.support.fake_homeserver import FakeHomeserver

DASHBOARD = Path(PROJECT_ROOT) / "contrib" / "grafana" / "directory.json"

# PromQL words that are not metric names (functions and aggregations are followed by
# "(" and skipped anyway).
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[a-zA-Z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRING.sub('""', expr)
    assert text.count("(") == text.count(")"), f"unbalanced parentheses: {expr}"
    assert text.count("{") == text.count("}"), f"unbalanced braces: {expr}"
    assert text.count("[") == text.count("]"), f"unbalanced brackets: {expr}"
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if word in KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, max by (le, kind) (rate(x_bucket{job=~"$job",a="b{c}"}'
        "[$__rate_interval])))"
    ) == {"x_bucket"}
    assert metric_names("sum without (instance) (a_total offset 5m) / on (x) b + 1e3") == {
        "a_total",
        "b",
    }


def expressions(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target, rows' nested panels included."""

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


@pytest.fixture
def api(
    settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    yield from serve(with_settings(settings, homeserver_url=homeserver.url), db, homeserver)


SERIES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exposed(api: RunningApi) -> set[str]:
    """Every series name /metrics serves (after a transaction and a search), whether or
    not it has samples yet (the bootstrap's, before any bootstrap): a family declared
    with `# TYPE` serves its names as soon as it has a value."""
    with api.client() as client:
        body = {"events": [member("!room:ours.test", "@bob:ours.test")]}
        headers = {"Authorization": "Bearer hs-secret"}
        put = client.put("/_matrix/app/v1/transactions/1", json=body, headers=headers)
        assert put.is_success
        search = {"search_term": "bob"}
        headers = {"Authorization": "Bearer as-secret"}
        assert client.post(
            "/_matrix/client/v3/user_directory/search", json=search, headers=headers
        ).is_success
        api.settle()
        text = client.get("/metrics").text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SERIES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_the_dashboard_plots_is_exposed(api: RunningApi) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    served = exposed(api)
    used: dict[str, set[str]] = {}
    found = list(expressions(dashboard))
    assert len(found) >= 10
    for title, expr in found:
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        for name in names:
            used.setdefault(name, set()).add(title)
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition") or ""
        if query.startswith("label_values("):
            used.setdefault(query[len("label_values(") :].split(",")[0].strip(), set()).add(
                f"${variable['name']}"
            )
    missing = {name: sorted(titles) for name, titles in used.items() if name not in served}
    assert not missing, f"plotted but not on /metrics: {missing}"
    # What the dashboard promises to show, by panel.
    assert {
        "directory_fetches_total",
        "directory_fetch_seconds_bucket",
        "directory_destinations_backed_off",
        "directory_apply_delay_seconds_bucket",
        "directory_inbox_events",
        "directory_inbox_oldest_age_seconds",
        "directory_pending_fetches",
        "directory_searches_total",
        "directory_search_seconds_bucket",
        "directory_bootstrap_rooms",
        "directory_reconcile_repairs_total",
        "directory_snapshots_total",
    } <= used.keys()


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            # Every query goes to the data source the viewer picks.
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["refId"] for t in panel["targets"]), panel["title"]
