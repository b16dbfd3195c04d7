"""Coverage-guided fuzzing (atheris, libFuzzer) of every decoder that reads bytes off the network or the disk.

Each target hands the fuzzer's bytes to one decoder and lets through only the errors that decoder documents
(errors.py): anything else that escapes, a hang past ``-timeout`` or memory past ``-rss_limit_mb`` is a
crash, and libFuzzer saves the input as ``crash-<sha1>`` (or ``timeout-``, ``oom-``) under
``-artifact_prefix``. Every target starts from valid messages (seeds.py), written to a fresh corpus
directory, or to the corpus directories given when they are new or empty.

    python fuzz/decoders.py list                                 # the targets
    python fuzz/decoders.py codec -max_total_time=600            # fuzz one target for ten minutes
    python fuzz/decoders.py codec ./crash-0123abcd               # run one saved input again
    FEDMQTT_FUZZ_SECONDS=600 python -m pytest tests/test_fuzz.py # every target, 600 s shared between them
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["fedmqtt"]):
    import numpy as np
    from pydantic import ValidationError

    import seeds
    from fedmqtt import codec, dedup, global_model, model_file, ownership, signing
    from fedmqtt.allocation_schemas import parse_assignment
    from fedmqtt.assignment import AssignmentFollower, Defaults
    from fedmqtt.coordinator import Book
    from fedmqtt.errors import CodecError, ConfigError, IncompatibleModel, InvalidMessage, InvalidUpdate, SecAggAbort
    from fedmqtt.schemas import Ack, Status
    from fedmqtt.secagg import Client, Cohort, Server
    from fedmqtt.secagg import messages as m
    from fedmqtt.topics import Topics
    from fedmqtt.transport import Message
    from fedmqtt.validation import Reference, check_norm, check_update

REF = Reference.of(seeds.PARAMS)
SEEN = dedup.of([(dedup.key(seeds.AGENT, "applied"), 2)], 0)
PRIVATE_PEM, PUBLIC = signing.new_key()
SIGNER = signing.Signer.from_pem(PRIVATE_PEM)


def update(data: bytes) -> None:
    """What the aggregator checks before the strategy sees an update (validation.py), compressed forms too."""
    with suppress(InvalidUpdate):
        checked = check_update(data, seeds.AGENT, reference=REF, version=3, max_staleness=2, seen=SEEN,
                               max_payload=1 << 16)
        check_norm(checked.tensors, 100.0)


def decode(data: bytes) -> None:
    with suppress(CodecError):
        codec.decode(data, max_payload=1 << 16)


def model(data: bytes) -> None:
    """A model on ``model`` or ``model/<form>``: the aggregator's look at its own model topic (which never
    raises), and an agent's acceptance without and with the model key."""
    ownership.model_info(data, REF.max_header)
    with suppress(CodecError, InvalidUpdate, IncompatibleModel):
        global_model.accept(data, seeds.FP, seeds.SPEC)
    with suppress(CodecError, InvalidUpdate, IncompatibleModel):
        global_model.accept(data, seeds.FP, seeds.SPEC, model_key=PUBLIC)


MODEL_FILE = Path(tempfile.mkdtemp(prefix="fedmqtt-fuzz-")) / "model.safetensors"


def model_file_load(data: bytes) -> None:
    MODEL_FILE.write_bytes(data)
    with suppress(ConfigError):
        model_file.load(MODEL_FILE, seeds.PARAMS)


def status(data: bytes) -> None:
    """An agent's status, as the aggregator reads it (presence) and as the coordinator does (capabilities;
    its ``status`` refuses what it cannot read and never raises); and an ack, as the agent reads it."""
    with suppress(ValidationError):
        Status.model_validate_json(data)
    book = Book()
    book.status("hapt", seeds.AGENT, data, 1.0)
    book.views()
    with suppress(ValidationError):
        Ack.model_validate_json(data)


def assignment(data: bytes) -> None:
    with suppress(InvalidMessage):
        parse_assignment(data, seeds.AGENT)
    AssignmentFollower(seeds.AGENT, Defaults("default", "hapt"), tasks=("hapt",)).offer(data)  # never raises
    Book().retained(seeds.AGENT, data)


# The secure-aggregation service of an aggregator, fed as the broker would: the first byte picks the topic's
# message type and sender, and whether a step (members a, b, c; step id s1) is in progress.
KINDS_IN = ("ready", "keys", "shares", "masked", "reveal", "refuse")
SENDERS = ("a", "b", "zed")
COHORT = Cohort("s1", 3, ("a", "b", "c"), threshold=2, degree=None, clip=1.0, bits=16, dim=seeds.DIM)
TOPICS = Topics(federation="fuzz")
SECURE: list[Any] = []  # secagg_in's service, made once that target is chosen


