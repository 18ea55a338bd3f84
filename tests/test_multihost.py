"""Several JAX processes on localhost, as a pod runs them: joined by jax.distributed (a simulated
SLURM allocation, or an explicit coordinator), 2 fake CPU devices each, gloo collectives.

What a pod run must give: the same parameters as one process over the same 4 devices at every
step; checkpoints that restore on the other topology and continue as the straight run does; a
SIGTERM to every process that leaves one agreed checkpoint and resumes bit for bit; a prepared
dataset whose records each host reads once per epoch; GenEval prompts split with nothing made
twice; clear errors when the job cannot form. The SLURM recipe itself is what runs the pod side.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distill_jax import distributed
from distill_jax.config import load_config
from distill_jax.sharding import abstract_sharded
from distill_jax.train import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = f"{REPO}/configs/scm.py:runlocal"
STEPS = 6
OVERRIDES = [
    f"--config.total_steps={STEPS}",
    "--config.log_every=1",
    "--config.checkpoint_every=1",
    f"--config.keep_checkpoints={STEPS}",
]
ONE_HOST = ["--config.mesh.devices=4"]  # 1 process x 4 of the suite's 8 fake devices
RTOL = 1e-5
LR = 1e-3  # runlocal's


def child_env(cache: Path) -> dict[str, str]:
    """The processes share a compilation cache: the same step compiles once for the module."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}


def run_hosts(command, logs: Path, cache: Path, *, how="slurm", timeout=600) -> list[str]:
    """Runs ``command`` as 2 processes x 2 devices; returns each process's output."""
    codes = distributed.launch_local(
        command, 2, 2, how=how, env=child_env(cache), timeout_s=timeout, log_dir=str(logs)
    )
    out = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(o[-3000:] for o in out)
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill_jax.cli", *args]


def one_host(workdir: Path, *extra: str):
    return train(load_config(CONFIG, OVERRIDES + ONE_HOST + list(extra)), workdir)


def restore(workdir: Path, step: int, like: dict) -> list[np.ndarray]:
    """The parameters of ``workdir``'s checkpoint ``step``, restored onto ``like``'s devices."""
    abstract = abstract_sharded(like)
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",)) as manager:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        state = manager.restore(step, args=args)["state"]
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["params"]))]


