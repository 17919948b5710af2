"""The float32 model's ONNX Runtime latency, timed as the search times a trial (``search.targets``):
the number to give ``python -m gmm_quant.tune --max-latency-ms`` for "no slower than float".

    python bench/float_latency.py --config vit_mnist --pretrained runs/vit --data-dir ../shared/data

Prints the median of ``--repeats`` measurements (each the median of 30 calls after 30 warm-up calls,
2 intra-op threads) and their spread. ``--against A.onnx B.onnx`` times those files too, interleaved
with the float32 model measurement by measurement, and prints each one's latency and its ratio to it.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

from gmm_quant.formats import export
from gmm_quant.run import configs, inputs
from gmm_quant.run.pretrained import pretrained_weights
from gmm_quant.search import targets
from gmm_quant.training import data, modes


def float_latency(config, pretrained, batch, data_dir=None, repeats=5, against=()) -> dict:
    """{"float32": [ms, ...], file: [ms, ...]}: ``repeats`` interleaved measurements of each."""
    cfg = configs.load(config)
    apply_fn, params, _graphdef = inputs.build_model(cfg)
    params, state = pretrained_weights(pretrained, params, modes.state_of(apply_fn))
    apply_fn = modes.with_state(apply_fn, state)
    ds = data.load(cfg.dataset, data_dir)
    x = export.model_input(ds.x_test[:batch])
    proto = export.to_onnx(apply_fn, params, {}, x[:8], remove_dead_units=False)
    files = {"float32": proto.SerializeToString(), **{str(f): pathlib.Path(f).read_bytes() for f in against}}
    times = {name: [] for name in files}
    for _ in range(repeats):
        for name, onnx_bytes in files.items():
            times[name].append(targets.latency_ms(onnx_bytes, x))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the model's config name (gmm_quant/run/configs)")
    ap.add_argument("--pretrained", required=True, help="the float32 model: a work directory or a file")
    ap.add_argument("--batch", type=int, default=64, help="rows per timed call")
    ap.add_argument("--data-dir", default=None, help="directory holding mnist/ (MNIST configs)")
    ap.add_argument("--repeats", type=int, default=5, help="independent measurements (median reported)")
    ap.add_argument("--against", nargs="*", default=(), help="ONNX files timed interleaved with float32")
    args = ap.parse_args()
    times = float_latency(args.config, args.pretrained, args.batch, args.data_dir, args.repeats, args.against)
    base = statistics.median(times["float32"])
    for name, ms in times.items():
        print(f"{name} ({args.config}, batch {args.batch}): {statistics.median(ms):.3f} ms "
              f"(min {min(ms):.3f}, max {max(ms):.3f}, {args.repeats} measurements), "
              f"{statistics.median(ms) / base:.3f}x float32")  # fmt: skip


if __name__ == "__main__":
    main()
