"""Where a study's trials are: --storage-path as Ray Tune takes it, a folder (local, or shared by every node) or a URI.

Ray Tune reads and writes its storage through pyarrow's filesystems (`FileSystem.from_uri`,
as ray.train's get_fs_and_path does); so does everything here that the driver keeps beside
the trials (study.yaml, best/) or looks for there (a taken name, --resume's trial state). A
folder is taken as its absolute path; a URI (s3://bucket/prefix, gs://..., with pyarrow's
options after a '?', e.g. ?endpoint_override=HOST:PORT&scheme=http) as given.

An S3-compatible endpoint comes from AWS_ENDPOINT_URL (or the URI's endpoint_override), the
credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the region from
AWS_DEFAULT_REGION: pyarrow reads them, in this process and in every trial's. A private
local Ray's trials inherit this process's environment; on a cluster each node needs them.

Standard library only until a filesystem is opened (pyarrow then). A location's pure arithmetic (is it a URI,
what is inside it) is search.records.location's, which the study's config builds its folders with.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit, urlunsplit

from search.errors import UsageError, one_line
from search.records.location import is_uri, join

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

SECRET_OPTIONS = ("access_key", "secret_key", "session_token")
"""Options pyarrow would take in the URI that are secrets; the storage path is printed and recorded with the study."""
TIMEOUT_S = 3
"""Connect and read timeouts of the checks' requests to S3 (one retry), and GCS's time for retries: pyarrow's
defaults retry a storage that does not answer for minutes. The study's own requests, and Ray's, keep them."""
NETWORK_ERRORS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't resolve", "Timeout was reached")
AWS_ERROR = re.compile(r"AWS Error (\w+)")
"""The error code in pyarrow's message about a failed S3 request ("AWS Error ACCESS_DENIED during ...")."""
CREDENTIAL_ERRORS = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "HTTP status 403",
    "EXPIRED_TOKEN",
    "No credentials",
)


def resolved(storage_path: str) -> str:
    """A --storage-path as the study records it: a folder (or file:// URI) as its absolute path, a URI as given."""
    if not is_uri(storage_path):
        return str(Path(storage_path).expanduser().resolve())
    parts = urlsplit(storage_path)
    if parts.scheme == "file":
        return str(Path(parts.path).resolve())
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def split(location: str) -> tuple[str, str]:
    """The location's folder and last name: Ray Tune's storage_path and name for an experiment there."""
    if not is_uri(location):
        path = Path(location)
        return str(path.parent), path.name
    parts = urlsplit(location)
    folder, _, name = parts.path.rstrip("/").rpartition("/")
    return urlunsplit(parts._replace(path=folder)), name


# ---------------------------------------------------------------- through pyarrow


def filesystem(location: str, quick: bool = False) -> tuple[FileSystem, str]:
    """pyarrow's filesystem and path of a location, as Ray opens it; quick: S3 and GCS give up within seconds
    (TIMEOUT_S), for the checks before a study; the study's own writes are as patient as Ray's."""
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), location
    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    if not quick:
        return fs, path
    options = fs.__reduce__()[1][0] if fs.type_name in ("s3", "gcs") else {}  # what from_uri resolved, as pickled
    if isinstance(fs, pyarrow.fs.S3FileSystem):
        retry = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=2)
        fs = pyarrow.fs.S3FileSystem(
            **{**options, "connect_timeout": TIMEOUT_S, "request_timeout": TIMEOUT_S, "retry_strategy": retry}
        )
    elif isinstance(fs, pyarrow.fs.GcsFileSystem):
        fs = pyarrow.fs.GcsFileSystem(**{**options, "retry_time_limit": timedelta(seconds=TIMEOUT_S)})
    return fs, path


def exists(storage: str, *names: str) -> bool:
    """Whether something is at `names` under the storage (an S3 prefix counts); a storage that cannot be read
    is a one-line UsageError."""
    if not is_uri(storage):
        return Path(join(storage, *names)).exists()
    from pyarrow.fs import FileType

    fs = None
    try:
        fs, path = filesystem(join(storage, *names), quick=True)
        return fs.get_file_info(path).type != FileType.NotFound
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid (a bad URI) is a ValueError
        raise UsageError(storage_problem(storage, error, fs)) from None