def assert_params_close(a, b, *, exact=False):
    """Parameters of two topologies agree to float32 reduction order.

    The all-reduce of the gradients adds the devices' parts in another order under gloo (2
    processes) than in one process, so gradients differ in the last bits (after one step the
    parameters agree to 3e-8). Adam divides the first moment by the root of the second: where
    two steps' gradients nearly cancel in the first moment, a last-bit difference becomes a
    visible one in that element's update, bounded by the step's learning rate. Measured: 7 of
    78,065 elements after step 2, 39 after step 6, at most 1.43e-5 apart (lr 1e-3), not
    growing. So: every element to rtol 1e-5 but for at most 0.1% of them, and none further apart
    than LR / 10.
    """
    assert len(a) == len(b)
    if exact:
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        return
    x = np.concatenate([v.ravel() for v in a])
    y = np.concatenate([v.ravel() for v in b])
    apart = ~np.isclose(x, y, rtol=RTOL, atol=1e-8)
    assert apart.sum() <= 1e-3 * x.size, f"{apart.sum()} of {x.size} elements differ"
    assert np.abs(x - y).max() < LR / 10, np.abs(x - y).max()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 1 process x 4 devices, a checkpoint at every step."""
    workdir = tmp_path_factory.mktemp("one-host")
    return workdir, one_host(workdir)


@pytest.fixture(scope="module")
def pod(tmp_path_factory, cache):
    """launch/slurm_gpu.sbatch, its srun replaced by the local launcher: 2 processes x 2
    devices in a simulated SLURM job, each running launch/host.sh."""
    root = tmp_path_factory.mktemp("pod")
    logs = root / "logs"
    launcher = (
        f"{sys.executable} -m distill_jax.distributed -n 2 --devices 2 --slurm --log-dir {logs}"
    )
    env = {
        **os.environ,
        **child_env(cache),
        "CONFIG": CONFIG,
        "WORKDIR": str(root / "run"),
        "REPO": str(REPO),
        "ACCEL": "cpu",
        "SRUN": launcher,
        "DISTILL_JAX": str(Path(sys.executable).parent / "distill-jax"),
    }
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), *OVERRIDES],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = [(logs / f"process_{i}.log").read_text() for i in range(2)]
    assert done.returncode == 0, done.stderr[-3000:] + "\n".join(o[-3000:] for o in out)
    return root / "run", out


def test_slurm_recipe_equals_one_process_at_every_step(pod, straight):
    workdir, (log0, log1) = pod
    ref_dir, ref = straight
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == list(range(1, STEPS + 1))
    first = [restore(d, 1, ref.state) for d in (workdir, ref_dir)]
    for x, y in zip(*first, strict=True):  # one step: the parameters agree everywhere
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-8)
    for step in steps:
        assert_params_close(restore(workdir, step, ref.state), restore(ref_dir, step, ref.state))
    # Process 1 says who it is; the progress bar and the summary come from process 0 only.
    assert "joined the job as process 1 of 2 (slurm" in log1 and "p1/2" in log1
    assert "train scm" in log0 and "train scm" not in log1
    assert f"step {STEPS}:" in log0 and f"step {STEPS}:" not in log1
    # Both processes wrote the student together (one folder, checksums verified on loading).
    from flax import nnx

    from distill_jax.folders import load_flux

    students = [load_flux(d / "student") for d in (workdir, ref_dir)]
    assert_params_close(
        *([np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))] for m in students)
    )
    assert not [p for p in workdir.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_pod_checkpoint_continues_on_one_process(pod, straight, tmp_path):
    """2 x 2 -> 1 x 4: resume the pod's step 3 on one process; it continues as the straight
    run does."""
    workdir, _ = pod
    ref_dir, ref = straight
    shutil.copytree(workdir, tmp_path / "run")
    for step in range(4, STEPS + 1):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step))
    resumed = one_host(tmp_path / "run")
    assert resumed.metrics[0]["step"] == 4
    assert_params_close(
        restore(tmp_path / "run", STEPS, ref.state), restore(ref_dir, STEPS, ref.state)
    )


def test_one_process_checkpoint_continues_on_the_pod(straight, cache, tmp_path):
    """1 x 4 -> 2 x 2, joined through an explicit coordinator this time."""
    ref_dir, ref = straight
    shutil.copytree(ref_dir, tmp_path / "run")
    for step in range(4, STEPS + 1):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step))
    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "run"), *OVERRIDES]
    run_hosts(cli(*args), tmp_path / "logs", cache, how="explicit")
    assert_params_close(
        restore(tmp_path / "run", STEPS, ref.state), restore(ref_dir, STEPS, ref.state)
    )


def test_sigterm_to_every_process_leaves_one_checkpoint_and_resumes_exactly(
    straight, cache, tmp_path
):
    """SIGTERM reaches both processes (the launcher passes it on, as a scheduler does) while
    they train a long run: they agree on one step, save it and exit 143 (128 + SIGTERM: stopped,
    not finished). Resumed to 3 steps past it, the parameters equal, bit for bit, those of an
    uninterrupted run to the same step."""
    _, ref = straight
    logs = tmp_path / "logs"
    long = [
        "--config.total_steps=3000",
        "--config.log_every=1000",
        "--config.checkpoint_every=5000",
    ]
    launcher = [sys.executable, "-m", "distill_jax.distributed", "-n", "2", "--devices", "2"]
    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "cut"), "--multihost", *long]
    proc = subprocess.Popen(
        [*launcher, "--slurm", "--log-dir", str(logs), "--", *cli(*args)],
        env={**os.environ, **child_env(cache)},
    )
    deadline = time.monotonic() + 600
    while (
        not (logs / "process_0.log").is_file()
        or "step compiled" not in (logs / "process_0.log").read_text()
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    saved = [int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 3000, saved
    stop = saved[0]
    for i in range(2):
        text = (logs / f"process_{i}.log").read_text()
        assert f"all hosts stop after step {stop}" in text
        assert f"stopped by SIGTERM after saving step {stop}" in text

    target = [f"--config.total_steps={stop + 3}", "--config.checkpoint_every=5000"]
    for name in ("cut", "straight"):
        args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / name), "--multihost"]
        args += target
        run_hosts(cli(*args), tmp_path / f"logs-{name}", cache)
    assert_params_close(
        restore(tmp_path / "cut", stop + 3, ref.state),
        restore(tmp_path / "straight", stop + 3, ref.state),
        exact=True,
    )


# --- a prepared (latents) dataset ----------------------------------------------------------------

RECORDS = 24


@pytest.fixture(scope="module")
def latents_ds(tmp_path_factory) -> Path:
    """24 records shaped for the tiny preset (what `distill-jax prepare` writes)."""
    from distill_jax.data import builders
    from distill_jax.data.prepare import UNCOND_FILE

    out = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)

    def read_shard(records):
        for i in records:
            yield {
                "latents": rng.standard_normal((4, 4, 4)).astype(np.float32),
                "t5": rng.standard_normal((8, 32)).astype(np.float32),
                "pooled": rng.standard_normal(16).astype(np.float32),
                "caption": f"record {i}",
                "key": f"{i:03d}",
                "index": i,
            }

    builders.write_dataset(
        out,
        name=builders.LATENT_DATASET,
        features=builders.latent_features((4, 4, 4), (8, 32), 16, np.float32),
        num_records=RECORDS,
        read_shard=read_shard,
        shard_size=7,
        metadata={"scaling_factor": 0.5, "shift_factor": 0.1},
        process_index=0,
        process_count=1,
    )
    np.savez(out / UNCOND_FILE, t5=np.zeros((8, 32), np.float32), pooled=np.zeros(16, np.float32))
    return out


JOIN = """
import json, os, sys
import numpy as np
from distill_jax import distributed
distributed.initialize(
    coordinator_address=os.environ["DISTILL_JAX_COORDINATOR"], num_processes=2,
    process_id=int(os.environ["DISTILL_JAX_PROCESS_ID"]), timeout_s=60,
)
def report(value):  # this process's result, as JSON
    out = os.path.join(sys.argv[1], os.environ["DISTILL_JAX_PROCESS_ID"] + ".json")
    json.dump(value, open(out, "w"))
