"""The readers of a user's data and weights, in process: the three data sources give the same arrays,
the three weight formats the same model, and the renaming rule matches their paths."""

import sys
import textwrap

import numpy as np
import pytest
from flax import nnx, serialization
from safetensors.numpy import save_file

from gmm_quant.formats import foreign
from gmm_quant.run.pretrained import pretrained_weights
from gmm_quant.training import data, modes, user_data

DIGITS = data.load_digits()
ARRAYS = {
    "x_train": DIGITS.x_train,
    "y_train": DIGITS.y_train,
    "x_test": DIGITS.x_test,
    "y_test": DIGITS.y_test,
}


def _same(ds: data.Dataset, arrays: dict):
    for name, value in arrays.items():
        np.testing.assert_array_equal(getattr(ds, name), value)


def test_npz_loader_and_hugging_face_directory_give_the_same_arrays(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", **ARRAYS)
    _same(user_data.load_user_data(str(tmp_path / "d.npz")), ARRAYS)

    (tmp_path / "mydata.py").write_text(
        textwrap.dedent(
            f"""
            import numpy as np
            def load():
                d = np.load({str(tmp_path / "d.npz")!r})
                return {{k: d[k] for k in d.files}}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _same(user_data.load_user_data("mydata:load"), ARRAYS)

    datasets = pytest.importorskip("datasets")
    splits = {
        split: datasets.Dataset.from_dict({"image": ARRAYS[f"x_{ours}"], "label": ARRAYS[f"y_{ours}"]})
        for split, ours in (("train", "train"), ("test", "test"))
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    _same(user_data.load_user_data(str(tmp_path / "hf"), columns=("image", "label")), ARRAYS)
    with pytest.raises(data.DataError, match="split 'train' has no column 'x'"):
        user_data.load_user_data(str(tmp_path / "hf"))


def test_a_given_validation_split_is_used_as_it_is(tmp_path):
    x_val, y_val = DIGITS.x_train[:50], DIGITS.y_train[:50]
    np.savez(tmp_path / "d.npz", **ARRAYS, x_val=x_val, y_val=y_val)
    ds, val = data.split_validation(user_data.load_user_data(str(tmp_path / "d.npz")), 0.1, 0)
    np.testing.assert_array_equal(val[0], x_val)
    assert len(ds.x_train) == len(DIGITS.x_train) and ds.x_val is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blocks.0.mlp.kernel", "blocks/0/mlp/kernel"),
        ("params/conv/kernel", "conv/kernel"),
        ("batch_stats.bn.mean", "bn/mean"),
        ("bn/mean/value", "bn/mean"),
        ("params", "params"),
    ],
)
def test_the_renaming_rule(name, expected):
    assert foreign.canonical(name) == expected


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4 * 64, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.conv(x))).reshape(x.shape[0], -1))


def test_three_weight_formats_give_the_same_model(tmp_path):
    trained = Net(nnx.Rngs(7))
    trained.bn.mean[...] = np.arange(4, dtype=np.float32)  # statistics the user's training produced
    state = nnx.state(trained, nnx.Not(nnx.RngState)).to_pure_dict()
    flat = {}
    for (a, b), v in [((m, k), v) for m, d in state.items() for k, v in d.items()]:
        flat[f"{a}.{b}"] = np.asarray(v)
    save_file(flat, str(tmp_path / "w.safetensors"))
    (tmp_path / "w.msgpack").write_bytes(serialization.msgpack_serialize({"params": state}))
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "ckpt").resolve(), nnx.state(trained, nnx.Not(nnx.RngState)))
    x = DIGITS.x_test[:16].reshape(-1, 8, 8, 1)
    trained.eval()
    expected = np.asarray(trained(x))
    for source in ("w.safetensors", "w.msgpack", "ckpt"):
        apply_fn, params = modes.from_nnx(Net(nnx.Rngs(0)))
        params, state_out = pretrained_weights(tmp_path / source, params, apply_fn.state)
        np.testing.assert_array_equal(np.asarray(modes.with_state(apply_fn, state_out)(params, x)), expected)


def test_weights_without_statistics_keep_the_models_own(tmp_path):
    trained = Net(nnx.Rngs(7))
    params_only = nnx.state(trained, nnx.Param).to_pure_dict()
    save_file({f"{m}.{k}": np.asarray(v) for m, d in params_only.items() for k, v in d.items()},
              str(tmp_path / "p.safetensors"))  # fmt: skip
    apply_fn, params = modes.from_nnx(Net(nnx.Rngs(0)))
    _, state = pretrained_weights(tmp_path / "p.safetensors", params, apply_fn.state)
    np.testing.assert_array_equal(state["bn"]["mean"][...], np.zeros(4, np.float32))


def test_a_loader_that_cannot_be_imported_is_named(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(data.DataError, match="cannot import"):
        user_data.load_user_data("no_such_module_here:load")
