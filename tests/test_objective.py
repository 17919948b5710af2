"""The joint objective: ``mixture_every`` gives the mixture a gradient and an Adam step on every k-th
step only, and leaves the weights' gradient exactly that of the full objective."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gmm_quant as gq
from gmm_quant.training import loop


def setup(k):
    rng = np.random.default_rng(0)
    params = {"l": {"kernel": jnp.asarray(rng.normal(size=(64, 32)) * 0.1, jnp.float32)}}
    plan = gq.make_plan(params)
    x = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 32, 64), jnp.int32)
    loss = gq.joint_loss(gq.cross_entropy(lambda p, v: v @ p["l"]["kernel"]), plan, 0.5, 100, mixture_every=k)
    opt = gq.joint_optimizer(mixture_every=k)
    state = loop.init_state({"params": params, "mixtures": gq.init_mixtures(plan, params)}, opt)
    return loss, opt, state, x, y


def test_the_mixture_learns_on_every_kth_step_only_and_the_weights_on_every_step():
    loss, opt, state, x, y = setup(3)
    full_loss, *_ = setup(1)
    means = []
    for step in range(6):
        grads = jax.grad(lambda t, s: loss(t, x, y, s)[0])(state.trainable, state.step)
        full = jax.grad(lambda t, s: full_loss(t, x, y, s)[0])(state.trainable, state.step)
        learns = step % 3 == 2
        mixture_grad = jax.tree.leaves(grads["mixtures"])
        assert any(bool(jnp.any(g != 0)) for g in mixture_grad) == learns
        if learns:  # the gradient of the full objective, then
            for a, b in zip(mixture_grad, jax.tree.leaves(full["mixtures"]), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        # the same maths compiled in two programs: float32 rounding apart
        np.testing.assert_allclose(grads["params"]["l"]["kernel"], full["params"]["l"]["kernel"], rtol=1e-5)
        updates, opt_state = opt.update(grads, state.opt_state, state.trainable)
        state = loop.TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state)
        means.append(np.asarray(state.trainable["mixtures"]["shared"].means))
    moved = [not np.array_equal(a, b) for a, b in zip([setup(3)[2].trainable["mixtures"]["shared"].means,
                                                       *means[:-1]], means, strict=True)]  # fmt: skip
    assert moved == [False, False, True, False, False, True]


def test_retraining_goes_on_until_tight_and_stops_at_the_first_tight_epoch():
    """``retrain_tightness``: after ``retrain_epochs``, retraining stops at the first epoch whose state
    has every layer within the tightness (recomputed here from each epoch's state), or at 4x."""
    import dataclasses

    from flax import nnx

    import models
    from gmm_quant.core import codebook
    from gmm_quant.run import configs, stages
    from gmm_quant.run.plan import build_plan
    from gmm_quant.search.trial import memory_runner
    from gmm_quant.training import data

    ds = data.load("digits")
    train = (ds.x_train[:512], ds.y_train[:512])
    graphdef, params = nnx.split(models.create("digits_mlp", 0), nnx.Param)
    base = dataclasses.replace(configs.load("tiny"), retrain_epochs=2, tau=0.5)
    for target in (1e9, 0.15):
        cfg = dataclasses.replace(base, retrain_tightness=target)
        plan, seen = build_plan(cfg, params), []

        def record(epoch, state, plan=plan, seen=seen):
            tr = state.trainable
            seen.append(max(codebook.tightness(plan, tr["mixtures"], tr["params"]).values()))

        apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
        ctx = stages.Context(cfg, train, (train[0][:0], train[1][:0]), memory_runner(cfg, train, record))
        _, _, result = stages.retrain(ctx, plan, stages.Model(apply_fn, params), stages.Record())
        ok = [e for e, t in enumerate(seen) if e + 1 >= 2 and t <= target]
        expected = ok[0] + 1 if ok else 8
        assert result.retrain_epochs == len(seen) == expected
    assert expected > 2  # the tight target made it go on past the epochs asked for


def test_snapped_weights_are_the_nearest_centres_with_a_straight_through_gradient():
    params = {"l": {"kernel": jnp.asarray([[0.04, -0.31], [0.26, 0.9]], jnp.float32)}}
    plan = gq.make_plan(params)
    mixtures = gq.init_mixtures(plan, params)
    mixtures["shared"] = mixtures["shared"]._replace(means=jnp.asarray([-0.3, 0.2, 0.5], jnp.float32))
    hard = gq.core.objective.snapped(plan, mixtures, params)
    # centres 0 (the zero component), -0.3, 0.2, 0.5: each weight on the nearest one
    np.testing.assert_array_equal(hard["l"]["kernel"], np.asarray([[0.0, -0.3], [0.2, 0.5]], np.float32))
    c = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    grads = jax.grad(lambda t: jnp.sum(c * gq.core.objective.snapped(plan, t["m"], t["p"])["l"]["kernel"]))(
        {"p": params, "m": mixtures}
    )
    np.testing.assert_array_equal(grads["p"]["l"]["kernel"], c)  # d/dw of sum(c * w_hat) is c
    assert not any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads["m"]))  # the centres: none


def test_from_snap_from_on_the_task_sees_the_snapped_weights():
    rng = np.random.default_rng(0)
    params = {"l": {"kernel": jnp.asarray(rng.normal(size=(8, 4)) * 0.3, jnp.float32)}}
    plan = gq.make_plan(params)
    mixtures = gq.init_mixtures(plan, params)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
    task = gq.cross_entropy(lambda p, v: v @ p["l"]["kernel"])
    loss = gq.joint_loss(task, plan, 0.0, 100, snap_from=5)  # tau 0: the task alone
    trainable = {"params": params, "mixtures": mixtures}
    hard = gq.core.objective.snapped(plan, mixtures, params)
    np.testing.assert_allclose(loss(trainable, x, y, 4)[0], task(params, x, y)[0], rtol=1e-6)
    np.testing.assert_allclose(loss(trainable, x, y, 5)[0], task(hard, x, y)[0], rtol=1e-6)
    assert not np.isclose(float(task(hard, x, y)[0]), float(task(params, x, y)[0]))


def test_snap_from_is_the_first_step_of_the_last_snap_epochs():
    from gmm_quant.training.pipeline import snap_from

    assert snap_from(100, 10, 50) == 90 * 50
    assert snap_from(10, 30, 50) == 0  # more than all: from the start
    assert snap_from(100, 0, 50) is None
