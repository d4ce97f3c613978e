"""Server interceptors (grpc.aio): request ids, metrics, bearer-token auth, and the ONE place that
maps domain errors to gRPC status codes (STYLE R14).

Order used by :mod:`serving.server` (first = outermost)::

    RequestIdInterceptor -> MetricsInterceptor -> BearerTokenAuthInterceptor -> ExceptionToStatusInterceptor

so every log line and metric of a request, refusals included, carries its request id and final
code. grpc.aio runs all interceptors and the handler in the same ``contextvars.Context``, so the
request id set in ``intercept_service`` is visible in the handler and (copied explicitly by the
servicer) in the worker thread that scores.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc
import grpc.aio

from serving.errors import (
    DeadlineTooShort,
    InvalidRequest,
    ModelNotLoaded,
    Overloaded,
    ScorerError,
    StoreUnavailable,
)

__all__ = [
    "BearerTokenAuthInterceptor",
    "ExceptionToStatusInterceptor",
    "MetricsInterceptor",
    "REQUEST_ID_HEADER",
    "RequestIdInterceptor",
    "current_request_id",
    "request_id_var",
]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
#: Request id of the RPC being handled ("-" outside any RPC).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def current_request_id() -> str:
    return request_id_var.get()


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    md = details.invocation_metadata or ()
    return {k: v for k, v in md if isinstance(v, str)}


def _with_unary(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _same_kind(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s streaming kind whose behavior is the coroutine ``behavior``."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Takes the caller's ``x-request-id`` (or makes one), puts it in :data:`request_id_var`, and
    echoes it in the trailing metadata of unary calls (successes and errors alike)."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        given = _metadata(handler_call_details).get(REQUEST_ID_HEADER, "")
        rid = given if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        request_id_var.set(rid)
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
            return await inner(request, context)

        return _with_unary(handler, behavior)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Calls ``observe(method, code_name, seconds)`` once per unary RPC, with its final code."""

    def __init__(self, observe: Callable[[str, str, float], None]) -> None:
        self._observe = observe

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]
        observe = self._observe

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = await inner(request, context)
                code = "OK"
                return response
            except grpc.aio.AbortError:
                set_code = context.code()
                code = set_code.name if isinstance(set_code, grpc.StatusCode) else "UNKNOWN"
                raise
            except BaseException:  # cancelled by the client, or an unmapped error
                code = "CANCELLED"
                raise
            finally:
                observe(method, code, time.perf_counter() - started)

        return _with_unary(handler, behavior)


class BearerTokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` for one of ``tokens``
    (UNAUTHENTICATED). Methods under ``exempt_prefixes`` (health checks, for load-balancer and
    Kubernetes probes that carry no credentials) pass without a token."""

    def __init__(
        self, tokens: Collection[str], exempt_prefixes: Collection[str] = ("/grpc.health.v1.Health/",)
    ) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("BearerTokenAuthInterceptor needs at least one non-empty token")
        self._tokens = [t.encode() for t in tokens]
        self._exempt = tuple(exempt_prefixes)

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        g = given.strip().encode()
        ok = False
        for t in self._tokens:  # no early exit: timing does not reveal which token matched
            ok |= hmac.compare_digest(g, t)
        return ok

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self._exempt) or self._authorized(
            _metadata(handler_call_details).get("authorization", "")
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        log.warning("refused unauthenticated call", extra={"method": method})

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        return _same_kind(handler, deny)


class ExceptionToStatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors raised by unary handlers to status codes; the only place that does.

    ``InvalidRequest`` -> INVALID_ARGUMENT, ``ModelNotLoaded``/``StoreUnavailable`` -> UNAVAILABLE, ``Overloaded`` ->
    RESOURCE_EXHAUSTED, ``DeadlineTooShort`` -> DEADLINE_EXCEEDED (each with the error's own
    message, which names the field or the condition). Anything else -> INTERNAL with a generic
    message plus the request id; the traceback goes to the log (``exc_info``), never to the client.
    """

    _CODES: tuple[tuple[type[ScorerError], grpc.StatusCode], ...] = (
        (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotLoaded, grpc.StatusCode.UNAVAILABLE),
        (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
        (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineTooShort, grpc.StatusCode.DEADLINE_EXCEEDED),
    )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise  # the handler already chose a status
            except ScorerError as exc:
                code = next((c for t, c in self._CODES if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
                level = logging.INFO if isinstance(exc, InvalidRequest) else logging.WARNING
                log.log(level, "request refused", extra={"method": method, "code": code.name,
                                                         "reason": str(exc)})
                await context.abort(code, str(exc))
            except Exception:
                log.error("unhandled error", exc_info=True, extra={"method": method})
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error (request id {current_request_id()})"
                )

        return _with_unary(handler, behavior)
