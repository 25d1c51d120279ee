"""Idempotent registry and tracking writes, stage claims, and nothing left behind.

Fast tests drive the pieces against a local SQLite MLflow store (no Ray): create-or-get of experiments, creates
whose reply was lost, claims and their races, stale runs of a dead driver, alias compare-and-set, scratch folders
and orphaned Ray processes. Slow tests run `secvec run` as real processes: two at once against one
`mlflow server` on PostgreSQL, and a driver killed with SIGKILL, then rerun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from workflows import claims as claims_module
from workflows.claims import FAILURE_TAG, HEARTBEAT_TAG, OWNER_TAG, ClaimRefusedError, StageClaims, owner_tags
from workflows.leftovers import SCRATCH_LOCK, Scratch, end_orphaned_ray, remove_stale_scratch
from workflows.registry import AliasConflictError, Registry
from workflows.tracking import StageRun, ensure_experiment

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def _database(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds on a busy machine)."""
    root = tmp_path_factory.mktemp("claims")
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


@pytest.fixture
def store(_database, request):
    """(tracking URI, a fresh experiment for this test)."""
    uri, artifacts = _database
    return uri, ensure_experiment(uri, f"secvec-{request.node.name}"[:200], artifacts)


def _stage_run(uri: str, experiment_id: str, extra: dict | None = None) -> str:
    tags = {"secvec.stage": "vec", "secvec.stage_hash": DIGEST, **owner_tags(), **(extra or {})}
    return StageRun(uri, experiment_id, "p/vec", None, tags).run_id


def _running(uri: str, experiment_id: str) -> list:
    return MlflowClient(uri).search_runs([experiment_id], "attributes.status = 'RUNNING'")


# -- create-or-get, creates whose reply was lost ----------------------------------------------------------
def test_experiment_created_by_a_concurrent_run_is_looked_up_not_an_error(store, monkeypatch):
    uri, experiment_id = store
    real = MlflowClient.get_experiment_by_name
    calls = []

    def stale_first_look(self, name):  # the other driver creates it between our look-up and our create
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first_look)
    name = MlflowClient(uri).get_experiment(experiment_id).name
    assert ensure_experiment(uri, name, None) == experiment_id
    assert len(calls) >= 2


def test_a_create_whose_reply_was_lost_is_not_sent_again(store, monkeypatch):
    uri, experiment_id = store
    monkeypatch.setenv("SECVEC_MLFLOW_RETRY_SECONDS", "5")
    real = MlflowClient.create_run
    sent = []

    def reply_lost(self, *args, **kwargs):
        sent.append(1)
        real(self, *args, **kwargs)  # the server created it ...
        raise ConnectionError("read timed out")  # ... but the reply never arrived

    monkeypatch.setattr(MlflowClient, "create_run", reply_lost)
    run = StageRun(uri, experiment_id, "p/vec", None, {"secvec.stage": "vec"})
    assert len(sent) == 1, "the create must not be re-sent once the first one is found"
    runs = MlflowClient(uri).search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [run.run_id]


def test_registering_twice_from_one_run_gives_one_version(store, tmp_path, monkeypatch):
    uri, experiment_id = store
    monkeypatch.setenv("SECVEC_MLFLOW_RETRY_SECONDS", "5")
    run_id = _stage_run(uri, experiment_id)
    registry = Registry(uri)
    real = MlflowClient.create_model_version
    sent = []

    def reply_lost(self, *args, **kwargs):
        sent.append(1)
        real(self, *args, **kwargs)
        raise ConnectionError("read timed out")

    monkeypatch.setattr(MlflowClient, "create_model_version", reply_lost)
    first = registry.register("twice", "security-vector", "file:///x", run_id, {"a": "1"})
    monkeypatch.setattr(MlflowClient, "create_model_version", real)
    again = registry.register("twice", "security-vector", "file:///x", run_id, {"a": "1"})
    assert len(sent) == 1 and first.version == again.version == "1"
    assert len(MlflowClient(uri).search_model_versions("name='twice'")) == 1


