"""What a worker's combined update carries: the device updates in it (metadata ``fedmqtt.members``).

A worker (fedmqtt.worker) combines k device updates into one; the aggregator that owns the model counts it
as k updates and records each member in its de-duplication window, so that a device update re-sent through
another worker is never applied twice (``duplicate_member``).

>>> text = encode([("dev-1", "u7", 3), ("dev-2", "u1", 4)])
>>> parse({MEMBERS: text}, base_version=4)
(('dev-1', 'u7', 3), ('dev-2', 'u1', 4))
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from fedmqtt.errors import InvalidUpdate, Reason
from fedmqtt.types import is_id

MEMBERS = "fedmqtt.members"
MAX_BYTES = 12 << 10  # a combined update's header stays within what the model's own header allows
Member = tuple[str, str, int]  # agent, update id, base version


def encode(members: Iterable[Member]) -> str:
    return json.dumps([[a, u, int(b)] for a, u, b in members], separators=(",", ":"))


def parse(metadata: Mapping[str, str], base_version: int) -> tuple[Member, ...]:
    """The members a combined update declares; raises InvalidUpdate(bad_metadata) unless they are a
    non-empty list of distinct ``[agent, update id, base version]`` with bases at most the combined
    update's own."""
    text = metadata.get(MEMBERS)
    if text is None:
        raise InvalidUpdate(Reason.BAD_METADATA, f"a combined update needs {MEMBERS}")
    if len(text) > MAX_BYTES:
        raise InvalidUpdate(Reason.BAD_METADATA, f"{MEMBERS} is {len(text)} bytes, more than {MAX_BYTES}")
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise InvalidUpdate(Reason.BAD_METADATA, f"{MEMBERS} is not JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise InvalidUpdate(Reason.BAD_METADATA, f"{MEMBERS} must be a non-empty list")
    out: list[Member] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and is_id(item[0])
                and isinstance(item[1], str) and is_id(item[1]) and type(item[2]) is int
                and 0 <= item[2] <= base_version):
            raise InvalidUpdate(Reason.BAD_METADATA, f"{MEMBERS}: {str(item)[:80]} is not [agent, update id, "
                                                     f"base version <= {base_version}]")
        out.append((item[0], item[1], item[2]))
    if len({(a, u) for a, u, _ in out}) != len(out):
        raise InvalidUpdate(Reason.BAD_METADATA, f"{MEMBERS} names an update twice")
    return tuple(out)
