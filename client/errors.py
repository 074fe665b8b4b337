"""Exceptions of the client library, one per gRPC status a caller can act on.

Each keeps the server's status details, which name the offending field first (`start.sampling.top_p: must be
in (0, 1], got 1.5`); `field` holds that part when the message has it.
"""

from __future__ import annotations

import grpc


class MusicGenError(Exception):
    """Base class: a call to the MusicGen server failed. `code` is the gRPC status, `details` its text."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        self.code = code

    @property
    def field(self) -> str | None:
        """The request field the server named (`start.sampling.top_p`), or None."""
        head, sep, _ = self.details.partition(": ")
        return head if sep and " " not in head else None


class InvalidArgument(MusicGenError):
    """A request value is out of range or malformed (INVALID_ARGUMENT); the message names the field."""


class FailedPrecondition(MusicGenError):
    """A request was valid but not now, e.g. a second start (FAILED_PRECONDITION)."""


class ResourceExhausted(MusicGenError):
    """The server is at its session limit, or a message was over its size limit (RESOURCE_EXHAUSTED)."""


class Unauthenticated(MusicGenError):
    """Missing or wrong bearer token (UNAUTHENTICATED)."""


class Unavailable(MusicGenError):
    """The server cannot be reached, or is shutting down (UNAVAILABLE)."""


class DeadlineExceeded(MusicGenError):
    """The call ran past its timeout (DEADLINE_EXCEEDED)."""


class Cancelled(MusicGenError):
    """The call was cancelled (CANCELLED), e.g. by `LiveSession.close()` from another thread."""


class ServerError(MusicGenError):
    """Any other status (INTERNAL, UNKNOWN, ...): a server bug or an unexpected failure."""


_BY_CODE: dict[grpc.StatusCode, type[MusicGenError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError, target: str = "") -> MusicGenError:
    """The client exception for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    kind = _BY_CODE.get(code, ServerError)
    if kind is Unavailable and target:
        details = f"server {target} not reachable: {details}"
    return kind(details, code)
