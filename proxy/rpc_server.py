# The jsonrpc-fdpass server side of one connection.
#
# Strategy: one reader task frames the stream (protocol.jsonrpc) and starts
# each request in its own task, so responses go out in completion order and
# a slow method never holds up a fast one. At most `max_in_flight` requests
# run at once; when all slots are taken the reader stops reading, and the
# kernel's socket buffer pushes back on the client. Responses are whole
# messages written under FdSocket's send lock.
#
# Fd ownership: fds received with a request belong to its handler from the
# moment it is called; if no handler is called (unknown method, bad params,
# invalid message) the server closes them. Fds a handler returns in its
# Reply are closed by the server once sent, or on any failure to send.
#
# Lifetime: when the peer closes its end, in-flight handlers are cancelled
# (nobody is left to read their answers) and everything is closed. A fatal
# framing error is answered with one -32050 error (id null) before closing.
# Any other exception escaping the connection (our bug, whatever message
# provoked it) is logged and answered with one -32603 error (id null), and
# ends this connection only: `serve` never raises it into the caller, where
# it would take down every other connection of the process.

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import anyio
import msgspec

from protocol.jsonrpc import (
    DEFAULT_MAX_MESSAGE_SIZE,
    FD_ERROR,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    ErrorKind,
    ErrorObject,
    FramingError,
    InvalidMessage,
    Message,
    MessageFramer,
    Request,
    RequestId,
    Response,
    RpcError,
    encode_message,
    error_data,
    error_response,
    success_response,
)
from proxy.fdsocket import DEFAULT_RECEIVE_SIZE, FdPassingError, FdSocket, close_fds

