"""gunicorn configuration: ``gunicorn -c python:service.server.gunicorn_conf``.

``gradcam-service serve`` starts gunicorn with this file after the engine
processes are up, and sets the ``GRADCAM_*`` variables (its flags) and the
engines' socket paths. Neither the master nor the HTTP workers load torch:
each worker creates the app after the fork (``preload_app = False``) and talks
to the engines over their sockets.
"""

from __future__ import annotations

from service.contract.settings import Settings, available_cores
from service.logs import LOG_FORMAT, QUOTING_LIBRARIES, json_lines, withhold_warning_text

settings = Settings.from_env()
# The master and (forked from it) every worker log warnings without their text.
withhold_warning_text()

# Sized for the machine: the workers decode, fit and render (numpy, Pillow),
# which holds each one's interpreter, so one per core; their request threads
# mostly wait on the engine, without the GIL, so a worker can hold many. Never
# fewer than two: while gunicorn replaces a crashed worker the other one serves.
workers = settings.workers or max(2, available_cores())
threads = settings.threads or 16

wsgi_app = "service.server.app:create_app()"
bind = [f"{settings.host}:{settings.port}"]
# All socket I/O on an event loop, request threads only run the app, slow clients
# are timed out, and the wait for a thread is measured and bounded (worker.py).
worker_class = "service.server.worker.BufferingWorker"
preload_app = False
# A worker that answers nothing for this long is restarted: a generous bound for
# large batches on a CPU, still short of a hang.
timeout = 120
graceful_timeout = max(1, round(settings.shutdown_timeout_s))
keepalive = 5
accesslog = "-"
# (Our worker writes its own access lines: the path without its query string.)
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms id=%({x-request-id}o)s'

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "service.logs.RequestIdFilter"},
        "library_text": {"()": "service.logs.LibraryTextFilter"},
    },
    "formatters": {
        "default": {"()": "service.logs.JsonFormatter"} if json_lines() else {"format": LOG_FORMAT}
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "default",
            "filters": ["request_id", "library_text"],
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        # Their warnings are about a client's file, which the answer already speaks of.
        **{name: {"level": "ERROR"} for name in QUOTING_LIBRARIES},
    },
}
# No runtime control socket: nothing here uses it, and several servers on one
# machine (tests, replicas) would share its default path.
control_socket_disable = True


def child_exit(server: object, worker: object) -> None:
    """A worker is gone: drop its live gauges from the aggregated metrics."""
    from service.metrics import mark_process_dead

    mark_process_dead(worker.pid)  # type: ignore[attr-defined]
