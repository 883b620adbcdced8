"""Console hygiene for the entry points: keep the run's own progress readable.

orbax logs ~15 INFO lines per checkpoint save and restore, and jax/grain a few more per start; on a
console they bury the progress lines (steps/s, ETA, losses). Their warnings and errors still show,
and everything still goes to the log files absl writes when --log_dir is set.
"""
import logging as std_logging

from absl import logging

_LIBRARIES = ("/orbax/", "/grain/", "/jax/_src/", "/etils/")


class _QuietLibraryInfo(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or not any(part in record.pathname for part in _LIBRARIES))


def quiet_library_logs() -> None:
    """Drops INFO records of the libraries above from absl's console handler."""
    logging.get_absl_handler().addFilter(_QuietLibraryInfo())
