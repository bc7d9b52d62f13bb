"""The HTTP/1.1 connection: uvicorn's h11 protocol with a bound on the time to send headers.

uvicorn bounds how long an idle kept-alive connection may wait (``timeout_keep_alive``)
but not how long a client may take to send a request's headers: one that sends half a
header block holds its connection for ever. :func:`with_header_timeout` gives a protocol
class that closes such a connection ``seconds`` after it opened (or after its previous
response) unless a complete request head has arrived, answering ``408 Request Timeout``.
The body is bounded separately, by the application (``--body-timeout``).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

_MESSAGE = b"the request headers did not arrive in time (--header-timeout)"
TIMEOUT_REPLY = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                 + f"content-length: {len(_MESSAGE)}\r\nconnection: close\r\n\r\n".encode() + _MESSAGE)


def with_header_timeout(seconds: float) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass that closes a connection whose request head takes longer than ``seconds``."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a complete request head: the application takes over
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head is bounded the same way

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.write(TIMEOUT_REPLY)
                self.transport.close()

    return HeaderTimeoutProtocol
