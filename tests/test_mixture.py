import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gmm_quant.core import interpolation
from gmm_quant.core import mixture as mx

CFG = mx.MixtureConfig(num_components=17, pi_zero=0.9)


def test_free_means_equally_spaced_with_both_endpoints():
    w = {"a": jnp.array([-0.7, 0.1, 0.2]), "b": jnp.array([[0.5, 0.9]])}
    state = mx.init_mixture(CFG, w)
    assert state.means.shape == (16,)
    assert state.means[0] == pytest.approx(-0.7) and state.means[-1] == pytest.approx(0.9)
    np.testing.assert_allclose(np.diff(state.means), 1.6 / 15, rtol=1e-5)


def test_zero_component_pinned_at_exactly_zero_with_pi_zero():
    state = mx.init_mixture(CFG, init_range=(-1.0, 2.0))
    means = mx.component_means(state._replace(means=state.means + 0.3))
    assert means[0] == 0.0
    pi = np.exp(mx.log_mixing_proportions(CFG, state))
    assert pi[0] == pytest.approx(0.9, rel=1e-6)
    np.testing.assert_allclose(pi[1:], 0.1 / 16, rtol=1e-5)
    np.testing.assert_allclose(pi.sum(), 1.0, rtol=1e-6)


def _random_state(rng, config=CFG):
    return mx.MixtureState(
        means=jnp.asarray(np.sort(rng.uniform(-0.5, 0.5, config.num_components - 1)), jnp.float32),
        log_precisions=jnp.asarray(rng.uniform(2.0, 9.0, config.num_components), jnp.float32),
        mixing_logits=jnp.asarray(rng.normal(size=config.num_components), jnp.float32),
    )


def _scipy_log_density(config, state, w):
    pi = np.exp(np.asarray(mx.log_mixing_proportions(config, state), np.float64))
    mu = np.asarray(mx.component_means(state), np.float64)
    sd = np.exp(-0.5 * np.asarray(state.log_precisions, np.float64))
    dens = sum(
        p * stats.norm.pdf(np.asarray(w, np.float64), m, s) for p, m, s in zip(pi, mu, sd, strict=True)
    )
    return np.log(dens)


@pytest.mark.parametrize("learn_pi_zero", [False, True])
def test_log_prob_matches_scipy_mixture(learn_pi_zero):
    rng = np.random.default_rng(0)
    config = mx.MixtureConfig(pi_zero=0.95, learn_pi_zero=learn_pi_zero)
    state = _random_state(rng, config)
    weights = {"k": jnp.asarray(rng.normal(0, 0.2, (300, 100)), jnp.float32)}
    expected = _scipy_log_density(config, state, weights["k"]).sum()
    assert float(mx.log_prob(config, state, weights)) == pytest.approx(expected, rel=1e-5)
    assert float(mx.log_prob(config, state, weights, exact=True)) == pytest.approx(expected, rel=1e-5)


def test_log_prob_gradients_match_exact():
    rng = np.random.default_rng(1)
    state = _random_state(rng)
    w = jnp.asarray(rng.normal(0, 0.2, 5000), jnp.float32)
    fast = jax.grad(lambda s, w: mx.log_prob(CFG, s, w), argnums=(0, 1))(state, w)
    exact = jax.grad(lambda s, w: mx.log_prob(CFG, s, w, exact=True), argnums=(0, 1))(state, w)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(exact), strict=True):
        scale = np.abs(np.asarray(b)).max()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3 * scale)


