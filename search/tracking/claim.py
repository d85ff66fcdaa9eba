"""A study's name, claimed by the one process that runs it, for as long as it runs.

Two `run.py --name X` started together would otherwise both pass the "name taken" checks and
then share one MLflow name, one Optuna study and one Ray experiment folder (two `--resume` of
one study likewise). The claim is an OS file lock (flock) on `.X.claim` in each local folder the
study writes to: the SQLite MLflow store's, a SQLite Optuna database's, a folder --storage-path.
run.py takes it before the name checks and holds it until it exits. The kernel drops a lock
however its process ends, kill -9 included, so no claim outlives its holder: a claim file that a
killed process left behind is simply taken over.

Stores shared across machines (an MLflow server, a database URL, a bucket) hold no lock file.
There the Optuna database's unique study name is a new study's claim, taken just before its MLflow
run opens (study_run.claim_optuna_study); two `--resume` of one study on two machines are not
caught.

Standard library only: run.py claims the name before MLflow, torch or Ray load.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from search.errors import UsageError
from search.records.location import is_uri
from search.records.study_config import StudyConfig
from search.tracking.schema import sqlite_path

CLAIM_SUFFIX = ".claim"
"""The lock file of study X in a store's folder: `.X.claim`, holding its holder's pid and host."""
HOLDER_READ_TRIES = 10
"""How often a refused claimer reads the holder's pid before it gives up naming it (50 ms apart)."""


class StudyTaken(Exception):
    """Another process holds the claim; args[0] names it (\"pid N\", \"pid N on HOST\" or \"\")."""


def being_run(name: str, holder: str, resuming: bool = False) -> str:
    """The one line that refuses a study someone else is running."""
    who = f" ({holder})" if holder else ""
    advice = "wait for it to end" if resuming else "wait for it, or choose another --name"
    return f"study {name} is being run by another process{who}: {advice}"


def name_taken(name: str, where: str) -> str:
    """The one line that refuses a new study whose name a finished (or interrupted) study has `where`."""
    return f"a study named {name!r} exists already {where}: continue it with --resume, or choose another --name"


class StudyClaim:
    """The locks on a study's name, one per local folder; release() (or the process's end) gives them back.

    A context manager: `with claim_study(config): ...` holds the name for the block.
    """

    def __init__(self, name: str, locks: list[tuple[Path, int]], created: list[Path]):
        self.name = name
        self._locks = locks
        """(lock file, its open descriptor) for each folder claimed."""
        self._created = created
        """Folders made only to hold a lock file, deepest first: removed again on release where still empty."""

    def release(self) -> None:
        """Unlink each lock file while still holding it (a process waiting on the old file then sees it gone and
        starts over), close it, and remove the folders made for it if nothing else came to live there."""
        while self._locks:
            path, descriptor = self._locks.pop()
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(descriptor)
        for folder in self._created:
            with contextlib.suppress(OSError):  # not empty: the study wrote there, or another claim did
                folder.rmdir()
        self._created.clear()

    def __enter__(self) -> StudyClaim:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def claim_folders(config: StudyConfig) -> list[Path]:
    """The local folders the study writes to, each once, in one order for every process (two claimers then meet
    at the same first folder, and one of them wins)."""
    folders = {Path(config.storage_path)} if not is_uri(config.storage_path) else set()
    for uri in (config.tracking_uri, config.optuna_storage):
        if uri and uri.startswith("sqlite:///"):
            folders.add(sqlite_path(uri).parent)
    return sorted({folder.expanduser().resolve() for folder in folders})


def claim_study(config: StudyConfig, resuming: bool = False) -> StudyClaim:
    """Claim the study's name in every local folder it writes to, or raise a one-line UsageError naming the process
    that holds it. A folder that cannot be made or written is passed over: the store checks that follow refuse it
    in their own words."""
    return claim_name(config.name, claim_folders(config), resuming)


def claim_name(name: str, folders: list[Path], resuming: bool = False) -> StudyClaim:
    """claim_study for a name and its folders."""
    locks: list[tuple[Path, int]] = []
    created: list[Path] = []
    claim = StudyClaim(name, locks, created)  # fills as it goes: released whole if a folder is taken
    try:
        for folder in folders:
            made = made_folders(folder)
            if made is None:
                continue
            created[:0] = made  # deepest first overall: a later folder may sit inside an earlier one
            path = folder / f".{name}{CLAIM_SUFFIX}"
            descriptor = locked(path)
            if descriptor is not None:
                locks.append((path, descriptor))
    except StudyTaken as taken:
        claim.release()
        raise UsageError(being_run(name, str(taken), resuming)) from None
    except BaseException:
        claim.release()
        raise
    return claim


def made_folders(folder: Path) -> list[Path] | None:
    """Make the folder where missing: the folders made, deepest first; None where it cannot be made."""
    missing = []
    parent = folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return missing


def locked(path: Path) -> int | None:
    """An open descriptor holding the lock on `path`; StudyTaken where another process holds it; None where the
    file cannot be opened here (a read-only folder)."""
    while True:
        try:
            descriptor = open_lock_file(path)
        except FileNotFoundError:  # a claim of another name removed the folder it had made: make it again
            if made_folders(path.parent) is None:
                return None
            continue
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(descriptor)
            os.close(descriptor)
            raise StudyTaken(holder) from None
        except OSError:  # a filesystem without locks (some network mounts): no claim can live there
            os.close(descriptor)
            return None
        if same_file(descriptor, path):
            write_holder(descriptor)
            return descriptor
        os.close(descriptor)  # the holder released it and unlinked it meanwhile: lock the file there now


def open_lock_file(path: Path) -> int:
    """The lock file opened for writing, created if missing; read-only where another user's file allows no more
    (flock needs no write access)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def same_file(descriptor: int, path: Path) -> bool:
    """Whether `path` still names the file the descriptor has open."""
    try:
        named, held = path.stat(), os.fstat(descriptor)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def write_holder(descriptor: int) -> None:
    """This process's pid and host, for the line that refuses the next claimer."""
    with contextlib.suppress(OSError):  # a read-only descriptor: the lock holds all the same
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def holder_of(descriptor: int) -> str:
    """\"pid N\" (\"pid N on HOST\" for another machine's), from the lock file; \"\" where it says nothing.

    The holder writes its pid just after it locks: until then the file is empty, or still names a killed
    holder's pid, and is read again."""
    for _ in range(HOLDER_READ_TRIES):
        words = os.pread(descriptor, 300, 0).decode(errors="replace").split()
        pid, host = [*words, "", ""][:2]
        elsewhere = host != socket.gethostname()  # a folder that machines share: its pid cannot be checked here
        if pid.isdigit() and (elsewhere or alive(int(pid))):
            return f"pid {pid}" + (f" on {host}" if elsewhere else "")
        time.sleep(0.05)
    return ""


def alive(pid: int) -> bool:
    """Whether a process of this machine has that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
