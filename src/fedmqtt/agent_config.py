"""An edge agent's settings (:class:`AgentConfig`) and the global model it holds (:class:`GlobalModel`).

``AgentConfig.allocation`` (an :class:`AllocationConfig`) turns on capability-based allocation (protocol
1.1, docs/protocol.md 10): the agent then probes its speed, advertises its capabilities in its status and
works as the coordinator's assignment says. Without it (the default) the agent does none of that: no probe,
no assignment subscription, no capabilities in its status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from fedmqtt.capabilities import MAX_TASKS, Power, check_tags, check_task_name, read_power
from fedmqtt.compression import Compression
from fedmqtt.errors import ConfigError
from fedmqtt.privacy import ClientDP
from fedmqtt.topics import Topics
from fedmqtt.types import Array, Encoding, ModelInfo


@dataclass(frozen=True)
class AllocationConfig:
    """Capabilities and assignments for one agent. ``task`` is the task it trains in its federation (the name
    the coordinator's ``--federations`` use); ``tasks`` every task it holds data for (default: just ``task``),
    the ones a coordinator may assign it to. With ``follow`` false it only advertises.

    >>> AllocationConfig("digits", tags={"site": "a"}).held
    ('digits',)
    """

    task: str
    tasks: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    follow: bool = True  # subscribe to the assignment and work as it says
    refresh: float = 5.0  # seconds: a new loss goes out in the status at most this often
    power_poll: float = 1.0  # seconds: read the power source this often; a change goes out at once
    read_power: Callable[[], Power] = read_power  # injectable (tests, devices with their own power monitor)
    settle: float = 10.0  # on a move to another federation: wait this long for the outbox's acks first

    def __post_init__(self) -> None:
        if len(self.held) > MAX_TASKS:
            raise ConfigError(f"an agent advertises at most {MAX_TASKS} tasks")
        try:  # here, not at the first status: a status a coordinator would refuse is never built
            for task in self.held:
                check_task_name(task)
            check_tags(self.tags)
        except ValueError as exc:
            raise ConfigError(f"allocation: {exc}") from exc
        if not self.refresh > 0 or not self.power_poll > 0 or self.settle < 0:
            raise ConfigError("allocation refresh and power_poll must be > 0, settle >= 0")

    @property
    def held(self) -> tuple[str, ...]:
        """``task`` first, then the others, without repeats."""
        return tuple(dict.fromkeys((self.task, *self.tasks)))


@dataclass(frozen=True)
class AgentConfig:
    topics: Topics = field(default_factory=Topics)
    local_steps: int = 20  # E optimizer steps per local round
    encoding: Encoding = "delta"
    # pad each round of local_steps steps to at least this long (simulates a slower device; an assigned E
    # pads in proportion, so that the device keeps its emulated speed)
    round_seconds: float = 0.0
    ack_timeout: float = 30.0  # re-send an unacknowledged update after this long
    max_outbox: int = 8  # unacknowledged updates held before training pauses (back-pressure)
    backoff_max: float = 10.0
    session_expiry: int = 600
    # unacknowledged updates on disk, in <outbox_dir>/<agent id>/ (<outbox_dir>/<federation>/<agent id>/ with
    # allocation: an agent that moves keeps each federation's updates apart)
    outbox_dir: str | Path | None = None
    dp: ClientDP | None = None  # client-level DP: clip and noise every delta before it leaves (fedmqtt.privacy)
    model_key: str | None = None  # the aggregator's Ed25519 public key (base64): adopt only models it signed
    # "pull": take the retained model when a local round is about to start (subscribe, take it, unsubscribe);
    # "push": stay subscribed and receive every version (a model per version on every device's link)
    model_delivery: Literal["pull", "push"] = "pull"
    compression: Compression = field(default_factory=Compression)  # how updates travel (compression.py)
    # the model as it travels to the device: "float32" (model topic), or "float16" / "int8" (model/<form>,
    # published when the aggregator's model_forms include it; else the agent takes the float32 model)
    model_download: Literal["float32", "float16", "int8"] = "float32"
    allocation: AllocationConfig | None = None  # capabilities and assignments (protocol 1.1); None: off
    secure: bool = False  # offer updates to secure-aggregation cohorts instead of publishing them (secure.py)

    def __post_init__(self) -> None:
        if self.dp is not None and self.encoding != "delta":
            raise ConfigError("client DP applies to deltas; use encoding='delta'")
        if self.compression.method != "none" and self.encoding != "delta":
            raise ConfigError("compressed updates are deltas; use encoding='delta'")
        if self.secure and (self.encoding != "delta" or self.compression.method != "none"):
            raise ConfigError("secure aggregation sums dense deltas: use encoding='delta' without compression")

    def outbox_path(self, agent_id: str) -> Path | None:
        """Where ``agent_id``'s unacknowledged updates are kept (None: in memory)."""
        if self.outbox_dir is None:
            return None
        base = Path(self.outbox_dir)
        return (base / self.topics.federation if self.allocation is not None else base) / agent_id


class GlobalModel(NamedTuple):
    info: ModelInfo
    params: dict[str, Array]
