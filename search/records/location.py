"""Locations as the records spell them: a folder's absolute path, or a URI (s3://bucket/prefix?options).

Pure string arithmetic, standard library only: the study's config builds its folders with it, the
stores tell a folder from a bucket with it. Opening a location (pyarrow) is search.study.storage's.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")
"""A scheme and '://'; two letters at least, so that a Windows drive (C:/...) stays a folder."""


def is_uri(storage: str) -> bool:
    return URI.match(storage) is not None


def join(location: str, *names: str) -> str:
    """A location inside `location`: a folder's path joined, or a URI's path extended (its options kept at the end)."""
    if not is_uri(location):
        return str(Path(location, *names))
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path="/".join([parts.path.rstrip("/"), *names])))
