"""Nothing left behind: stage scratch folders and the processes of a local Ray that secvec started.

Scratch folders (``<tmp>/secvec-<stage>-*``) hold downloads, checkpoints before upload and the final artifact of
one stage on one worker. Each holds a lock file that its worker keeps locked (``flock``, released by the kernel
when the process dies, ``kill -9`` included): the worker removes its folder when the stage ends, and a folder
whose lock can be taken belongs to a dead worker and is removed by the next stage or driver on that host.

The embedded Ray runs under its own temp dir (``$SECVEC_RAY_TEMP_DIR``, default ``/tmp/ray-secvec-<uid>``), so its
sessions are known to be secvec's. Ray names each session ``session_<date>_<pid of the driver>``; the driver
shuts its Ray down at exit, and a later driver ends the processes of sessions whose driver is gone (Ray's
dashboard and runtime-env agents survive a ``kill -9`` of the driver and ignore SIGTERM).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SCRATCH_LOCK = ".secvec-scratch.lock"
RAY_TEMP_ENV = "SECVEC_RAY_TEMP_DIR"
_SESSION = re.compile(r"^session_\d{4}-\d{2}-\d{2}_[\d-]+_\d+_(?P<pid>\d+)$")


# -- scratch folders -----------------------------------------------------------------------------------------
class Scratch:
    """A stage's scratch folder, locked for the lifetime of this process (or until :meth:`remove`)."""

    def __init__(self, stage_name: str):
        from filelock import FileLock

        self.path = Path(tempfile.mkdtemp(prefix=f"secvec-{stage_name}-"))
        self._lock = FileLock(str(self.path / SCRATCH_LOCK), timeout=0)
        self._lock.acquire()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(Exception):
            self._lock.release()


def remove_stale_scratch(root: str | Path | None = None, min_age_s: float = 2.0) -> list[Path]:
    """Remove scratch folders under ``root`` (default: the temp dir) whose worker is gone; returns them.
    Folders without the lock file are not secvec's scratch and are left alone, and so are lock files younger
    than ``min_age_s`` (a worker may have created the file and not yet locked it)."""
    from filelock import FileLock, Timeout

    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob("secvec-*-*"):
        lock_file = folder / SCRATCH_LOCK
        try:
            if time.time() - lock_file.stat().st_mtime < min_age_s:
                continue
        except OSError:
            continue  # no lock file: not scratch, or removed meanwhile
        lock = FileLock(str(lock_file), timeout=0)
        try:
            lock.acquire()
        except (Timeout, OSError):
            continue  # a live worker holds it
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            with contextlib.suppress(Exception):
                lock.release()
    if removed:
        logger.info("removed %d scratch folder(s) of stages that were killed", len(removed))
    return removed


# -- the embedded Ray ----------------------------------------------------------------------------------------
def ray_temp_dir() -> str:
    """Where the embedded Ray keeps its sessions (a short path: Ray's unix sockets live under it)."""
    return os.environ.get(RAY_TEMP_ENV) or f"/tmp/ray-secvec-{os.getuid()}"


def _processes_mentioning(paths: list[str]) -> dict[str, list]:
    """One scan of the process table: path -> processes (not this one) whose command line mentions it."""
    import psutil

    found: dict[str, list] = {path: [] for path in paths}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid == os.getpid():
                continue
            args = proc.info["cmdline"] or ()
            for path in paths:
                if any(path in arg for arg in args):
                    found[path].append(proc)
                    break
    return found


def _session_processes(session_dir: str) -> list:
    return _processes_mentioning([session_dir])[session_dir]


def end_processes(procs: list, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL for whatever ignores it (Ray's agents do)."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_dir_of(pid: int, temp_dir: str | None = None) -> str | None:
    """The newest Ray session under the temp dir that process ``pid`` started (Ray puts the pid in the name)."""
    sessions = [s for s in Path(temp_dir or ray_temp_dir()).glob(f"session_*_{pid}") if _SESSION.match(s.name)]
    return str(max(sessions, key=lambda s: s.stat().st_mtime)) if sessions else None


def end_orphaned_ray(temp_dir: str | None = None) -> list[str]:
    """End the processes of embedded-Ray sessions whose driver process is gone; returns those sessions."""
    import psutil

    root = Path(temp_dir or ray_temp_dir())
    dead = []
    for session in sorted(root.glob("session_*")) if root.is_dir() else []:
        match = _SESSION.match(session.name)
        if match and not session.is_symlink() and not psutil.pid_exists(int(match["pid"])):
            dead.append(str(session))
    orphaned = []
    for session, procs in _processes_mentioning(dead).items() if dead else ():
        if procs:
            logger.info("ending %d process(es) of Ray session %s (its driver is gone)", len(procs), session)
            end_processes(procs)
            orphaned.append(Path(session).name)
    return orphaned


_registered = threading.Lock()
_session_dirs: list[str] = []


def shut_down_ray_at_exit(session_dir: str) -> None:
    """Make sure the local Ray this driver started ends with it, agents included: ``ray.shutdown`` at exit
    (atexit runs on a normal exit, on Ctrl-C, and on SIGTERM and SIGHUP, which become ``SystemExit`` here), then
    any process of the session that is still there."""
    with _registered:
        first = not _session_dirs
        _session_dirs.append(session_dir)
    if not first:
        return
    atexit.register(_shutdown)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _exit_on_signal)


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _shutdown() -> None:
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
    deadline = time.monotonic() + 5
    for session_dir in _session_dirs:
        procs = _session_processes(session_dir)
        while procs and time.monotonic() < deadline:  # ray.shutdown may still be stopping them
            time.sleep(0.2)
            procs = [p for p in procs if _alive(p)]
        if procs:
            end_processes(procs)