def _no_connection(opts: object) -> Any:
    raise AssertionError("a fuzz target makes no connection")


def secure_service() -> Any:
    """The service beside an aggregator (imported here: only this target needs jax)."""
    asyncio.set_event_loop(asyncio.new_event_loop())
    with atheris.instrument_imports(include=["fedmqtt"]):
        from fedmqtt.aggregator import Aggregator
        from fedmqtt.secure import SecureAggregation, SecureConfig
        from fedmqtt.strategies import fedasync
    aggregator = Aggregator(_no_connection, seeds.PARAMS, fedasync())  # messages are handed over directly
    return SecureAggregation(_no_connection, aggregator, SecureConfig(cohort_size=3))


def secagg_in(data: bytes) -> None:
    """Messages from members to the aggregator's secure-aggregation service (which counts and ignores what
    breaks the protocol: nothing may escape its message handler)."""
    if not data:
        return
    head, payload = data[0], data[1:]
    kind, sender = KINDS_IN[(head & 7) % len(KINDS_IN)], SENDERS[(head >> 3) % len(SENDERS)]
    service = SECURE[0]
    service.offers.clear()
    service._server = Server(COHORT) if head & 0x80 else None
    service._expected = set(COHORT.members)
    service._on_message(Message(f"{TOPICS.base}/secagg/{sender}/{kind}", payload, False))
    while not service._acks.empty():
        service._acks.get_nowait()
    with suppress(SecAggAbort):
        m.decode_masked(payload, seeds.DIM)


def secagg_out(data: bytes) -> None:
    """Messages from the aggregator to a member: parsed, and a cohort made into a member's session."""
    with suppress(SecAggAbort):
        msg = m.parse_to_agent(data)
        if isinstance(msg, m.CohortMsg):
            Client("a", msg.cohort("a"), np.zeros(seeds.DIM, np.float32))
        elif isinstance(msg, m.Roster | m.Forward):
            pairs = msg.keys.values() if isinstance(msg, m.Roster) else [(box,) for box in msg.shares.values()]
            for pair in pairs:
                for text in pair:
                    m.unb64(text)


Target = tuple[Callable[[bytes], None], Callable[[], list[bytes]]]
TARGETS: dict[str, Target] = {
    "codec": (decode, lambda: seeds.plain_updates() + seeds.models()),
    "update": (update, seeds.plain_updates),
    "compressed": (update, seeds.compressed_updates),
    "model": (model, lambda: seeds.models() + seeds.models(SIGNER)),
    "model_file": (model_file_load, seeds.models),
    "status": (status, lambda: seeds.statuses() + seeds.acks()),
    "assignment": (assignment, seeds.assignments),
    "secagg_in": (secagg_in, seeds.from_agents),
    "secagg_out": (secagg_out, seeds.to_agents),
}


def canary(data: bytes) -> None:
    """Not a decoder: it crashes on its own seed, so that tests/test_fuzz.py can see a crash reported."""
    if data.startswith(b"crash"):
        raise RuntimeError("the canary crashed, as it should")


def main(argv: list[str]) -> None:
    if argv[1:2] == ["list"]:
        print("\n".join(TARGETS))
        return
    targets = {**TARGETS, "canary": (canary, lambda: [b"crash"])}
    if len(argv) < 2 or argv[1] not in targets:
        sys.exit(f"usage: {argv[0]} list | TARGET [libFuzzer options] [corpus dirs or inputs]")
    test, make_seeds = targets[argv[1]]
    logging.disable(logging.CRITICAL)  # the services log every message they ignore
    if argv[1] == "secagg_in":
        SECURE.append(secure_service())
    args = [argv[0], *argv[2:]]
    corpora = [Path(a) for a in argv[2:] if not a.startswith("-")]
    if not corpora:  # no corpus given: start from the seeds in a fresh one
        corpora = [Path(tempfile.mkdtemp(prefix=f"fedmqtt-fuzz-{argv[1]}-"))]
        args.append(str(corpora[0]))
    for corpus in corpora:  # a new or empty corpus directory starts from the seeds
        if not corpus.exists() or (corpus.is_dir() and not any(corpus.iterdir())):
            corpus.mkdir(parents=True, exist_ok=True)
            for i, seed in enumerate(make_seeds()):
                (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup(args, test)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