# -- claims ----------------------------------------------------------------------------------------------
def test_a_live_claim_is_refused_or_waited_for_and_its_result_reused(store, monkeypatch):
    uri, experiment_id = store
    claims = StageClaims(uri, experiment_id)
    done: dict = {}
    first = claims.acquire(DIGEST, lambda: _stage_run(uri, experiment_id), lambda: done.get("output"), "vec")
    assert first.run_id and first.reused_output is None
    with pytest.raises(ClaimRefusedError, match=f"stage 'vec' is being trained by another secvec run .*{first.run_id}"):
        claims.acquire(DIGEST, lambda: _stage_run(uri, experiment_id), lambda: None, "vec", wait=False)

    def winner_finishes(seconds):  # the waiting driver polls; meanwhile the winner finishes
        MlflowClient(uri).set_terminated(first.run_id, "FINISHED")
        done["output"] = {"uri": "models:/tiny.security-vector.harmful/1"}

    monkeypatch.setattr(claims_module.time, "sleep", winner_finishes)
    second = claims.acquire(DIGEST, lambda: _stage_run(uri, experiment_id), lambda: done.get("output"), "vec")
    assert second.reused_output == {"uri": "models:/tiny.security-vector.harmful/1"} and second.run_id is None
    assert len(MlflowClient(uri).search_runs([experiment_id])) == 1, "the waiting driver created no run of its own"


def test_two_claims_created_at_the_same_moment_never_both_win(store, monkeypatch):
    """The rival's run appears right after ours: we see it, withdraw (FAILED and deleted), and then find a live
    claim; with the rival's claim there is exactly one RUNNING run of the stage."""
    uri, experiment_id = store
    monkeypatch.setattr(claims_module.time, "sleep", lambda s: None)
    claims = StageClaims(uri, experiment_id)
    rival: list[str] = []

    def create_with_rival():
        mine = _stage_run(uri, experiment_id)
        rival.append(_stage_run(uri, experiment_id))
        claims_module._HELD.add(rival[0])  # a live claim (another driver's, played by this process)
        return mine

    with pytest.raises(ClaimRefusedError):
        claims.acquire(DIGEST, create_with_rival, lambda: None, "vec", wait=False)
    assert [r.info.run_id for r in _running(uri, experiment_id)] == rival
    deleted = MlflowClient(uri).search_runs([experiment_id], run_view_type=2)  # DELETED_ONLY
    assert len(deleted) == 1 and deleted[0].info.status == "FAILED"


