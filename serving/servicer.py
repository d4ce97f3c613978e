"""The gRPC servicer, kept thin (STYLE R14): validate -> domain -> proto.

It raises domain errors and never picks status codes; :class:`~serving.interceptors.
ExceptionToStatusInterceptor` maps them. Scoring runs on a small thread pool (torch releases the
GIL), so the event loop stays free for admission, health checks and refusals even when every
worker is busy.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc.aio

from serving.errors import DeadlineTooShort, InvalidRequest, Overloaded
from serving.metrics import ScorerMetrics
from serving.proto import scorer_pb2, scorer_pb2_grpc
from serving.scorer import Scorer, ScoringRequest

__all__ = ["AdmissionGate", "RequestLimits", "ScorerServicer", "to_domain"]


@dataclass(frozen=True)
class RequestLimits:
    """Validation limits of a Score request."""

    max_candidates: int = 2000  # candidates per request; the proto has no hard cap
    max_id_chars: int = 256  # user, item and category ids
    max_context_entries: int = 64  # entries of the optional context map
    max_context_chars: int = 1024  # each context key and value

    def __post_init__(self) -> None:
        if min(self.max_candidates, self.max_id_chars, self.max_context_entries, self.max_context_chars) < 1:
            raise ValueError("request limits must be >= 1")


def _first_bad(values: list[str], max_chars: int) -> tuple[int, str] | None:
    """(index, problem) of the first empty or too long id, or None. C-speed scan in the good case."""
    if all(values) and max(map(len, values)) <= max_chars:
        return None
    for i, v in enumerate(values):
        if not v:
            return i, "is required"
        if len(v) > max_chars:
            return i, f"is longer than {max_chars} characters"
    return None  # pragma: no cover - unreachable


def to_domain(request: scorer_pb2.ScoreRequest, limits: RequestLimits) -> ScoringRequest:
    """Validate ``request`` and convert it; raises :class:`InvalidRequest` naming the field."""
    if not request.user_id:
        raise InvalidRequest("user_id", "is required")
    if len(request.user_id) > limits.max_id_chars:
        raise InvalidRequest("user_id", f"is longer than {limits.max_id_chars} characters")
    n = len(request.candidates)
    if n == 0:
        raise InvalidRequest("candidates", "must not be empty")
    if n > limits.max_candidates:
        raise InvalidRequest("candidates", f"has {n} entries; at most {limits.max_candidates} are allowed")
    items = [c.item_id for c in request.candidates]
    cats = [c.category_id for c in request.candidates]
    for name, values in (("item_id", items), ("category_id", cats)):
        bad = _first_bad(values, limits.max_id_chars)
        if bad is not None:
            raise InvalidRequest(f"candidates[{bad[0]}].{name}", bad[1])
    context = dict(request.context)
    if len(context) > limits.max_context_entries:
        raise InvalidRequest("context", f"has {len(context)} entries; at most {limits.max_context_entries} "
                                        "are allowed")
    for k, v in context.items():
        if not k or len(k) > limits.max_context_chars or len(v) > limits.max_context_chars:
            raise InvalidRequest(f"context[{k[:32]!r}]", f"needs a non-empty key, and key and value of at most "
                                                         f"{limits.max_context_chars} characters")
    return ScoringRequest(request.user_id, items, cats, context)


class AdmissionGate:
    """At most ``limit`` Score requests admitted at once (running + waiting for a worker); the next
    one is refused with :class:`Overloaded` at once instead of queueing without bound. Used only
    from the event loop thread, so a plain counter suffices."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("admission limit must be >= 1")
        self.limit = limit
        self.inflight = 0

    def __enter__(self) -> AdmissionGate:
        if self.inflight >= self.limit:
            raise Overloaded(f"server is at its limit of {self.limit} concurrent requests; retry with backoff")
        self.inflight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.inflight -= 1


class ScorerServicer(scorer_pb2_grpc.ScorerServicer):
    """``ctrstream.v1.Scorer``.

    Args:
        scorer (Scorer): the domain object.
        executor (Executor): threads that run :meth:`Scorer.score`.
        gate (AdmissionGate): bounds concurrent requests.
        limits (RequestLimits, default RequestLimits()): validation limits.
        metrics (ScorerMetrics | None, default None): per-request metrics.
    """

    def __init__(
        self,
        scorer: Scorer,
        executor: Executor,
        gate: AdmissionGate,
        limits: RequestLimits | None = None,
        metrics: ScorerMetrics | None = None,
    ) -> None:
        self.scorer = scorer
        self.executor = executor
        self.gate = gate
        self.limits = limits or RequestLimits()
        self.metrics = metrics

    async def Score(  # noqa: N802 - gRPC method name
        self, request: scorer_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ScoreResponse:
        domain = to_domain(request, self.limits)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        if remaining is not None and remaining < self.scorer.min_budget_s:
            raise DeadlineTooShort(f"only {remaining * 1000:.1f} ms of the deadline were left on arrival")
        with self.gate:
            if self.metrics is not None:
                self.metrics.inflight.set(self.gate.inflight)
            try:
                call = functools.partial(self.scorer.score, domain, deadline=deadline)
                ctx = contextvars.copy_context()  # the request id follows into the worker thread
                result = await asyncio.get_running_loop().run_in_executor(self.executor, ctx.run, call)
            finally:
                if self.metrics is not None:
                    self.metrics.inflight.set(self.gate.inflight - 1)
        if self.metrics is not None:
            self.metrics.observe_score(result, domain.num_candidates)
        return scorer_pb2.ScoreResponse(
            scores=result.scores.tolist(), model_name=result.model_name, model_version=result.model_version
        )
