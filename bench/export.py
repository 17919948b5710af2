"""File sizes and ONNX Runtime latency of the exported model: float32 vs codebook vs grid encodings.

    python bench/export.py --model-file runs/table/lenet300_100/sws-default/model.gqz [...more files]

For each compressed ``.gqz`` file: bytes of the float32 ONNX export, the codebook ONNX (UINT4/UINT8
indices -> Cast -> Gather), the grid ONNX (centres rounded onto a 4-bit grid -> DequantizeLinear),
the ``.gqz`` file itself, and gzip -9 of each; then onnxruntime latency (median of interleaved runs)
of the codebook and grid exports relative to float32, at batch 1 and 256 (sessions from
``gmm_quant.export.session``, which lets ONNX Runtime decode the weights once at load time).
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import tempfile
import time

import numpy as np

from gmm_quant.core import accounting, grid
from gmm_quant.core.rules import flatten
from gmm_quant.formats import export, storage


def _latency(sessions: dict, x, repeats: int) -> dict:
    times = {name: [] for name in sessions}
    for sess in sessions.values():  # warm up
        sess.run(None, {"input": x})
    for _ in range(repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, {"input": x})
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_file(path: pathlib.Path, repeats: int):
    apply_fn, params, codebooks, compressed = export.load_model_file(path)
    shape = (8, 8, 1) if (compressed.config or {}).get("dataset") == "digits" else (28, 28, 1)
    x = np.random.default_rng(0).normal(size=(256, *shape)).astype(np.float32)
    grid_codebooks = {p: grid.to_grid(cb, bits=4) for p, cb in codebooks.items()}
    from gmm_quant.core.codebook import dequantize

    grid_params = dequantize(grid_codebooks, params)
    models = {
        "float32": export.to_onnx(apply_fn, params, {}, x[:8], remove_dead_units=False),
        "sparse, units kept": export.to_onnx(
            apply_fn, params, codebooks, x[:8], encoding="sparse", remove_dead_units=False
        ),
        "codebook": export.to_onnx(apply_fn, params, codebooks, x[:8], encoding="codebook"),
        "sparse": export.to_onnx(apply_fn, params, codebooks, x[:8], encoding="sparse"),
        "grid": export.to_onnx(apply_fn, grid_params, grid_codebooks, x[:8], encoding="grid"),
    }
    blobs = {name: m.SerializeToString() for name, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for version in (1, 2):
            out = pathlib.Path(tmp) / f"v{version}.gqz"
            storage.save_compressed(out, codebooks, params, model=compressed.model, config=compressed.config,
                                    version=version)  # fmt: skip
            blobs[f".gqz v{version}"] = out.read_bytes()
    sizes = {name: (len(b), len(gzip.compress(b, 9))) for name, b in blobs.items()}
    flat = {p: np.asarray(v) for p, v in flatten(params).items()}
    sizes["Han count"] = (accounting.summarize(codebooks, flat)["han_bits"] / 8, None)
    sessions = {name: export.session(blobs[name]) for name in models}
    latency = {batch: _latency(sessions, x[:batch], repeats) for batch in (1, 256)}
    load = {name: _load_time(blobs[name]) for name in models}
    return compressed.model, sizes, latency, load


def _load_time(blob: bytes, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        export.session(blob)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", nargs="+", required=True, type=pathlib.Path)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print("| model | file | bytes | / Han count | gzip -9 bytes |")
    print("| --- | --- | --- | --- | --- |")
    lat_rows = []
    for path in args.model_file:
        model, sizes, latency, load = bench_file(path, args.repeats)
        han = sizes["Han count"][0]
        for name, (raw, gz) in sizes.items():
            print(f"| {model} | {name} | {raw:,.0f} | {raw / han:.2f}x | {f'{gz:,}' if gz else ''} |")
        for batch, t in latency.items():
            names = ("codebook", "sparse, units kept", "sparse", "grid")
            cells = [f"{t[n] * 1e3:.3f} ({t[n] / t['float32']:.2f}x)" for n in names]
            lat_rows.append(f"| {model} | {batch} | {t['float32'] * 1e3:.3f} | " + " | ".join(cells) + " |")
        lat_rows.append(f"| {model} | load ms | " + " | ".join(f"{load[n] * 1e3:.1f}" for n in load) + " |")
    print()
    print("| model | batch | float32 ms | codebook | sparse, units kept | sparse | grid |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(lat_rows))


if __name__ == "__main__":
    main()
