"""Stage claims: one driver trains a stage hash at a time, and runs whose driver died do not stay RUNNING.

MLflow offers no lock, so a claim is the stage's own MLflow run: RUNNING, tagged with the stage hash, its owner
(host, pid and process start time of the driver) and a heartbeat the driver refreshes. A driver claims a stage by
creating that run and then looking for other live runs with the same hash: creating is the "raise my hand" and
the search after it the "look around", so of two drivers that race, at least one sees the other (whichever
searched later). After the search it looks for a finished run once more: a rival that finished between the first
look and the search was in neither. A driver that sees a rival withdraws (its run is deleted) and retries after a random pause; a
live claim held by another driver is waited for, and its registered result reused when it finishes.

A claim is stale when its owner is a process of this host that no longer exists (``kill -9``), or, for
owners on other hosts, when its heartbeat is older than the lease (``$SECVEC_LEASE_SECONDS``, default 300;
the machines' clocks must agree to well within it). Stale runs are marked FAILED with a ``secvec.failure`` tag.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from workflows.tracking import with_retries

logger = logging.getLogger(__name__)

OWNER_TAG = "secvec.owner"
HEARTBEAT_TAG = "secvec.heartbeat"
FAILURE_TAG = "secvec.failure"
HASH_TAG = "secvec.stage_hash"
LEASE_ENV = "SECVEC_LEASE_SECONDS"
LEASE_SECONDS = 300.0
WAIT_POLL_SECONDS = 2.0
_HELD: set[str] = set()  # RUNNING runs this process is working on now (a run it left behind is stale)


class ClaimRefusedError(RuntimeError):
    """Another live driver is training the same stage and this one was told not to wait."""


def lease_seconds() -> float:
    """How long a claim stays valid without a heartbeat: ``$SECVEC_LEASE_SECONDS`` (read at call time), else 300."""
    return float(os.environ.get(LEASE_ENV, LEASE_SECONDS))


def this_owner() -> dict:
    """Who holds a claim: host, pid and the process's start time (a reused pid is not mistaken for the owner)."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": round(psutil.Process().create_time(), 2)}


def owner_tags() -> dict[str, str]:
    return {OWNER_TAG: json.dumps(this_owner(), sort_keys=True), HEARTBEAT_TAG: f"{time.time():.1f}"}