def test_a_rival_that_finishes_between_our_two_looks_is_reused_not_trained_again(store, monkeypatch):
    """The window between "is a finished run there?" and "is a live claim there?": the rival finishes right after
    our first look, so the second finds no live claim. We may claim, but must look for a finished run once more
    after claiming (a rival RUNNING at our rival search was seen; one FINISHED by then is found now), withdraw,
    and reuse its result: one stage hash, one trained version. (Seen as two versions per stage hash when two
    `secvec run`s of one spec ran on a loaded machine.)"""
    uri, experiment_id = store
    monkeypatch.setattr(claims_module.time, "sleep", lambda s: None)
    claims = StageClaims(uri, experiment_id)
    rival = _stage_run(uri, experiment_id)
    claims_module._HELD.add(rival)  # a live claim (another driver's, played by this process)
    looks: list[int] = []

    def finished_after_first_look():
        looks.append(1)
        if len(looks) == 1:  # the rival finishes just after this look
            MlflowClient(uri).set_terminated(rival, "FINISHED")
            claims_module._HELD.discard(rival)
            return None
        return {"uri": "models:/tiny.security-vector.harmful/1"}

    claim = claims.acquire(DIGEST, lambda: _stage_run(uri, experiment_id), finished_after_first_look, "vec")
    assert claim.reused_output == {"uri": "models:/tiny.security-vector.harmful/1"} and claim.run_id is None
    assert _running(uri, experiment_id) == [], "our claim was withdrawn, nothing of ours trains"
    deleted = MlflowClient(uri).search_runs([experiment_id], run_view_type=2)  # DELETED_ONLY
    assert len(deleted) == 1 and deleted[0].info.status == "FAILED"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_of_a_dead_driver_are_marked_failed_and_live_ones_are_left(store):
    uri, experiment_id = store
    host = json.loads(owner_tags()[OWNER_TAG])["host"]
    dead_owner = json.dumps({"host": host, "pid": _dead_pid(), "started": 1.0})
    stage = _stage_run(uri, experiment_id, {OWNER_TAG: dead_owner})
    pipeline = StageRun(
        uri, experiment_id, "pipeline/p", None, {"secvec.kind": "pipeline", **owner_tags(), OWNER_TAG: dead_owner}
    ).run_id
    live = _stage_run(uri, experiment_id)  # owned by this process, which is working on it
    claims_module._HELD.add(live)
    left_behind = _stage_run(uri, experiment_id)  # owned by this process, which is not working on it
    elsewhere = _stage_run(
        uri,
        experiment_id,
        {OWNER_TAG: json.dumps({"host": "other-host", "pid": 1, "started": 1}), HEARTBEAT_TAG: f"{time.time():.1f}"},
    )
    marked = StageClaims(uri, experiment_id).sweep_stale()
    assert sorted(marked) == sorted([stage, pipeline, left_behind])
    client = MlflowClient(uri)
    for run_id in (stage, pipeline):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "driver process" in run.data.tags[FAILURE_TAG]
    assert "earlier pipeline of this driver process" in client.get_run(left_behind).data.tags[FAILURE_TAG]
    assert {r.info.run_id for r in _running(uri, experiment_id)} == {live, elsewhere}


def test_a_claim_from_another_host_expires_without_heartbeat(store, monkeypatch):
    uri, experiment_id = store
    monkeypatch.setenv("SECVEC_LEASE_SECONDS", "60")
    other = json.dumps({"host": "other-host", "pid": 1, "started": 1})
    old = _stage_run(uri, experiment_id, {OWNER_TAG: other, HEARTBEAT_TAG: f"{time.time() - 61:.1f}"})
    fresh = _stage_run(uri, experiment_id, {OWNER_TAG: other, HEARTBEAT_TAG: f"{time.time() - 30:.1f}"})
    assert StageClaims(uri, experiment_id).sweep_stale() == [old]
    assert "no heartbeat from its driver" in MlflowClient(uri).get_run(old).data.tags[FAILURE_TAG]
    assert [r.info.run_id for r in _running(uri, experiment_id)] == [fresh]


# -- aliases -----------------------------------------------------------------------------------------------
def test_an_alias_moved_by_another_run_after_we_looked_is_not_overwritten(store):
    uri, experiment_id = store
    registry = Registry(uri)
    versions = [registry.register("m", "finetuned", "file:///x", _stage_run(uri, experiment_id), {}) for _ in range(3)]
    registry.set_alias(versions[0])
    looked = registry.alias_target("m")
    registry.set_alias(versions[1])  # another run promotes in between
    with pytest.raises(AliasConflictError, match="another run moved m@champion from version 1 to version 2"):
        registry.set_alias(versions[2], expected=looked)
    assert registry.alias_target("m") == "2"
    registry.set_alias(versions[2], expected="2")
    assert registry.alias_target("m") == "3"


