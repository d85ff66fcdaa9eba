"""Joining a running Ray cluster (--address): its address and its token, checked before anything heavy loads.

Ray 2.60 clusters authenticate by token: a driver that joins one needs the head's token
(`~/.ray/auth_token` there), in its own ~/.ray/auth_token, in the file RAY_AUTH_TOKEN_PATH
names, or in RAY_AUTH_TOKEN. Without it, Ray's own error is a paragraph; here it is one line.

Standard library only.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from search.errors import UsageError

ADDRESS_ENV = "RAY_ADDRESS"
TOKEN_ENV, TOKEN_PATH_ENV, AUTH_MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"


def ray_address(given: str | None) -> str | None:
    """--address, else RAY_ADDRESS (as Ray reads it), else None: a private local Ray."""
    return given or os.environ.get(ADDRESS_ENV) or None


def token_file() -> Path:
    return Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")


def token_available() -> bool:
    return bool(os.environ.get(TOKEN_ENV, "").strip()) or token_file().is_file()


def missing_token(address: str) -> str:
    return (
        f"--address {address}: the Ray cluster asks for its auth token and this machine has none: copy "
        f"~/.ray/auth_token from the head node to {token_file()} (or set {TOKEN_ENV}; `ray get-auth-token` "
        f"on the head prints it)"
    )


def check_cluster(address: str | None) -> None:
    """A cluster to join needs its token here, unless token authentication was turned off (RAY_AUTH_MODE)."""
    if address and os.environ.get(AUTH_MODE_ENV, "token") == "token" and not token_available():
        raise UsageError(missing_token(address))


class ClusterWatch:
    """Calls `on_lost` (in a thread of its own) once the cluster's head stops taking connections.

    A driver whose head dies would otherwise wait in Ray for a minute and then be ended by
    Ray's own C++ code, with no chance to close the study's record or say how to resume.
    A head that refuses connections for LOST_AFTER_S seconds on end counts as gone.
    """

    POLL_S = 2.0
    LOST_AFTER_S = 10.0

    def __init__(self, gcs_address: str, on_lost: Callable[[], None]):
        host, _, port = gcs_address.rpartition(":")
        self._head, self._on_lost = (host, int(port)), on_lost
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cluster-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        unanswered = 0.0
        while not self._stopped.wait(self.POLL_S):
            unanswered = 0.0 if self._answers() else unanswered + self.POLL_S
            if unanswered >= self.LOST_AFTER_S:
                self._on_lost()
                return

    def _answers(self) -> bool:
        try:
            with socket.create_connection(self._head, timeout=self.POLL_S):
                return True
        except OSError:
            return False
