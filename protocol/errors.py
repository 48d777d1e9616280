"""Errors that say whose fault a failure was.

Every failure the proxy reports belongs to one of three parties: the client
sent something we cannot act on, the image source (a layout on disk, a
registry) is missing or broken, or we have a bug. Each error carries a stable
``kind`` string that both protocols expose: the legacy protocol folds it into
``error_code`` and the jsonrpc-fdpass API puts it in ``error.data.kind``, so
clients branch on it instead of parsing messages.
"""

from __future__ import annotations

from typing import ClassVar


class ImageProxyError(Exception):
    """Base class: a failure with a message fit to show to a client."""

    kind: ClassVar[str] = "internal"
    #: Whether trying the same request again may succeed.
    retryable: ClassVar[bool] = False


class ClientError(ImageProxyError):
    """The request itself is wrong: bad arguments, bad order of calls."""

    kind = "invalid-argument"


class NotInitializedError(ClientError):
    """A method was called before Initialize."""

    kind = "not-initialized"


class NotFoundError(ImageProxyError):
    """The image, instance or blob does not exist in the source."""

    kind = "not-found"


class UnsupportedError(ImageProxyError):
    """The source holds something we deliberately do not handle."""

    kind = "unsupported"


class PolicyError(ImageProxyError):
    """The signature policy rejects the image."""

    kind = "policy-denied"


class SourceError(ImageProxyError):
    """The image source is broken: malformed manifest, unreadable blob."""

    kind = "source-error"


class RetryableError(SourceError):
    """A transient failure: a stalled or dropped upstream."""

    kind = "retryable"
    retryable = True


class DigestMismatchError(SourceError):
    """Content read from the source does not match its digest or size."""

    kind = "digest-mismatch"

    def __init__(self, message: str, *, expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual
