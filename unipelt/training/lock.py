"""One process per run: an exclusive lock file in the run folder."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..plan import RunInProgress


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on `<run_dir>/.lock` for the run's lifetime (released by the OS if the process dies), so
    two processes never train the same run into the same folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    handle = open(path, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise RunInProgress(
                f"run {run_dir.name} is already running in another process (pid {owner}, lock {str(path)!r}); "
                "wait for it, or if two jobs of one sweep share this run id, tell them apart with output.tag=<name>"
            ) from None
        except OSError:  # pragma: no cover - a file system without locks
            pass
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        # Temp files of atomic writes interrupted by a kill: never read, safe to drop while holding the lock.
        for folder in (run_dir, run_dir / "checkpoint", run_dir / "modules"):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)
        yield
    finally:
        handle.close()
