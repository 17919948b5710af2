"""ONNX export of a compressed model, verified in ONNX Runtime before the file is written.

    python -m gmm_quant.export WORKDIR_OR_FILE -o model.onnx [--encoding sparse|codebook|grid]

Three weight encodings for quantised layers (``ENCODING``, the default of every caller, is sparse):

* ``sparse``: only the non-zeros, as position gaps and UINT4/UINT8 indices, rebuilt in the graph by
  ``CumSum -> ScatterElements`` (folded by ONNX Runtime at load; ``onnx_export.encodings``).
* ``codebook`` (any centres): indices as UINT4 (k <= 16) or UINT8 initializers, then
  ``Cast(to=INT32) -> Gather(centres)`` feeding the layer's MatMul/Conv. The file holds packed indices.
* ``grid`` (centres exactly ``scale * (q - zero_point)``, see ``grid.py``): ``DequantizeLinear`` of
  UINT4 (or UINT8) codes. Refused with a clear error when a layer's centres are not on a grid.

The graph is built from the traced model (``onnx_export``), checked with ``onnx.checker`` (full check,
shape inference), run in onnxruntime on a sample batch, and written atomically only if its outputs
match JAX within ``tolerance`` (1e-4 absolute by default; a model computing in bfloat16 or float16
within 8 epsilons of that dtype, ``dtype_tolerance``).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import onnx

from gmm_quant._util.files import write_atomic
from gmm_quant.core.float_codes import grids
from gmm_quant.core.rules import path_str
from gmm_quant.formats import onnx_export, storage
from gmm_quant.formats.onnx_export.encodings import ENCODERS, code_float_initializers
from gmm_quant.formats.onnx_export.names import compact_names
from gmm_quant.formats.onnx_export.runtime import quantises_activations, session
from gmm_quant.formats.onnx_export.units import RESTORED
from gmm_quant.training import data, modes

OPSET = 21
ENCODINGS = tuple(ENCODERS)
ENCODING = "sparse"  # the default everywhere: the Python API, the export command and a run's model.onnx


class ExportMismatch(RuntimeError):
    """ONNX Runtime's outputs differ from JAX's beyond the tolerance."""


def to_onnx(
    apply_fn, params, codebooks: dict, sample, *, encoding=ENCODING, remove_dead_units=True,
    float_codes=None,
) -> onnx.ModelProto:  # fmt: skip
    """ONNX model of ``apply_fn(params, x)`` with the leaves in ``codebooks`` stored compressed; units
    whose weights are all zero are removed (matrices shrunk, constant units folded into biases).
    Constants on the grid of one of ``float_codes`` ({path: FloatCode}) are stored as its codes."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    leaves = [np.asarray(leaf) for _, leaf in flat]
    make = ENCODERS[encoding]
    encoders = {}
    for path, cb in codebooks.items():
        try:
            encoders[path] = make(cb)
        except ValueError as err:
            raise ValueError(f"layer {path}: {err}") from None

    def fn(leaves, x):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), x)

    model = onnx_export.convert(
        fn, leaves, paths, encoders, model_input(sample), opset=OPSET, codebooks=codebooks, make=make,
        remove_dead_units=remove_dead_units,
    )  # fmt: skip
    if float_codes:
        code_float_initializers(model, set(grids(float_codes).values()))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)  # a check; its value_info is not kept
    return model


def model_input(x) -> np.ndarray:
    """The graph's input dtype: float32 for real-valued inputs, int32 for token ids."""
    x = np.asarray(x)
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x.astype(np.int32)


def run_onnx(model, x) -> np.ndarray:
    return session(model).run(None, {"input": model_input(x)})[0]


def verify(model, apply_fn, params, x, tolerance=1e-4) -> float:
    """Max abs difference ONNX Runtime vs JAX on ``x``; raises ExportMismatch above the tolerance.

    The tolerance is absolute for outputs of magnitude <= 1 and relative to the largest output above
    that (float32 rounding of logits near 1e6 alone is 0.06).
    """
    ours = run_onnx(model, x)
    ref = np.asarray(modes.compiled(apply_fn)(params, model_input(x)), np.float32)
    tolerance = max(tolerance, dtype_tolerance(model))
    if not np.all(np.isfinite(ref)):
        raise ExportMismatch("the model's outputs on the sample are not finite; file not written")
    diff = float(np.max(np.abs(ours - ref)))
    allowed = tolerance * max(1.0, float(np.max(np.abs(ref))))
    if quantises_activations(model):  # rows: examples, or every position of sequences
        rows = (ours.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1]))
        return _verify_quantised(*rows, diff, sequences=ref.ndim > 2)
    if not diff <= allowed:
        message = f"ONNX Runtime differs from JAX by {diff:.3g} (> {allowed:.2g}); file not written"
        raise ExportMismatch(message)
    return diff


HALF_EPSILONS = 8  # a half-precision model matches within 8 machine epsilons of its dtype


def dtype_tolerance(model) -> float:
    """The tolerance a model's own precision allows: ``HALF_EPSILONS`` epsilons of the lowest float
    dtype it computes in (bfloat16: 0.0625, float16: 0.0078; float32 models: 0)."""
    props = {p.key: p.value for p in model.metadata_props}
    name = props.get(onnx_export.COMPUTE_DTYPE)
    return 0.0 if name is None else HALF_EPSILONS * float(jax.numpy.finfo(name).eps)


