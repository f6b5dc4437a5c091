"""Real Synapse homeservers on loopback for end-to-end tests.

Synapse runs from its own venv (.venv-synapse, made by scripts/synapse-venv) so its
pinned dependencies never meet ours; we only talk to it over HTTP. Each server keeps
everything (config, SQLite database, signing key, certificate, log) in its workdir.

The configuration is a generated base config plus an overrides file that Synapse merges
one top-level key at a time. Overrides are written as JSON, which is valid YAML, so this
module needs no YAML library.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from tests.support.services import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_VENV_SCRIPT = PROJECT_ROOT / "scripts" / "synapse-venv"
SYNAPSE_VERSION = "1.163.2"
# Fixed so tests can use the shared-secret admin registration API (register_admin).
REGISTRATION_SHARED_SECRET = "synapse-testbed-shared-secret"

# Every rate limit Synapse 1.163 reads, raised so tests never meet M_LIMIT_EXCEEDED.
_UNLIMITED = {"per_second": 10000, "burst_count": 100000}
_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_registration_token_validity": _UNLIMITED,
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_admin_redaction": _UNLIMITED,
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_key_requests": _UNLIMITED,
    "rc_3pid_validation": _UNLIMITED,
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_third_party_invite": _UNLIMITED,
    "rc_media_create": _UNLIMITED,
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_room_creation": _UNLIMITED,
    "rc_reports": _UNLIMITED,
    "rc_user_directory": _UNLIMITED,
    "rc_profile": _UNLIMITED,
    # Federation uses its own shape: requests per window before sleeping/rejecting.
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 100000,
        "sleep_delay": 1,
        "reject_limit": 100000,
        "concurrent": 1000,
    },
}

# Generates the self-signed federation certificate with the cryptography package that
# Synapse itself depends on, so the harness does not rely on an openssl binary.
_CERT_SCRIPT = """
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (
    x509.CertificateBuilder()
    .subject_name(name).issuer_name(name).public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(days=1))
    .not_valid_after(now + datetime.timedelta(days=3650))
    .add_extension(x509.SubjectAlternativeName([
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    ]), critical=False)
    .sign(key, hashes.SHA256())
)
open(sys.argv[1], "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(sys.argv[2], "wb").write(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption()))
"""


_INSTALL_LOCK = threading.Lock()


def synapse_python() -> Path:
    """The python of .venv-synapse, installing Synapse there first if needed."""
    with _INSTALL_LOCK:  # federating_pair prepares two servers in threads
        return _synapse_python()


def _synapse_python() -> Path:
    venv = PROJECT_ROOT / ".venv-synapse"
    python = venv / "bin" / "python"
    if python.exists() and (venv / f".installed-matrix-synapse-{SYNAPSE_VERSION}").exists():
        return python
    result = subprocess.run([str(SYNAPSE_VENV_SCRIPT)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"scripts/synapse-venv failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    return Path(result.stdout.strip().splitlines()[-1])


class MatrixError(RuntimeError):
    """A client API call answered with a non-2xx status."""

    def __init__(self, method: str, url: str, status: int, body: dict) -> None:
        super().__init__(f"{method} {url} -> {status} {body}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class AppserviceRegistration:
    url: str
    as_token: str
    hs_token: str
    sender_localpart: str = "userdirectory"
    id: str = "userdirectory"

    def yaml(self) -> str:
        """The registration file Synapse reads (JSON-quoted scalars are valid YAML)."""
        q = json.dumps
        return (
            f"id: {q(self.id)}\n"
            f"url: {q(self.url)}\n"
            f"as_token: {q(self.as_token)}\n"
            f"hs_token: {q(self.hs_token)}\n"
            f"sender_localpart: {q(self.sender_localpart)}\n"
            # Non-exclusive catch-alls: Synapse then pushes every event of every room
            # with a local member, while users and rooms stay usable by everyone.
            "namespaces:\n"
            "  users:\n"
            '    - regex: "@.*"\n'
            "      exclusive: false\n"
            "  rooms:\n"
            '    - regex: ".*"\n'
            "      exclusive: false\n"
            "  aliases: []\n"
            "rate_limited: false\n"
        )


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask Linux to SIGKILL Synapse when the
    # test process dies, so a crashed or killed pytest leaves no homeserver holding ports.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SynapseServer:
    """One Synapse process; start() may be called again after stop() or kill()."""

    def __init__(
        self,
        workdir: Path,
        server_name: str,
        client_port: int,
        federation_port: int | None = None,
        appservice: AppserviceRegistration | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        # Top-level config keys merged over the harness's own (e.g. allow_guest_access);
        # may also be set after construction, before start().
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.server_name = server_name
        self.client_port = client_port
        self.federation_port = federation_port
        self.appservice = appservice
        self.client_url = f"http://127.0.0.1:{client_port}"
        self.log_path = self.workdir / "homeserver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None
        self._log_offset = 0  # where the current run's lines start in log_path

    def __repr__(self) -> str:
        return f"SynapseServer({self.server_name!r}, {self.client_url})"

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        self.prepare()
        self.launch()
        self.wait_ready(timeout)

    def prepare(self) -> None:
        """Write config, keys and certificate; safe to run in a thread (no process left)."""
        python = synapse_python()
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = self.workdir / "homeserver.yaml"
        if not base.exists():
            # Generated once per data folder: it holds the signing key path and the
            # secrets, which must survive restarts.
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "synapse.app.homeserver",
                    "--server-name",
                    self.server_name,
                    "--config-path",
                    str(base),
                    "--data-directory",
                    str(self.workdir),
                    "--generate-config",
                    "--report-stats=no",
                ],
                cwd=self.workdir,
                check=True,
                capture_output=True,
            )
        if self.federation_port is not None and not (self.workdir / "tls.crt").exists():
            subprocess.run(
                [str(python), "-c", _CERT_SCRIPT, "tls.crt", "tls.key"],
                cwd=self.workdir,
                check=True,
                capture_output=True,
            )
        (self.workdir / "log.config").write_text(self._log_config())
        if self.appservice is not None:
            (self.workdir / "appservice.yaml").write_text(self.appservice.yaml())
        (self.workdir / "overrides.yaml").write_text(json.dumps(self._overrides(), indent=2))

    def launch(self) -> None:
        """Start the process. Call from the main thread: the parent-death signal is tied
        to the thread that forks, so a worker thread's exit would kill Synapse."""
        if self.running:
            return
        python = synapse_python()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(python),
                    "-m",
                    "synapse.app.homeserver",
                    "--config-path",
                    str(self.workdir / "homeserver.yaml"),
                    "--config-path",
                    str(self.workdir / "overrides.yaml"),
                ],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def register_appservice(self, appservice: AppserviceRegistration, timeout: float = 60) -> None:
        """Add the appservice to a server that may already have users and rooms, as an
        operator does: write the registration, then restart (Synapse reads
        app_service_config_files only at start)."""
        was_running = self.running
        self.stop()
        self.appservice = appservice
        if was_running:
            self.start(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the client API answers (and the federation port accepts)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                self.process = None
                raise RuntimeError(f"{self} exited ({code}) while starting:\n{self.log_tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            response = httpx.get(f"{self.client_url}/_matrix/client/versions", timeout=2)
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        if self.federation_port is None:
            return True
        try:
            socket.create_connection(("127.0.0.1", self.federation_port), timeout=1).close()
        except OSError:
            return False
        return True

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; safe to call twice or on a dead process."""
        process, self.process = self.process, None
        self._close_http()
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as if the machine died: no clean shutdown, no goodbye to peers."""
        process, self.process = self.process, None
        self._close_http()
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 60) -> str:
        """The last lines this run wrote to the log (earlier runs are skipped)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- configuration ---------------------------------------------------------

    def _overrides(self) -> dict[str, Any]:
        listeners: list[dict[str, Any]] = [
            {
                "port": self.client_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        overrides: dict[str, Any] = {
            "public_baseurl": f"{self.client_url}/",
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.workdir / "homeserver.db")},
            },
            "log_config": str(self.workdir / "log.config"),
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "registration_shared_secret": REGISTRATION_SHARED_SECRET,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "user_directory": {"enabled": True},
            # Without this a fresh database's background updates sleep between
            # batches and Synapse's own directory lags ~30 s behind.
            "background_updates": {"sleep_enabled": False},
            "url_preview_enabled": False,
            "enable_metrics": False,
            **_RATE_LIMITS,
        }
        if self.federation_port is not None:
            listeners.append(
                {
                    "port": self.federation_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "resources": [{"names": ["federation"], "compress": False}],
                }
            )
            overrides.update(
                tls_certificate_path=str(self.workdir / "tls.crt"),
                tls_private_key_path=str(self.workdir / "tls.key"),
                federation_verify_certificates=False,
                # Both are needed: loopback is in the default blacklist, and an
                # IP-literal server name is checked against the blacklist only.
                ip_range_whitelist=["127.0.0.0/8"],
                ip_range_blacklist=[],
            )
        overrides["listeners"] = listeners
        if self.appservice is not None:
            overrides["app_service_config_files"] = [str(self.workdir / "appservice.yaml")]
        overrides.update(self.extra_config)
        return overrides

    def _log_config(self) -> str:
        # Unbuffered, unrotated file logging: the generated config buffers INFO lines
        # in memory, which hides the cause of a failed start.
        return json.dumps(
            {
                "version": 1,
                "formatters": {
                    "precise": {
                        "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                        " - %(request)s - %(message)s"
                    }
                },
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "formatter": "precise",
                        "filename": str(self.log_path),
                        "encoding": "utf8",
                    }
                },
                "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
                "root": {"level": "INFO", "handlers": ["file"]},
                "disable_existing_loggers": False,
            },
            indent=2,
        )

    # -- client API ------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            # Joins over federation and remote profile lookups can take seconds.
            self._http = httpx.Client(base_url=self.client_url, timeout=30)
        return self._http

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def register(
        self, localpart: str, password: str = "password", displayname: str | None = None
    ) -> MatrixUser:
        """A new user, logged in; with open registration one dummy-auth call suffices."""
        body = {"username": localpart, "password": password, "auth": {"type": "m.login.dummy"}}
        response = self.http.post("/_matrix/client/v3/register", json=body)
        data = _json(response)
        if response.status_code != 200:
            raise MatrixError("POST", "/register", response.status_code, data)
        user = MatrixUser(data["user_id"], data["access_token"], self)
        if displayname is not None:
            user.set_displayname(displayname)
        return user

    def register_admin(
        self, localpart: str, password: str = "password", displayname: str | None = None
    ) -> MatrixUser:
        """A new server admin, logged in, through Synapse's shared-secret registration
        API: GET a nonce, then POST with an HMAC-SHA1 over nonce, user, password and the
        admin flag, keyed with registration_shared_secret."""
        path = "/_synapse/admin/v1/register"
        response = self.http.get(path)
        if response.status_code != 200:
            raise MatrixError("GET", path, response.status_code, _json(response))
        nonce = response.json()["nonce"]
        mac = hmac.new(REGISTRATION_SHARED_SECRET.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"admin"]))
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": True,
            "mac": mac.hexdigest(),
        }
        if displayname is not None:
            body["displayname"] = displayname
        response = self.http.post(path, json=body)
        data = _json(response)
        if response.status_code != 200:
            raise MatrixError("POST", path, response.status_code, data)
        return MatrixUser(data["user_id"], data["access_token"], self)

    def register_guest(self) -> MatrixUser:
        """A new guest (POST /register?kind=guest; needs allow_guest_access: true)."""
        response = self.http.post("/_matrix/client/v3/register", params={"kind": "guest"}, json={})
        data = _json(response)
        if response.status_code != 200:
            raise MatrixError("POST", "/register?kind=guest", response.status_code, data)
        return MatrixUser(data["user_id"], data["access_token"], self)


def _json(response: httpx.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        return {"raw": response.text}
    return data if isinstance(data, dict) else {"value": data}


def _seg(value: str) -> str:
    """One path segment: room and user ids contain '!', '@', ':' and '#'."""
    return quote(value, safe="")


class MatrixUser:
    """A thin client-API wrapper around one access token."""

    def __init__(self, user_id: str, access_token: str, server: SynapseServer) -> None:
        self.user_id = user_id
        self.access_token = access_token
        self.server = server

    def __repr__(self) -> str:
        return f"MatrixUser({self.user_id!r})"

    def request(
        self,
        method: str,
        path: str,
        json: object | None = None,
        params: dict | None = None,
    ) -> tuple[int, dict]:
        """A raw client API call (path from /_matrix/...) with this user's token."""
        response = self.server.http.request(
            method,
            path,
            json=json,
            params=params,
            headers={"Authorization": f"Bearer {self.access_token}"},
        )
        return response.status_code, _json(response)

    def _ok(
        self, method: str, path: str, json: object | None = None, params: dict | None = None
    ) -> dict:
        status, body = self.request(method, path, json=json, params=params)
        if not 200 <= status < 300:
            raise MatrixError(method, path, status, body)
        return body

    def create_room(
        self, *, public: bool, name: str | None = None, invite: Iterable[str] = ()
    ) -> str:
        # The preset alone sets join rule and history visibility; the room is not
        # published in the room directory (visibility stays private).
        body: dict[str, Any] = {
            "preset": "public_chat" if public else "private_chat",
            "invite": list(invite),
        }
        if name is not None:
            body["name"] = name
        return self._ok("POST", "/_matrix/client/v3/createRoom", body)["room_id"]

    def join(self, room_id: str, via: str | None = None) -> None:
        # A room id alone says nothing about where the room lives: a remote room needs
        # a server to ask (server_name, spelt "via" in newer specs).
        params = {"server_name": via} if via else None
        self._ok("POST", f"/_matrix/client/v3/join/{_seg(room_id)}", {}, params)

    def leave(self, room_id: str) -> None:
        self._ok("POST", f"/_matrix/client/v3/rooms/{_seg(room_id)}/leave", {})

    def invite(self, room_id: str, user_id: str) -> None:
        self._ok("POST", f"/_matrix/client/v3/rooms/{_seg(room_id)}/invite", {"user_id": user_id})

    def set_displayname(self, name: str) -> None:
        """Global name; Synapse echoes a join->join member event into every room."""
        self._ok(
            "PUT",
            f"/_matrix/client/v3/profile/{_seg(self.user_id)}/displayname",
            {"displayname": name},
        )

    def set_room_displayname(self, room_id: str, name: str) -> None:
        """A name in one room only: our member event re-sent with another displayname."""
        path = f"/_matrix/client/v3/rooms/{_seg(room_id)}/state/m.room.member/{_seg(self.user_id)}"
        content = self._ok("GET", path)
        content["displayname"] = name
        self._ok("PUT", path, content)

    def _state(self, room_id: str, event_type: str, content: dict) -> None:
        self._ok("PUT", f"/_matrix/client/v3/rooms/{_seg(room_id)}/state/{event_type}/", content)

    def set_avatar_url(self, url: str) -> None:
        """Global avatar, echoed into every room like a global name."""
        self._ok(
            "PUT",
            f"/_matrix/client/v3/profile/{_seg(self.user_id)}/avatar_url",
            {"avatar_url": url},
        )

    def set_guest_access(self, room_id: str, access: str) -> None:
        """m.room.guest_access: "can_join" lets guests join a public room."""
        self._state(room_id, "m.room.guest_access", {"guest_access": access})

    def deactivate(self, password: str = "password") -> None:
        """Deactivate this account (Synapse leaves its rooms and erases its name)."""
        localpart = self.user_id[1:].split(":", 1)[0]
        auth = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        }
        self._ok("POST", "/_matrix/client/v3/account/deactivate", {"auth": auth})

    def set_join_rule(self, room_id: str, rule: str) -> None:
        self._state(room_id, "m.room.join_rules", {"join_rule": rule})

    def set_history_visibility(self, room_id: str, visibility: str) -> None:
        self._state(room_id, "m.room.history_visibility", {"history_visibility": visibility})

    def directory_search(self, term: str, limit: int = 10) -> dict:
        """Synapse's OWN user directory on this server (to contrast with ours)."""
        return self._ok(
            "POST",
            "/_matrix/client/v3/user_directory/search",
            {"search_term": term, "limit": limit},
        )