__all__ = ["Handler", "Reply", "RpcError", "RpcServer"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT: Final = 64
# How long a dying connection may take to accept its -32050 error.
_FATAL_REPORT_TIMEOUT: Final = 5.0

ParamsT = TypeVar("ParamsT", bound=msgspec.Struct)


@dataclass
class Reply:
    """What a handler returns: a msgspec-encodable result and fds to send.

    The server closes ``fds`` after sending them (or when it cannot).
    """

    result: Any = None
    fds: list[int] = field(default_factory=list)
    #: Called once ``fds`` are closed (sent or not): lets a handler bound how
    #: many fds are open across replies still waiting to be sent.
    on_closed: Callable[[], None] | None = None


Handler = Callable[[ParamsT, list[int]], Awaitable[Reply]]


@dataclass(frozen=True)
class _Method:
    params_decoder: msgspec.json.Decoder[Any]
    handler: Callable[[Any, list[int]], Awaitable[Reply]]


class RpcServer:
    """Dispatches jsonrpc-fdpass requests to registered typed handlers."""

    def __init__(
        self,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        receive_size: int = DEFAULT_RECEIVE_SIZE,
    ) -> None:
        self._methods: dict[str, _Method] = {}
        self.max_in_flight = max_in_flight
        self.max_message_size = max_message_size
        self.receive_size = receive_size

    def register(
        self, name: str, params_type: type[ParamsT], handler: Handler[ParamsT]
    ) -> None:
        """Serve method ``name``: params are decoded into ``params_type``.

        ``handler(params, fds)`` owns the fds it is given (it must close or
        keep them, even when it raises) and returns a Reply. It reports a
        failure by raising RpcError; any other exception becomes -32603.
        """
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        decoder = msgspec.json.Decoder(params_type)
        self._methods[name] = _Method(decoder, handler)

    async def serve(self, sock: FdSocket) -> None:
        """Serve one connection until the peer closes it; then close ``sock``."""
        connection = _Connection(self, sock)
        try:
            fatal = await connection.run()
        except Exception:
            logger.exception("closing jsonrpc-fdpass connection after our own bug")
            message = "Internal error; the server log has the details"
            await _report_fatal(sock, INTERNAL_ERROR, message, ErrorKind.INTERNAL)
        else:
            if fatal is not None:
                logger.warning("closing jsonrpc-fdpass connection: %s", fatal)
                message = f"File Descriptor Error: {fatal}"
                await _report_fatal(sock, FD_ERROR, message, ErrorKind.FRAMING)
        finally:
            connection.close_fds()
            await sock.aclose()

    async def _respond(
        self, message: Message, fds: list[int]
    ) -> tuple[Response | None, Reply]:
        """The response to one message (None for notifications) and its fds.

        Takes ownership of ``fds``; the caller owns the returned fds.
        """
        if isinstance(message, Request):
            return await self._call(message, fds)
        close_fds(fds)
        if isinstance(message, Response):
            logger.warning("ignoring a response from the client (id %r)", message.id)
            return None, Reply()
        return _invalid_request(message), Reply()

    async def _call(
        self, request: Request, fds: list[int]
    ) -> tuple[Response | None, Reply]:
        started = time.monotonic()
        outcome = await self._run_handler(request, fds)
        duration = time.monotonic() - started
        logger.debug("%s id=%r took %.3fs", request.method, request.id, duration)
        if request.is_notification:
            _close_reply(outcome[1])
            return None, Reply()
        return outcome

    async def _run_handler(
        self, request: Request, fds: list[int]
    ) -> tuple[Response, Reply]:
        request_id = None if isinstance(request.id, msgspec.UnsetType) else request.id
        method = self._methods.get(request.method)
        if method is None:
            close_fds(fds)
            return _method_not_found(request_id, request.method), Reply()
        try:
            params = method.params_decoder.decode(_params_document(request))
        except msgspec.ValidationError as exc:
            close_fds(fds)
            return _invalid_params(request_id, request.method, exc), Reply()
        try:
            reply = await method.handler(params, fds)
        except RpcError as exc:
            return error_response(request_id, exc.to_error_object()), Reply()
        except Exception:
            logger.exception("method %s failed", request.method)
            return _internal_error(request_id, request.method), Reply()
        return _encode_reply(request_id, request.method, reply)


class _Connection:
    """State of one served connection: its framer, tasks and unclaimed fds."""

    def __init__(self, server: RpcServer, sock: FdSocket) -> None:
        self._server = server
        self._sock = sock
        self._framer = MessageFramer(server.max_message_size)
        self._slots = anyio.Semaphore(server.max_in_flight)
        # Fds of messages whose task has not started yet: if the connection
        # ends first, those tasks never run and these are closed here.
        self._unclaimed: set[int] = set()

    async def run(self) -> FramingError | FdPassingError | None:
        """Read and dispatch until EOF; the fatal error that ended it, if any."""
        fatal: FramingError | FdPassingError | None = None
        async with anyio.create_task_group() as group:
            try:
                await self._read_requests(group)
            except (FramingError, FdPassingError) as exc:
                fatal = exc
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            # EOF or a broken stream: nobody is left to read the answers.
            group.cancel_scope.cancel()
        return fatal

    def close_fds(self) -> None:
        """Close every fd this connection still holds."""
        close_fds(self._framer.close())
        close_fds(list(self._unclaimed))
        self._unclaimed.clear()

    async def _read_requests(self, group: anyio.abc.TaskGroup) -> None:
        while True:
            data, fds = await self._sock.receive(self._server.receive_size)
            if not data:
                close_fds(fds)
                self._framer.at_eof()
                return
            self._framer.feed(data, fds)
            while (item := self._framer.next_message()) is not None:
                message, message_fds = item
                self._unclaimed.update(message_fds)
                await self._slots.acquire()
                group.start_soon(self._answer, message, message_fds, group)

    async def _answer(
        self, message: Message, fds: list[int], group: anyio.abc.TaskGroup
    ) -> None:
        """Run one message to completion and send its response, if any."""
        self._unclaimed.difference_update(fds)
        try:
            response, reply = await self._server._respond(message, fds)
            try:
                if response is not None:
                    payload = encode_message(response)
                    await self._sock.send_message(payload, reply.fds)
            finally:
                _close_reply(reply)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # A half-sent or refused response leaves the stream unusable.
            logger.debug("could not send a response, closing: %s", exc)
            group.cancel_scope.cancel()
        finally:
            self._slots.release()


async def _report_fatal(
    sock: FdSocket, code: int, message: str, kind: ErrorKind
) -> None:
    """Best effort: tell the peer why the connection is going away."""
    failure = ErrorObject(code=code, message=message, data=error_data(kind))
    with anyio.move_on_after(_FATAL_REPORT_TIMEOUT):
        try:
            await sock.send_message(encode_message(error_response(None, failure)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


def _params_document(request: Request) -> bytes | msgspec.Raw:
    # Absent params mean "no arguments": decode as an empty object so a
    # params type with only optional fields accepts it.
    return b"{}" if isinstance(request.params, msgspec.UnsetType) else request.params


def _encode_reply(
    request_id: RequestId, method: str, reply: Reply
) -> tuple[Response, Reply]:
    try:
        response = success_response(request_id, reply.result, fds=len(reply.fds))
    except (msgspec.EncodeError, TypeError):
        logger.exception("method %s returned a result that cannot be encoded", method)
        _close_reply(reply)
        return _internal_error(request_id, method), Reply()
    return response, reply


def _close_reply(reply: Reply) -> None:
    """Close a reply's fds, then tell its handler they are gone."""
    try:
        close_fds(reply.fds)
    finally:
        reply.fds = []
        if reply.on_closed is not None:
            callback, reply.on_closed = reply.on_closed, None
            callback()


def _invalid_request(message: InvalidMessage) -> Response:
    reason = f"Invalid Request: {message.reason}"
    data = error_data(ErrorKind.INVALID_REQUEST)
    error = ErrorObject(code=INVALID_REQUEST, message=reason, data=data)
    return error_response(message.id, error)


def _method_not_found(request_id: RequestId, method: str) -> Response:
    data = error_data(ErrorKind.UNSUPPORTED, method=method)
    message = f"Method not found: {method!r}"
    return error_response(
        request_id, ErrorObject(code=METHOD_NOT_FOUND, message=message, data=data)
    )


def _invalid_params(
    request_id: RequestId, method: str, exc: msgspec.ValidationError
) -> Response:
    data = error_data(ErrorKind.INVALID_ARGUMENT, method=method)
    message = f"Invalid params for {method}: {exc}"
    return error_response(
        request_id, ErrorObject(code=INVALID_PARAMS, message=message, data=data)
    )


def _internal_error(request_id: RequestId, method: str) -> Response:
    data = error_data(ErrorKind.INTERNAL, method=method)
    message = f"Internal error in {method}; the server log has the details"
    return error_response(
        request_id, ErrorObject(code=INTERNAL_ERROR, message=message, data=data)
    )
