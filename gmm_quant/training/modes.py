"""Models with state and randomness: BatchNorm statistics that update, Dropout that draws fresh masks.

``apply_fn(params, x)`` is all the stages need from a stateless model. A model with state is given as
a ``Stateful`` apply function instead, made from the model the way its library writes it::

    apply_fn, params = from_nnx(model)                   # an nnx.Module (BatchNorm, Dropout, remat...)
    apply_fn, params = from_linen(module, variables)     # Linen: variables["params"] + collections

and passed where ``apply_fn`` goes (``gq.pretrain``, ``gq.retrain``, ``gq.finetune``, ``gq.error_rate``,
``gq.export_onnx``). Training steps run the model in train mode: its state (every collection or
variable that is not a parameter) is carried from step to step, and its random streams are reseeded
on every step from ``(seed, step)``, so a resumed run draws the masks an uninterrupted one would.
Evaluation and export run it in eval mode with the state it has.
"""

from __future__ import annotations

import jax

_STREAM = 0x5EED  # the training RNG is fold_in(key(seed), _STREAM) folded with the step


class Stateful:
    """``apply_fn`` of a model with state and randomness.

    Invariants:
      - ``self(params, x)`` runs the model in eval mode with ``self.state`` (pure given the state).
      - ``self.train_apply(params, state, x, rng)`` returns ``(outputs, new_state)``: train mode, a
        pure function; ``new_state`` has the structure and dtypes of ``state``.
      - ``self.state`` is the state after the last stage that trained through this object (the
        stages store it there, as NNX updates a module in place); it starts as the model's own.
    """

    def __init__(self, eval_apply, train_apply, state, rebuild=None):
        self._eval, self.train_apply, self.state, self._rebuild = eval_apply, train_apply, state, rebuild

    def __call__(self, params, x):
        return self._eval(params, self.state, x)

    def module(self, params):
        """The user's model object holding ``params`` and ``self.state``, in eval mode (NNX: a new
        ``nnx.Module``; Linen: the ``variables`` dict)."""
        if self._rebuild is None:
            raise TypeError("this model has no module form")
        return self._rebuild(params, self.state)


def _flatten(f: Stateful):
    return (f.state,), (f._eval, f.train_apply, f._rebuild)


def _unflatten(aux, children):
    return Stateful(aux[0], aux[1], children[0], aux[2])


# A Stateful is a pytree of its state, so ``compiled`` can pass it to jit as an argument.
jax.tree_util.register_pytree_node(Stateful, _flatten, _unflatten)


def _call(apply_fn, params, x):
    return apply_fn(params, x)


_jitted_call = jax.jit(_call)


def compiled(apply_fn):
    """``jax.jit(apply_fn)``, except that a ``Stateful``'s state is an argument of the compiled
    program rather than a constant of it: jit caches a program per function, and a constant state
    would be the one of the first call (stale after the next stage updated it)."""
    if isinstance(apply_fn, Stateful):
        return lambda params, x: _jitted_call(apply_fn, params, x)
    return jax.jit(apply_fn)


def state_of(apply_fn):
    """The state the stages carry for ``apply_fn``: ``apply_fn.state`` if it is ``Stateful``, else None."""
    return apply_fn.state if isinstance(apply_fn, Stateful) else None


def with_state(apply_fn, state):
    """A new ``Stateful`` like ``apply_fn`` holding ``state`` (``apply_fn`` itself for any other
    apply function, or when ``state`` is None): the run's stages return models, never change them."""
    if not isinstance(apply_fn, Stateful) or state is None:
        return apply_fn
    return _unflatten(_flatten(apply_fn)[1], (state,))


def keep_state(apply_fn, state) -> None:
    """Store a stage's final ``state`` on a ``Stateful`` ``apply_fn`` (nothing for any other)."""
    if isinstance(apply_fn, Stateful) and state is not None:
        apply_fn.state = state


def step_key(seed: int, step):
    """The random key of training step ``step`` (a traced int is fine) of a run seeded ``seed``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)


def outputs(apply_fn, params, x, mode: dict):
    """``(outputs, aux)`` of a task loss: eval mode when ``mode`` is empty, else train mode with
    ``mode["state"]`` and ``mode["rng"]`` and ``aux == {"state": new_state}`` (the loop carries it)."""
    if not mode:
        return apply_fn(params, x), {}
    if not isinstance(apply_fn, Stateful):
        raise TypeError("a model state was given to a stateless apply_fn")
    out, new = apply_fn.train_apply(params, mode["state"], x, mode["rng"])
    return out, {"state": new}


def from_nnx(model):
    """``(apply_fn, params)`` of an ``nnx.Module``: ``params`` its ``nnx.Param``s; ``apply_fn`` a
    ``Stateful`` (``.state``: every other variable, BatchNorm statistics included) whose train mode
    is the module's ``train()`` and eval mode its ``eval()``. The module itself is not changed."""
    from flax import nnx

    graphdef, params, rngs, state = nnx.split(model, nnx.Param, nnx.RngState, ...)

    def merged(params, state, key):
        fresh = rngs if key is None else _reseeded(rngs, key)
        return nnx.merge(graphdef, params, fresh, state, copy=True)

    def train_apply(params, state, x, key):
        module = merged(params, state, key)
        module.train()
        out = module(x)
        return out, nnx.state(module, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))

    def rebuild(params, state):
        module = merged(params, state, None)
        module.eval()
        return module

    def eval_apply(params, state, x):
        return rebuild(params, state)(x)

    return Stateful(eval_apply, train_apply, state, rebuild), params


def _reseeded(rngs, key):
    """The model's random streams with every key replaced by one drawn from ``key`` and counts at 0."""
    leaves, treedef = jax.tree.flatten(rngs)
    fresh = []
    for i, leaf in enumerate(leaves):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            fresh.append(jax.random.split(jax.random.fold_in(key, i), leaf.shape))  # stacked: one each
        else:
            fresh.append(jax.numpy.zeros_like(leaf))
    return jax.tree.unflatten(treedef, fresh)


def from_linen(module, variables: dict, *, train_kwargs=None, eval_kwargs=None, rng_streams=("dropout",)):
    """``(apply_fn, params)`` of a Linen module: ``params`` is ``variables["params"]``; every other
    collection (``batch_stats``...) is the state, mutable in train mode. ``train_kwargs`` /
    ``eval_kwargs`` are passed to ``module.apply`` in each mode (default ``{"train": True}`` /
    ``{"train": False}``, the Linen examples' convention); ``rng_streams`` are the RNG names the
    module draws from in train mode."""
    train_kwargs = {"train": True} if train_kwargs is None else dict(train_kwargs)
    eval_kwargs = {"train": False} if eval_kwargs is None else dict(eval_kwargs)
    state = {k: v for k, v in variables.items() if k != "params"}

    def eval_apply(params, state, x):
        return module.apply({"params": params, **state}, x, **eval_kwargs)

    def train_apply(params, state, x, key):
        rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_streams)}
        out, new = module.apply({"params": params, **state}, x, mutable=list(state), rngs=rngs,
                                **train_kwargs)  # fmt: skip
        return out, {**state, **new}

    def rebuild(params, state):
        return {"params": params, **state}

    return Stateful(eval_apply, train_apply, state, rebuild), variables["params"]
