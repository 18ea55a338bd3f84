"""``prepare`` from prompts alone: the teacher samples the latents, written as encoded images are.

Two teachers: a tiny random FLUX pipeline (``test_data``'s encoders plus a random transformer
with a guidance embedder) and the shipped toy teacher. The reference for every record is the
sampler (:func:`~distill_jax.pipeline.generate.denoise`) run on that record alone from the noise
``normal(fold_in(key(seed), index))``, and ``generate`` from the same noise draws the image that
the stored latent decodes to; the trainer's input reads the dataset back in diffusion units.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from test_data import CharTokenizer, random_model

from distill_jax import cli
from distill_jax.data import builders
from distill_jax.data import prepare as prepare_module
from distill_jax.data.prepare import FLUX_GUIDANCE, UNCOND_FILE, prepare_prompts, read_prompts
from distill_jax.folders import load_pipeline
from distill_jax.models import clip, t5
from distill_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline import toy
from distill_jax.pipeline.generate import denoise, generate
from distill_jax.pipeline.pipeline import Pipeline

# Words of the shapes world, so that both teachers read them.
PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle left of a red square",
    "three yellow circles",
    "a cyan square",
]
K = 2  # samples per prompt: 10 records
# 10 records in shards of 4 (the last holds 2), sampler batches of 3 (each shard's last padded).
PREP = dict(steps=3, samples_per_prompt=K, batch_size=3, shard_size=4, seed=5, dtype="float32")
# Per teacher: the FLUX pipeline's VAE halves twice (16 px -> 8x8 latents, 16 tokens); the toy
# samples its world's 32 px by default (4x4 latents, 4 tokens).
SIZE = {"flux": dict(resolution=16, max_sequence_length=12), "toy": {}}
RESOLUTION = {"flux": 16, "toy": 32}
TEXT_LEN = {"flux": 12, "toy": 8}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux_pipe() -> Pipeline:
    vae, t5_cfg, clip_cfg = AutoencoderConfig.tiny(), t5.tiny(), clip.tiny()
    cfg = FluxConfig.preset(
        "tiny",
        in_channels=4 * vae.latent_channels,
        context_dim=t5_cfg.d_model,
        pooled_dim=clip_cfg.hidden_size,
    )
    pipe = Pipeline(
        transformer=random_model(lambda: Flux(cfg, rngs=nnx.Rngs(0)), 3),
        vae=random_model(lambda: Autoencoder(vae, rngs=nnx.Rngs(0)), 0),
        clip=random_model(lambda: clip.CLIPTextEncoder(clip_cfg, rngs=nnx.Rngs(0)), 1),
        t5=random_model(lambda: t5.T5Encoder(t5_cfg, rngs=nnx.Rngs(0)), 2),
        clip_tokenizer=CharTokenizer(eos=98, pad=0),
        t5_tokenizer=CharTokenizer(eos=1, pad=0),
    )
    assert pipe.transformer.guidance_in is not None  # the default guidance applies
    return pipe


@pytest.fixture(scope="module")
def toy_pipe() -> toy.ToyPipeline:
    return load_pipeline(toy.TEACHER_PATH)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(f"  {p}\n" for p in PROMPTS))  # blank lines between, spaces
    return path


class Prepared:
    def __init__(self, name: str, pipe, out: Path):
        self.name, self.pipe, self.out = name, pipe, out

    @property
    def size(self) -> dict:
        return SIZE[self.name]


@pytest.fixture(scope="module", params=["flux", "toy"])
def prepared(request, prompts_file, tmp_path_factory) -> Prepared:
    name = request.param
    pipe = request.getfixturevalue(f"{name}_pipe")
    out = tmp_path_factory.mktemp(f"prepared-{name}")
    report = prepare_prompts(prompts_file, out, pipeline=pipe, **PREP, **SIZE[name])
    assert report.complete and report.num_shards == 3 and report.shards_written == 3
    assert report.examples == len(PROMPTS) * K and not report.skipped
    return Prepared(name, pipe, out)


def read_rows(path: Path) -> list[dict]:
    """The records of a dataset folder, by index."""
    ds = tfds.builder_from_directory(str(path)).as_data_source("train")
    return sorted((ds[i] for i in range(len(ds))), key=lambda r: int(r["index"]))


def text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def noise_of(pipe, index: int, resolution: int, seed: int = PREP["seed"]) -> np.ndarray:
    """Record ``index``'s initial noise ``[C, h, w]``, drawn as the module docstring says."""
    h, w = lat.latent_size(resolution, resolution, vae_scale_factor=pipe.vae_scale_factor)
    key = jax.random.fold_in(jax.random.key(seed), index)
    return np.asarray(jax.random.normal(key, (pipe.latent_channels, h, w)))