def stale_reason(run_id: str, tags: dict[str, str], start_time_ms: int, now: float | None = None) -> str | None:
    """Why a RUNNING run is abandoned, or None while its driver may still be alive.

    Same host: the owner process is gone (or its pid now belongs to another process), or it is this process and
    the run is not one it is working on (an earlier pipeline in this process failed without reaching MLflow).
    Other host, or no owner tag (runs from older versions): no heartbeat (or start) for longer than the lease."""
    import psutil

    now = time.time() if now is None else now
    owner = _parse_owner(tags.get(OWNER_TAG))
    if owner and owner == this_owner():
        return None if run_id in _HELD else "left behind by an earlier pipeline of this driver process"
    if owner and owner.get("host") == socket.gethostname():
        try:
            alive = abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["started"])) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError, TypeError):
            alive = False
        return None if alive else f"driver process {owner.get('pid')} on {owner.get('host')} is gone"
    try:
        last = float(tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        last = start_time_ms / 1000
    lease = lease_seconds()
    if now - last > lease:
        return f"no heartbeat from its driver for {now - last:.0f}s (lease {lease:.0f}s)"
    return None


def _parse_owner(raw: str | None) -> dict | None:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


@dataclass
class Claim:
    """The outcome of :meth:`StageClaims.acquire`: this driver's RUNNING run, or a finished run's output to reuse."""

    run_id: str | None = None
    reused_output: dict | None = None


class StageClaims:
    """Claims and clean-up for one experiment, used by the driver only."""

    def __init__(self, tracking_uri: str, experiment_id: str):
        from mlflow import MlflowClient

        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.client = MlflowClient(tracking_uri)

    def _search(self, filter_string: str, what: str) -> list:
        return with_retries(
            lambda: self.client.search_runs([self.experiment_id], filter_string, max_results=1000),
            what,
            self.tracking_uri,
        )

    def mark_failed(self, run_id: str, reason: str, budget_s: float | None = None) -> None:
        from mlflow.entities import RunTag

        with_retries(
            lambda: self.client.log_batch(run_id, tags=[RunTag(FAILURE_TAG, reason[:500])]),
            "tag a failed run",
            self.tracking_uri,
            budget_s,
        )
        with_retries(
            lambda: self.client.set_terminated(run_id, "FAILED"), "mark a run failed", self.tracking_uri, budget_s
        )

    def sweep_stale(self) -> list[str]:
        """Mark every abandoned RUNNING secvec run of the experiment FAILED (pipeline and stage runs of a killed
        driver); runs whose driver is alive, here or elsewhere, are left alone. Returns the run ids marked."""
        marked = []
        for run in self._search("attributes.status = 'RUNNING'", "search running runs"):
            tags = run.data.tags
            if HASH_TAG not in tags and tags.get("secvec.kind") != "pipeline":
                continue  # not a run secvec's driver owns
            reason = stale_reason(run.info.run_id, tags, run.info.start_time)
            if reason:
                logger.info(
                    "marking abandoned run %s (%s) FAILED: %s", run.info.run_id, tags.get("mlflow.runName", ""), reason
                )
                self.mark_failed(run.info.run_id, f"abandoned: {reason}")
                marked.append(run.info.run_id)
        return marked

    def live_claims(self, digest: str) -> list:
        """RUNNING runs of this stage hash whose drivers are alive (stale ones are marked FAILED on the way)."""
        live = []
        for run in self._search(
            f"tags.`{HASH_TAG}` = '{digest}' and attributes.status = 'RUNNING'", "search running stages"
        ):
            reason = stale_reason(run.info.run_id, run.data.tags, run.info.start_time)
            if reason:
                self.mark_failed(run.info.run_id, f"abandoned: {reason}")
            else:
                live.append(run)
        return live

    def acquire(
        self,
        digest: str,
        create_run: Callable[[], str],
        find_finished: Callable[[], dict | None],
        stage_name: str,
        wait: bool = True,
    ) -> Claim:
        """Reuse a finished run of ``digest``, or create this driver's claim run, or wait for a live rival."""
        announced = None
        while True:
            finished = find_finished()
            if finished is not None:
                return Claim(reused_output=finished)
            rivals = self.live_claims(digest)
            if not rivals:
                run_id = create_run()
                _HELD.add(run_id)  # ours and alive; the caller keeps holding it (Heartbeat.hold) until the stage ends
                rivals = [r for r in self.live_claims(digest) if r.info.run_id != run_id]
                # A rival that finished between our first look (find_finished) and our rival search was in
                # neither: look again now. One RUNNING at the search was seen; one FINISHED by then is found here.
                finished = None if rivals else find_finished()
                if not rivals and finished is None:
                    return Claim(run_id=run_id)
                _HELD.discard(run_id)
                self.withdraw(run_id)  # both may withdraw; the random pause breaks the tie on the next round
                if finished is not None:
                    return Claim(reused_output=finished)
                time.sleep(random.uniform(0.2, 2.0))
                continue
            holder = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id))
            if not wait:
                raise ClaimRefusedError(
                    f"stage {stage_name!r} is being trained by another secvec run (MLflow run {holder.info.run_id}, "
                    f"{holder.data.tags.get(OWNER_TAG, 'owner unknown')}); wait for it and rerun to reuse its result"
                )
            if announced != holder.info.run_id:
                logger.warning(
                    "stage %s: another secvec run (MLflow run %s) is training the same stage; waiting for its result",
                    stage_name,
                    holder.info.run_id,
                )
                announced = holder.info.run_id
            time.sleep(WAIT_POLL_SECONDS)

    def withdraw(self, run_id: str) -> None:
        """Take back a claim that lost a race: FAILED and deleted, so it is neither reused nor shown."""
        self.mark_failed(run_id, "withdrawn: another run claimed the same stage at the same moment")
        with_retries(lambda: self.client.delete_run(run_id), "delete a withdrawn claim", self.tracking_uri)


class Heartbeat:
    """Holds the driver's RUNNING runs: refreshes their ``secvec.heartbeat`` every lease/5 seconds in a daemon
    thread, and marks them as this process's live work (so :func:`stale_reason` leaves them alone)."""

    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_ids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="secvec-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(max(0.5, lease_seconds() / 5)):
            for run_id in list(self.run_ids):
                try:
                    self.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.1f}")
                except Exception as err:  # a missed beat is harmless until the lease runs out
                    logger.info("heartbeat for run %s failed: %s", run_id, type(err).__name__)

    def hold(self, run_id: str) -> None:
        self.run_ids.add(run_id)
        _HELD.add(run_id)

    def release(self, run_id: str) -> None:
        self.run_ids.discard(run_id)
        _HELD.discard(run_id)

    def stop(self) -> None:
        for run_id in list(self.run_ids):
            self.release(run_id)
        self._stop.set()
