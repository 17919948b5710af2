"""Scale-out (issue 14): a mesh of 8 host CPU devices, set inside each test's subprocess."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from cli_runs import ROOT, one_line

DEVICES = "--xla_force_host_platform_device_count=8"


def run_python(code: str, timeout=300) -> dict:
    """Run ``code`` with 8 host devices; it prints one JSON object, returned here."""
    env = {**os.environ, "XLA_FLAGS": DEVICES, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_cli(workdir, *extra):
    env = {**os.environ, "XLA_FLAGS": DEVICES, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "gmm_quant.train", "--config", "tiny", "--workdir", str(workdir),
           "--no-progress", "--no-onnx", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sharded_prior_equals_the_unsharded_one_value_and_gradients():
    out = run_python("""
        import json, jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from gmm_quant.core import mixture as mx
        from gmm_quant.scale.mesh import make_mesh
        cfg = mx.MixtureConfig(num_components=9)
        rng = np.random.default_rng(0)
        w = (0.1 * rng.normal(size=(64, 256))).astype(np.float32)
        w[0, :4] = [-3.0, 3.5, 2.0, -1.0]  # the global extremes sit in the first model block only
        b = rng.normal(size=(4096, 1100)).astype(np.float32)  # blocks of 1.1M: summed in chunks
        state = mx.init_mixture(cfg, [w, b])
        lp = lambda s, w, b, specs=None: mx.log_prob(cfg, s, [w, b], specs=specs)
        grad = jax.value_and_grad(lp, (0, 1, 2))
        ref_value, ref_grads = grad(state, w, b)
        exact = float(mx.log_prob(cfg, state, [w, b], exact=True))
        mesh = make_mesh({"data": 2, "model": 4})
        with jax.set_mesh(mesh):
            ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
            bs = jax.device_put(b, NamedSharding(mesh, P("model", None)))
            fn = jax.jit(lambda s, w, b: grad(s, w, b, specs=[P(None, "model"), P("model", None)]))
            value, grads = fn(state, ws, bs)
        blocks = [np.asarray(s.data) for s in ws.addressable_shards]
        diffs = [float(np.abs(np.asarray(a) - np.asarray(c)).max() / (np.abs(np.asarray(a)).max() + 1e-30))
                 for a, c in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads))]
        print(json.dumps({"ref": float(ref_value), "sharded": float(value), "exact": exact, "diffs": diffs,
                          "block_ranges": [[float(x.min()), float(x.max())] for x in blocks],
                          "grad_spec": str(grads[1].sharding.spec)}))
    """)
    assert out["sharded"] == pytest.approx(out["ref"], rel=1e-5)
    assert out["sharded"] == pytest.approx(out["exact"], rel=1e-4)  # the grid spans the global range
    assert max(out["diffs"]) <= 1e-5
    assert any(lo > -3.0 or hi < 3.5 for lo, hi in out["block_ranges"])  # some block's range differs
    assert out["grad_spec"] == "P(None, 'model')"  # the weights' gradient stays where they live


def test_training_state_lives_where_the_placement_says_and_gradients_are_reduced():
    out = run_python("""
        import json, jax, numpy as np
        import gmm_quant as gq
        from flax import nnx
        import models
        from gmm_quant.training import data, pipeline
        from gmm_quant.scale.mesh import make_mesh
        from gmm_quant.scale.placement import plan_placement
        graphdef, params = nnx.split(models.create("digits_mlp", 0), nnx.Param)
        apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
        ds = data.load("digits")
        plan = gq.make_plan(params)
        placement = plan_placement(params, make_mesh({"data": 2, "model": 4}), ["layers/0/kernel"])
        setup = pipeline.retrain_setup(apply_fn, params, plan, num_train=1024, steps_per_epoch=16,
                                       placement=placement)
        state = pipeline.run_epochs(*setup, (ds.x_train[:1024], ds.y_train[:1024]), epochs=1, batch_size=64,
                                    seed=0, name="retrain", placement=placement)
        kernel = state.trainable["params"]["layers"][0]["kernel"]
        mu = jax.tree.leaves(state.opt_state)
        print(json.dumps({"kernel": str(kernel.sharding.spec), "shape": list(kernel.shape),
                          "block": list(kernel.addressable_shards[0].data.shape),
                          "other": str(state.trainable["params"]["layers"][1]["kernel"].sharding.spec)}))
    """)
    assert out["kernel"] == "P(None, 'model')" and out["other"] == "P()"
    assert out["block"][0] * out["block"][1] * 4 == out["shape"][0] * out["shape"][1]  # a quarter each


def test_a_sharded_layer_is_compressed_and_counted_where_its_shards_live():
    """Assign / prune / snap and the Han count of layers split over the model axis (along their input or
    output dimension, dense and conv) equal the host's numpy result; the indices stay split like the
    weights, and no compiled program gathers the layer (no all-gather / all-to-all)."""
    out = run_python("""
        import json, jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        import gmm_quant as gq
        from gmm_quant.core import accounting, codebook
        from gmm_quant.core.rules import Rule
        from gmm_quant.core import sharded as compression
        from gmm_quant.scale.mesh import make_mesh
        mesh, rng, rows = make_mesh({"data": 2, "model": 4}), np.random.default_rng(0), []
        conv = (3, 3, 16, 32)
        layers = [((300, 64), P(None, "model")), ((4000, 64), P("model", None)),
                  (conv, P(None, None, "model", None)), (conv, P(None, None, None, "model"))]
        for shape, spec in layers:
            w = (0.1 * rng.normal(size=shape) * (rng.random(shape) < 0.05)).astype(np.float32)  # long gaps
            params = {"k": w}
            plan = gq.make_plan(params, (Rule(".*", prune_threshold=3),))
            mixtures = gq.init_mixtures(plan, params)
            ref_cb, _ = codebook.compress(plan, mixtures, params)
            sharded = {"k": jax.device_put(w, NamedSharding(mesh, spec))}
            cb, snapped = codebook.compress(plan, mixtures, sharded)
            centres = cb["k"].centres
            programs = [compression.snapper(sharded["k"].sharding, centres).lower(sharded["k"])]
            text = "".join(p.compile().as_text() for p in programs)
            rows.append({
                "centres": bool(np.array_equal(centres, ref_cb["k"].centres)),
                "indices": bool(np.array_equal(np.asarray(cb["k"].indices), ref_cb["k"].indices)),
                "where": all(a.sharding.is_equivalent_to(sharded["k"].sharding, len(shape))
                             for a in (cb["k"].indices, snapped["k"])),
                "cost": accounting.layer_cost("k", cb["k"]) == accounting.layer_cost("k", ref_cb["k"]),
                "fillers": accounting.layer_cost("k", ref_cb["k"]).fillers,
                "gathers": "all-gather" in text or "all-to-all" in text,
            })
        print(json.dumps(rows))
    """)
    for row in out:
        assert row["centres"] and row["indices"] and row["where"] and row["cost"] and not row["gathers"]
    assert any(row["fillers"] for row in out)  # gaps longer than the difference field are exercised


def _results(workdir) -> dict:
    metrics = json.loads((workdir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("error_", "val_error_", "compression_ratio"))}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one") / "w"
    proc = train_cli(workdir)
    assert proc.returncode == 0, proc.stderr
    return _results(workdir)


def test_data_parallel_and_fsdp_run_gives_the_one_device_result(tmp_path, one_device):
    """Retrain + compress + fine-tune of the tiny config: 4-way data parallel with every kernel split
    over 2 more devices (FSDP) gives the errors and the compression ratio of one device exactly."""
    proc = train_cli(tmp_path / "w", "--mesh", "data=4,model=2", "--shard-params", "kernel")
    assert proc.returncode == 0, proc.stderr
    assert _results(tmp_path / "w") == one_device


def test_a_checksum_is_the_same_for_every_sharding():
    """What lets a checkpoint written by several processes verify in one: ``tree_checksum`` of a tree
    is the same on the host, replicated, and split over one or two mesh axes."""
    out = run_python("""
        import json, jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from gmm_quant.run.checksums import tree_checksum
        from gmm_quant.scale.mesh import make_mesh
        mesh, rng = make_mesh({"data": 2, "model": 4}), np.random.default_rng(0)
        tree = {"w": rng.normal(size=(64, 96)).astype(np.float32), "i": rng.integers(0, 9, (8, 40), np.uint8)}
        sums = [tree_checksum(tree)[0]]
        for spec in (P(), P("model"), P(None, "model"), P("data", "model"), P("model", "data")):
            placed = {k: jax.device_put(v, NamedSharding(mesh, spec)) for k, v in tree.items()}
            sums.append(tree_checksum(placed)[0])
        print(json.dumps({"sums": sums}))
    """)
    assert len(set(out["sums"])) == 1


def _two_processes(workdir, *extra, workdirs=None, slurm=False, timeout=300):
    """``python -m gmm_quant.train`` of the tiny config as 2 processes on localhost (one CPU device
    each, so a mesh spans both); returns [(returncode, stdout, stderr)] of process 0 and 1. ``slurm``:
    the processes find each other with ``--distributed`` in the environment of a 2-task Slurm job."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    dirs = workdirs or (workdir, workdir)
    cmd = [sys.executable, "-m", "gmm_quant.train", "--config", "tiny", "--no-progress", "--no-onnx", *extra]
    procs = []
    for i in (0, 1):
        if slurm:  # what srun sets (one task per node; both nodes are this host)
            job = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                   "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"}  # fmt: skip
            job["JAX_COORDINATOR_PORT"] = str(port)
            launch = ["--distributed"]
        else:
            job = {}
            launch = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        argv = [*cmd, "--workdir", str(dirs[i]), *launch]
        procs.append(subprocess.Popen(argv, env={**env, **job}, cwd=ROOT, **pipes))
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outs, strict=True)]


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_two_processes_checkpoint_their_own_shards_and_resume_in_two_or_one(tmp_path, one_device):
    """Two processes with every kernel split between them: each writes its own shards of each
    checkpoint (orbax's multi-process layout), the result is the one-device result; a shard of the last
    retraining step damaged, both processes agree to fall back to the step before and finish with the
    same result; and the same checkpoints resume in one process (their checksums do not depend on the
    layout)."""
    workdir, sharded = tmp_path / "w", ["--mesh", "model=2", "--shard-params", "kernel"]
    runs = _two_processes(workdir, *sharded)
    assert [r[0] for r in runs] == [0, 0], runs
    assert "process 0 wrote the results" in runs[1][1]
    assert _results(workdir) == one_device
    step = max((workdir / "checkpoints" / "retrain").glob("[0-9]*"), key=lambda p: int(p.name))
    for me in (0, 1):  # each process wrote array data of its own
        assert any(p.is_file() for p in (step / "default" / f"ocdbt.process_{me}" / "d").iterdir())

    _flip_a_byte(max((step / "default" / "ocdbt.process_1" / "d").iterdir(), key=lambda p: p.stat().st_size))
    for name in ("metrics.json", "model.gqz"):
        (workdir / name).unlink()
    runs = _two_processes(workdir, *sharded)
    assert [r[0] for r in runs] == [0, 0], runs
    assert f"retrain checkpoint {step.name} is damaged" in runs[0][2] and "damaged" not in runs[1][2]
    assert _results(workdir) == one_device

    (workdir / "metrics.json").unlink()
    proc = train_cli(workdir)  # one process, one device, from the two processes' checkpoints
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr  # nothing refused as damaged
    assert _results(workdir) == one_device


