import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmm_quant.core import grid
from gmm_quant.core.codebook import Codebook


def test_to_grid_puts_centres_on_an_evenly_spaced_grid_that_fit_recovers():
    cb = Codebook(
        np.array([0.0, -0.31, -0.07, 0.12, 0.5], np.float32), np.arange(5, dtype=np.uint8).repeat(3)
    )
    on_grid = grid.to_grid(cb, bits=4)
    scale, zero_point, levels = grid.fit(on_grid.centres)
    np.testing.assert_array_equal((levels * scale).astype(np.float32), on_grid.centres)
    assert on_grid.centres[0] == 0.0 and 0 <= zero_point <= 15 and (levels + zero_point).max() <= 15
    np.testing.assert_allclose(on_grid.dequantize(), cb.dequantize(), atol=0.5 / 7 / 2 + 1e-7)


def test_fit_rejects_centres_off_any_grid():
    assert grid.fit(np.array([0.0, 0.1, np.pi / 10], np.float32)) is None


def test_project_rounds_with_a_straight_through_gradient():
    c = jnp.array([0.26, -0.49])
    np.testing.assert_allclose(grid.project(c, 0.25), [0.25, -0.5])
    np.testing.assert_allclose(jax.grad(lambda c: jnp.sum(3 * grid.project(c, 0.25)))(c), [3.0, 3.0])


@pytest.mark.parametrize("bits, top", [(4, 7), (8, 127)])
def test_fine_tuned_centres_never_leave_the_grids_bit_width(bits, top):
    from gmm_quant.core import codebook_tuning
    from gmm_quant.core.codebook import make_codebook

    centres = np.array([0.0, -0.3, 0.1, 0.5], np.float32)
    cb = grid.to_grid(make_codebook(centres[np.array([0, 1, 2, 3, 3])], centres), bits)
    drifted = {"centres": {"w": np.asarray(cb.centres[1:]) * 3.0}}  # latents pushed far past the top level
    out = codebook_tuning.updated_codebooks({"w": cb}, drifted, grid=True)["w"]
    scale, _, levels = grid.fit(out.centres)
    assert np.abs(levels).max() <= top and scale == grid.fit(cb.centres)[0]
