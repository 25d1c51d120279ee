"""MLflow tracking from a Ray worker (rank 0): runs, flattened params, metrics, artifacts, with retries.

Ray Train v2 rejects Tune callbacks such as MLflowLoggerCallback (ray #64179), so rank 0 logs
through ``MlflowClient`` directly. Every call retries with backoff for a bounded time, then fails with
a message that names the tracking server. Creates are not blindly re-sent: a reply that timed out may still
have created the run, so :func:`create_once` looks for it (by a token tag) before sending the create again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

SECRET_WORDS = ("password", "passwd", "secret", "accesskey", "apikey", "privatekey", "credential")
RETRY_ENV = "SECVEC_MLFLOW_RETRY_SECONDS"
RETRY_SECONDS = 60.0
CREATE_TOKEN_TAG = "secvec.create_token"  # unique per create call: finds a run whose create reply was lost
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):[^/\s]*@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>[?&][^=&\s]*(?:password|secret|token|access_key|credential|signature)"
    r"[^=&\s]*=)[^&\s]*"
)


def retry_budget() -> float:
    """Seconds one MLflow call may keep retrying: ``$SECVEC_MLFLOW_RETRY_SECONDS`` (read at call time), else 60."""
    return float(os.environ.get(RETRY_ENV, RETRY_SECONDS))


def redact(text: str) -> str:
    """Hide credentials: ``scheme://user:pw@host`` -> ``scheme://user:***@host``, and secret query values."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)


class TrackingUnavailableError(RuntimeError):
    """The MLflow server did not answer within the retry budget."""


def with_retries(fn: Callable[[], T], what: str, tracking_uri: str, budget_s: float | None = None) -> T:
    """Call ``fn`` until it succeeds or ``budget_s`` passes (exponential backoff with jitter)."""
    from mlflow.exceptions import MlflowException

    budget = retry_budget() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            return fn()
        except MlflowException as err:
            code = getattr(err, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"):
                raise
            last = err
        except (OSError, ConnectionError) as err:
            last = err
        if time.monotonic() + delay > deadline:
            raise TrackingUnavailableError(
                f"MLflow at {redact(tracking_uri)} did not answer while trying to {what} for {budget:.0f}s "
                f"({_describe(last)}); check the server and rerun the pipeline "
                "(finished stages are reused)"
            ) from None
        # INFO, not WARNING: the one-line error above is what a user needs; `secvec run --verbose` shows these
        logger.info("MLflow %s failed (%s); retrying in %.1fs", what, type(last).__name__, delay)
        time.sleep(delay + random.uniform(0, delay / 4))
        delay = min(delay * 2, 8.0)


def create_once(
    create: Callable[[], T],
    find_created: Callable[[], T | None],
    what: str,
    tracking_uri: str,
    budget_s: float | None = None,
) -> T:
    """Retry a non-idempotent create (a run, a model version) without duplicating it: before every re-send,
    ``find_created`` looks for what an earlier attempt may have created although its reply was lost."""
    attempts = 0

    def attempt() -> T:
        nonlocal attempts
        if attempts:
            found = find_created()
            if found is not None:
                return found
        attempts += 1
        return create()

    return with_retries(attempt, what, tracking_uri, budget_s)


def _describe(err: BaseException) -> str:
    text = redact(str(err))
    for symptom in ("Connection refused", "timed out", "Name or service not known", "Temporary failure in name"):
        if symptom in text:
            return f"{type(err).__name__}: {symptom.lower()}"
    return f"{type(err).__name__}: {text[:160]}"


def is_secret_key(key: str) -> bool:
    """``db_password``, ``aws_secret_access_key``, ``accessKey``, ``auth_token``: yes; ``max_new_tokens``: no."""
    compact = re.sub(r"[^a-z0-9]", "", str(key).lower())
    return any(w in compact for w in SECRET_WORDS) or compact.endswith("token")


def flatten(data: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested spec -> ``a.b.c`` params; secret-looking keys are never logged, passwords in URIs are redacted."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if is_secret_key(key):
            continue
        if isinstance(value, dict):
            yield from flatten(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                yield from flatten(v, f"{name}.{i}.")
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            yield name, redact(text)[:500]


def configure_http_retries() -> None:
    """Make MLflow's own HTTP client fail fast so our bounded backoff is in charge."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class StageRun:
    """One MLflow run for one stage, used from rank 0 only."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        run_name: str,
        parent_run_id: str | None,
        tags: dict[str, str] | None = None,
        existing_run_id: str | None = None,
    ):
        from mlflow import MlflowClient

        configure_http_retries()
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        if existing_run_id:  # a restarted worker continues the run it had started
            run = with_retries(lambda: self.client.get_run(existing_run_id), "reopen the run", tracking_uri)
            self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
            return
        token = uuid.uuid4().hex
        run_tags = {"mlflow.runName": run_name, **(tags or {}), CREATE_TOKEN_TAG: token}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id

        def find_created():
            runs = self.client.search_runs([experiment_id], f"tags.`{CREATE_TOKEN_TAG}` = '{token}'", max_results=1)
            return runs[0] if runs else None

        run = create_once(
            lambda: self.client.create_run(experiment_id, tags=run_tags), find_created, "create a run", tracking_uri
        )
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params)]
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            with_retries(lambda c=chunk: self.client.log_batch(self.run_id, params=c), "log params", self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        with_retries(lambda: self.client.log_batch(self.run_id, metrics=items), "log metrics", self.tracking_uri)

    def set_tags(self, tags: dict[str, str], budget_s: float | None = None) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        with_retries(lambda: self.client.log_batch(self.run_id, tags=items), "set tags", self.tracking_uri, budget_s)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> str:
        with_retries(
            lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path),
            f"upload {artifact_path}",
            self.tracking_uri,
        )
        return f"{self.artifact_uri}/{artifact_path}"

    def finish(self, status: str = "FINISHED", budget_s: float | None = None) -> None:
        with_retries(
            lambda: self.client.set_terminated(self.run_id, status), "close the run", self.tracking_uri, budget_s
        )


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None) -> str:
    """Create-or-get: two drivers starting together both end up with the one experiment of that name (the
    loser of the race gets RESOURCE_ALREADY_EXISTS, or a database unique violation, and looks it up again)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_http_retries()
    client = MlflowClient(tracking_uri)

    def look_up() -> str | None:
        existing = with_retries(lambda: client.get_experiment_by_name(name), "look up the experiment", tracking_uri)
        return existing.experiment_id if existing is not None else None

    found = look_up()
    if found is not None:
        return found
    try:
        return create_once(
            lambda: client.create_experiment(name, artifact_location=artifact_location),
            look_up,
            "create the experiment",
            tracking_uri,
        )
    except MlflowException:
        found = look_up()  # created by a concurrent run between our look-up and our create
        if found is None:
            raise
        return found