def test_two_processes_distil_code_and_quantise_activations_like_one(tmp_path):
    """The stages that hold arrays besides the weights (the distillation teacher, the fine-tuning's
    indices, activation ranges, float codes, the tightness check) run on global arrays in two
    processes, starting from the one-process run's pretraining, and give the one-process result."""
    extra = ["--distill-alpha", "0.5", "--activation-mode", "w8a8", "--float-bits", "6",
             "--retrain-tightness", "0.3"]  # fmt: skip
    proc = train_cli(tmp_path / "one", *extra)
    assert proc.returncode == 0, proc.stderr
    sharded = ["--mesh", "model=2", "--shard-params", "kernel"]
    reuse = ["--pretrained", str(tmp_path / "one"), "--pretrain-epochs", "0"]  # each process reads it
    runs = _two_processes(tmp_path / "two", *sharded, *reuse, *extra)
    assert [r[0] for r in runs] == [0, 0], runs
    assert _results(tmp_path / "two") == _results(tmp_path / "one")


def test_processes_that_do_not_share_the_work_directory_are_refused(tmp_path):
    """Two processes of a (simulated) Slurm job started with ``--distributed`` join one run, find that
    they do not see the same work directory, and stop in one line before training."""
    runs = _two_processes(None, workdirs=(tmp_path / "a", tmp_path / "b"), slurm=True)
    for code, _, err in runs:
        assert code == 1 and "is not shared by the 2 processes" in one_line(err)
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b").exists()


