"""Paths that may be local or on GCS (gs://), and files a reader never sees half of.

Every command takes its paths through `as_path`: a local path becomes absolute (orbax finalises
saves in a background thread whose working directory may differ; TPU VMs share no disk, so a
relative path would name a different directory on every host), a URL (gs://bucket/dir) stays as
it is. `etils.epath` then reads and writes both: the local disk, or GCS through tf.io.gfile.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from etils import epath

TMP_PREFIX = ".tmp."   # temporary siblings are named .tmp.<pid>.<name>


def is_local(path: str | os.PathLike) -> bool:
    """False for gs:// (or any other scheme's) paths."""
    return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path for `path`: absolute when local, unchanged when a URL such as gs://b/dir."""
    text = os.fspath(path)
    if is_local(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    return epath.Path(text)


def as_str(path: str | os.PathLike) -> str:
    """`as_path(path)` as a string (for libraries that take str paths, e.g. orbax, clu)."""
    return os.fspath(as_path(path))


def tmp_sibling(path: epath.Path) -> epath.Path:
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}.{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """write(file) into a temporary sibling, then rename: a killed run leaves no partial file.

    Locally the temporary file is fsynced and renamed over `path`. For GCS, `write` gets a local
    temporary file (seekable, as zipfile needs; tf.io.gfile would stage the upload on the local
    disk anyway), which is uploaded under the temporary name and renamed (a server-side copy), so
    a writer that fails half-way never leaves a partial object under `path`. The temporary file is
    removed when `write` fails or is interrupted (SIGTERM, Ctrl-C); one a SIGKILL leaves behind
    keeps the TMP_PREFIX name, so its owner can clean it up on the next run.

    Args:
      path: the file to write (local or gs://).
      write: called with the open binary file.
    """
    path = as_path(path)
    tmp = tmp_sibling(path)
    try:
        if is_local(path):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with tempfile.NamedTemporaryFile(prefix=TMP_PREFIX, suffix=f".{path.name}") as f:
                write(f)
                f.flush()
                epath.Path(f.name).copy(tmp, overwrite=True)
            tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text (config.json, manifests, histories)."""
    atomic_write(path, lambda f: f.write(text.encode()))
