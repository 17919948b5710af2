"""A deploy target for the search: the shipped file's size, measured on the real file of every trial.

``compress_to_budget(..., max_bytes=N, target="gqz" | "onnx")`` asks "the most accurate model whose
file fits in N bytes": the objective becomes the validation error (lowest wins), subject to the file
fitting (and to the accuracy budget, when one is given too). Each finished trial writes its file as the
final run writes it (``model.gqz`` with the model's name and its config's changed fields, or the
verified ``model.onnx``) into a temporary directory and records its size; the pruner's rung score
is the negated validation error less the estimated overshoot (the Han count standing in for the file).
"""

from __future__ import annotations

import math
import pathlib
import tempfile

TARGETS = ("gqz", "onnx")
CONSTRAINT = "bytes"  # a trial's file size over the target, less one (<= 0: it fits)


def problem(max_bytes, target) -> str | None:
    """What is wrong with a target (one no file can meet, or not one), checked before any training."""
    if target not in TARGETS:
        return f"target must be one of {TARGETS}, got {target!r}"
    if max_bytes is None:
        return None
    ok = isinstance(max_bytes, int | float) and not isinstance(max_bytes, bool) and math.isfinite(max_bytes)
    if not ok or max_bytes <= 0:
        return f"max_bytes must be a finite number of bytes > 0, got {max_bytes!r}"
    return None


def measure(target: str, sample, model_name=None):
    """``(cfg, codebooks, model) -> bytes`` of the file ``target`` names, written as a run writes it."""

    def file_bytes(cfg, codebooks, model) -> int:
        from gmm_quant.run.config import changed_fields
        from gmm_quant.training import modes

        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / f"model.{target}"
            if target == "gqz":
                from gmm_quant.formats import storage

                storage.save_compressed(
                    path, codebooks, model.params, model=model_name or cfg.model, config=changed_fields(cfg),
                    activations=model.activations, reuse=list(model.links), float_codes=model.float_codes,
                    state=modes.state_of(model.apply_fn),
                )  # fmt: skip
            else:
                from gmm_quant.formats import export

                export.export_onnx(model.apply_fn, model.params, codebooks, sample, path,
                                   float_codes=model.float_codes)  # fmt: skip
            return path.stat().st_size

    return file_bytes


def rung_score(original_bytes: float, max_bytes: float):
    """What the pruner compares at a rung: the negated validation error, less the fraction by which
    the Han count of the model compressed now (``original_bytes / CR``) exceeds the target."""

    def score(compression_ratio: float, val_error: float) -> float:
        over = max(0.0, original_bytes / compression_ratio / max_bytes - 1.0)
        return -val_error - over

    return score
