"""Patient ids as salted hashes: the only form in which a patient id leaves memory.

A patient id (a manifest's `group`, a DICOM file's PatientID) splits the data in memory, raw,
so that the same data and seed cut the same split on every machine. Whatever writes one down
(split.json, a warning, an error message) writes `patient_hash(id, patient_salt())` instead:
'p-' and 16 hex digits of HMAC-SHA256, keyed by a secret of the machine. Without the salt a
hash cannot be turned back into an id by trying likely ones (record numbers, names and birth
dates are few); with it the same patient gets the same hash in every study on the machine, so
a later final.py or a colleague holding the same salt can compare them.

The salt is never written to any store: it is HPO_PATIENT_SALT where that is set, else a file
made once, readable by its owner only, at $XDG_CONFIG_HOME/hpo-classifiers/patient-salt
(~/.config/... without XDG_CONFIG_HOME). This module lives in trainables/ because the indexers
(trainables.manifest, the DICOM reader) name patients in their refusals, and search/ may import
trainables/ while trainables/ may not import search/.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from trainables.data import DataError, Sample

SALT_ENV = "HPO_PATIENT_SALT"
"""A salt given by the environment: a colleague's, to get the same hashes as on their machine."""
SALT_FILE = Path("hpo-classifiers") / "patient-salt"
"""The machine's salt, under the user's configuration folder."""
HASH_PREFIX = "p-"
HASH_DIGITS = 16
"""Hex digits kept: 64 bits, no collision in practice among a study's thousands of patients."""


class SaltError(DataError):
    """The salt cannot be read or made. A DataError: every indexer's refusal path (one line, exit 2) carries it,
    and the indexers ask for the salt before anything is written."""


def patient_hash(patient_id: str, salt: bytes) -> str:
    """'p-' and 16 hex digits of HMAC-SHA256(salt, id): the same id and salt give the same hash."""
    digest = hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest[:HASH_DIGITS]


def patient_hashes(patient_ids: list[str] | set[str], salt: bytes) -> list[str]:
    """Each id's hash, sorted (by hash: an order of the raw ids would tell something of them)."""
    return sorted(patient_hash(patient_id, salt) for patient_id in patient_ids)


def salt_path() -> Path:
    """$XDG_CONFIG_HOME/hpo-classifiers/patient-salt, or ~/.config/hpo-classifiers/patient-salt."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / SALT_FILE


def patient_salt() -> bytes:
    """The machine's salt: HPO_PATIENT_SALT where set, else the salt file (made on first use), either stripped of
    surrounding blanks. A SaltError (one line) where the variable is empty or the file cannot be read or made."""
    given = os.environ.get(SALT_ENV)
    if given is not None:  # stripped, as the file is: a pasted salt's stray space or newline changes no hash
        if not given.strip():
            raise SaltError(
                f"{SALT_ENV} is set but empty: set it to the salt that hashes patient ids (a colleague's, to match "
                f"their hashes), or unset it to use {salt_path()}"
            )
        return given.strip().encode("utf-8")
    path = salt_path()
    try:
        if not path.is_file():
            made_once(path)
        salt = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise SaltError(
            f"the salt that hashes patient ids cannot be read or made at {path} ({reason}): make its folder "
            f"writable, or set {SALT_ENV}"
        ) from None
    if not salt:
        raise SaltError(
            f"the salt file {path} is empty: put back the salt it held (hashes made with another salt do not "
            f"match this machine's earlier ones), or delete the file to have a new one made"
        )
    return salt.encode("utf-8")


def made_once(path: Path) -> None:
    """A new random salt at `path`, readable by its owner only. Written to a file of its own, then linked into
    place: a process that made one at the same moment keeps its own, and both read the one that is there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(secrets.token_hex(32) + "\n")
        with contextlib.suppress(FileExistsError):  # another process made one first: both use that one
            os.link(draft, path)  # never replaces a salt that is there: its hashes are in stores already
    finally:
        draft.unlink(missing_ok=True)


SHORTEST_ID_SOUGHT = 3
"""Patient ids shorter than this ('1', '42') match too many paths by chance to be worth a warning."""


def paths_naming_their_patient(samples: Iterable[Sample]) -> list[str]:
    """The keys (paths) that contain their own patient's id, sorted. Paths are recorded as given (split.json, the
    results' predictions), so such a path carries the id into the stores that only ever see its hash."""
    return sorted(
        sample.key
        for sample in samples
        if sample.group is not None and len(sample.group) >= SHORTEST_ID_SOUGHT and sample.group in sample.key
    )