def write_text(text: str, storage: str, *names: str) -> None:
    fs, path = filesystem(join(storage, *names))
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(storage: str, *names: str) -> str:
    fs, path = filesystem(join(storage, *names))
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def upload(folder: Path, storage: str, *names: str) -> None:
    """A local folder's files copied to `names` under the storage, as Ray copies a checkpoint."""
    import pyarrow.fs

    fs, path = filesystem(join(storage, *names))
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(folder), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


@contextmanager
def staged(storage: str, *names: str) -> Iterator[Path]:
    """A local folder whose files end up at `names` under the storage: that folder itself where the storage is a
    folder; else a temporary one, uploaded when the block ends without an error (nothing if it stayed empty)."""
    if not is_uri(storage):
        yield Path(join(storage, *names))
        return
    with tempfile.TemporaryDirectory(prefix="storage-") as folder:
        yield Path(folder)
        if any(Path(folder).iterdir()):
            upload(Path(folder), storage, *names)


# ---------------------------------------------------------------- the check before anything is written


def check_storage(storage: str) -> None:
    """Refuse, in one line and within seconds, a URI the study could not keep its trials in: an unknown scheme,
    secrets in the URI, an endpoint that does not answer, a missing bucket, credentials refused. Writes and
    deletes one empty object to be sure. A folder passes: Ray creates it."""
    if not is_uri(storage):
        return
    secrets = [key for key in parse_qs(urlsplit(storage).query) if key in SECRET_OPTIONS]
    if secrets:
        raise UsageError(
            f"--storage-path: keep {' and '.join(secrets)} out of the URI, which is printed and recorded with the "
            f"study; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment instead"
        )
    import pyarrow.fs

    fs = None
    try:
        fs, path = filesystem(storage, quick=True)
        bucket = path.split("/")[0]
        if isinstance(fs, pyarrow.fs.S3FileSystem) and fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise UsageError(
                f"--storage-path {storage}: bucket {bucket!r} does not exist at {endpoint(fs)}: create it "
                f"(e.g. aws s3 mb s3://{bucket}), or name one that exists"
            )
        probe = f"{path}/.storage-check-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)
    except (OSError, ValueError) as error:
        raise UsageError(storage_problem(storage, error, fs)) from None


def storage_problem(storage: str, error: BaseException, fs: FileSystem | None = None) -> str:
    """pyarrow's error about the storage as one line: what is wrong and what to do."""
    where, text = f"--storage-path {storage}", one_line(error)
    if fs is None:  # the URI itself did not open
        if "Unrecognized filesystem type" in text:
            scheme = urlsplit(storage).scheme
            return (
                f"{where}: pyarrow (which Ray Tune stores trials through) knows no {scheme}:// storage; give a "
                f"folder, or a URI such as s3://bucket/prefix (gs://, hdfs://, abfs:// work too)"
            )
        if "not found" in text.lower() or "NoSuchBucket" in text:  # AWS S3 proper, asked for the bucket's region
            return f"{where}: {text}: create the bucket, or name one that exists"
    at = endpoint(fs) if fs is not None or not storage.startswith("s3://") else "AWS S3"
    code = AWS_ERROR.search(text)
    if any(mark in text for mark in NETWORK_ERRORS):
        return (
            f"{where}: no storage answers at {at} ({text.rpartition('Details: ')[2]}): start it, or point "
            f"AWS_ENDPOINT_URL (or the URI's ?endpoint_override=HOST:PORT) at one that does"
        )
    if any(mark in text for mark in CREDENTIAL_ERRORS):
        unset = "" if os.environ.get("AWS_ACCESS_KEY_ID") else "; AWS_ACCESS_KEY_ID is not set"
        return (
            f"{where}: {at} refused this machine's credentials ({code.group(1) if code else text}{unset}): set "
            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION) to a key that may write there"
        )
    if code and code.group(1) == "NO_SUCH_BUCKET":
        return f"{where}: its bucket does not exist at {at}: create it, or name one that exists"
    return f"{where}: cannot be read or written ({text}): check the URI, and that this machine may write there"


def endpoint(fs: FileSystem | None) -> str:
    """Where a filesystem sends its requests, for a message: an S3 endpoint given, else AWS S3."""
    if fs is None or fs.type_name != "s3":
        return "the storage"
    return fs.__reduce__()[1][0].get("endpoint_override") or "AWS S3"