def guidance_of(pipe) -> float | None:
    return None if pipe.transformer.guidance_in is None else FLUX_GUIDANCE


def reference(p: Prepared, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record ``index`` sampled alone: (diffusion latents [C, h, w], t5 [S, D], pooled [P])."""
    res = RESOLUTION[p.name]
    noise = noise_of(p.pipe, index, res)[None]
    t5_, pooled, txt_ids = p.pipe.encode([PROMPTS[index // K]], TEXT_LEN[p.name])
    h, w = noise.shape[2:]
    packed = denoise(
        p.pipe,
        lat.pack(noise),
        t5_,
        pooled,
        txt_ids,
        lat.image_ids(h, w),
        steps=PREP["steps"],
        guidance=guidance_of(p.pipe),
    )
    return np.asarray(lat.unpack(packed, h, w))[0], np.asarray(t5_[0]), np.asarray(pooled[0])


@pytest.fixture(scope="module")
def references(prepared) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [reference(prepared, i) for i in range(len(PROMPTS) * K)]


def factors(p: Prepared) -> tuple[float, float]:
    """(scaling_factor, shift_factor): the VAE's, or 1 and 0 for the toy's autoencoder."""
    if p.name == "toy":
        return 1.0, 0.0
    return p.pipe.vae.cfg.scaling_factor, p.pipe.vae.cfg.shift_factor


def diffusion(p: Prepared, stored: np.ndarray) -> np.ndarray:
    """A stored latent ``[h, w, C]`` (unscaled) -> diffusion units ``[C, h, w]``, as the trainer
    reads it (``(z - shift) * scale``)."""
    scale, shift = factors(p)
    return ((np.asarray(stored, np.float32) - shift) * scale).transpose(2, 0, 1)


def assert_close(got, want, what: str, rtol: float = 1e-4) -> None:
    want = np.asarray(want, np.float32)
    atol = 1e-5 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(
        np.asarray(got, np.float32), want, rtol=rtol, atol=atol, err_msg=what
    )


def test_records_are_the_samplers_own(prepared, references):
    p = prepared
    meta = builders.load_info(p.out).metadata
    scale, shift = factors(p)
    assert (meta["scaling_factor"], meta["shift_factor"]) == pytest.approx((scale, shift))
    assert meta["steps"] == 3 and meta["samples_per_prompt"] == K and meta["seed"] == 5
    assert meta["guidance"] == guidance_of(p.pipe)  # 3.5 for FLUX, none for the toy
    assert meta["resolution"] == RESOLUTION[p.name]
    rows = read_rows(p.out)
    assert [int(r["index"]) for r in rows] == list(range(len(PROMPTS) * K))
    h = RESOLUTION[p.name] // p.pipe.vae_scale_factor
    d_text, d_pooled = (32, 32) if p.name == "flux" else (64, 64)
    for r, (z, t5_, pooled) in zip(rows, references, strict=True):
        i = int(r["index"])
        assert text(r["caption"]) == PROMPTS[i // K]
        assert text(r["key"]) == f"{i // K:06d}-{i % K}"
        assert r["latents"].shape == (h, h, p.pipe.latent_channels)
        assert r["t5"].shape == (TEXT_LEN[p.name], d_text) and r["pooled"].shape == (d_pooled,)
        assert {r[k].dtype for k in ("latents", "t5", "pooled")} == {np.dtype(np.float32)}
        assert_close(diffusion(p, r["latents"]), z, f"record {i} latents")
        assert_close(r["t5"], t5_, f"record {i} t5")
        assert_close(r["pooled"], pooled, f"record {i} pooled")
    # Each sample of a prompt has its own noise.
    assert np.abs(rows[0]["latents"] - rows[1]["latents"]).max() > 1e-2
    # The unconditional embeddings beside it are the teacher's of " ".
    uncond_t5, uncond_pooled, _ = p.pipe.encode([" "], TEXT_LEN[p.name])
    with np.load(p.out / UNCOND_FILE) as f:
        assert_close(f["t5"], uncond_t5[0], "uncond t5")
        assert_close(f["pooled"], uncond_pooled[0], "uncond pooled")


@pytest.mark.parametrize("index", [0, 7])
def test_stored_latents_decode_to_what_generate_draws(prepared, index):
    """The unscaling is the one the pipeline's decoder undoes: the stored latent, read back in
    diffusion units and decoded, is the image ``generate`` draws from the same noise."""
    p, res = prepared, RESOLUTION[prepared.name]
    row = read_rows(p.out)[index]
    image = generate(
        p.pipe,
        [PROMPTS[index // K]],
        height=res,
        width=res,
        steps=PREP["steps"],
        guidance=guidance_of(p.pipe),
        init_noise=noise_of(p.pipe, index, res)[None],
        max_sequence_length=TEXT_LEN[p.name],
    )
    decoded = p.pipe.decode(lat.pack(diffusion(p, row["latents"])[None]), res, res)
    diff = np.abs(decoded.astype(int) - image.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 rounding at the uint8 step
    assert image.std() > 0  # not a constant image that any latent would match


def assert_same_rows(a: Path, b: Path, rtol: float = 1e-5) -> None:
    ra, rb = read_rows(a), read_rows(b)
    assert [int(r["index"]) for r in ra] == [int(r["index"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert text(x["key"]) == text(y["key"]) and text(x["caption"]) == text(y["caption"])
        for name in ("latents", "t5", "pooled"):
            assert_close(x[name], y[name], f"record {int(x['index'])} {name}", rtol=rtol)


def test_batch_and_shard_sizes_do_not_change_the_records(prepared, prompts_file, tmp_path):
    out = tmp_path / "ds"
    sizes = dict(batch_size=4, shard_size=10)  # one shard; batches 4, 4 and 2 padded to 4
    report = prepare_prompts(
        prompts_file, out, pipeline=prepared.pipe, **PREP | sizes, **prepared.size
    )
    assert report.complete and report.num_shards == 1
    assert_same_rows(out, prepared.out)


class Interrupted(Exception):
    pass


class CountingSampler:
    """Stands in for ``denoise`` inside prepare: counts the calls, and fails from ``fail_at`` on."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise Interrupted(f"simulated interruption at sampler call {self.calls}")
        return denoise(*args, **kw)


@pytest.mark.parametrize("prepared", ["toy"], indirect=True)
def test_resume_redoes_nothing_finished(prepared, prompts_file, tmp_path, monkeypatch):
    out, kw = tmp_path / "ds", dict(pipeline=prepared.pipe, **PREP)
    # Shard 0 (records 0-3) takes calls 1 and 2; call 3 is shard 1's first.
    monkeypatch.setattr(prepare_module, "denoise", CountingSampler(fail_at=3))
    with pytest.raises(Interrupted):
        prepare_prompts(prompts_file, out, **kw)
    shard0 = out / "flux_latents-train.array_record-00000-of-00003"
    assert shard0.is_file() and not (out / "dataset_info.json").exists()
    stamp = shard0.stat().st_mtime_ns
    again = CountingSampler()
    monkeypatch.setattr(prepare_module, "denoise", again)
    report = prepare_prompts(prompts_file, out, **kw)
    assert (report.shards_found_done, report.shards_written, report.complete) == (1, 2, True)
    assert again.calls == 3  # shard 1 in two batches, shard 2 in one: nothing of shard 0
    assert shard0.stat().st_mtime_ns == stamp
    assert_same_rows(out, prepared.out)


@pytest.mark.parametrize("prepared", ["toy"], indirect=True)
def test_hosts_split_the_shards(prepared, prompts_file, tmp_path):
    out = tmp_path / "ds"
    reports = [
        prepare_prompts(
            prompts_file, out, pipeline=prepared.pipe, process_index=p, process_count=2, **PREP
        )
        for p in (0, 1)
    ]
    assert [r.shards_written for r in reports] == [2, 1]  # shards 0, 2 and shard 1
    assert [r.complete for r in reports] == [False, True]
    assert_same_rows(out, prepared.out)


@pytest.mark.parametrize("prepared", ["toy"], indirect=True)
def test_a_resume_must_repeat_the_prompts_and_settings(prepared, prompts_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(PROMPTS)))  # as many prompts, another order
    with pytest.raises(ValueError, match=r"different settings \(prompts_sha256: "):
        prepare_prompts(other, prepared.out, pipeline=prepared.pipe, **PREP)
    with pytest.raises(ValueError, match=r"different settings \(steps: 3 -> 4\)"):
        prepare_prompts(prompts_file, prepared.out, pipeline=prepared.pipe, **PREP | dict(steps=4))


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("\n  a red circle  \n\r\n\ttwo blue squares\n\n")
    assert read_prompts(txt) == ["a red circle", "two blue squares"]
    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": "a red circle", "tag": "single"}, {"text": "x"}, {"caption": "y"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]))
    assert read_prompts(jsonl) == ["a red circle", "x", "y"]


