"""The float32 model's ONNX Runtime latency, timed as the search times a trial (``search.targets``):
the number to give ``python -m gmm_quant.tune --max-latency-ms`` for "no slower than float".

    python bench/float_latency.py --config vit_mnist --pretrained runs/vit --data-dir ../shared/data

Prints the median of ``--repeats`` measurements (each the median of 30 calls after 30 warm-up calls,
2 intra-op threads) and their spread.
"""

from __future__ import annotations

import argparse
import statistics

from gmm_quant.formats import export
from gmm_quant.run import configs, inputs
from gmm_quant.run.pretrained import pretrained_weights
from gmm_quant.search import targets
from gmm_quant.training import data, modes


def float_latency(config: str, pretrained: str, batch: int, data_dir=None, repeats: int = 5) -> list[float]:
    cfg = configs.load(config)
    apply_fn, params, _graphdef = inputs.build_model(cfg)
    params, state = pretrained_weights(pretrained, params, modes.state_of(apply_fn))
    apply_fn = modes.with_state(apply_fn, state)
    ds = data.load(cfg.dataset, data_dir)
    x = export.model_input(ds.x_test[:batch])
    proto = export.to_onnx(apply_fn, params, {}, x[:8], remove_dead_units=False)
    onnx_bytes = proto.SerializeToString()
    return [targets.latency_ms(onnx_bytes, x) for _ in range(repeats)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the model's config name (gmm_quant/run/configs)")
    ap.add_argument("--pretrained", required=True, help="the float32 model: a work directory or a file")
    ap.add_argument("--batch", type=int, default=64, help="rows per timed call")
    ap.add_argument("--data-dir", default=None, help="directory holding mnist/ (MNIST configs)")
    ap.add_argument("--repeats", type=int, default=5, help="independent measurements (median reported)")
    args = ap.parse_args()
    times = float_latency(args.config, args.pretrained, args.batch, args.data_dir, args.repeats)
    print(f"float32 {args.config} batch {args.batch}: {statistics.median(times):.3f} ms "
          f"(min {min(times):.3f}, max {max(times):.3f}, {args.repeats} measurements)")  # fmt: skip


if __name__ == "__main__":
    main()