def test_a_work_directory_in_use_stops_every_process_at_once(tmp_path):
    """Process 0 alone takes the lock; when it may not, the others stop too (no process waits at a
    barrier for one that left: that took 5 minutes and ended in a crash)."""
    import fcntl

    workdir = tmp_path / "w"
    workdir.mkdir()
    with open(workdir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 on host elsewhere")
        held.flush()
        runs = _two_processes(workdir, timeout=60)
    for code, _, err in runs:
        assert code == 1 and "is in use by pid 1 on host elsewhere" in one_line(err)
    assert one_line(runs[1][2]).startswith("error: process 0: work directory")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mesh", "data=16"], "needs 16 devices but JAX sees 8"),
        (["--mesh", "pipeline=2"], "expected AXIS=SIZE with AXIS one of ('data', 'model')"),
        (["--mesh", "data=0"], "size '0' is not a positive integer"),
        (["--mesh", "data=3"], "'batch_size' = 64: not a multiple of the mesh's data axis (3)"),
        (
            ["--mesh", "model=8", "--shard-params", "layers/2/bias"],
            "cannot shard layers/2/bias (10,) over model=8",
        ),
        (["--shard-params", "kernel"], "needs a mesh with a model axis"),
    ],
)
def test_a_bad_mesh_is_refused_in_one_line_before_anything_is_written(tmp_path, extra, message):
    proc = train_cli(tmp_path / "w", *extra)
    assert proc.returncode in (1, 2) and message in one_line(proc.stderr)
    assert not (tmp_path / "w").exists()
