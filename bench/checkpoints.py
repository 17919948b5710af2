"""Checkpoints of a ~100M-value training state: one process vs two, checksum vs sha256.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/checkpoints.py

The state is what a retraining epoch saves for a 2^25-weight layer with Adam: weights, first and second
moments (3 x 2^25 float32 = 403 MB) and a step. (1) One process, one device: ``StageCheckpoints.save``
(orbax write, checksum, file digests, metadata) and ``restore_latest`` (file digests, orbax read,
checksum), medians of ``--repeats``; beside them the two digests of the state alone, ``tree_checksum``
(jitted, any layout) and ``tree_digest`` (sha256 of the host bytes, what checkpoints recorded before).
(2) The same state split over ``model=2`` between two processes on localhost (``jax.distributed``,
one CPU device each): each writes, hashes and reads its own half. Every case runs in fresh
subprocesses, one case after the other on this machine's 2 cores, the two cases alternated over
``--rounds`` (medians reported).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def child(log2: int, repeats: int, workdir: str, port: int, processes: int, me: int) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if processes > 1:
        from gmm_quant.scale import distributed

        distributed.initialize(f"localhost:{port}", processes, me)
    from gmm_quant.run import checkpoint as ckpt
    from gmm_quant.run.checksums import tree_checksum
    from gmm_quant.scale.mesh import make_mesh

    shape = (2 ** (log2 - 12), 4096)
    sharding = NamedSharding(make_mesh({"model": processes}), P("model", None))

    def leaf(seed):
        def block(index):
            start, stop, _ = index[0].indices(shape[0])
            rng = np.random.default_rng(seed * 1000 + start)
            return rng.standard_normal((stop - start, 4096), np.float32)

        return jax.make_array_from_callback(shape, sharding, block)

    state = {"step": np.array(7, np.int32), "w": leaf(1), "mu": leaf(2), "nu": leaf(3)}
    store = ckpt.StageCheckpoints(workdir, "retrain", "start")
    saves, restores = [], []
    for epoch in range(1, repeats + 1):
        start = time.perf_counter()
        store.save(epoch, state)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        got, _ = store.restore_latest(state)
        restores.append(time.perf_counter() - start)
        assert got == epoch
    store.close()
    out = {"save_s": statistics.median(saves), "restore_s": statistics.median(restores)}
    tree_checksum(state)
    start = time.perf_counter()
    tree_checksum(state)
    out["checksum_s"] = time.perf_counter() - start
    if processes == 1:
        start = time.perf_counter()
        ckpt.tree_digest(state)
        out["sha256_s"] = time.perf_counter() - start
    out["mb"] = 3 * 4 * shape[0] * shape[1] / 1e6
    return out


def run(log2: int, repeats: int, processes: int) -> dict:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as workdir:
        cmd = [sys.executable, __file__, "--child", str(log2), str(repeats), workdir, str(port)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        procs = [subprocess.Popen([*cmd, str(processes), str(i)], env=env, stdout=subprocess.PIPE, text=True)
                 for i in range(processes)]  # fmt: skip
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"{processes}-process case failed")
        return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2", type=int, default=25, help="log2 of the weights (the state holds 3x)")
    ap.add_argument("--repeats", type=int, default=3, help="saves and restores per subprocess")
    ap.add_argument("--rounds", type=int, default=3, help="one-process and two-process runs, alternated")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        log2, repeats, workdir, port, processes, me = args.child
        print(json.dumps(child(int(log2), int(repeats), workdir, int(port), int(processes), int(me))))
        return
    rounds = [(run(args.log2, args.repeats, 1), run(args.log2, args.repeats, 2)) for _ in range(args.rounds)]
    one, two = ({k: statistics.median(r[i][k] for r in rounds) for k in rounds[0][i]} for i in (0, 1))
    print(f"state: {one['mb']:.0f} MB; medians of {args.rounds} alternated rounds of {args.repeats}")
    print(f"{'':24}{'1 process':>12}{'2 processes':>14}{'ratio':>8}")
    rows = (("save_s", "save (s)"), ("restore_s", "verify + restore (s)"), ("checksum_s", "checksum (s)"))
    for key, name in rows:
        print(f"{name:24}{one[key]:12.2f}{two[key]:14.2f}{two[key] / one[key]:8.2f}")
    print(f"sha256 of the state on one process: {one['sha256_s']:.2f} s "
          f"(checksum / sha256 = {one['checksum_s'] / one['sha256_s']:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