def test_large_leaf_is_chunked_and_still_exact(monkeypatch):
    rng = np.random.default_rng(2)
    state = _random_state(rng)
    w = jnp.asarray(rng.normal(0, 0.2, 4321), jnp.float32)
    whole = jax.value_and_grad(lambda s, w: mx.log_prob(CFG, s, w), argnums=(0, 1))(state, w)
    monkeypatch.setattr(interpolation, "CHUNK", 1000)  # 4 whole chunks and a rest of 321 weights
    value, grads = jax.value_and_grad(lambda s, w: mx.log_prob(CFG, s, w), argnums=(0, 1))(state, w)
    assert float(value) == pytest.approx(_scipy_log_density(CFG, state, w).sum(), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize(
    "case",
    ["huge_precision", "far_weight", "vanishing_component"],
)
def test_finite_value_and_gradients_in_extreme_cases(case):
    state = mx.init_mixture(CFG, init_range=(-0.5, 0.5))
    w = jnp.linspace(-0.5, 0.5, 1001)
    if case == "huge_precision":
        state = state._replace(log_precisions=state.log_precisions.at[3].set(80.0).at[0].set(40.0))
    elif case == "far_weight":
        w = w.at[0].set(1e4).at[1].set(-3e3)
    else:
        state = state._replace(mixing_logits=state.mixing_logits.at[5].set(-1e4))
    for exact in (False, True):
        value, grads = jax.value_and_grad(
            lambda s, w, e=exact: mx.complexity(CFG, s, w) if not e else -mx.log_prob(CFG, s, w, exact=True),
            argnums=(0, 1),
        )(state, w)
        assert np.isfinite(value)
        for g in jax.tree.leaves(grads):
            assert np.isfinite(np.asarray(g)).all(), (case, exact)


def test_hyper_prior_is_gamma_on_precision():
    """Differences of hyper_log_prob equal differences of scipy's Gamma log-density on the precisions."""
    rng = np.random.default_rng(4)
    s1, s2 = _random_state(rng), _random_state(rng)

    def scipy_lp(state):
        lam = np.exp(np.asarray(state.log_precisions, np.float64))
        a0, b0 = CFG.zero_gamma
        a, b = CFG.gamma
        return (
            stats.gamma.logpdf(lam[0], a0, scale=1 / b0) + stats.gamma.logpdf(lam[1:], a, scale=1 / b).sum()
        )

    ours = float(mx.hyper_log_prob(CFG, s2)) - float(mx.hyper_log_prob(CFG, s1))
    assert ours == pytest.approx(scipy_lp(s2) - scipy_lp(s1), rel=1e-4)


def test_sampled_weights_follow_the_mixture():
    rng = np.random.default_rng(3)
    state = _random_state(rng)
    draws = np.asarray(mx.sample(CFG, state, jax.random.key(0), (20000,)), np.float64)
    pi = np.exp(np.asarray(mx.log_mixing_proportions(CFG, state), np.float64))
    mu = np.asarray(mx.component_means(state), np.float64)
    sd = np.exp(-0.5 * np.asarray(state.log_precisions, np.float64))

    def cdf(x):
        return sum(p * stats.norm.cdf(x, m, s) for p, m, s in zip(pi, mu, sd, strict=True))

    assert stats.kstest(draws, cdf).pvalue > 1e-3


def test_invalid_config_values_are_rejected():
    with pytest.raises(ValueError, match="num_components"):
        mx.MixtureConfig(num_components=0)
    with pytest.raises(ValueError, match="pi_zero"):
        mx.MixtureConfig(pi_zero=1.0)
    with pytest.raises(ValueError, match="gamma"):
        mx.MixtureConfig(gamma=(0.0, 1.0))


def test_sample_params_draws_each_layer_from_the_scaled_mixture():
    import gmm_quant as gq
    from gmm_quant.core import init

    params = {
        "a": {"kernel": jnp.zeros((300, 40))},
        "b": {"kernel": jnp.zeros((40, 200)), "bias": jnp.ones(200)},
    }
    plan = gq.make_plan(params, mixture=CFG)
    mixtures = {"shared": _random_state(np.random.default_rng(5))}
    sampled = gq.core.rules.flatten(gq.sample_params(plan, mixtures, params, jax.random.key(1)))
    state = mixtures["shared"]
    pi = np.exp(np.asarray(mx.log_mixing_proportions(CFG, state), np.float64))
    mu = np.asarray(mx.component_means(state), np.float64)
    sd = np.exp(-0.5 * np.asarray(state.log_precisions, np.float64))
    for path, fan_in in (("a/kernel", 300), ("b/kernel", 40)):
        scale = init.layer_scale(CFG, state, sampled[path].shape)
        assert scale == pytest.approx(np.sqrt(1 / fan_in) / float(init.mixture_std(CFG, state)), rel=1e-5)

        def cdf(x, scale=scale):
            return sum(
                p * stats.norm.cdf(x, scale * m, scale * s) for p, m, s in zip(pi, mu, sd, strict=True)
            )

        assert stats.kstest(np.asarray(sampled[path]).ravel(), cdf).pvalue > 1e-3, path
    np.testing.assert_array_equal(sampled["b/bias"], 1.0)  # biases are left alone


def test_the_prior_keeps_nothing_per_weight_between_its_passes(monkeypatch):
    """Value and gradients of the prior need O(grid + chunk) scratch memory, whatever the leaf's size
    (XLA's own buffer plan of the compiled program, not a timing)."""
    monkeypatch.setattr(interpolation, "CHUNK", 1 << 14)
    state = mx.init_mixture(CFG, init_range=(-0.2, 0.2))

    def scratch(n, frozen=False):
        w = jnp.zeros((n,), jnp.float32)
        if frozen:
            fn = jax.grad(lambda w: mx.log_prob(CFG, jax.lax.stop_gradient(state), w))
            return fn, (w,)
        return jax.value_and_grad(lambda s, w: mx.log_prob(CFG, s, w), argnums=(0, 1)), (state, w)

    temps = {}
    for n in (1 << 18, 1 << 23):
        for frozen in (False, True):
            fn, args = scratch(n, frozen)
            temps[n, frozen] = jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
    weights = 4 << 23  # 32 MB
    assert temps[1 << 23, False] < 0.1 * weights and temps[1 << 23, True] < 0.1 * weights
    for frozen in (False, True):  # the scratch is the grid's and one chunk's, not the leaf's
        assert temps[1 << 23, frozen] <= temps[1 << 18, frozen] + (1 << 16)


def test_weights_of_one_value_get_a_range_around_it():
    """A one-output layer's bias (quantise_biases on a regression model) has no range to span: the
    4 free means span -0.25 +- 0.25, endpoints included."""
    state = mx.init_mixture(mx.MixtureConfig(num_components=5), jnp.asarray([-0.25]))
    np.testing.assert_allclose(state.means, [-0.5, -1 / 3, -1 / 6, 0.0], atol=1e-7)
    zeros = mx.init_mixture(mx.MixtureConfig(num_components=3), jnp.zeros(4))
    np.testing.assert_allclose(zeros.means, [-1e-3, 1e-3], atol=1e-9)


def test_the_density_table_is_log_p_and_its_derivative_by_autodiff():
    state = mx.init_mixture(CFG, init_range=(-0.3, 0.3))._replace(
        mixing_logits=jnp.linspace(-1.0, 1.0, CFG.num_components)
    )
    grid = jnp.linspace(-0.4, 0.4, 257)
    values, slopes = mx._density_table(CFG, state, grid)
    np.testing.assert_allclose(values, mx.log_density(CFG, state, grid), rtol=1e-6, atol=1e-5)
    by_autodiff = jax.vmap(jax.grad(lambda x: mx.log_density(CFG, state, x)))(grid)
    np.testing.assert_allclose(slopes, by_autodiff, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("learn_mixture", [True, False])
def test_both_evaluations_give_the_same_value_and_weight_gradient(learn_mixture):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.laplace(0, 0.05, 5000), jnp.float32)
    state = mx.init_mixture(CFG, w)
    reference = jax.value_and_grad(lambda w: mx.log_prob(CFG, state, w, exact=True))(w)
    value, grad = jax.value_and_grad(
        lambda w: mx.log_prob(CFG, jax.lax.stop_gradient(state), w, learn_mixture=learn_mixture)
    )(w)
    np.testing.assert_allclose(value, reference[0], rtol=1e-4)
    np.testing.assert_allclose(grad, reference[1], rtol=1e-3, atol=1e-3 * float(jnp.abs(reference[1]).max()))