"""


def run_script(script: str, tmp_path: Path, cache: Path, *args: str) -> list:
    """``script`` (after :data:`JOIN`) on 2 joined processes x 2 devices, with ``sys.argv[2:]``
    = ``args``; returns what each process passed to ``report``."""
    command = [sys.executable, "-c", JOIN + script, str(tmp_path), *args]
    run_hosts(command, tmp_path / "logs", cache, how="explicit", timeout=300)
    return [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]


READ_EPOCH = """
from jax.sharding import NamedSharding, PartitionSpec
from distill_jax.data.input_pipeline import latent_batches
from distill_jax.data.training import host_rows
from distill_jax.sharding import make_mesh
from distill_jax.train import BATCH_AXES

mesh = make_mesh({"data": 2, "fsdp": 2})
rows = host_rows(NamedSharding(mesh, PartitionSpec(BATCH_AXES)), 8)
it = iter(latent_batches(sys.argv[2], global_batch=8, rows=rows, seed=3))
seen = [np.asarray(next(it)["index"]).tolist() for _ in range(3)]  # one epoch: 24 / 8 batches
report({"rows": rows.tolist(), "seen": seen})
"""


def test_hosts_read_disjoint_shares_of_a_prepared_dataset(latents_ds, cache, tmp_path):
    """Over one epoch the two hosts together read every record once, each host its own rows of
    every global batch, and the global batches are those a single process reads."""
    from distill_jax.data.input_pipeline import latent_batches

    hosts = run_script(READ_EPOCH, tmp_path, cache, str(latents_ds))
    assert hosts[0]["rows"] == [0, 1, 2, 3] and hosts[1]["rows"] == [4, 5, 6, 7]
    read = sorted(i for h in hosts for batch in h["seen"] for i in batch)
    assert read == list(range(RECORDS))
    single = iter(latent_batches(latents_ds, global_batch=8, seed=3))
    for k in range(3):
        want = np.asarray(next(single)["index"]).tolist()
        assert hosts[0]["seen"][k] + hosts[1]["seen"][k] == want


WRITE_SHARDS = """
from distill_jax.data import builders

def read_shard(records):
    for i in records:
        yield {"latents": np.full((4, 4, 4), i, np.float32), "t5": np.zeros((8, 32), np.float32),
               "pooled": np.zeros(16, np.float32), "caption": "c", "key": str(i), "index": i}

