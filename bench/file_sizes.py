"""The files a run ships against its Han count: ``model.gqz`` as written before (v3, the run's whole
config in the header) and now (v4), ``model.onnx`` with the converter's readable tensor names and
with the short ones the file holds; all from the same compressed model.

    python bench/file_sizes.py runs/vit runs/charlm      # workdirs of finished runs; ~10 s each

The Han count is ``metrics.json``'s (``han_bytes``: quantised layers plus float leaves as stored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile

from gmm_quant.formats import export, storage
from gmm_quant.formats.onnx_export.names import compact_names
from gmm_quant.run import config as cfgm
from gmm_quant.training import data


def sizes(workdir: pathlib.Path) -> dict:
    compressed = storage.load_compressed(workdir / "model.gqz")
    han = json.loads((workdir / "metrics.json").read_text())["han_bytes"]
    changed = compressed.config or {}
    cfg = cfgm.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in changed.items()})
    params = {**{p: cb.dequantize() for p, cb in compressed.codebooks.items()}, **compressed.float_leaves}
    common = dict(model=compressed.model, float_codes=compressed.float_codes, state=compressed.state,
                  activations=compressed.activations, reuse=compressed.reuse)  # fmt: skip
    out = {"han": han}
    with tempfile.TemporaryDirectory() as tmp:
        for version, config in ((3, dataclasses.asdict(cfg)), (4, cfgm.changed_fields(cfg))):
            path = pathlib.Path(tmp) / f"v{version}.gqz"
            storage.save_compressed(
                path, compressed.codebooks, params, config=config, version=version, **common
            )
            out[f"gqz v{version}"] = path.stat().st_size
        apply_fn, params, codebooks, _ = export.load_model_file(workdir / "model.gqz", None)
        sample = data.random_inputs(cfg.dataset)
        readable = export.to_onnx(apply_fn, params, codebooks, sample[:8], float_codes=compressed.float_codes,
                                  remove_dead_units=False)  # fmt: skip
        out["onnx readable"] = len(readable.SerializeToString())
        compact_names(readable)
        out["onnx short names"] = len(readable.SerializeToString())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+", type=pathlib.Path, help="workdirs of finished runs")
    args = ap.parse_args(argv)
    columns = ".gqz v3 (before) | .gqz v4 (now) | ONNX, readable names | ONNX as written (short names)"
    print(f"| run | Han count | {columns} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for workdir in args.workdirs:
        s = sizes(workdir)
        cells = [
            f"{s[k]:,} ({s[k] / s['han']:.3f}x)"
            for k in ("gqz v3", "gqz v4", "onnx readable", "onnx short names")
        ]
        print(f"| {workdir.name} | {s['han']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
