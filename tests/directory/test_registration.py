"""`python -m directory registration` prints a registration a homeserver accepts: the
namespaces we need (all users and rooms, non-exclusive), our URL, unguessable tokens
(or the configured ones), and the settings that match it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from directory.config import PROJECT_ROOT


def run(*args: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("AS_TOKEN", "HS_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "directory", "registration", *args],
        cwd=PROJECT_ROOT,
        env={**environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_registration_is_valid_yaml_with_our_namespaces(tmp_path: Path) -> None:
    env_file = tmp_path / "directory.env"
    output = run("--url", "http://10.0.0.5:9080", "--env-file", str(env_file))
    reg = yaml.safe_load(output)
    assert reg["url"] == "http://10.0.0.5:9080"
    assert reg["rate_limited"] is False
    assert reg["namespaces"]["users"] == [{"exclusive": False, "regex": "@.*"}]
    assert reg["namespaces"]["rooms"] == [{"exclusive": False, "regex": ".*"}]
    assert len(reg["as_token"]) >= 32 and len(reg["hs_token"]) >= 32
    assert reg["as_token"] != reg["hs_token"]
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert settings["AS_TOKEN"] == reg["as_token"] and settings["HS_TOKEN"] == reg["hs_token"]
    assert settings["HTTP_PORT"] == "9080"
    assert f"# AS_TOKEN={reg['as_token']}" in output


def test_tokens_are_random_unless_configured() -> None:
    first, second = yaml.safe_load(run()), yaml.safe_load(run())
    assert first["as_token"] != second["as_token"]
    fixed = yaml.safe_load(run(AS_TOKEN='a"b: c', HS_TOKEN="hs"))
    assert fixed["as_token"] == 'a"b: c' and fixed["hs_token"] == "hs"
    assert fixed["url"] == "http://127.0.0.1:9080"