def plan_federating_pair(
    workdir: Path, appservice: AppserviceRegistration | None
) -> tuple[SynapseServer, SynapseServer]:
    """Two homeservers that will federate over loopback TLS, the appservice on hs1; not
    started yet, so their server names are known before anything runs.

    The port in a server name is where peers connect, so it must be the federation
    listener's port. Distinct hosts (localhost vs 127.0.0.1) as in the checked testbed.
    """
    workdir = Path(workdir)
    fed1, fed2 = free_port(), free_port()
    hs1 = SynapseServer(
        workdir / "hs1",
        f"localhost:{fed1}",
        free_port(),
        federation_port=fed1,
        appservice=appservice,
    )
    hs2 = SynapseServer(workdir / "hs2", f"127.0.0.1:{fed2}", free_port(), federation_port=fed2)
    return hs1, hs2


def start_servers(*servers: SynapseServer) -> None:
    # Config generation imports all of Synapse (~1 s each): do it in parallel. The
    # processes are forked from this thread (see launch) and then awaited together.
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        for future in [pool.submit(server.prepare) for server in servers]:
            future.result()
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise


def federating_pair(
    workdir: Path, appservice: AppserviceRegistration | None
) -> tuple[SynapseServer, SynapseServer]:
    """plan_federating_pair, started."""
    hs1, hs2 = plan_federating_pair(workdir, appservice)
    start_servers(hs1, hs2)
    return hs1, hs2


def random_token() -> str:
    return secrets.token_urlsafe(24)


__all__ = [
    "REGISTRATION_SHARED_SECRET",
    "AppserviceRegistration",
    "MatrixError",
    "MatrixUser",
    "SynapseServer",
    "federating_pair",
    "plan_federating_pair",
    "random_token",
    "start_servers",
    "synapse_python",
]
