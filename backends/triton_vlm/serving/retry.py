"""Try a call again while its failure is transient, with backoff, up to a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry(call: Callable[[], T], transient: Callable[[Exception], bool], deadline_s: float = 60.0,
          first_delay_s: float = 0.05, max_delay_s: float = 2.0) -> T:
    """`call()`; while it raises an error that `transient` accepts, again after a growing delay, until
    `deadline_s` has passed (then the last error is raised). Other errors are raised at once."""
    deadline = time.monotonic() + deadline_s
    delay = first_delay_s
    while True:
        try:
            return call()
        except Exception as e:
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, max_delay_s)
