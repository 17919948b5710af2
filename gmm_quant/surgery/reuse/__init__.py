"""Cross-layer reuse: one stored matrix serves several layers, each with a feature transform.

* ``candidates`` — which same-shaped layers resemble each other (least-squares output scales,
  similarity, validation error if replaced); ``python -m gmm_quant.reuse WORKDIR`` prints the table
  (``gmm_quant.cli.reuse``).
* ``links`` — ``Link(target, source, rank)`` and the config's ``"TARGET_REGEX=SOURCE"`` rules.
* ``layers`` — the model surgery: a target becomes ``Reused(source)`` with a per-channel scale and
  bias (and an optional low-rank correction), the source shared by reference (stored once).
* ``choose`` — greedy choice of links within a validation-error budget.
"""

from gmm_quant.surgery.reuse.candidates import candidates, output_scales, reuse_table, similarity
from gmm_quant.surgery.reuse.links import Link

__all__ = ["Link", "candidates", "output_scales", "reuse_table", "similarity"]
