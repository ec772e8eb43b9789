"""``vidlab``: fit an experiment (a generator, or an autoencoder with task: autoencoder), sweep an
ablation, cache latents, sample from a trained run, evaluate videos or a run."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from experiments.config import ConfigError, compose

console = Console()
errors = Console(stderr=True, soft_wrap=True)

EPILOG = """examples:
  vidlab fit smoke                                  # configs/experiment/smoke.yaml
  vidlab fit shapes backbone=dit_tiny optim.lr=1e-3 # swap a preset, set a key
  vidlab fit --from-run RUN_ID trainer.max_steps=50 # re-run a logged config
  vidlab fit --resume RUN_ID                        # continue a killed run from its last checkpoint
  vidlab sweep configs/ablation/demo.yaml
  vidlab fit vae_causal3d                           # train an autoencoder -> outputs/autoencoders/vae_causal3d/
  vidlab cache-latents smoke_cached                 # encode the data once; then: vidlab fit smoke_cached
  vidlab sample RUN_ID --prompt "a red circle moving left on a black background" --seed 0
  vidlab eval --videos outputs/samples/cli --metrics probe,fvd_probe   # score mp4s into a new run
  vidlab eval --run RUN_ID                          # sample + score a trained run, logged into it
"""


def _ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"open the MLflow UI: make ui   (mlflow ui --backend-store-uri {uri} --host 127.0.0.1)"
    return f"runs are in the MLflow server at {uri}"


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def cmd_fit(args: argparse.Namespace) -> int:
    from experiments.fit import run_fit
    from experiments.tracking import client, run_config, tracking_uri

    overrides = list(args.overrides)
    source = args.from_run or args.resume
    if args.from_run and args.resume:
        raise ConfigError("vidlab fit: give --from-run (a new run) or --resume (the same run), not both")
    if source:
        if args.experiment:
            overrides.insert(0, args.experiment)  # argparse took the first override as EXPERIMENT
        folder = Path(tempfile.mkdtemp(prefix="vidlab-from-run-"))
        experiment = folder / "config.yaml"
        experiment.write_text(run_config(client(), source))
    elif args.experiment:
        experiment = args.experiment
    else:
        raise ConfigError("vidlab fit: give an EXPERIMENT (name or file) or --from-run RUN_ID")
    composed = compose(experiment, overrides)
    tags = {"vidlab.from_run": args.from_run} if args.from_run else {}
    if args.resume:
        result = run_fit(composed, run_id=args.resume, resume=True)
    else:
        result = run_fit(composed, tags=tags)
    console.print(f"run {result.run_id}: final train/loss {result.final_loss}")
    console.print(f"checkpoint: {result.checkpoint}")
    for path in result.samples:
        console.print(f"sample: {path}")
    console.print(_ui_hint(tracking_uri(composed.cfg)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.sweep import format_axis_value, load_ablation, run_sweep
    from experiments.tracking import tracking_uri

    results = run_sweep(args.ablation)
    table = Table(title=f"ablation {load_ablation(args.ablation).name}")
    for column in ("arm", "status", "final train/loss", "samples", "run"):
        table.add_column(column, overflow="fold")
    for r in results:
        loss = "-" if r.final_loss is None else f"{r.final_loss:.4f}"
        samples = _relative(r.samples_dir) if r.samples_dir else (r.error or "-")
        axes = "\n".join(f"{k}={format_axis_value(v)}" for k, v in r.arm.values.items())
        table.add_row(axes, r.status, loss, samples, r.run_id[:8])
    console.print(table)
    composed = compose(load_ablation(args.ablation).experiment)
    console.print(_ui_hint(tracking_uri(composed.cfg)))
    return 1 if any(r.status == "FAILED" for r in results) else 0


def cmd_cache(args: argparse.Namespace) -> int:
    from experiments.cache import run_cache

    composed = compose(args.experiment, list(args.overrides))
    result = run_cache(composed, batch_size=args.batch_size, shard_size=args.shard_size, device=args.device)
    state = "written" if result.built else "complete already, nothing to do"
    console.print(f"latent cache of {result.count} clips ({state}): {result.folder}")
    console.print(f"fingerprint: {result.fingerprint}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from experiments.sample import sample

    paths = sample(args.source, args.prompt, args.seed or [0], Path(args.out), args.frames, args.height,
                   args.width, args.cfg_scale)
    for path in paths:
        console.print(f"wrote {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from experiments.evaluate import evaluate_folder, evaluate_run
    from experiments.tracking import tracking_uri

    if bool(args.videos) == bool(args.run):
        raise ConfigError("vidlab eval: give exactly one of --videos DIR or --run RUN_ID")
    metrics = [m for m in (args.metrics or "").split(",") if m.strip()]
    dimensions = [d for d in args.vbench_dimensions.split(",") if d.strip()]
    try:
        if args.videos:
            result = evaluate_folder(args.videos, metrics or ["probe", "fvd_probe"], args.reference, args.protocol,
                                     args.detector_path, dimensions, args.num_reference, args.probe_steps)
        else:
            result = evaluate_run(args.run, metrics or None, args.num_videos)
    except ValueError as exc:  # unknown metric, protocol or detector: a usage error
        raise ConfigError(str(exc)) from exc
    table = Table(title=f"vidlab eval -> run {result.run_id}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(result.scores.items()):
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    for path, why in result.skipped.items():
        console.print(f"skipped {path}: {why}", soft_wrap=True)
    console.print(_ui_hint(tracking_uri()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidlab", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train one experiment into a new MLflow run")
    fit.add_argument("experiment", nargs="?", help="name under configs/experiment/ or a YAML file")
    fit.add_argument("overrides", nargs="*", help="group=preset or a.b=value")
    fit.add_argument("--from-run", metavar="RUN_ID", help="re-run the config.yaml logged by that run")
    fit.add_argument("--resume", metavar="RUN_ID", help="continue that run from its last checkpoint, into the same "
                     "MLflow run (overrides such as trainer.max_steps=... apply)")
    fit.set_defaults(func=cmd_fit)

    sweep = sub.add_parser("sweep", help="run an ablation grid (resumes: finished arms are skipped)")
    sweep.add_argument("ablation", help="a YAML file such as configs/ablation/demo.yaml")
    sweep.set_defaults(func=cmd_sweep)

    cache = sub.add_parser("cache-latents", help="encode an experiment's data once (latents + text) for data=latent_cache")
    cache.add_argument("experiment", help="name under configs/experiment/ or a YAML file")
    cache.add_argument("overrides", nargs="*", help="group=preset or a.b=value (the same as for fit)")
    cache.add_argument("--batch-size", type=int, help="clips per encoder call (default: the data's batch_size)")
    cache.add_argument("--shard-size", type=int, default=256, help="clips per shard file (default: %(default)s)")
    cache.add_argument("--device", help="default: cuda when available, else cpu")
    cache.set_defaults(func=cmd_cache)

    smp = sub.add_parser("sample", help="write mp4 files from a trained run or checkpoint")
    smp.add_argument("source", metavar="RUN_ID|CHECKPOINT")
    smp.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    smp.add_argument("--seed", action="append", type=int, help="repeat for several seeds (default 0)")
    smp.add_argument("--out", default="outputs/samples/cli", help="output folder (default: %(default)s)")
    smp.add_argument("--frames", type=int, help="default: the run's sample callback setting")
    smp.add_argument("--height", type=int)
    smp.add_argument("--width", type=int)
    smp.add_argument("--cfg-scale", type=float, help="default: the run's guidance.cfg_scale")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="score a folder of mp4s or a trained run (probe, fvd_probe, fvd, vbench) into MLflow")
    ev.add_argument("--videos", metavar="DIR", help="mp4 files named <prompt>-<seed>.mp4; results go to a new run")
    ev.add_argument("--run", metavar="RUN_ID", help="sample the run's evaluation videos; results go to that run")
    ev.add_argument("--reference", metavar="DIR", help="real mp4s for fvd / fvd_probe (default for the Shapes "
                    "metrics: held-out Shapes clips rendered at the videos' size)")
    ev.add_argument("--metrics", help="comma list of probe,fvd_probe,fvd,vbench (default: probe,fvd_probe; "
                    "with --run: the run's callbacks.evaluation.metrics)")
    ev.add_argument("--protocol", default="fvd2048_16f", help="FVD protocol preset (default: %(default)s)")
    ev.add_argument("--detector-path", help="I3D weight file (default: $VIDLAB_WEIGHTS_DIR or ~/.cache/vidlab)")
    ev.add_argument("--vbench-dimensions", default="temporal_flickering", help="comma list (default: %(default)s)")
    ev.add_argument("--num-reference", type=int, default=256, help="built-in Shapes reference clips (default: %(default)s)")
    ev.add_argument("--probe-steps", type=int, default=1000, help="Shapes probe training steps, cached (default: %(default)s)")
    ev.add_argument("--num-videos", type=int, help="with --run: videos to sample (default: the run's setting)")
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("vidlab").addHandler(handler)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # '[overrides]' is not markup
        return 2
    except RuntimeError as exc:
        from modules.system import NonFiniteLossError  # torch is imported only by commands that need it

        if not isinstance(exc, NonFiniteLossError):
            raise
        errors.print(f"[bold red]stopped:[/] {escape(str(exc))}", highlight=False)  # optim.nonfinite=stop
        return 1


if __name__ == "__main__":
    sys.exit(main())
