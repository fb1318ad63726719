"""A quiet console (docs/monitoring.md, "Console and log files").

The console gets the progress bar, the job's own lines (``asyppo`` logger, INFO and up) and other libraries'
errors. Everything else goes to ``<run>/logs/``:

* ``driver.log``: every log record of the driver process, every library's included, at INFO and up;
* ``<actor>.log`` (``rollout-0.log``, ``critic-1.log``, ``learner.log``, ...): all that an actor process and its
  children (vLLM's engine core, DeepSpeed's compiler) print, appended across restarts.

``logging.verbose: true`` (``asyppo train --verbose``) leaves every stream where it was: actors print to the console
through Ray, and the driver's libraries log at INFO. Failures reach the console either way: a failed call ends the job
with one line naming the actor and the phase, with the full traceback in ``<run>/error.log``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["RunLog", "redirect_output", "route_library_loggers", "route_raylet_messages", "setup_console",
           "with_output_to"]

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    """The job's own records from INFO up; other libraries' errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "asyppo" or record.levelno >= logging.ERROR


class _DemoteUnreadFailures(logging.Filter):
    """Ray logs an ERROR ("Unhandled error ...", with the remote traceback) when the reference to a call that failed
    is freed without its result having been read. The job reads every result it needs through ``Supervisor.get``,
    which turns a failure into the job's one line; a result left unread belongs to a call left behind when another
    failed first (a critic's update waiting on the targets of a learner that was lost), and its reference is freed
    after that line, as the job exits. So the record is a WARNING: in driver.log while the run is open, not on the
    console after the job's last line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith("Unhandled error"):
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


class _ConsoleHandler(logging.StreamHandler):
    """stderr, written around the step progress bar: ``tqdm.write`` clears the bar, prints the line and draws the bar
    again (a plain write would append a warning to the bar's line)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def setup_console(verbose: bool) -> None:
    """The root logger's console handler (stderr): everything at INFO when ``verbose``, else :class:`_ConsoleFilter`."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(_ConsoleFilter())
    handler.set_name("asyppo-console")
    for old in [h for h in root.handlers if h.get_name() == "asyppo-console"]:
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)  # Python warnings become records, in driver.log
    if not verbose:
        route_library_loggers()


# Libraries that give their logger a console handler of its own; quiet, their records go through the root logger.
OWN_HANDLERS = ("ray",)
# The logger of Ray's report of a failed call whose result nobody read (ray._private.worker._unhandled_error_handler).
RAY_UNREAD_FAILURES = "ray._private.worker"


def route_library_loggers() -> None:
    """Send the records of :data:`OWN_HANDLERS` loggers through the root logger's handlers (the console filter and
    driver.log) instead of their own, with Ray's reports of failed results nobody read demoted to warnings
    (:class:`_DemoteUnreadFailures`). Call after importing them and pass ``configure_logging=False`` to ``ray.init``
    so that it keeps it that way."""
    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    unread = logging.getLogger(RAY_UNREAD_FAILURES)
    if not any(isinstance(f, _DemoteUnreadFailures) for f in unread.filters):
        unread.addFilter(_DemoteUnreadFailures())


def route_raylet_messages() -> None:
    """What Ray's raylets report to the driver (a worker that died: a 15-line paragraph of possible causes; a task
    killed for memory) goes to the ``ray.raylet`` logger at WARNING, so to driver.log, instead of straight to stdout
    beside the job's own one-line account of the same event. Call after ``ray.init``.

    Ray's driver prints these from a thread of its own through ``ray._private.worker.print_to_stdstream``, with no
    setting to send them elsewhere (``log_to_driver`` covers the actors' output only); that function is wrapped here,
    and everything else it prints is left as it was."""
    import ray._private.worker as ray_worker

    print_to_stdstream = ray_worker.print_to_stdstream
    if getattr(print_to_stdstream, "routes_raylet_messages", False):
        return
    raylet = logging.getLogger("ray.raylet")

    def print_or_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return print_to_stdstream(data, ignore_prefix)
        for message in data.get("lines", []):
            raylet.warning("%s", message)

    print_or_log.routes_raylet_messages = True
    ray_worker.print_to_stdstream = print_or_log


class RunLog:
    """``<run>/logs/driver.log``: every record of the driver process while the run is open."""

    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(log_dir / "driver.log", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        self.handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


def redirect_output(path: Path) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so C libraries and child processes too) at
    ``path``, appending."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def with_output_to(actor_class: type, log_dir: Path) -> type:
    """``actor_class`` whose every process (the first and each restart) writes its output to
    ``log_dir/<its Ray actor name>.log`` from the start of its constructor on."""

    class OutputToFile(actor_class):
        def __init__(self, *args, **kwargs):
            import ray

            redirect_output(log_dir / f"{ray.get_runtime_context().get_actor_name() or actor_class.__name__}.log")
            super().__init__(*args, **kwargs)

    # The dashboard and error messages show the class's name: keep the role's.
    OutputToFile.__name__ = OutputToFile.__qualname__ = actor_class.__name__
    OutputToFile.__doc__ = actor_class.__doc__
    return OutputToFile