# -- scratch folders and orphaned Ray processes ----------------------------------------------------------
_KILLED_WITH_SCRATCH = """
import os, signal, sys
from workflows.leftovers import Scratch
scratch = Scratch("vec")
(scratch.path / "downloads").mkdir()
print(scratch.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_scratch_of_a_killed_worker_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WITH_SCRATCH], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    killed = Path(proc.stdout.strip())
    assert proc.returncode == -signal.SIGKILL and (killed / SCRATCH_LOCK).is_file()
    assert remove_stale_scratch() == [], "a fresh lock file may not be locked yet: left alone"
    old = time.time() - 60
    os.utime(killed / SCRATCH_LOCK, (old, old))
    live = Scratch("ft")
    os.utime(live.path / SCRATCH_LOCK, (old, old))
    unrelated = tmp_path / "secvec-wheel-abc"  # not scratch (no lock file): never touched
    unrelated.mkdir()
    assert remove_stale_scratch() == [killed]
    assert not killed.exists() and live.path.is_dir() and unrelated.is_dir()
    live.remove()
    assert not live.path.exists()


def test_processes_of_a_ray_session_whose_driver_died_are_ended(tmp_path):
    """Ray's agents outlive a SIGKILLed driver and ignore SIGTERM; a process that does the same stands in."""
    session = tmp_path / f"session_2026-11-30_20-03-01_997300_{_dead_pid()}"
    session.mkdir()
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\nsignal.signal(signal.SIGTERM, "
            "signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)",
            f"--session-dir={session}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    live_session = tmp_path / f"session_2026-11-30_20-03-02_1_{os.getpid()}"
    live_session.mkdir()
    bystander = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nprint('ready', flush=True)\ntime.sleep(600)",
            f"--session-dir={live_session}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stubborn.stdout.readline().strip() == "ready" and bystander.stdout.readline().strip() == "ready"
        assert end_orphaned_ray(str(tmp_path)) == [session.name]
        stubborn.wait(10)  # ended (psutil reaped it, so Popen cannot see by which signal)
        assert bystander.poll() is None, "a session whose driver is alive is left alone"
    finally:
        for proc in (stubborn, bystander):
            proc.kill()
            proc.wait()


# -- the one-line error on an MLflow outage --------------------------------------------------------------
def _spec_file(tmp_path: Path, tracking_uri: str, name: str = "conc", ft_steps: int = 4) -> Path:
    train = {"learning_rate": 3e-3, "max_steps": 4, "batch_size": 8, "max_length": 32, "log_every": 2}
    spec = {
        "name": name,
        "base_model": {"source": "builtin:tiny"},
        "tracking": {"tracking_uri": tracking_uri, "experiment": f"secvec-{name}", "base_name": "tiny"},
        "scaling": {"num_workers": 1, "checkpoint_every": 2},
        "work_dir": str(tmp_path / "work"),
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
                "training": {**train, "max_steps": ft_steps},
            },
            {
                "name": "ev",
                "kind": "evaluation",
                "candidate": {"stage": "ft"},
                "harmful_prompts": {"builtin": "toy-harmful-eval", "limit": 4},
                "task_data": {"builtin": "toy-facts"},
                "max_new_tokens": 2,
                "gate": {"max_harmful_rate": 1.0},
            },
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli_env(tmp_path: Path, **extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",
        "TMPDIR": str(tmp_path / "tmp"),
        "SECVEC_RAY_TEMP_DIR": f"/tmp/ray-secvec-i15b-{os.getpid()}",
        **extra,
    }


@pytest.mark.slow
def test_an_unreachable_server_prints_one_line_and_retries_only_with_verbose(tmp_path):
    from tests.e2e import free_port

    spec = _spec_file(tmp_path, f"http://127.0.0.1:{free_port()}")
    env = _cli_env(tmp_path, SECVEC_MLFLOW_RETRY_SECONDS="3")
    quiet = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "run", str(spec)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in quiet.stderr.splitlines() if ln.strip()]
    assert quiet.returncode == 1 and len(lines) == 1, quiet.stderr
    assert lines[0].startswith("error: MLflow at http://127.0.0.1:") and "did not answer" in lines[0]
    loud = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "run", str(spec), "--verbose"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loud.returncode == 1 and "Retrying" in loud.stderr, loud.stderr  # urllib3's retry warnings


# -- real processes (slow) -------------------------------------------------------------------------------
def _scratch_left(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("secvec-*-*") if (p / SCRATCH_LOCK).exists())


