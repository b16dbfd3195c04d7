"""Regenerate the protocol test vectors (run from the repo root: python tests/vectors/make_vectors.py).

The vectors are committed; tests decode them, so a change to the wire format shows up as a failing test.
"""

import json
from pathlib import Path

import numpy as np

from fedmqtt import codec
from fedmqtt.compression import Compression, compress

HERE = Path(__file__).parent


def main() -> None:
    params = {
        "dense/kernel": (np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5 - 1.0),
        "dense/bias": np.array([0.25, -0.5, 1.0], dtype=np.float32),
    }
    delta = {
        "dense/kernel": np.full((2, 3), 0.125, dtype=np.float32),
        "dense/bias": np.array([-0.25, 0.0, 0.5], dtype=np.float32),
    }
    fp = codec.fingerprint(params)
    model = codec.encode_model(params, version=7)
    update = codec.encode_update(delta, agent="edge-1", update_id="0123456789abcdef", base_version=7, num_samples=42,
                                 encoding="delta", model_fingerprint=fp)
    (HERE / "model_v7.safetensors").write_bytes(model)
    (HERE / "update_edge-1.safetensors").write_bytes(update)
    expected = {
        "fingerprint_lines": "".join(
            f"{n}\t{codec.dtype_code(params[n].dtype)}\t{','.join(map(str, params[n].shape))}\n" for n in sorted(params)),
        "model": {"metadata": codec.decode(model).metadata,
                  "tensors": {k: {"dtype": "F32", "shape": list(v.shape), "values": v.ravel().tolist()}
                              for k, v in params.items()}},
        "update": {"metadata": codec.decode(update).metadata,
                   "tensors": {k: {"dtype": "F32", "shape": list(v.shape), "values": v.ravel().tolist()}
                               for k, v in delta.items()}},
    }
    # Compressed forms of the same delta (protocol 1.1): the dense delta each one stands for is in expected.json.
    compressed = {}
    for label, setting in (("float16", "float16"), ("int8", "int8"), ("topk", "topk:0.34")):
        sent = compress(delta, Compression.parse(setting), np.random.default_rng(7))
        payload = codec.encode_update(sent.tensors, agent="edge-1", update_id=f"0123456789abcd{label[:2]}",
                                      base_version=7, num_samples=42, model_fingerprint=fp, extra=sent.metadata)
        (HERE / f"update_edge-1_{label}.safetensors").write_bytes(payload)
        compressed[label] = {"metadata": codec.decode(payload).metadata,
                             "dense": {k: {"shape": list(v.shape), "values": v.ravel().tolist()}
                                       for k, v in sent.dense.items()}}
    expected["compressed_updates"] = compressed
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print("fingerprint", fp)
    allocation_vectors()
    combined_vectors(params)


def combined_vectors(params: dict[str, np.ndarray]) -> None:
    """Section 12: a worker's combined update of two members on model_v7, and the duplicate_member ack that
    names one of them."""
    from fedmqtt import members
    from fedmqtt.schemas import Ack, dump

    mean = {"dense/kernel": np.full((2, 3), 0.0625, dtype=np.float32),
            "dense/bias": np.array([0.5, -0.125, 0.0], dtype=np.float32)}
    carried = [("edge-1", "0123456789abcdef", 7), ("edge-2", "fedcba9876543210", 6)]
    payload = codec.encode_update(mean, agent="worker-1", update_id="worker-1-a1b2c3d4-1", base_version=7,
                                  num_samples=84, model_fingerprint=codec.fingerprint(params),
                                  extra={members.MEMBERS: members.encode(carried)})
    (HERE / "combined_worker-1.safetensors").write_bytes(payload)
    refusal = Ack(update_id="worker-1-a1b2c3d4-1", status="rejected", version=9, reason="duplicate_member",
                  detail="1 of 2 members were applied before, e.g. edge-2/fedcba9876543210",
                  members=["edge-2/fedcba9876543210"])
    (HERE / "combined.json").write_text(json.dumps({
        "topic": "fedmqtt/default/combined/worker-1",
        "metadata": codec.decode(payload).metadata,
        "members": [list(m) for m in carried],
        "updates_it_stands_for": len(carried),
        "tensors": {k: {"dtype": "F32", "shape": list(v.shape), "values": v.ravel().tolist()} for k, v in mean.items()},
        "duplicate_member_ack": json.loads(dump(refusal)),
    }, indent=2, sort_keys=True) + "\n")


def allocation_vectors() -> None:
    """Section 10: a status with capabilities, an assignment, and assignments a reader must refuse."""
    from fedmqtt.allocation.base import Assignment, Plan
    from fedmqtt.allocation_schemas import assignment_payload, capabilities_json
    from fedmqtt.capabilities import Capabilities, Compute, Link, Memory, Power
    from fedmqtt.schemas import Status, dump

    caps = Capabilities(Compute(85.25, 32), Memory(4125097984, 2011131904), Power("battery", 64.0),
                        Link(125000.0, 0.05), 1200, ("hapt",), {"hw": "rpi4", "site": "plant-3"}, 0.41)
    status = Status(agent="edge-3", state="online", version=41, updates_sent=17, ts=1795612345.25,
                    capabilities=capabilities_json(caps))
    (HERE / "status_with_capabilities.json").write_bytes(dump(status) + b"\n")
    a = Assignment("edge-3", Plan("hapt", "hapt", 10, None, 0.5, "topk:0.01"), 1795612345250, 1795612345.25,
                   "utility+speed-aware+bandwidth")
    good = json.loads(assignment_payload(a))
    (HERE / "assignment.json").write_bytes(assignment_payload(a) + b"\n")
    bad = [("participation", {"participation": 0}), ("compression", {"compression": "zip"}),
           ("federation", {"federation": "coordinator"}), ("local_steps", {"local_steps": "10"}),
           ("sequence", {"sequence": -1}), ("agent", {"agent": "edge 3"}), ("schema", {"schema": 2})]
    (HERE / "assignment_invalid.json").write_text(json.dumps(
        [{"field": f, "payload": good | change} for f, change in bad], indent=1) + "\n")


if __name__ == "__main__":  # not on import: pytest imports every module for its doctests
    main()
