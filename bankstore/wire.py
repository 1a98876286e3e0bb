"""Chunk bytes between numpy buffers and Redis, without the copies redis-py makes on the way.

Through redis-py with hiredis, a large value is copied several times: a memoryview argument is
turned into bytes and then packed into a new command buffer; a reply goes from the socket buffer
into hiredis's buffer and then into a bytes object, which a reader copies once more into its
tensor. For a 500 MB bank those copies cost more than the transfer. Here a SET is sent as a small
header, the caller's own buffer and a small trailer (`Connection.send_packed_command` hands each
piece to `sendall`), and GET replies are received with `recv_into` straight into the slices of
preallocated stage buffers. Both run on one connection checked out of the client's pool, which
hands out connections with no unread data.

Note:
    Receiving needs the connection's socket, `Connection._sock`, which redis-py does not expose
    publicly; where a connection has none, `get_into` falls back to a pipelined GET and one copy.
    RESP2 and RESP3 replies are understood; a push message in the middle of the replies (RESP3
    with server notifications) is not, and drops the connection with a `redis.ConnectionError`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import redis

RECEIVE_BYTES = 2**16
"""Bytes asked of the socket while looking for a reply header (the rest goes straight through)."""
CRLF = b"\r\n"

Reply = int | redis.ResponseError | None
"""What `get_into` found for one key: the value's length, None for a missing key, or the error."""


def set_from(client: redis.Redis, items: Sequence[tuple[str, memoryview]], ttl_s: int) -> None:
    """SET key value EX ttl_s for each item, pipelined, each value sent from its own buffer.

    Raises:
        redis.ResponseError: the server refused one of the SETs (the first refusal).
    """
    ttl = str(ttl_s).encode()
    pieces: list[bytes | memoryview] = []
    for key, value in items:
        name = key.encode()
        pieces.append(b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n" % (len(name), name, len(value)))
        pieces.append(value)
        pieces.append(b"\r\n$2\r\nEX\r\n$%d\r\n%b\r\n" % (len(ttl), ttl))

    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command(pieces)
        replies = [connection.read_response() for _ in items]
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply


def get_into(client: redis.Redis, keys: Sequence[str], views: Sequence[memoryview]) -> list[Reply]:
    """GET each key into its view, pipelined; a value must have exactly the view's length.

    A value of another length is read and discarded (its length is returned so the caller can
    name the mismatch); the connection stays usable after missing keys and error replies.

    Args:
        keys: the keys to read.
        views: one writable buffer per key, of the length its value should have.

    Returns:
        One `Reply` per key.
    """
    pool = client.connection_pool
    connection = pool.get_connection()
    sock = getattr(connection, "_sock", None)
    if sock is None:
        pool.release(connection)
        return _get_with_copy(client, keys, views)
    try:
        connection.send_packed_command(connection.pack_commands([("GET", key) for key in keys]))
        receiver = _Receiver(sock)
        return [receiver.bulk_into(view) for view in views]
    except TimeoutError as error:
        connection.disconnect()
        raise redis.TimeoutError(f"timeout reading chunks from Redis ({error})") from error
    except OSError as error:
        connection.disconnect()
        raise redis.ConnectionError(f"error reading chunks from Redis ({error})") from error
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


class _Receiver:
    """Reads RESP replies from a socket; bulk payloads go straight into the caller's buffers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()
        """Bytes received past the last parsed line."""

    def bulk_into(self, view: memoryview) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"-", b"!"):  # error (RESP2), blob error (RESP3)
            if kind == b"!":
                rest = self._payload(int(rest))
            return redis.ResponseError(rest.decode(errors="replace"))
        if line in (b"$-1", b"_"):  # nil (RESP2), null (RESP3)
            return None
        if kind != b"$":
            raise redis.ConnectionError(f"unexpected reply {bytes(line[:40])!r} to GET")

        length = int(rest)
        if length != len(view):
            self._payload(length)
            return length
        taken = min(len(self.pending), length)
        view[:taken] = self.pending[:taken]
        del self.pending[:taken]
        while taken < length:
            received = self.sock.recv_into(view[taken:], length - taken)
            if received == 0:
                raise redis.ConnectionError("Redis closed the connection in the middle of a value")
            taken += received
        self._crlf()
        return length

    def _line(self) -> bytes:
        while (end := self.pending.find(CRLF)) < 0:
            self._receive()
        line = bytes(self.pending[:end])
        del self.pending[: end + len(CRLF)]
        return line

    def _payload(self, length: int) -> bytes:
        """A payload that goes nowhere (or into a message), with its trailing CRLF."""
        while len(self.pending) < length + len(CRLF):
            self._receive()
        payload = bytes(self.pending[:length])
        del self.pending[: length + len(CRLF)]
        return payload

    def _crlf(self) -> None:
        while len(self.pending) < len(CRLF):
            self._receive()
        if self.pending[: len(CRLF)] != CRLF:
            raise redis.ConnectionError("a value from Redis does not end in CRLF")
        del self.pending[: len(CRLF)]

    def _receive(self) -> None:
        data = self.sock.recv(RECEIVE_BYTES)
        if not data:
            raise redis.ConnectionError("Redis closed the connection in the middle of a reply")
        self.pending += data


def _get_with_copy(
    client: redis.Redis, keys: Sequence[str], views: Sequence[memoryview]
) -> list[Reply]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    replies: list[Reply] = []
    for value, view in zip(pipe.execute(raise_on_error=False), views, strict=True):
        if value is None or isinstance(value, redis.ResponseError):
            replies.append(value)
            continue
        if len(value) == len(view):
            view[:] = value
        replies.append(len(value))
    return replies
