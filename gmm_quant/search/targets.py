"""Deploy targets for the search: the shipped file's size and its latency in ONNX Runtime, measured
on the real file of every trial.

``compress_to_budget(..., max_bytes=N, target="gqz" | "onnx")`` asks "the most accurate model whose
file fits in N bytes", ``max_latency_ms=T`` "... that answers a batch of ``latency_batch`` in at most
T ms in ONNX Runtime on this machine": the objective becomes the validation error (lowest wins),
subject to the targets (and to the accuracy budget, when one is given too). Each finished trial writes
its file as the final run writes it (``model.gqz`` with the model's name and its config's changed
fields, or the verified ``model.onnx``) into a temporary directory and records its size; with a latency
target it times the ONNX file (``latency_ms``: median of repeated runs after warm-up, the session's
threads stated by ``THREADS``; a result within ``RECHECK`` of the target is measured again, longer,
before it is judged). The pruner's rung score is the negated validation error less the estimated size
overshoot (the Han count standing in for the file).
"""

from __future__ import annotations

import math
import pathlib
import tempfile

TARGETS = ("gqz", "onnx")
CONSTRAINT = "bytes"  # a trial's file size over the target, less one (<= 0: it fits)
LATENCY = "latency"  # a trial's latency over the target, less one
THREADS = 2  # ONNX Runtime intra-op threads when timing (this machine's cores)
RUNS = 30  # timed runs after as many warm-up runs (median); twice that when re-measured
RECHECK = 0.1  # a latency within 10% of the target is measured again before it is judged


class Unshippable(RuntimeError):
    """A trial's model whose ONNX file does not verify (ONNX Runtime disagrees with JAX beyond the
    exporter's tolerance): the final run could not ship it either, so the trial fails and the search
    goes on."""


def _positive(value) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return ok and value > 0


def problem(max_bytes, target, max_latency_ms=None, latency_batch=1) -> str | None:
    """What is wrong with a target (one no file can meet, or not one), checked before any training."""
    if target not in TARGETS:
        return f"target must be one of {TARGETS}, got {target!r}"
    if max_bytes is not None and not _positive(max_bytes):
        return f"max_bytes must be a finite number of bytes > 0, got {max_bytes!r}"
    if max_latency_ms is not None and not _positive(max_latency_ms):
        return f"max_latency_ms must be a finite number of milliseconds > 0, got {max_latency_ms!r}"
    if not (isinstance(latency_batch, int) and not isinstance(latency_batch, bool) and latency_batch >= 1):
        return f"latency_batch must be a whole number >= 1, got {latency_batch!r}"
    return None


def latency_ms(onnx_bytes: bytes, batch, runs: int = RUNS) -> float:
    """Median milliseconds of one ONNX Runtime call on ``batch`` (after ``runs`` warm-up calls), with
    ``THREADS`` intra-op threads, the session built as ``onnx_export.runtime.session`` builds it."""
    import statistics
    import time

    from gmm_quant.formats.onnx_export.runtime import session

    sess = session(onnx_bytes, threads=THREADS)
    feed = {sess.get_inputs()[0].name: batch}
    times = []
    for i in range(2 * runs):
        start = time.perf_counter()
        sess.run(None, feed)
        if i >= runs:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def judged_latency(onnx_bytes: bytes, batch, max_latency_ms: float) -> float:
    """``latency_ms``, measured again (twice as long) when the first is within ``RECHECK`` of the
    target: timing noise does not decide a trial near the limit."""
    first = latency_ms(onnx_bytes, batch)
    if abs(first / max_latency_ms - 1.0) <= RECHECK:
        return latency_ms(onnx_bytes, batch, 2 * RUNS)
    return first


def measure(target: str, sample, *, max_bytes=None, max_latency_ms=None, latency_batch=1):
    """``(cfg, codebooks, model) -> {"file_bytes", "latency_ms"}``: the size of the file ``target``
    names, written as a run writes it (with ``max_bytes``), and the ONNX file's latency on a batch of
    ``latency_batch`` rows of ``sample`` (with ``max_latency_ms``)."""
    import numpy as np

    from gmm_quant.run import job  # the run's own file writers: a trial's file is the final run's

    rows = np.resize(np.asarray(sample), (latency_batch, *np.shape(sample)[1:]))  # repeated to size

    def batch():  # the graph's input dtype (token ids stay integers)
        from gmm_quant.formats.export import model_input

        return model_input(rows)

    def measured(cfg, codebooks, model) -> dict:
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            if max_bytes is not None and target == "gqz":
                out["file_bytes"] = job.save_model_file(
                    pathlib.Path(tmp) / "model.gqz", cfg, codebooks, model
                )
            if target == "onnx" or max_latency_ms is not None:
                from gmm_quant.formats import export

                path = pathlib.Path(tmp) / "model.onnx"
                encoding = job.onnx_encoding(cfg) or export.ENCODING
                try:
                    export.export_onnx(model.apply_fn, model.params, codebooks, sample, path,
                                       encoding=encoding, float_codes=model.float_codes)  # fmt: skip
                except export.ExportMismatch as err:
                    raise Unshippable(f"its ONNX file does not verify: {err}") from None
                if max_bytes is not None and target == "onnx":
                    out["file_bytes"] = path.stat().st_size
                if max_latency_ms is not None:
                    out["latency_ms"] = judged_latency(path.read_bytes(), batch(), max_latency_ms)
        return out

    return measured


def rung_score(original_bytes: float, max_bytes: float | None):
    """What the pruner compares at a rung: the negated validation error, less the fraction by which
    the Han count of the model compressed now (``original_bytes / CR``) exceeds a size target."""

    def score(compression_ratio: float, val_error: float) -> float:
        if max_bytes is None:
            return -val_error
        over = max(0.0, original_bytes / compression_ratio / max_bytes - 1.0)
        return -val_error - over

    return score
