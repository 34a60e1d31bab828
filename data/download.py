"""Checksummed downloads that never leave a half-written or unverified file behind.

`download(url, dest, md5=... or sha256=...)` streams into a temporary file in the destination's
directory, hashes while it writes, and publishes the file under its final name only after the
checksum matches. A mismatch deletes the temporary file and raises a UserError naming the file
and both checksums. An existing file at `dest` is never overwritten: if it has the expected
checksum it is kept and nothing is fetched; if not, the user is told to delete it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request

from utils.errors import UserError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


def file_digest(path: str, algorithm: str) -> str:
    """Hex digest of a file's bytes with hashlib's `algorithm` ("md5", "sha256", ...)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected(md5: str | None, sha256: str | None) -> tuple[str, str] | None:
    if md5 is not None and sha256 is not None:
        raise ValueError("give md5 or sha256, not both")
    if md5 is not None:
        return "md5", md5.lower()
    if sha256 is not None:
        return "sha256", sha256.lower()
    return None


def publish(tmp_path: str, dest_path: str) -> bool:
    """Give `tmp_path` the name `dest_path` without ever replacing an existing file.

    Uses a hard link (atomic, fails if the name exists) and falls back to a rename checked
    just before, for file systems without hard links. The temporary name is removed either
    way. Returns True if the file was published, False if `dest_path` already existed.
    """
    try:
        os.link(tmp_path, dest_path)
        published = True
    except FileExistsError:
        published = False
    except OSError:  # no hard links here (some network / FAT file systems)
        if os.path.exists(dest_path):
            published = False
        else:
            os.replace(tmp_path, dest_path)
            return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp_path)
    return published


def download(
    url: str,
    dest_path: str,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = TIMEOUT_S,
) -> str:
    """Fetch `url` into `dest_path`, verified against `md5` or `sha256` if one is given.

    Returns `dest_path`. `progress`: a tqdm bar on stderr (None: only when it is a terminal).
    Raises UserError on a network failure, a checksum mismatch (nothing is left behind) or an
    existing `dest_path` whose checksum is wrong (it is left alone).
    """
    expected = _expected(md5, sha256)
    name = os.path.basename(dest_path)
    if os.path.exists(dest_path):
        if expected is not None:
            actual = file_digest(dest_path, expected[0])
            if actual != expected[1]:
                raise UserError(
                    f"existing file {dest_path} has {expected[0]} {actual}, expected {expected[1]}; "
                    "delete it and run again to download it"
                )
        return dest_path

    directory = os.path.dirname(os.path.abspath(dest_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    try:
        digest = hashlib.new(expected[0]) if expected else None
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 -- http(s) URLs from our tables
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = getattr(error, "reason", error)
                raise UserError(
                    f"cannot download {url}: {reason}; fetch it by hand and put it at {dest_path}"
                ) from None
            with response:
                total = response.headers.get("Content-Length")
                from tqdm import tqdm  # imported here: only downloads need it

                with tqdm(
                    total=int(total) if total and total.isdigit() else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=name,
                    disable=None if progress is None else not progress,
                    leave=False,
                ) as bar:
                    try:
                        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                            out.write(chunk)
                            if digest is not None:
                                digest.update(chunk)
                            bar.update(len(chunk))
                    except (OSError, urllib.error.URLError) as error:
                        raise UserError(f"download of {url} failed midway: {error}; run again") from None
        if expected is not None:
            actual = digest.hexdigest()
            if actual != expected[1]:
                raise UserError(
                    f"checksum mismatch for {name} from {url}: {expected[0]} {actual}, expected {expected[1]}; "
                    "nothing was kept, try again or fetch the file by hand"
                )
        publish(tmp_path, dest_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
    return dest_path
