"""Converters: checkpoints from elsewhere become the project's own exports, once
(`python -m utils.convert --help`). Each source format is one module here with an
`add_command(subparsers)` that adds its subcommand; `__main__.COMMANDS` lists them."""
import hashlib


def file_sha256(path: str) -> str:
    """The SHA-256 of a source file, recorded in the sidecar of what it was converted into."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
