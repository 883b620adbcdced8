"""Writing a local file so that a reader never sees half of it."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

TMP_PREFIX = ".tmp."   # temporary siblings are named .tmp.<pid>.<name>


def atomic_write(path, write: Callable) -> None:
    """write(file) into a temporary sibling, then rename: a killed run leaves no partial file.

    The temporary file is removed when `write` fails or is interrupted (SIGTERM, Ctrl-C); one a
    SIGKILL leaves behind keeps the TMP_PREFIX name, so its owner can clean it up on the next run.

    Args:
      path: the file to write.
      write: called with the open binary file.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}.{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
