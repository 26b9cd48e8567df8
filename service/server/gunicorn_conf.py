"""gunicorn configuration: ``gunicorn -c python:service.server.gunicorn_conf``.

Read by the gunicorn master, which must never import torch or touch CUDA: the
app (and with it the models) is created inside each worker after the fork
(``preload_app = False``). Settings come from ``GRADCAM_*`` variables, which
``gradcam-service serve`` sets from its flags.
"""

from __future__ import annotations

import os

from service.logs import LOG_FORMAT
from service.settings import Settings

settings = Settings.from_env()
cores = os.cpu_count() or 1

# Sized for the machine: a worker per 4 cores (at most 4), each with all its
# cores' worth of torch threads, and enough request threads to decode and
# render in parallel while the model runs.
workers = settings.workers or max(1, min(4, cores // 4))
threads = settings.threads or 8
if not settings.torch_threads:
    os.environ["GRADCAM_TORCH_THREADS"] = str(max(1, cores // workers))
# OpenMP threads that sleep rather than spin at their barriers: the request
# threads and gunicorn share the cores with the model, and a spinning torch
# thread starves them (and so the next batch). Measured at concurrency 16 on 2
# cores, paired against the bare forward: 0.90x with PASSIVE, 0.76-0.81x with
# the default (README, "Under load"). Read by each worker when it imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

wsgi_app = "service.server.app:create_app()"
bind = [f"{settings.host}:{settings.port}"]
worker_class = "gthread"
preload_app = False
# A worker that answers nothing for this long is restarted: a generous bound for
# large batches on a CPU, still short of a hang.
timeout = 120
graceful_timeout = 30
keepalive = 5
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms id=%({x-request-id}o)s'

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "service.logs.RequestIdFilter"}},
    "formatters": {"default": {"format": LOG_FORMAT}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "default",
                             "filters": ["request_id"], "stream": "ext://sys.stderr"}},
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}
# No runtime control socket: nothing here uses it, and several servers on one
# machine (tests, replicas) would share its default path.
control_socket_disable = True


def child_exit(server: object, worker: object) -> None:
    """A worker is gone: drop its live gauges from the aggregated metrics."""
    from service.metrics import mark_process_dead

    mark_process_dead(worker.pid)  # type: ignore[attr-defined]
