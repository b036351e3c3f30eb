"""Where a search's study lives, and how several workers share it.

A study is kept in any optuna storage: the default SQLite file in the output folder (one machine), a database
URL (PostgreSQL, MySQL: several machines) or `journal:FILE`, optuna's append-only journal on a shared file
system. Workers announce that they are alive with a heartbeat written into their running trial; a running trial
whose heartbeat stopped for `STALE_SECONDS` belongs to a dead worker and is marked failed, so that its grid point
runs again. (Optuna's own heartbeat covers database storages only; this one works the same for all three.)
Heartbeats are wall-clock times: machines sharing a study need clocks within a few seconds of each other (NTP).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from ..config import ConfigError

HEARTBEAT_SECONDS = 10.0  # how often a running trial says its worker is alive
STALE_SECONDS = 60.0  # silence after which a running trial's worker counts as dead
HEARTBEAT = "heartbeat"  # the trial's user attribute holding its last heartbeat (seconds since the epoch)
STORAGE_HELP = "postgresql://USER:PASSWORD@HOST/DB, mysql+pymysql://…, sqlite:///FILE or journal:FILE"


def check_storage(storage: str | None) -> None:
    """Refuse a `--storage` that cannot be one, before any work starts."""
    if storage is None:
        return
    if storage.startswith("journal:"):
        path = Path(storage[len("journal:"):]).expanduser()
        if not path.name or not path.parent.is_dir():
            raise ConfigError(f"--storage {storage}: the folder {path.parent} does not exist; name a journal file in "
                              "an existing (shared) folder")
    elif not re.match(r"^[a-z][a-z0-9+]*://", storage):
        raise ConfigError(f"--storage {shown(storage)}: not a storage URL; use {STORAGE_HELP}")


def open_storage(storage: str | None, out: Path):
    """`--storage` → what optuna.create_study takes; None → the SQLite file out/study.db."""
    if storage is None:
        return f"sqlite:///{out / 'study.db'}"
    check_storage(storage)
    if storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(Path(storage[len("journal:"):]).expanduser())))
    return storage


def shown(storage: str | None) -> str:
    """A storage for messages, its password hidden."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", storage) if storage else "study.db"


class Heartbeat:
    """While the block runs, writes the time into the trial every `HEARTBEAT_SECONDS` from a thread."""

    def __init__(self, trial):
        self.trial, self._stop = trial, threading.Event()
        self._thread = threading.Thread(target=self._beat, name="alnet-heartbeat", daemon=True)

    def __enter__(self):
        self.trial.set_user_attr(HEARTBEAT, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.trial.set_user_attr(HEARTBEAT, time.time())
            except Exception:  # the trial was finished elsewhere (given up as stale) or the storage is gone
                return


def fail_stale_trials(study, now: float | None = None) -> list[int]:
    """Mark running trials whose worker fell silent as failed; their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get(HEARTBEAT)
        if last is None and trial.datetime_start is not None:
            last = trial.datetime_start.timestamp()
        if last is not None and now - last > STALE_SECONDS:
            try:
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                failed.append(trial.number)
            except (UpdateFinishedTrialError, RuntimeError):  # finished (or failed) by another worker meanwhile
                pass
    return failed