written = builders.write_dataset(
    sys.argv[2], name=builders.LATENT_DATASET,
    features=builders.latent_features((4, 4, 4), (8, 32), 16, np.float32),
    num_records=20, read_shard=read_shard, shard_size=3,
    metadata={"scaling_factor": 1.0, "shift_factor": 0.0},
)
report({"written": written.shards_written, "complete": written.complete})
"""


def test_hosts_write_a_dataset_together(cache, tmp_path):
    """prepare's writer on 2 processes: process p writes shards p, p + 2, ...; both return only
    when the dataset is complete, its metadata written once, by process 0."""
    import tensorflow_datasets as tfds

    reports = run_script(WRITE_SHARDS, tmp_path, cache, str(tmp_path / "ds"))
    assert reports == [{"written": 4, "complete": True}, {"written": 3, "complete": True}]
    ds = tfds.builder_from_directory(str(tmp_path / "ds")).as_data_source("train")
    assert sorted(int(ds[i]["index"]) for i in range(len(ds))) == list(range(20))


def test_pod_equals_one_process_on_a_prepared_dataset(latents_ds, cache, tmp_path):
    data = [
        "--config.data.kind=latents",
        f"--config.data.path={latents_ds}",
        "--config.checkpoint_every=1000",
    ]
    ref = one_host(tmp_path / "one", *data)
    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "pod"), *OVERRIDES, *data]
    run_hosts(cli(*args, "--multihost"), tmp_path / "logs", cache)
    assert_params_close(
        restore(tmp_path / "pod", STEPS, ref.state), restore(tmp_path / "one", STEPS, ref.state)
    )


def test_pod_shards_a_converted_teacher_and_student_over_both_hosts(cache, tmp_path):
    """FSDP across the processes: the shipped toy teacher (a converted folder) is read straight
    into its shards on the 4 devices of 2 hosts, and the first step's loss and gradient norm
    equal the one-process run's.

    Parameters are not compared here: the student starts as a copy of a trained teacher, where
    most elements of the sCM gradient are float32 rounding noise, and Adam's first step turns
    each into a +-lr move; two meshes in one process (fsdp=4 against data=2 x fsdp=2) already
    differ that way in most elements, by at most the learning rate."""
    import ast

    from distill_jax.pipeline.toy import TEACHER_PATH

    fsdp = [
        f"--config.teacher.path={TEACHER_PATH}",
        "--config.data.latent_channels=16",  # the toy's latent (64 = 16 x 2 x 2 packed)
        "--config.mesh.data=1",
        "--config.mesh.fsdp=4",
        "--config.total_steps=1",
    ]
    ref = one_host(tmp_path / "one", *fsdp)
    kernel = ref.state["params"]["double_blocks"][0]["img_attn"]["qkv"]["kernel"].get_value()
    assert kernel.sharding.spec[0] == "fsdp"
    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "pod"), *OVERRIDES, *fsdp]
    log0, _ = run_hosts(cli(*args, "--multihost"), tmp_path / "logs", cache)
    pod = ast.literal_eval(log0.split("step 1: ", 1)[1].splitlines()[0])
    # (scm/g_norm, about 5e-7 here, is itself rounding noise: the student equals the teacher.)
    for name in ("train/loss", "train/grad_norm", "scm/tangent_norm"):
        np.testing.assert_allclose(pod[name], ref.metrics[0][name], rtol=RTOL, err_msg=name)


# --- generation --------------------------------------------------------------------------------


def test_geneval_is_split_across_hosts_and_resumes(cache, tmp_path):
    from distill_jax.pipeline.toy import TEACHER_PATH

    metadata = tmp_path / "evaluation_metadata.jsonl"
    prompts = [
        "a red circle",
        "two blue squares",
        "a green triangle",
        "a cyan square",
        "three yellow circles",
    ]
    metadata.write_text("".join(json.dumps({"prompt": p, "tag": "t"}) + "\n" for p in prompts))
    out = tmp_path / "out"
    (out / "00001" / "samples").mkdir(parents=True)  # done by an earlier, interrupted run
    (out / "00001" / "marker").write_text("kept")
    args = [
        "-v",
        "geneval",
        "--checkpoint",
        str(TEACHER_PATH),
        "--metadata",
        str(metadata),
        "--out",
        str(out),
        "--steps",
        "2",
        "--samples",
        "2",
        "--guidance",
        "none",
        "--size",
        "32",
    ]
    logs = run_hosts(cli(*args), tmp_path / "logs", cache, how="explicit")
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}" for i in range(5)]
    assert (out / "00001" / "marker").read_text() == "kept"
    for i in (0, 2, 3, 4):
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == [
            "0000.png",
            "0001.png",
        ]
    # host 0 takes prompts 0, 2, 4; host 1 takes 1 (already done) and 3.
    assert "host 0 of 2 takes 3, 0 of them already done" in logs[0]
    assert "host 1 of 2 takes 2, 1 of them already done" in logs[1]


# --- start-up errors ---------------------------------------------------------------------------


def test_a_missing_peer_is_reported_with_the_coordinator_address(tmp_path):
    port = distributed.free_port()
    args = [
        "train",
        "--config",
        CONFIG,
        "--workdir",
        str(tmp_path),
        "--coordinator-address",
        f"localhost:{port}",
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--distributed-timeout",
        "3",
    ]
    done = subprocess.run(
        cli(*args),
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert f"could not join the job through the coordinator at localhost:{port}" in done.stderr
    assert "within 3 s" in done.stderr


def test_multihost_without_a_cluster_says_how_to_name_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
    done = subprocess.run(
        cli("train", "--config", CONFIG, "--workdir", str(tmp_path), "--multihost"),
        env=env | {"JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "no cluster was detected" in done.stderr
    assert "--coordinator-address HOST:PORT --num-processes N --process-id I" in done.stderr


def test_the_runtime_must_start_before_the_backend():
    jax.devices()  # the suite's backend is up
    with pytest.raises(distributed.DistributedError, match="started before"):
        distributed.initialize(coordinator_address="localhost:1", num_processes=2, process_id=0)


def test_an_explicit_cluster_needs_all_three_settings():
    with pytest.raises(distributed.DistributedError, match="all of --coordinator-address"):
        distributed.initialize(coordinator_address="localhost:1")
