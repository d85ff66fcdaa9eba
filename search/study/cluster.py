"""Joining a running Ray cluster (--address): its address, and the token authentication this driver joins it with.

A Ray 2.60 cluster authenticates by token if its head was started so (RAY_AUTH_MODE=token, or
a token in the head's ~/.ray/auth_token); `ray start --head` with Ray's defaults on a machine
with no token runs with authentication off. A driver with a token (its own ~/.ray/auth_token,
the file RAY_AUTH_TOKEN_PATH names, or RAY_AUTH_TOKEN) sends it, and joins either kind; one
without joins a cluster whose authentication is off. A cluster that refuses the driver's token,
or its lack of one, is answered by one line once Ray has asked it.

Standard library only.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

ADDRESS_ENV = "RAY_ADDRESS"
TOKEN_ENV, TOKEN_PATH_ENV, AUTH_MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"


def ray_address(given: str | None) -> str | None:
    """--address, else RAY_ADDRESS (as Ray reads it), else None: a private local Ray."""
    return given or os.environ.get(ADDRESS_ENV) or None


def token_file() -> Path:
    return Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")


def token_available() -> bool:
    return bool(os.environ.get(TOKEN_ENV, "").strip()) or token_file().is_file()


def auth_environment(address: str | None) -> dict[str, str]:
    """RAY_AUTH_MODE for this process, set before Ray is imported (Ray reads it then).

    A private local Ray: token authentication on, Ray's default for a new local Ray, said explicitly
    (Ray then starts without a warning about it; its token is made in ~/.ray/auth_token if missing).
    A cluster: token where this machine has one, else off. Token mode without a token would make Ray
    refuse at once, without asking a cluster that may not want one; Ray never turns it on by itself
    for an explicit address.
    """
    if address is None or token_available():
        return {AUTH_MODE_ENV: "token"}
    return {AUTH_MODE_ENV: "disabled"}


def token_refused(address: str) -> str:
    """The one line for a cluster that refused this driver: no token here, another mode set, or another token."""
    fix = (
        f"copy ~/.ray/auth_token from the head node to {token_file()} (or set {TOKEN_ENV}; `ray get-auth-token` "
        f"on the head prints it)"
    )
    if not token_available():
        return f"--address {address}: the Ray cluster asks for its auth token and this machine has none: {fix}"
    mode = os.environ.get(AUTH_MODE_ENV, "token")
    if mode != "token":
        return (
            f"--address {address}: the Ray cluster asks for its auth token and {AUTH_MODE_ENV}={mode} here sends "
            f"none: unset {AUTH_MODE_ENV}"
        )
    return f"--address {address}: the Ray cluster refused this machine's auth token (another cluster's?): {fix}"


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
