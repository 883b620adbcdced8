"""Console hygiene for the entry points: keep the run's own progress readable, and show it.

orbax logs ~15 INFO lines per checkpoint save and restore, and jax/grain a few more per start; on a
console they bury the progress lines (steps/s, ETA, losses). Their warnings and errors still show,
and everything still goes to the log files absl writes when --log_dir is set.
"""
import logging as std_logging
import time

from absl import logging

_LIBRARIES = ("/orbax/", "/grain/", "/jax/_src/", "/etils/")


class _QuietLibraryInfo(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or not any(part in record.pathname for part in _LIBRARIES))


def quiet_library_logs() -> None:
    """Drops INFO records of the libraries above from absl's console handler."""
    logging.get_absl_handler().addFilter(_QuietLibraryInfo())


class Progress:
    """A progress bar for long jobs: tqdm when installed, else a log line every 30 s; images/s
    (of this run's own work) and ETA either way.

    Args:
      total: the job's size in images.
      initial: images already done (a resumed job), counted as done but not in the rate.
      enabled: False on all but one process (nothing is shown).
      verb: what the log line says was done ("sampled", "encoded").
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True,
                 verb: str = "processed"):
        self.total, self.done, self.enabled, self.verb = total, initial, enabled, verb
        self.start, self.last, self.new = time.time(), 0.0, 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm  # optional: a plain log line without it
                self.bar = tqdm(total=total, initial=initial, unit="img", smoothing=0.1,
                                dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done, self.new = self.done + n, self.new + n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if now - self.last >= 30 or self.done == self.total:
            rate = self.new / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            logging.info("%s %d / %d images, %.1f images/s, ETA %s", self.verb, self.done,
                         self.total, rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