QUANTISED_AGREEMENT = 0.98
SEQUENCE_WITHIN = 0.95  # positions of sequences within one step: a flipped code reaches every later position


def _verify_quantised(ours, ref, diff, sequences=False) -> float:
    """Activation quantisation: a value a float32 rounding away from a code boundary may take the
    neighbouring code in ONNX Runtime (which orders some float arithmetic differently) and carry that
    step downstream. Required: at least ``QUANTISED_AGREEMENT`` of the rows within one step of the
    logits quantised to 8 bits (their range / 255), and as many with the same argmax. For sequences
    (rows = positions), causal attention carries one flipped code to every later position of its
    sequence: ``SEQUENCE_WITHIN`` of the positions within one step suffice (argmax as before)."""
    step = float(ref.max() - ref.min()) / 255
    within = float(np.mean(np.abs(ours - ref).max(axis=1) <= step))
    same = float(np.mean(ours.argmax(1) == ref.argmax(1)))
    needed = SEQUENCE_WITHIN if sequences else QUANTISED_AGREEMENT
    if within < needed or same < QUANTISED_AGREEMENT:
        raise ExportMismatch(
            f"ONNX Runtime differs from the fake-quantised JAX model: {within:.1%} of the rows within one "
            f"step of the logits ({step:.3g}), {same:.1%} with the same argmax; file not written"
        )
    return diff


def export_onnx(
    apply_fn, params, codebooks, sample, path, *, encoding=ENCODING, tolerance=1e-4, float_codes=None,
    remove_dead_units=None,
) -> dict:  # fmt: skip
    """Build, verify on ``sample`` and atomically write the ONNX file; returns size and max diff.

    ``remove_dead_units`` None: remove them unless that makes the graph put narrowed features back in
    order (a residual stream, a LayerNorm: a Concat and a Gather per site, which cost a transformer
    more time than the narrower products save — BENCHMARKS.md, "W8A8 latency").
    """
    build = lambda remove: to_onnx(apply_fn, params, codebooks, sample[:8], encoding=encoding,  # noqa: E731
                                   float_codes=float_codes, remove_dead_units=remove)  # fmt: skip
    removed = remove_dead_units is not False
    model = build(removed)
    if remove_dead_units is None and restores_units(model):
        removed, model = False, build(False)
    compact_names(model)  # the file holds short tensor names; the one verified is the one written
    diff = verify(model, apply_fn, params, sample, tolerance)
    data = model.SerializeToString()
    write_atomic(pathlib.Path(path), data)
    return {"bytes": len(data), "max_abs_diff": diff, "encoding": encoding, "dead_units_removed": removed}


def restores_units(model) -> bool:
    """Whether the graph puts narrowed features back in order somewhere (``units.materialise``)."""
    return any(out.startswith(RESTORED) for node in model.graph.node for out in node.output)


def load_model_file(path, model: str | None = None, *, trust_model: bool = False):
    """(apply_fn, params, codebooks, Compressed) rebuilt from a ``.gqz`` file, with its state.

    ``model`` (a project model name or ``package.module:factory``) overrides the model the file names;
    a factory only the file names is used with ``trust_model`` (``Compressed.build_model``).
    """
    compressed = storage.load_compressed(path)
    if model is None and compressed.model is None:
        raise ValueError(f"{path} does not name its model; name it (model='package.module:factory')")
    # the file's weights and state, in eval mode (stored statistics, no dropout): what is exported
    module = compressed.load_model(compressed.build_model(model, trust_model=trust_model))
    apply_fn, params = modes.from_nnx(module)
    return apply_fn, params, compressed.codebooks, compressed


def export_file(
    model_path, out_path, *, sample=None, encoding=ENCODING, tolerance=1e-4, model=None, trust_model=False
) -> dict:
    """Export a ``.gqz`` file; ``sample`` defaults to random inputs of the dataset's shape."""
    apply_fn, params, codebooks, compressed = load_model_file(model_path, model, trust_model=trust_model)
    if sample is None:
        sample = data.random_inputs((compressed.config or {}).get("dataset"))
    try:
        jax.eval_shape(apply_fn, params, model_input(sample[:1]))
    except (TypeError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise ValueError(f"the model does not run on inputs of shape {sample.shape[1:]} ({first})") from None
    return export_onnx(apply_fn, params, codebooks, sample, out_path, encoding=encoding, tolerance=tolerance,
                       float_codes=compressed.float_codes)  # fmt: skip


def _is_our_onnx(path: pathlib.Path) -> bool:
    """True when ``path`` is an ONNX file written by gmm_quant (its producer name says so)."""
    try:
        return onnx.load(str(path), load_external_data=False).producer_name == "gmm_quant"
    except Exception:  # not protobuf, not ONNX, unreadable: not ours
        return False


def check_output(source: pathlib.Path, output: pathlib.Path, *, force: bool = False) -> None:
    """Refuse to write over the input, a directory, or an existing file that is not our ONNX output."""
    if output.is_dir():
        raise IsADirectoryError(f"output {output} is a directory; name the .onnx file to write")
    inputs = [source, source / "model.gqz"] if source.is_dir() else [source]
    if output.exists() and any(p.exists() and output.samefile(p) for p in inputs):
        raise FileExistsError(f"refusing to write the ONNX file over its input {output}")
    if output.exists() and not force and not _is_our_onnx(output):
        raise FileExistsError(
            f"refusing to overwrite {output}: not an ONNX file written by gmm_quant (--force replaces it)"
        )
