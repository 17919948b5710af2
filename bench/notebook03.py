"""Notebook 03's recipe on its two models (a BatchNorm + Dropout ConvNet, a small transformer), with
and without the snapped weights in the loop (``snap_epochs``), on scikit-learn's digits.

The models are the notebook's own (its model cell is executed here, not copied). 10% of the training
data is held out for the validation error; the test error is reported beside it.

    python bench/notebook03.py                      # about 3 minutes on 2 cores
    python bench/notebook03.py --variants snap5     # one variant

Prints one JSON line per model, variant and fine-tuning length.
"""

import argparse
import json
import pathlib
import time

import numpy as np
from flax import nnx

import gmm_quant as gq
from gmm_quant.core.rules import flatten
from gmm_quant.training import data

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "03_your_model.ipynb"
RECIPE = dict(tau=0.05, warmup_epochs=0, tightness=0.1, epochs=30)  # the notebook's gq.retrain call
VARIANTS = {"notebook": {}, "snap5": {"snap_epochs": 5}, "snap10": {"snap_epochs": 10}}


def notebook_models() -> dict:
    """The notebook's ConvNet and TinyTransformer, from its cell that defines them."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "class ConvNet" in "".join(c["source"]))
    scope: dict = {}
    exec(source.split("ds = data.load_digits()")[0], scope)  # our own notebook's cell
    return {"convnet": scope["ConvNet"], "transformer": scope["TinyTransformer"]}


def run(variants, finetunes=(5, 10)):
    ds = data.load_digits()
    fit, val = data.split_validation(ds, 0.1, seed=0)
    train, test = (fit.x_train, fit.y_train), (ds.x_test, ds.y_test)
    for name, make in notebook_models().items():
        apply, params = gq.from_nnx(make(nnx.Rngs(0)))
        params = gq.pretrain(apply, params, train, epochs=30, batch_size=32)
        before = (gq.error_rate(apply, params, *val), gq.error_rate(apply, params, *test))
        plan = gq.make_plan(params)
        for variant in variants:
            start = time.perf_counter()
            mixtures, retrained = gq.retrain(apply, params, train, plan, batch_size=32, **RECIPE,
                                             **VARIANTS[variant])  # fmt: skip
            codebooks, snapped = gq.compress(plan, mixtures, retrained)
            for epochs in finetunes:
                tuned, final = gq.finetune(apply, codebooks, snapped, train, epochs=epochs, batch_size=32)
                flat = {p: np.asarray(v) for p, v in flatten(final).items()}
                cr = gq.summarize(tuned, flat, state=apply.state)["compression_ratio"]
                after = (gq.error_rate(apply, final, *val), gq.error_rate(apply, final, *test))
                row = dict(model=name, variant=variant, finetune_epochs=epochs,
                           val_error=[before[0], after[0]], test_error=[before[1], after[1]],
                           compression_ratio=round(cr, 2),
                           seconds=round(time.perf_counter() - start, 1))  # fmt: skip
                print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    run(ap.parse_args().variants.split(","))


if __name__ == "__main__":
    main()
