"""sha256 of image files' content, cached by where and what the file is (path, size, modification time, inode), so a
run's data fingerprint follows what the files hold, not when they were copied, and reads each file once per change.

The cache is a folder of small entries under the one cache root (`cache_dir.py`): an entry names its file's stat, so a
file changed since is hashed again; a cache that cannot be written only costs the next run a read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..utils.durable import sha256_of
from ..utils.write_policy import atomic_write_bytes
from .cache_dir import default_cache_dir

CACHE_FORMAT = "file-sha256-v1"


def content_digest(path: str | os.PathLike, cache_dir: Path | None = None) -> str:
    """The sha256 (hex) of the file at `path`, from the cache when the file is unchanged since it was hashed."""
    stat = os.stat(path)
    identity = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}".encode()
    key = hashlib.sha256(identity).hexdigest()
    entry = (cache_dir or default_cache_dir()) / CACHE_FORMAT / key[:2] / key
    try:
        cached = entry.read_text()
        if len(cached) == 64:
            return cached
    except (OSError, UnicodeDecodeError):
        pass
    digest = sha256_of(Path(path))
    try:
        atomic_write_bytes(entry, digest.encode(), durable=False)
    except OSError:
        pass
    return digest
