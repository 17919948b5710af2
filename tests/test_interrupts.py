"""A Ctrl-C that Python drops (raised inside a garbage-collector callback, as JAX registers one) still
stops a run: at the next epoch, after that epoch's checkpoint hook."""

import gc
import os
import signal
import sys
import time

import numpy as np
import optax
import pytest

from gmm_quant._util import interrupts
from gmm_quant.training import pipeline


@pytest.fixture
def installed():
    previous, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    interrupts.install()
    yield
    signal.signal(signal.SIGINT, previous)
    sys.unraisablehook = hook
    interrupts._pending = False


def drop_a_ctrl_c():
    """SIGINT delivered while a gc callback runs: Python prints 'Exception ignored' and goes on."""

    def callback(phase, info):
        if phase == "start":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the callback

    gc.callbacks.append(callback)
    try:
        gc.collect()  # the KeyboardInterrupt raised in the callback is dropped: no exception here
    finally:
        gc.callbacks.remove(callback)


def test_a_dropped_ctrl_c_is_raised_at_the_next_check(installed, capsys):
    interrupts.check()  # nothing pending: no exception
    drop_a_ctrl_c()
    assert "Traceback" not in capsys.readouterr().err  # dropped quietly (one line stays one line)
    assert interrupts.pending()
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_a_dropped_ctrl_c_stops_training_after_the_epoch_and_its_checkpoint(installed):
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    y = (x.sum(1) > 0).astype(np.int32)

    def loss(p, xb, yb, step):
        del step
        logits = xb @ p
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), {}

    saved = []

    def on_epoch(epoch, state, metrics):
        saved.append(epoch)
        if epoch == 1:
            drop_a_ctrl_c()

    with pytest.raises(KeyboardInterrupt):
        params = np.zeros((3, 2), np.float32)
        pipeline.run_epochs(loss, optax.sgd(0.1), params, (x, y), epochs=5, batch_size=16, seed=0,
                            name="test", on_epoch=on_epoch)  # fmt: skip
    assert saved == [0, 1]  # stopped right after epoch 2's checkpoint, not at the end of the run
