"""``checksums.tree_checksum``: the invariants of its docstring (sharding invariance: tests/test_scale.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from gmm_quant.run.checksums import tree_checksum


def _tree():
    rng = np.random.default_rng(0)
    return {
        "kernel": rng.normal(size=(6, 5)).astype(np.float32),
        "codes": rng.integers(0, 255, size=(7,), dtype=np.uint8),
        "half": rng.normal(size=(4,)).astype(jnp.bfloat16),
        "flag": np.array([True, False]),
        "step": np.int32(3),
    }


def _changed(edit):
    tree = _tree()
    edit(tree)
    return tree_checksum(tree)[0]


def test_equal_trees_give_equal_checksums_on_host_or_device():
    a, b = _tree(), {k: jnp.asarray(v) for k, v in _tree().items()}
    assert tree_checksum(a) == tree_checksum(b)
    assert tree_checksum(a)[0].startswith("c1:")


EDITS = {
    "one element's last bit": lambda t: t["kernel"].__setitem__((2, 3), np.nextafter(t["kernel"][2, 3], 9)),
    "two elements swapped": lambda t: t["kernel"].__setitem__((0, slice(0, 2)), t["kernel"][0, 1::-1]),
    "a uint8 code": lambda t: t["codes"].__setitem__(6, t["codes"][6] ^ 1),
    "a bfloat16 value": lambda t: t["half"].__setitem__(1, -t["half"][1]),
    "a bool": lambda t: t["flag"].__setitem__(1, True),
    "the step": lambda t: t.__setitem__("step", np.int32(4)),
    "a leaf's path": lambda t: t.__setitem__("kernel2", t.pop("kernel")),
    "a leaf's shape": lambda t: t.__setitem__("kernel", t["kernel"].reshape(5, 6)),
    "a leaf's dtype": lambda t: t.__setitem__("codes", t["codes"].view(np.int8)),
}


@pytest.mark.parametrize("how", list(EDITS))
def test_any_change_changes_the_checksum(how):
    assert _changed(EDITS[how]) != tree_checksum(_tree())[0]


def test_equal_values_with_other_bits_differ():
    """-0.0 == 0.0, but a checkpoint must come back bit for bit."""
    zero, minus = _tree(), _tree()
    zero["kernel"][0, 0], minus["kernel"][0, 0] = 0.0, -0.0
    assert tree_checksum(zero)[0] != tree_checksum(minus)[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_is_whether_every_floating_element_is_finite(bad):
    assert tree_checksum(_tree())[1] is True
    tree = _tree()
    tree["kernel"][4, 4] = bad
    assert tree_checksum(tree)[1] is False
    tree = _tree()
    tree["half"][0] = bad
    assert tree_checksum(tree)[1] is False


def test_leaves_summed_by_numpy_match_the_compiled_sum(monkeypatch):
    """Small local leaves are summed by numpy (nothing to compile), others by a jitted program where
    they live: both give the same checksum, so any leaf verifies on any process."""
    from gmm_quant.run import checksums

    on_host = tree_checksum(_tree())
    monkeypatch.setattr(checksums, "SMALL", -1)  # every leaf through the compiled sum
    assert tree_checksum({k: jnp.asarray(v) for k, v in _tree().items()}) == on_host
