"""Open the Optuna storage that a study lives in: a file beside mlflow.db, any SQLAlchemy URL, or a journal file.

RDB storages (SQLite, PostgreSQL, MySQL) get Optuna's heartbeat: a trial whose worker stops
beating is failed after the grace period and retried by RetryHeartbeatStaleTrialCallback, and the
retry resumes from the run's checkpoint. Journal files have no heartbeat in Optuna.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse, urlunparse

from liquid_diffusion.config import ConfigError

if TYPE_CHECKING:  # optuna itself is imported where a storage is opened, so that --help stays fast
    import optuna

HEARTBEAT_SECONDS = 60
CREATE_ATTEMPTS = 5
JOURNAL_PREFIX = "journal:"


def default_storage_url(tracking_uri: str) -> str:
    """optuna.db beside a sqlite mlflow.db; in the working directory for any other tracking store."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        return f"sqlite:///{folder / 'optuna.db'}"
    return "sqlite:///optuna.db"


def redact(url: str) -> str:
    """The URL without its password, for tags and messages."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
        return urlunparse(parsed._replace(netloc=netloc))
    return url


def open_storage(url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS):
    """An Optuna storage for `url`; ConfigError, naming the URL, when it cannot be opened."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    if url.startswith(JOURNAL_PREFIX) or url.endswith((".log", ".journal")):
        path = Path(url.removeprefix(JOURNAL_PREFIX)).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"--storage {url}: folder {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(
            f"--storage {url!r} is not valid; expected an SQLAlchemy URL (sqlite:///optuna.db, "
            f"postgresql://user:password@host/db) or a journal file (journal:PATH or PATH.log)"
        )
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is marked experimental
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=2 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                    # SQLite: wait for another worker's write lock instead of failing at once
                    engine_kwargs={"connect_args": {"timeout": 60}}
                    if url.startswith("sqlite")
                    else {"pool_pre_ping": True},
                )
        except (IntegrityError, ProgrammingError, OperationalError) as err:
            # Commands started at the same instant on a fresh storage all create its tables; the
            # losers hit the winner's rows (alembic_version) or tables. By the next try they exist.
            racing = not isinstance(err, OperationalError) or "already exists" in str(err) or "locked" in str(err)
            if not racing or attempt + 1 == CREATE_ATTEMPTS:
                raise ConfigError(f"--storage {redact(url)}: cannot open it ({one_line_reason(err)})") from None
            time.sleep(0.2 + random.random())
        except Exception as err:  # SQLAlchemy and its drivers raise many kinds: name it and move on
            raise ConfigError(f"--storage {redact(url)}: cannot open it ({one_line_reason(err)})") from None


def one_line_reason(err: Exception) -> str:
    """`Type: first line of the message`, for one-line errors about a store that cannot be opened."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {detail[:200]}"


def has_heartbeat(storage) -> bool:
    return bool(getattr(storage, "get_heartbeat_interval", lambda: None)())


# Optuna's public API has no accessor for these two; the driver needs them because it claims queued
# trials itself, through the storage's compare-and-set on a trial's state (see Driver.claim), and beats
# the heartbeat itself (study.optimize would do both, but cannot hand a worker one given queued trial).
# They are the only reach-ins into Optuna's private attributes.


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study lives in."""
    return study._storage


def trial_id_of(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The id by which the storage knows a trial (its `number` counts within the study only)."""
    return trial._trial_id
