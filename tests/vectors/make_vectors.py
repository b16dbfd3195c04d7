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


if __name__ == "__main__":  # not on import: pytest imports every module for its doctests
    main()