def _processes_mentioning(text: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(text in a for a in proc.info["cmdline"] or ()):
            found.append(proc.info["pid"])
    return found


def _versions_by_stage_hash(client: MlflowClient) -> dict[str, list[str]]:
    by_hash: dict[str, list[str]] = {}
    for mv in client.search_model_versions():
        by_hash.setdefault(mv.tags["secvec.stage_hash"], []).append(f"{mv.name}/{mv.version}")
    return by_hash


@pytest.mark.slow
def test_two_concurrent_runs_of_one_spec_leave_one_version_per_stage_hash(tmp_path):
    from tests.e2e import mlflow_server, postgres_database

    (tmp_path / "tmp").mkdir()
    with postgres_database("secvec_i15b") as db, mlflow_server(db, tmp_path / "artifacts") as (url, _):
        spec = _spec_file(tmp_path, url)
        env = _cli_env(tmp_path)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "workflows.cli", "run", str(spec)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outs = [proc.communicate(timeout=1200) for proc in procs]
        for proc, (out, err) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
        client = MlflowClient(url)
        by_hash = _versions_by_stage_hash(client)
        assert sorted(v for vs in by_hash.values() for v in vs) == [
            "tiny.finetuned.ft/1",
            "tiny.security-vector.harmful/1",
        ]
        assert all(len(vs) == 1 for vs in by_hash.values()), by_hash
        experiment = client.get_experiment_by_name("secvec-conc").experiment_id
        assert _running(url, experiment) == [], "no run may stay RUNNING"
        for stage in ("vec", "ft", "ev"):
            finished = client.search_runs([experiment], f"tags.`secvec.stage` = '{stage}'")
            assert [r.info.status for r in finished] == ["FINISHED"], f"stage {stage} ran more than once"
        assert Registry(url).alias_target("tiny.finetuned.ft") == "1"
        for out, _ in outs:  # both final tables state the registry's truth
            assert "champion" in out and "not champion" not in out, out
        assert _scratch_left(tmp_path / "tmp") == []


_WAIT_FOR_TRAINING = 900  # seconds; an event is awaited, not a speed asserted (busy CI machines)


@pytest.mark.slow
def test_a_killed_driver_leaves_nothing_running_after_the_next_run(tmp_path):
    import shutil

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec_file(tmp_path, uri, name="killed", ft_steps=400)
    env = _cli_env(tmp_path, SECVEC_RAY_TEMP_DIR=f"/tmp/ray-secvec-k{os.getpid()}")
    ray_dir = Path(env["SECVEC_RAY_TEMP_DIR"])
    with open(tmp_path / "driver.log", "w") as log:  # noqa: SIM115 - the child keeps writing to it
        driver = subprocess.Popen(
            [sys.executable, "-m", "workflows.cli", "run", str(spec)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _WAIT_FOR_TRAINING
        while not list(tmp.glob("secvec-ft-*")):  # the fine-tuning worker has started
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the fine-tuning stage did not start"
            time.sleep(0.2)
        driver.kill()  # SIGKILL: no finally, no atexit
        driver.wait()
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("secvec-killed").experiment_id
        left_running = {r.info.run_id for r in _running(uri, experiment)}
        assert len(left_running) == 2, "the pipeline run and the ft run were RUNNING when the driver died"
        killed_session = str(next(ray_dir.glob(f"session_*_{driver.pid}")))

        rerun = subprocess.run(
            [sys.executable, "-m", "workflows.cli", "run", str(spec)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert _running(uri, experiment) == [], "no run may stay RUNNING"
        for run_id in left_running:
            run = client.get_run(run_id)
            assert run.info.status == "FAILED"
            assert run.data.tags[FAILURE_TAG].startswith(f"abandoned: driver process {driver.pid} ")
        assert _scratch_left(tmp) == [], "scratch of the killed stage and of the rerun is removed"
        assert _processes_mentioning(killed_session) == [], "the killed driver's Ray processes are ended"
        assert _processes_mentioning(str(ray_dir)) == [], "the rerun's own Ray ended with it"
        by_hash = _versions_by_stage_hash(client)
        assert all(len(vs) == 1 for vs in by_hash.values()), by_hash
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _processes_mentioning(str(ray_dir)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_dir, ignore_errors=True)
