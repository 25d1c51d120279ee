"""Helpers for end-to-end tests: a real `mlflow server` process on PostgreSQL, free ports, small specs."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_postgres():
    """Skip with a reason where PostgreSQL is unreachable; in CI (CI=true) that is a failure."""
    import psycopg2

    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as err:
        reason = f"PostgreSQL not reachable at 127.0.0.1:5432 ({str(err).strip()[:80]})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run this test")
        pytest.skip(reason)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def postgres_database(prefix: str = "secvec_test"):
    """A fresh database named ``<prefix>_<random>``, dropped afterwards."""
    conn = require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with contextlib.suppress(Exception):
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, port: int | None = None, timeout_s: float = 600):
    """Start `mlflow server` and wait until /health answers; stop it afterwards."""
    port = port or free_port()
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"mlflow server did not start: {(artifacts.parent / f'mlflow-server-{port}.log').read_text()[-2000:]}"
            )
        time.sleep(0.5)
    try:
        yield url, proc
    finally:
        stop_server(proc)
        log.close()


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def small_pipeline(
    tracking_uri: str, work_dir: Path, *, workers: int = 2, name: str = "e2e", max_harmful_rate: float = 1.0
) -> dict:
    """Vector -> guarded fine-tune -> evaluation on the raw tiny model, a few steps each (registry plumbing)."""
    train = {"learning_rate": 3e-3, "max_steps": 8, "batch_size": 8, "max_length": 32, "log_every": 4}
    return {
        "name": name,
        "base_model": {"source": "builtin:tiny"},
        "tracking": {"tracking_uri": tracking_uri, "experiment": f"secvec-{name}", "base_name": "tiny"},
        "scaling": {"num_workers": workers, "checkpoint_every": 4},
        "work_dir": str(work_dir),
        "stages": [
            {
                "name": "vec",
                "kind": "vector_training",
                "data": {"builtin": "toy-harmful", "limit": 10},
                "training": train,
            },
            {
                "name": "ft",
                "kind": "guarded_finetune",
                "data": {"builtin": "toy-facts"},
                "vectors": [{"stage": "vec"}],
                "training": train,
            },
            {
                "name": "ev",
                "kind": "evaluation",
                "candidate": {"stage": "ft"},
                "harmful_prompts": {"builtin": "toy-harmful-eval", "limit": 8},
                "task_data": {"builtin": "toy-facts"},
                "unwanted_data": {"builtin": "toy-facts", "limit": 4},
                "max_new_tokens": 4,
                "gate": {"max_harmful_rate": max_harmful_rate},
            },
        ],
    }
