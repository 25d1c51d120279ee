"""Checks a read-only command makes before it opens an MLflow store.

MLflow creates what it does not find (a SQLite file with its parent folders, the tables inside an empty
database) and keeps retrying a server that does not answer, so ``secvec registry list`` asks first: is this
a URI at all, does the store exist, does the server answer within a few seconds. Each problem is one line
that says what to do; nothing is created.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from workflows.tracking import redact

HEALTH_TIMEOUT_S = 3.0
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_NAMED_STORES = ("databricks", "databricks-uc")  # MLflow's own URIs without a colon
_MLFLOW_TABLES = ("experiments", "registered_models")
NO_STORE_HINT = "run `secvec demo` first (it writes sqlite:///.secvec/demo/mlflow.db) or pass --tracking-uri"


class RegistryUnavailable(ValueError):
    """The tracking URI names no readable MLflow store; the message is one line with the fix."""


def check_readable_store(uri: str, cwd: Path | None = None) -> str:
    """Return the URI to open (a relative ``sqlite:///`` path made absolute) or raise ``RegistryUnavailable``."""
    cwd = cwd or Path.cwd()
    if uri in _NAMED_STORES:
        return uri
    if not _URI.match(uri) or re.match(r"^[A-Za-z]:[\\/]", uri):
        raise RegistryUnavailable(
            f"--tracking-uri {uri!r} is a path, not a URI; use sqlite:///{_absolute(uri, cwd)} "
            "for a SQLite file or http://<host>:<port> for an MLflow server"
        )
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "sqlite":
        return _check_sqlite(uri, cwd)
    if scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
        if not path.is_dir():
            raise RegistryUnavailable(f"no MLflow store at {path} (from {uri}); {NO_STORE_HINT}")
        return uri
    if scheme in ("http", "https"):
        _check_server(uri)
    return uri


def _absolute(path: str, cwd: Path) -> Path:
    return (cwd / Path(path).expanduser()).absolute()


def _check_sqlite(uri: str, cwd: Path) -> str:
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        raise RegistryUnavailable(f"{uri} is not a SQLite file; {NO_STORE_HINT}")
    path = _absolute(uri[len("sqlite:///") :].split("?", 1)[0], cwd)
    if not path.is_file():
        raise RegistryUnavailable(f"no MLflow store at {path}; {NO_STORE_HINT}")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise RegistryUnavailable(f"{path} is not an MLflow database ({err}); {NO_STORE_HINT}") from None
    missing = [t for t in _MLFLOW_TABLES if t not in tables]
    if missing:
        raise RegistryUnavailable(f"{path} is not an MLflow database (no {', '.join(missing)} table); {NO_STORE_HINT}")
    return f"sqlite:///{path}"


def _check_server(uri: str) -> None:
    """Any HTTP answer from ``/health`` counts (an auth error is the server speaking); silence does not."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise RegistryUnavailable(
            f"MLflow at {redact(uri)} did not answer within {HEALTH_TIMEOUT_S:.0f}s "
            f"({reason}); start the server or fix --tracking-uri"
        ) from None
