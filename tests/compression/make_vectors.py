"""Write the golden vectors of the payload format into `compression/vectors/`.

Run from the repository root: `.venv/bin/python -m tests.compression.make_vectors` (or pass
another output folder as the only argument). The output is a pure function of this file and the
codecs: a fixed numpy seed per vector, and zip members with a fixed date, so running it again
rewrites identical bytes. `tests/compression/test_wire.py` decodes every vector, re-encodes it
byte for byte, and checks that this script reproduces the stored files.

Per vector: `<name>.bin` (the payload), `<name>.npz` (`input/<tensor>`: the flat fp32 values
given to `encode`; `decoded/<tensor>`: the dense fp32 values `decode` must return, reshaped to
the tensor's shape; only tensors present in the payload), and an entry in `manifest.json`.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedglm.compression import CODECS, NO_HASH, Header, Kind, decode, encode, model_hash
from fedglm.compression.wire import unpack

ROOT = Path(__file__).resolve().parents[2]
VECTOR_DIR = ROOT / "compression" / "vectors"
SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (32, 16),
    "blocks.0.attn.q.weight": (16, 16),
    "norm.weight": (16,),
}
CODER_NAMES = {0: "elias-fano", 1: "zstd"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))


def _random_model(seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(_size(shape)) * scale).astype(np.float32) for name, shape in SHAPES.items()
    }


def _state(values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(values[name].reshape(SHAPES[name]).copy()) for name in SHAPES}


def base_model() -> dict[str, np.ndarray]:
    """The global model every UPDATE and the DELTA are built on."""
    return _random_model(1000, 0.02)


def _clustered_update(seed: int) -> dict[str, np.ndarray]:
    """A model change whose largest entries sit in a few rows of `embed.weight` (clustered)."""
    values = _random_model(seed, 1e-4)
    rng = np.random.default_rng(seed + 1)
    embed = values["embed.weight"].reshape(SHAPES["embed.weight"])
    embed[5:7] += (rng.standard_normal((2, 16)) * 1e-2).astype(np.float32)
    values["norm.weight"][:] *= np.float32(0.01)  # tiny: a global selection leaves it out
    values["norm.weight"][3] = 0.0
    return values


def _vector_specs() -> list[dict[str, Any]]:
    base = model_hash(_state(base_model()))
    target_values = {
        name: base_model()[name] + _random_model(2000, 1e-3)[name].astype(np.float32) for name in SHAPES
    }
    target = model_hash(_state(target_values))
    update = {"kind": Kind.UPDATE, "round": 7, "base": base, "target": NO_HASH}
    return [
        {"name": "update-dense", "codec": "dense", "values": _random_model(1, 1e-3), **update},
        {"name": "update-fp16", "codec": "fp16", "values": _random_model(2, 1e-5), **update},
        {
            "name": "update-topk-tensor",
            "codec": "topk",
            "density": 0.05,
            "values": _clustered_update(3),
            **update,
        },
        {
            "name": "update-topk-global",
            "codec": "topk",
            "density": 0.05,
            "selection": "global",
            "values": _clustered_update(4),
            **update,
        },
        {
            "name": "update-ternary",
            "codec": "ternary",
            "density": 0.05,
            "values": _random_model(5, 1e-3),
            **update,
        },
        {"name": "update-int8", "codec": "int8", "values": _random_model(6, 1e-3), **update},
        {
            "name": "delta-topk",
            "codec": "topk",
            "density": 0.05,
            "kind": Kind.DELTA,
            "round": 8,
            "base": base,
            "target": target,
            "values": _random_model(7, 1e-3),
        },
        {
            "name": "full-dense",
            "codec": "dense",
            "kind": Kind.FULL,
            "round": 8,
            "base": NO_HASH,
            "target": target,
            "values": target_values,
        },
        {
            "name": "init",
            "codec": "dense",
            "kind": Kind.INIT,
            "round": 1,
            "base": NO_HASH,
            "target": base,
            "values": {},
        },
    ]


def _index_coders(blob: bytes, codec: str) -> dict[str, str]:
    """The index coder each sparse tensor of a payload uses."""
    if not CODECS[codec].sparse:
        return {}
    offset = {"topk": 5, "ternary": 8}[codec]
    payload = unpack(blob, SHAPES, len(blob))
    return {entry.name: CODER_NAMES[entry.body[offset]] for entry in payload.tensors}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive (readable by np.load) whose bytes depend only on `arrays`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue(), compresslevel=9)
    return out.getvalue()


def build() -> dict[str, bytes]:
    """Every file of the vectors folder, by file name."""
    files: dict[str, bytes] = {}
    manifest: dict[str, Any] = {
        "shapes": {name: list(shape) for name, shape in SHAPES.items()},
        "vectors": [],
    }
    for spec in _vector_specs():
        codec = CODECS[spec["codec"]]
        header = Header(spec["kind"], codec.codec_id, spec["round"], spec["base"], spec["target"])
        density = spec.get("density", 1.0)
        selection = spec.get("selection", "per-tensor")
        inputs = {name: np.asarray(v, dtype=np.float32).reshape(-1) for name, v in spec["values"].items()}
        work = {name: v.copy() for name, v in inputs.items()}
        blob = encode(work, SHAPES, codec, header, density=density, selection=selection)
        _, decoded = decode(blob, SHAPES)
        arrays = {f"input/{name}": v for name, v in inputs.items()}
        for name, d in decoded.items():
            arrays[f"decoded/{name}"] = d.dense(_size(SHAPES[name])).reshape(SHAPES[name])
        files[spec["name"] + ".bin"] = blob
        files[spec["name"] + ".npz"] = _npz_bytes(arrays)
        manifest["vectors"].append(
            {
                "name": spec["name"],
                "payload": spec["name"] + ".bin",
                "arrays": spec["name"] + ".npz",
                "kind": spec["kind"].name,
                "codec": spec["codec"],
                "density": density,
                "selection": selection,
                "round": spec["round"],
                "base": spec["base"].hex(),
                "target": spec["target"].hex(),
                "tensors": list(decoded),
                "index_coders": _index_coders(blob, spec["codec"]),
                "payload_bytes": len(blob),
            }
        )
    coders = {c for v in manifest["vectors"] if v["codec"] == "topk" for c in v["index_coders"].values()}
    if coders != set(CODER_NAMES.values()):
        raise RuntimeError(f"the topk vectors use index coders {sorted(coders)}, both are needed")
    files["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    return files


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else VECTOR_DIR
    out.mkdir(parents=True, exist_ok=True)
    files = build()
    for name, data in files.items():
        (out / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files ({total} bytes) to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
