"""Simulated shoppers sending real traffic through a model's router, and clicking.

The rollout tests, the canary benchmark and the demo need what a shop has: a stream of
requests from many shoppers, each answer shown to the shopper, and their clicks logged against
the request id (:mod:`recsys.delivery.feedback`). The shoppers come from the family
(``recsys.families.<name>.simulated_users``: held-out queries with judged products, or users
with their held-out next item); this driver is family-agnostic: it asks through
:func:`recsys.delivery.client.ask` and lets the shopper decide what to click.

Each simulated visitor has a stable routing key (``visitor-<n>``), so the router keeps them on
one arm; the draw of shoppers and clicks is seeded, so a run with a fixed rollout salt is
reproducible. Every outcome (ok or failed, arm, version, latency) is kept, so a test or a
benchmark can count exactly what clients saw.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.delivery.client import RoutedRequestError, ask


def visitor_key(visitor: int) -> str:
    """The routing key of simulated visitor ``visitor``."""
    return f"visitor-{visitor}"


@dataclass(frozen=True)
class Outcome:
    """What one simulated request got."""

    at: float
    ok: bool
    arm: str | None
    version: int | None
    latency_ms: float
    clicked: bool = False
    error: str | None = None


class ShopperTraffic(threading.Thread):
    """Send requests from ``shoppers`` through ``model``'s router until :meth:`stop` or
    ``max_requests``; ``rate`` requests per second (``None``: back to back). With ``feedback``
    (a :class:`~recsys.delivery.feedback.FeedbackLog`), impressions and clicks are logged under
    the rollout under way (read from the routing file of ``repo``)."""

    def __init__(
        self,
        control: Any,
        model: str,
        family: Any,
        shoppers: Any,
        *,
        repo: Path | None = None,
        feedback: Any = None,
        rate: float | None = None,
        max_requests: int | None = None,
        seed: int = 0,
        flush_every: int = 50,
        visitors: int = 10_000,
    ) -> None:
        super().__init__(daemon=True, name=f"shoppers-{model}")
        self.control = control
        self.model = model
        self.family = family
        self.shoppers = shoppers
        self.repo = repo
        self.feedback = feedback
        self.period = 1.0 / rate if rate else 0.0
        self.max_requests = max_requests
        self.rng = np.random.default_rng(seed)
        self.flush_every = flush_every
        self.visitors = max(int(visitors), len(shoppers))
        """Distinct routing keys: visitor ``v`` asks shopper ``v % len(shoppers)``'s question
        (many shoppers type the same query), so a split of a few dozen held-out queries is still
        a split of many users."""
        self.outcomes: list[Outcome] = []
        self.unattributed = 0
        """Answers the router could not pin to an arm (``default``): not logged as feedback."""
        self._stop_event = threading.Event()
        self._impressions: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._rollout: tuple[float, str | None] = (0.0, None)
        self.error: BaseException | None = None

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop_event.set()
        self.join(timeout_s)
        if self.error is not None:
            raise RuntimeError(f"simulated traffic failed: {self.error}") from self.error

    def _rollout_id(self) -> str | None:
        from recsys.delivery.routing import read_routing

        checked_at, rollout_id = self._rollout
        if self.repo is None or time.monotonic() - checked_at < 0.5:
            return rollout_id
        routing = read_routing(self.repo, self.model)
        rollout_id = routing.rollout_id if routing is not None and routing.active else None
        self._rollout = (time.monotonic(), rollout_id)
        return rollout_id

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by stop(): a dead driver must not look quiet
            self.error = exc
        finally:
            self._flush()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            if self.max_requests is not None and len(self.outcomes) >= self.max_requests:
                return
            visitor = int(self.rng.integers(self.visitors))
            self._one(visitor, self.shoppers[visitor % len(self.shoppers)])
            if len(self._impressions) + len(self._events) >= self.flush_every:
                self._flush()
            if self.period:
                next_at += self.period
                self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def _one(self, visitor: int, shopper: Any) -> None:
        started = time.time()
        try:
            answer = ask(
                self.control,
                self.model,
                self.family,
                shopper.request(),
                routing_key=visitor_key(visitor),
            )
        except RoutedRequestError as exc:
            self.outcomes.append(Outcome(started, False, None, None, 0.0, error=str(exc)[:300]))
            return
        clicks = shopper.clicks(answer.ids, self.rng)
        self.outcomes.append(
            Outcome(started, True, answer.arm, answer.version, answer.latency_ms, bool(clicks))
        )
        rollout_id = self._rollout_id() if self.feedback is not None else None
        if rollout_id is None:
            return
        if answer.arm not in ("stable", "candidate"):
            self.unattributed += 1
            return
        self._impressions.append(
            {
                "request_id": answer.request_id,
                "model": self.model,
                "version": answer.version,
                "arm": answer.arm,
                "items": answer.ids,
                "rollout_id": rollout_id,
                "ts": started,
            }
        )
        self._events += [
            {"request_id": answer.request_id, "event": "click", "item": item, "ts": started}
            for item in clicks
        ]

    def _flush(self) -> None:
        if self.feedback is None:
            return
        impressions, events = self._impressions, self._events
        self._impressions, self._events = [], []
        self.feedback.record_impressions(impressions)
        self.feedback.record_events(events)

    # -- what clients saw -------------------------------------------------------------------

    def counts(self, since: float = 0.0) -> dict[str, Any]:
        """Requests, failures and answers per arm/version since ``since`` (unix time)."""
        seen = [o for o in list(self.outcomes) if o.at >= since]
        by_arm = Counter(f"{o.arm}:v{o.version}" for o in seen if o.ok)
        return {
            "requests": len(seen),
            "failed": sum(not o.ok for o in seen),
            "answered_by": dict(sorted(by_arm.items())),
        }

    def first_failure_at(self, since: float = 0.0) -> float | None:
        return next((o.at for o in list(self.outcomes) if o.at >= since and not o.ok), None)

    def last_failure_at(self, since: float = 0.0) -> float | None:
        failed = [o.at for o in list(self.outcomes) if o.at >= since and not o.ok]
        return failed[-1] if failed else None
