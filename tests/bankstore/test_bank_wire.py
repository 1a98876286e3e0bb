"""Zero-copy SET and GET of chunk bytes: values land whole in their buffers, and odd replies
(missing keys, other lengths, errors) leave the connection in step for the replies after them."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bankstore.wire import _get_with_copy, get_into, set_from

pytestmark = pytest.mark.redis

SIZES = [0, 1, 100, 2**16 - 3, 2**16, 3 * 2**20 + 7]


@pytest.fixture(params=[get_into, _get_with_copy], ids=["received-in-place", "copied"])
def read(request):
    return request.param


def test_values_round_trip_through_their_buffers(client, prefix, read) -> None:
    values = [os.urandom(size) for size in SIZES]
    keys = [f"{prefix}value:{index}" for index in range(len(values))]
    items = [(key, memoryview(value)) for key, value in zip(keys, values, strict=True)]
    set_from(client, items, ttl_s=60)
    assert 0 < client.ttl(keys[-1]) <= 60

    buffers = [np.empty(len(value), dtype=np.uint8) for value in values]
    replies = read(client, keys, [memoryview(buffer) for buffer in buffers])
    assert replies == SIZES
    for value, buffer in zip(values, buffers, strict=True):
        assert buffer.tobytes() == value


def test_odd_replies_are_reported_and_the_rest_still_read(client, prefix, read) -> None:
    client.set(f"{prefix}good:0", b"a" * 10)
    client.set(f"{prefix}longer", b"b" * 500)
    client.rpush(f"{prefix}a-list", b"x")
    client.set(f"{prefix}good:1", b"c" * 20)
    keys = [f"{prefix}{name}" for name in ("good:0", "absent", "longer", "a-list", "good:1")]
    buffers = [np.zeros(size, dtype=np.uint8) for size in (10, 5, 50, 5, 20)]

    replies = read(client, keys, [memoryview(buffer) for buffer in buffers])
    assert replies[:3] == [10, None, 500]
    assert "WRONGTYPE" in str(replies[3])
    assert replies[4] == 20
    assert buffers[0].tobytes() == b"a" * 10
    assert buffers[4].tobytes() == b"c" * 20
    assert client.ping()  # the pooled connection is still in step
    assert client.get(f"{prefix}good:1") == b"c" * 20