@pytest.mark.parametrize(
    "name, content, error, match",
    [
        ("missing.txt", None, FileNotFoundError, r"prompts file \S*missing.txt does not exist"),
        ("blank.txt", "\n  \n\n", ValueError, r"prompts file \S*blank.txt holds no prompts"),
        ("bad.jsonl", '{"prompt": "a red circle"}\nnot json\n', ValueError, r"bad.jsonl:2: not"),
        ("nofield.jsonl", '{"tag": "single"}\n', ValueError, r"nofield.jsonl:1: a .jsonl line"),
        ("empty.jsonl", '{"prompt": " "}\n', ValueError, r"empty.jsonl:1: the 'prompt' field"),
        (
            "unknown.txt",
            "a red circle\n\na purple circle\n",
            ValueError,
            r"unknown.txt:3: prompt 'a purple circle': unknown word\(s\) \['purple'\]",
        ),
        (
            "long.txt",
            "a red circle left of a blue square and a green triangle\n",
            ValueError,
            r"long.txt:1: prompt .* has 12 words; the toy takes 8",
        ),
    ],
)
def test_bad_prompt_files_are_refused_naming_file_and_line(
    toy_pipe, tmp_path, name, content, error, match
):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match):
        prepare_prompts(path, tmp_path / "out", pipeline=toy_pipe, **PREP)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "teacher, change, match",
    [
        ("toy", dict(guidance=3.5), r"guidance=3.5 but the transformer has no guidance embedder"),
        ("toy", dict(samples_per_prompt=0), r"samples_per_prompt=0 must be >= 1"),
        ("toy", dict(steps=0), r"steps=0 must be in \[1, 1000\]"),
        ("toy", dict(resolution=40), r"height=40 must be a positive multiple of 16"),
        ("toy", dict(dtype="int8"), r"dtype='int8'"),
        ("flux", dict(seed=-1), r"seed=-1 must be in"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(
    request, tmp_path, teacher, change, match
):
    pipe = request.getfixturevalue(f"{teacher}_pipe")
    with pytest.raises(ValueError, match=match):
        prepare_prompts(PROMPTS, tmp_path / "out", pipeline=pipe, **PREP | change)
    assert not (tmp_path / "out").exists()


def train_config(p: Prepared, batch_size: int):
    """A few steps on the prepared dataset: flow matching of a tiny FLUX shaped like the random
    teacher's transformer, or sCM from the toy teacher (its runlocal variant)."""
    from distill_jax.config import base_config, load_config

    if p.name == "toy":
        c = load_config(f"{REPO}/configs/toy_distill.py:scm,runlocal", [])
        c.teacher.path = str(toy.TEACHER_PATH)
    else:
        c = base_config()
        c.method = "flow_matching"
        fc = p.pipe.transformer.cfg
        c.model.overrides = {
            "in_channels": fc.in_channels,
            "context_dim": fc.context_dim,
            "pooled_dim": fc.pooled_dim,
        }
        c.model.dtype = "float32"
        c.async_checkpoints = False
    c.total_steps, c.log_every, c.mesh.devices = 2, 1, 1
    c.data.kind, c.data.path, c.data.batch_size = "latents", str(p.out), batch_size
    return c


def test_train_reads_the_teachers_samples(prepared, references, tmp_path):
    """The trainer's input gives back the sampler's latents in diffusion units ([B, C, h, w]),
    the embeddings and the unconditional ones; `train` takes finite steps on the dataset."""
    from distill_jax.data.training import make_input
    from distill_jax.train import train

    n = len(PROMPTS) * K
    batches, aux = make_input(train_config(prepared, n), None)
    batch = next(batches)  # one global batch: the whole (shuffled) epoch
    assert batch["latents"].shape == (n, *references[0][0].shape)
    want = np.stack([z for z, _, _ in references])  # [n, C, h, w]
    dist = np.abs(batch["latents"][:, None] - want[None]).reshape(n, n, -1).max(-1)
    order = dist.argmin(1)
    assert sorted(order) == list(range(n))  # a permutation: every record once
    for pos, j in enumerate(order):
        assert_close(batch["latents"][pos], want[j], f"record {j} through the trainer's input")
        assert_close(batch["t5"][pos], references[j][1], f"record {j} t5")
        assert_close(batch["pooled"][pos], references[j][2], f"record {j} pooled")
    uncond_t5, uncond_pooled, _ = prepared.pipe.encode([" "], TEXT_LEN[prepared.name])
    assert_close(aux["uncond_t5"], uncond_t5[0], "uncond t5")
    assert_close(aux["uncond_pooled"], uncond_pooled[0], "uncond pooled")

    run = train(train_config(prepared, 2), tmp_path)
    assert [m["step"] for m in run.metrics] == [1, 2]
    assert all(np.isfinite(m["train/loss"]) and m["train/skipped_steps"] == 0 for m in run.metrics)


# --- the command ------------------------------------------------------------------------------


def cli_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prepare",
        "--prompts",
        str(prompts),
        str(out),
        "--pipeline",
        str(toy.TEACHER_PATH),
        "--steps",
        "3",
        "--samples-per-prompt",
        str(K),
        "--seed",
        "5",
        "--dtype",
        "float32",
        "--batch-size",
        "3",
        *extra,
    ]


@pytest.mark.parametrize("prepared", ["toy"], indirect=True)
def test_cli_prepare_from_prompts(prepared, prompts_file, tmp_path):
    out = tmp_path / "ds"
    assert cli.main(cli_args(prompts_file, out, "--shard-size", "4")) == 0
    assert builders.load_info(out).metadata["source"] == f"prompts:{prompts_file.resolve()}"
    assert_same_rows(out, prepared.out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "OUT", "--pipeline", "P"], "give either an image SOURCE or --prompts FILE"),
        (
            ["prepare", "SRC", "OUT", "--pipeline", "P", "--prompts", "F"],
            "give either an image SOURCE or --prompts FILE",
        ),
        (
            ["prepare", "SRC", "OUT", "--pipeline", "P", "--steps", "4"],
            "--steps is an option of --prompts",
        ),
        (
            ["prepare", "--prompts", "nowhere.txt", "OUT", "--pipeline", "P"],
            "prompts file nowhere.txt does not exist",
        ),
    ],
)
def test_cli_refuses_bad_usage_before_loading(argv, message, capsys):
    assert cli.main(argv) == 1
    assert message in capsys.readouterr().err


def test_cli_help_names_the_prompts_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    out = capsys.readouterr().out
    flags = ["[SOURCE] OUT", "--prompts", "--steps", "--guidance", "--samples-per-prompt"]
    assert [f for f in flags + ["--shard-size"] if f not in out] == []


# --- two hosts --------------------------------------------------------------------------------


@pytest.mark.parametrize("prepared", ["toy"], indirect=True)
def test_two_hosts_split_the_shards_and_write_the_one_host_dataset(
    prepared, prompts_file, tmp_path
):
    """`distill-jax prepare --prompts` on 2 joined processes x 2 devices: 4 shards of 3 records,
    process p samples shards p and p + 2, and together they write what one process writes."""
    from test_multihost import cli as command
    from test_multihost import run_hosts

    out = tmp_path / "ds"
    args = cli_args(prompts_file, out, "--shard-size", "3")
    logs = run_hosts(command("-v", *args), tmp_path / "logs", tmp_path / "cache", how="explicit")
    for log in logs:
        assert re.search(r"num_shards=4, shards_written=2, shards_found_done=0", log), log[-2000:]
    assert_same_rows(out, prepared.out)
