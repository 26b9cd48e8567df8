"""What one request carries through the pipeline, built once when it is admitted.

Its deadline (``GRADCAM_REQUEST_TIMEOUT_S`` from when the request arrived, or from when
it queued for a worker thread), a way to ask whether its client is still there, its
reservation in the service's memory budget and the size of its body. The stages (parse,
decode and fit, the engine call, drawing, storing) take this one object instead of the
four loose values; the command line makes one with no client and no budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from service.contract.errors import ClientClosed, DeadlineExceeded
from service.contract.settings import Settings
from service.memory import RequestMemory
from service.pipeline.budgets import BODY_COPIES


@dataclass(frozen=True)
class RequestContext:
    """One request's deadline, client, memory reservation and body size."""

    deadline: float  # time.monotonic() past which it is dropped (504)
    disconnected: Callable[[], bool] | None = None  # True once the client has gone
    memory: RequestMemory | None = None  # None: no budget (tests, the command line)
    body_bytes: int = 0

    @classmethod
    def start(
        cls,
        settings: Settings,
        started: float | None = None,
        disconnected: Callable[[], bool] | None = None,
        memory: RequestMemory | None = None,
        body_bytes: int = 0,
    ) -> RequestContext:
        """The context of a request that arrived at ``started`` (``time.monotonic()``;
        default now)."""
        begun = time.monotonic() if started is None else started
        return cls(begun + settings.request_timeout_s, disconnected, memory, body_bytes)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def check_still_wanted(self) -> None:
        """Raise if the deadline passed or the client left (between expensive steps)."""
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded("The request took longer than its deadline.")
        if self.disconnected is not None and self.disconnected():
            raise ClientClosed("The client disconnected before the answer was drawn.")

    def reserve_parsing(self, parsed_bytes: int) -> None:
        """Before the body is parsed: its copies and what parsing it takes, reserved
        together (``json_body.json_object``'s ``reserve``; the parsed values are gone once
        the request is validated)."""
        if self.memory is not None:
            self.memory.need(BODY_COPIES * self.body_bytes + parsed_bytes)
