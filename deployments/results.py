"""Where results live: a hash per frame id (readable by id) and a results stream per line.

Keys (under the configured prefix, default `defectscope:`):

    result:<frame_id>     hash: `verdict` (msgpack Result), later `explanation` (the same Result
                          with the LLM's answer); expires after `results_ttl_s`
    results:<line>        stream of entries {frame_id, kind: verdict|explanation, result}
    frames:<line>         stream of frame entries {frame: msgpack frame message}
    deadletter:<line>     stream of frames that failed `max_deliveries` times, with the reason

Writing a verdict is idempotent by frame id: a Lua script sets the hash field only if it is not
there yet and appends to the stream in the same step, so a frame delivered twice (a consumer died
after writing but before acknowledging) still has exactly one verdict in its line's stream.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from deployments.messages import Frame, Result

_WRITE_ONCE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return 0
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
           'frame_id', ARGV[5], 'kind', ARGV[1], 'result', ARGV[2])
return 1
"""


class Keys:
    """Key names under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def result(self, frame_id: str) -> str:
        return f"{self.prefix}result:{frame_id}"

    def results(self, line: str) -> str:
        return f"{self.prefix}results:{line}"

    def frames(self, line: str) -> str:
        return f"{self.prefix}frames:{line}"

    def dead_letters(self, line: str) -> str:
        return f"{self.prefix}deadletter:{line}"

    def line_of(self, frames_key: str) -> str:
        return frames_key.removeprefix(f"{self.prefix}frames:")


class ResultStore:
    """Idempotent result writes and reads by frame id."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, ttl_s: int, maxlen: int) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self._write_once = client.register_script(_WRITE_ONCE)

    async def write_verdict(self, result: Result) -> bool:
        """Stores and announces a frame's verdict; False if it already had one."""
        return await self._write(result, "verdict")

    async def write_explanation(self, result: Result) -> bool:
        """Stores and announces the explained result; False if it was explained already."""
        return await self._write(result, "explanation")

    async def _write(self, result: Result, kind: str) -> bool:
        keys = [self.keys.result(result.frame_id), self.keys.results(result.line)]
        arguments = [kind, result.pack(), self.ttl_s, self.maxlen, result.frame_id]
        return bool(await self._write_once(keys=keys, args=arguments))

    async def get(self, frame_id: str) -> Result | None:
        """The newest result of a frame (explained if it was), or None."""
        verdict, explanation = await self.client.hmget(
            self.keys.result(frame_id), ["verdict", "explanation"]
        )
        stored = explanation or verdict
        return Result.unpack(stored) if stored else None


class FrameQueue:
    """Appends frames to their line's stream, with a backlog check for admission."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, maxlen: int, group: str) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.maxlen = maxlen
        self.group = group

    async def push(self, frame: Frame) -> str:
        """XADD the frame; returns the entry id."""
        entry = await self.client.xadd(
            self.keys.frames(frame.line),
            {"frame": frame.to_message()},
            maxlen=self.maxlen,
            approximate=True,
        )
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def backlog(self, line: str) -> int:
        """Frames of `line` not yet delivered to the consumer group (the stream's length when the
        group does not exist yet)."""
        key = self.keys.frames(line)
        try:
            groups: list[dict[str, Any]] = await self.client.xinfo_groups(key)
        except redis.ResponseError:
            return 0  # no such stream yet
        for group in groups:
            name = group.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                lag = group.get("lag")
                if lag is not None:
                    return int(lag)
        return int(await self.client.xlen(key))
