"""The ``distill-jax`` command: one verb per library function.

    distill-jax convert SRC|org/name[@rev][/path] DST [--format auto|diffusers|bfl|t2i-distill] ...
    distill-jax export SRC DST --format diffusers|t2i-distill
    distill-jax sample CKPT --prompt "a red cube" [--prompt ...] --out DIR [--method scm ...]
    distill-jax train --config configs/scm.py[:runlocal] --workdir DIR [--config.x=y] [--dry-run]
    distill-jax prepare SOURCE OUT --pipeline CKPT [--resolution 512]
    distill-jax prepare --prompts FILE OUT --pipeline CKPT [--steps N] [--samples-per-prompt K]
    distill-jax demo [--workdir DIR]
    distill-jax geneval --checkpoint DIR --metadata evaluation_metadata.jsonl --out DIR

``train``, ``sample``, ``geneval`` and ``prepare`` also run on many hosts (``--multihost``, or an
explicit ``--coordinator-address/--num-processes/--process-id``): the distributed runtime starts
before anything touches a device (:mod:`distill_jax.distributed`).

Each verb registers its flags, and its ``run`` logs the process, the devices and the arguments and
calls one library function; everything a verb does is that function in a notebook. Adding a verb is
a local change: write ``_add_<verb>(subparsers)`` and list it in :data:`VERBS` (``convert`` and
``export`` live in :mod:`distill_jax.cli_convert`). jax and the models are imported inside the
verbs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from distill_jax.cli_convert import add_convert, add_export

log = logging.getLogger("distill_jax.cli")


def _guidance(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_distributed(p: argparse.ArgumentParser) -> None:
    """The flags that join a verb's processes into one multi-host job (see
    :mod:`distill_jax.distributed`); ``python -m distill_jax.distributed`` runs a local one."""
    import os

    def env_int(name: str) -> int | None:
        return int(os.environ[name]) if os.environ.get(name) else None

    g = p.add_argument_group(
        "multi-host",
        "Run the same command on every host. --multihost joins a cluster JAX detects (Cloud "
        "TPU, GKE, SLURM, Open MPI); elsewhere give all three of --coordinator-address, "
        "--num-processes and --process-id (defaults: $DISTILL_JAX_COORDINATOR, "
        "$DISTILL_JAX_NUM_PROCESSES, $DISTILL_JAX_PROCESS_ID).",
    )
    g.add_argument("--multihost", action="store_true", help="join the auto-detected cluster")
    g.add_argument(
        "--coordinator-address",
        default=os.environ.get("DISTILL_JAX_COORDINATOR"),
        metavar="HOST:PORT",
        help="process 0's address, reachable from every host",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=env_int("DISTILL_JAX_NUM_PROCESSES"),
        metavar="N",
        help="processes in the job",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=env_int("DISTILL_JAX_PROCESS_ID"),
        metavar="I",
        help="this process, 0 to N-1",
    )
    g.add_argument(
        "--distributed-timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="how long a process waits for its peers before failing (default: 300)",
    )


def _join_hosts(args: argparse.Namespace) -> None:
    """Starts the distributed runtime, before anything touches a device, when the verb's flags
    (or, for train, ``config.multihost``) ask for several hosts."""
    import os

    from distill_jax import distributed

    if not hasattr(args, "multihost"):  # a verb that runs on one host
        return
    config = getattr(args, "config_dict", None)
    wanted = args.multihost or args.coordinator_address or (config is not None and config.multihost)
    if not wanted:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            log.warning(
                "SLURM runs %s tasks but --multihost is not set: each process runs alone",
                os.environ["SLURM_NTASKS"],
            )
        return
    distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        timeout_s=args.distributed_timeout,
    )


def _log_context(args: argparse.Namespace) -> None:
    import jax

    kinds = sorted({d.device_kind for d in jax.devices()})
    log.info(
        "distill-jax %s: process %d of %d, %d device(s) (%d local): %s",
        args.verb,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
        ", ".join(kinds),
    )
    hidden = ("run", "verb", "config_dict")
    log.info("arguments: %s", {k: v for k, v in vars(args).items() if k not in hidden})


# --- sample -----------------------------------------------------------------------------------


def _add_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="prompts -> PNG images from a converted pipeline",
        description="Generates one image per prompt with a converted pipeline (distill-jax "
        "convert of a diffusers FLUX pipeline, possibly with a distilled transformer) and writes "
        "00000.png, 00001.png, ... (prompt in the PNG text) and grid.png to --out. On several "
        "hosts each generates and writes its share of the prompts.",
    )
    p.add_argument(
        "ckpt", metavar="CKPT", help="a converted distill-jax pipeline folder, or a toy one"
    )
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        dest="prompts",
        help="a prompt; repeat the flag for several images",
    )
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument(
        "--method",
        choices=("teacher", "scm", "meanflow"),
        default="teacher",
        help="sampler: FLUX's Euler ODE, sCM multistep or MeanFlow (default: teacher)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=28,
        help="model evaluations (default: 28; distilled students use 1-4)",
    )
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=3.5,
        help="embedded guidance, or 'none' for models without it (default: 3.5)",
    )
    p.add_argument(
        "--height", type=int, default=512, help="pixels, a multiple of 16 (default: 512)"
    )
    p.add_argument("--width", type=int, default=512, help="pixels, a multiple of 16 (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (default: 0)")
    p.add_argument(
        "--init-noise",
        default=None,
        metavar="PATH.npy",
        help="[N, C, h, w] float32 noise instead of the seed's (e.g. from diffusers)",
    )
    p.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (default: 256)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="parameter dtype to load (default: as stored)",
    )
    _add_distributed(p)
    p.set_defaults(run=_run_sample)


def _load_noise(path: str):
    """``--init-noise``: one ``.npy`` array, memory-mapped so that its shape is checked before
    it is read."""
    import numpy as np

    try:
        noise = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"--init-noise {path}: not a readable .npy array ({err})") from None
    if not isinstance(noise, np.ndarray):  # an .npz archive
        noise.close()
        raise ValueError(f"--init-noise {path}: an .npz archive; save the one array with np.save")
    return noise


def _run_sample(args: argparse.Namespace) -> None:
    from distill_jax.folders import load_pipeline
    from distill_jax.pipeline.generate import check_request, generate_to_folder

    check_request(  # before minutes of loading
        args.prompts,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        max_sequence_length=args.max_sequence_length,
    )
    noise = None if args.init_noise is None else _load_noise(args.init_noise)
    pipeline = load_pipeline(args.ckpt, dtype=args.dtype)
    paths = generate_to_folder(
        pipeline,
        args.prompts,
        args.out,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        init_noise=noise,
        method=args.method,
        max_sequence_length=args.max_sequence_length,
    )
    log.info("wrote %d file(s) to %s", len(paths), args.out)


# --- train ------------------------------------------------------------------------------------


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or distil with a config (flow matching, rescale, sCM, MeanFlow)",
        description="Runs distill_jax.train.train(config, workdir), resuming from the newest "
        "checkpoint in --workdir; a finished run writes its student to WORKDIR/student. Override "
        "any config field with --config.FIELD=VALUE (e.g. --config.optim.lr=1e-6); an unknown "
        "field is an error. SIGTERM or Ctrl-C saves a checkpoint and exits with 128 + the signal "
        "(143, 130); run the same command to resume.",
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="PATH.py[:ARG]",
        help="a configs/*.py file and its argument, e.g. configs/scm.py:runlocal",
    )
    p.add_argument("--workdir", help="checkpoints and TensorBoard events (required to train)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print per-device memory of the configured run from abstract shapes "
        "(parameters, optimizer, EMA, teacher, backward-pass residuals); nothing is allocated",
    )
    p.add_argument(
        "--compile",
        choices=("none", "full", "extrapolate"),
        default="none",
        help="with --dry-run: also compile the step and report XLA's temporary bytes ('full'), "
        "or compile at depths 1+1, 2+1, 1+2 and extrapolate ('extrapolate'; with scanned blocks, "
        "config.model.scan_layers, the full-depth step is compiled instead); on CPU stand-ins "
        "these ignore rematerialization (default: none; residuals need no compile)",
    )
    p.add_argument(
        "--fake-devices",
        type=int,
        default=0,
        metavar="N",
        help="with --dry-run: N CPU devices stand in for missing accelerators",
    )
    _add_distributed(p)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json

    config = args.config_dict
    if args.dry_run:
        from distill_jax.memory import plan_memory

        plan = plan_memory(config, compile=args.compile)
        for key, value in plan.items():
            log.info("%-20s %s", key, f"{value:.2f}" if isinstance(value, float) else value)
        print(json.dumps(plan))
        return
    if not args.workdir:
        raise ValueError("train needs --workdir (or --dry-run)")
    from distill_jax.train import train

    run = train(config, args.workdir)
    if run.metrics:
        log.info("step %d: %s", run.metrics[-1]["step"], run.metrics[-1])
    if run.stopped_early:  # not finished: a scheduler must not see success
        import signal

        name = signal.Signals(run.stop_signal).name
        log.warning(
            "stopped by %s after saving step %d; the same command resumes it",
            name,
            int(run.state["step"]),
        )
        return 128 + run.stop_signal
    return 0


# --- prepare ----------------------------------------------------------------------------------


def _add_prepare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="images + captions, or prompts alone, -> latents + text embeddings (a training "
        "dataset)",
        description="Encodes an image-caption source (a folder with metadata.jsonl or side-car "
        ".txt captions, parquet shards, or a built image dataset) with a converted pipeline's "
        "VAE and text encoders into a TFDS array_record dataset for `train`. Without images, "
        "--prompts FILE instead has the pipeline's transformer (the teacher) sample a clean "
        "latent for each prompt with its own sampler at its full step count, written in the "
        "same format (a toy pipeline folder works too). Resumable (finished shards are kept) "
        "and split across hosts.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="image-caption folder, parquet file(s) dir (or give --prompts instead)",
    )
    p.add_argument("out", metavar="OUT", help="dataset folder to write")
    p.add_argument(
        "--pipeline",
        required=True,
        metavar="CKPT",
        help="a converted pipeline folder (its vae, text encoders, tokenizers; with --prompts "
        "also its transformer), or with --prompts a toy one",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="no images: one prompt a line (or .jsonl with a prompt/text/caption field); the "
        "teacher samples the latents",
    )
    p.add_argument(
        "--resolution", type=int, default=None, help="pixels (default: 512; a toy teacher's 32)"
    )
    p.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="records per encoder or sampler call")
    p.add_argument(
        "--shard-size",
        type=int,
        default=256,
        help="records per output shard, the unit of resumption and of host assignment "
        "(default: 256)",
    )
    g = p.add_argument_group("prompts only (--prompts)")
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="the teacher's Euler steps (default: its full count, 28; a toy teacher's 16)",
    )
    g.add_argument(
        "--guidance",
        type=_guidance,
        default=None,
        help="embedded guidance (default: 3.5 for a teacher that embeds guidance, none for one "
        "that does not: FLUX.1-schnell, the toy)",
    )
    g.add_argument(
        "--samples-per-prompt",
        type=int,
        default=None,
        metavar="K",
        help="records per prompt, each from its own noise (default: 1)",
    )
    p.add_argument("--image-column", default="image", help="parquet/JSONL image field")
    p.add_argument(
        "--caption-column",
        default="caption",
        help="parquet/JSONL caption field (midjourney-v6-llava: llava)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="posterior-sample (or noise) seed (default: 0)"
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="stored dtype (default: bfloat16)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="skip larger images, unread (default: 40000000)",
    )
    p.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=10.0,
        help="skip images whose long side exceeds this times the short one (default: 10)",
    )
    _add_distributed(p)
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from distill_jax.data.prepare import prepare, prepare_prompts, read_prompts
    from distill_jax.data.sources import check_image_limits
    from distill_jax.folders import load_pipeline
    from distill_jax.pipeline.generate import check_request

    # Every check before minutes of loading the pipeline.
    if (args.source is None) == (args.prompts is None):
        raise ValueError("give either an image SOURCE or --prompts FILE (exactly one)")
    sampling = dict(
        steps=args.steps, guidance=args.guidance, samples_per_prompt=args.samples_per_prompt
    )
    if args.source is not None:
        given = [k for k, v in sampling.items() if v is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(
                f"{flag} is an option of --prompts (the teacher samples), not of SOURCE"
            )
        check_image_limits(args.max_pixels, args.max_aspect_ratio)
    else:
        read_prompts(args.prompts)
    check_request(
        [],
        height=args.resolution or 512,
        width=args.resolution or 512,
        seed=args.seed,
        max_sequence_length=args.max_sequence_length,
        **({} if args.steps is None else {"steps": args.steps}),
    )
    common = dict(
        pipeline=load_pipeline(args.pipeline),
        max_sequence_length=args.max_sequence_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        seed=args.seed,
        dtype=args.dtype,
    )
    if args.prompts is not None:
        sampling["samples_per_prompt"] = args.samples_per_prompt or 1
        report = prepare_prompts(
            args.prompts, args.out, resolution=args.resolution, **sampling, **common
        )
    else:
        report = prepare(
            args.source,
            args.out,
            resolution=args.resolution or 512,
            image_column=args.image_column,
            caption_column=args.caption_column,
            max_pixels=args.max_pixels,
            max_aspect_ratio=args.max_aspect_ratio,
            **common,
        )
    log.info("prepare: %s", report)


# --- demo -------------------------------------------------------------------------------------


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the embedded default: distil the toy shapes teacher with sCM and MeanFlow, score it",
        description="Distils the shipped toy teacher (a tiny FLUX that draws coloured shapes) with "
        "sCM and MeanFlow through the real training loop, evaluates the teacher at 1, 2, 4 and its "
        "full steps and each student at 1, 2 and 4 steps on held-out prompts, and writes "
        "report.json, report.md and samples.png to --workdir.",
    )
    p.add_argument(
        "--workdir", default="workdir/demo", help="output folder (default: workdir/demo)"
    )
    p.add_argument("--quick", action="store_true", help="a shortened run (smoke test)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument(
        "--teacher",
        default=None,
        help="a toy pipeline folder, e.g. WORKDIR/student of configs/toy_teacher.py "
        "(default: the shipped teacher)",
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from distill_jax.demo import run_demo

    teacher = {} if args.teacher is None else {"teacher": args.teacher}
    run_demo(args.workdir, quick=args.quick, seed=args.seed, **teacher)


# --- geneval ----------------------------------------------------------------------------------


def _add_geneval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "geneval",
        help="GenEval's generation step: 4 images per prompt in GenEval's folder layout",
        description="Writes OUT/<i:05d>/metadata.jsonl and OUT/<i:05d>/samples/<j:04d>.png for "
        "every line of GenEval's evaluation_metadata.jsonl; resumable (finished prompts are kept). "
        "Score the folder with the official GenEval code (see README).",
    )
    p.add_argument("--checkpoint", required=True, help="a converted pipeline folder, or a toy one")
    p.add_argument("--metadata", required=True, help="GenEval's evaluation_metadata.jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=("teacher", "scm", "meanflow"), default="teacher")
    p.add_argument("--steps", type=int, default=28, help="model evaluations (default: 28)")
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=3.5,
        help="embedded guidance, or 'none' (default: 3.5)",
    )
    p.add_argument("--size", type=int, default=512, help="pixels (default: 512)")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--seed", type=int, default=42, help="seed (default: 42, as the paper)")
    _add_distributed(p)
    p.set_defaults(run=_run_geneval)


def _run_geneval(args: argparse.Namespace) -> None:
    from distill_jax.evaluate import generate_geneval

    generate_geneval(
        args.checkpoint,
        args.metadata,
        args.out,
        method=args.method,
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        samples=args.samples,
        seed=args.seed,
    )


VERBS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_convert,
    add_export,
    _add_sample,
    _add_train,
    _add_prepare,
    _add_demo,
    _add_geneval,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-jax",
        description="FLUX.1 in JAX and its few-step distillation (sCM, MeanFlow).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one verb; returns the exit status: 0 when it finished, 1 with a one-line message
    when it failed (the traceback only with ``--verbose``), 130 on Ctrl-C, and ``128 + signal``
    when a preemption notice or Ctrl-C stopped training after a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # ml_collections-style overrides (--config.optim.lr=1e-6) belong to the train verb's config.
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.config_overrides = overrides
    if overrides and args.verb != "train":
        print(f"distill-jax {args.verb}: error: {overrides[0]} is a train option", file=sys.stderr)
        return 2
    if getattr(args, "fake_devices", 0):  # before JAX starts
        import os

        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.fake_devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    from distill_jax import console, distributed

    distributed.configure_logging(args.verbose)
    with console.quiet_libraries(args.verbose) as quiet:
        try:
            if args.verb == "train":
                from distill_jax.config import load_config

                args.config_dict = load_config(args.config, args.config_overrides)
            _join_hosts(args)  # before the first device is touched
            distributed.configure_logging(args.verbose)  # now the level follows the process
            _log_context(args)
            status = args.run(args) or 0
        except KeyboardInterrupt:
            print(f"distill-jax {args.verb}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 (every failure ends in one line and status 1)
            if args.verbose:
                log.exception("distill-jax %s failed", args.verb)
            line = console.error_line(err)
            if quiet and quiet.held:
                line += f" ({len(quiet.held)} library error(s) held back; --verbose shows them)"
            print(f"distill-jax {args.verb}: error: {line}", file=sys.stderr)
            return 1
        if quiet:
            quiet.release()
        return status


if __name__ == "__main__":
    sys.exit(main())
