"""Who takes part: the agents whose retained status says online, and which of them train.

A sync round waits for its members: agents online and either training (an update accepted in the last
three rounds) or just arrived (within ``horizon`` seconds). A retained "online" status alone, from a device
that never sends, stops counting after that. Memory is bounded by ``max_online``.

>>> p = Presence(max_online=10)
>>> p.status("a", online=True, now=0.0); p.status("ghost", online=True, now=0.0)
>>> p.trained("a", version=5)
>>> len(p), p.round_members(version=6, now=100.0, horizon=60.0)
(2, 1)
"""

from __future__ import annotations


class Presence:
    def __init__(self, max_online: int = 100_000) -> None:
        self.max_online = max_online
        self.online: set[str] = set()
        self._joined: dict[str, float] = {}  # online agent -> when its status said so
        self._sent: dict[str, int] = {}  # online agent -> version of its last accepted update
        self.refused = 0  # payloads on status topics that are not a status (ignored, presence unchanged)

    def __len__(self) -> int:
        return len(self.online)

    def status(self, agent: str, online: bool, now: float) -> None:
        """An agent's retained status said online or offline (beyond ``max_online`` agents, not tracked)."""
        if not online:
            self.online.discard(agent)
            self._joined.pop(agent, None)
            self._sent.pop(agent, None)
        elif len(self.online) < self.max_online and agent not in self.online:
            self.online.add(agent)
            self._joined[agent] = now

    def trained(self, agent: str, version: int) -> None:
        """An update of ``agent`` was accepted at ``version``."""
        if agent in self.online:
            self._sent[agent] = version

    def round_members(self, version: int, now: float, horizon: float) -> int:
        return sum(1 for a in self.online
                   if self._sent.get(a, -4) >= version - 3 or now - self._joined.get(a, now) < horizon)
