"""``vidlab``: fit an experiment (a generator, or an autoencoder with task: autoencoder), sweep an
ablation, cache latents, sample from a trained run, evaluate videos or a run, compare a sweep's arms."""

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
  vidlab sweep configs/ablation/objective.yaml --jobs 2   # 2 arms at a time, logs under outputs/sweeps/
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
    if sum(bool(x) for x in (args.from_run, args.resume, args.run_id)) > 1:
        raise ConfigError("vidlab fit: give one of --from-run (a new run), --resume (the same run, from its "
                          "checkpoint) or --run-id (an existing run, from step 0)")
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
    attached = args.resume or args.run_id  # a run that exists before this process: it records the outcome
    try:
        composed = compose(experiment, overrides)
        tags = {"vidlab.from_run": args.from_run} if args.from_run else {}
        if args.resume:
            result = run_fit(composed, run_id=args.resume, resume=True)
        else:
            result = run_fit(composed, run_id=args.run_id, tags=tags)
    except BaseException as exc:
        if attached:
            _record_end(attached, exc)
        raise
    from experiments.ranks import global_rank

    if global_rank() != 0:  # every rank returns here; rank 0's summary is the run's (the others' loss is local)
        return 0
    console.print(f"run {result.run_id}: final train/loss {result.final_loss}")
    console.print(f"checkpoint: {result.checkpoint}")
    for path in result.samples:
        console.print(f"sample: {path}")
    console.print(_ui_hint(tracking_uri(composed.cfg)))
    return 0


def _record_end(run_id: str, exc: BaseException) -> None:
    """An attached run (``--run-id``, ``--resume``) that this process fails or is stopped in: FAILED with
    the error in ``vidlab.error`` (what `vidlab sweep` reports for the arm), or KILLED on Ctrl-C.
    Rank 0 only; a failure to record must not hide the error itself."""
    from experiments.ranks import global_rank
    from experiments.tracking import client

    if global_rank() != 0:
        return
    try:
        mlflow_client = client()
        if isinstance(exc, Exception):
            mlflow_client.set_tag(run_id, "vidlab.error", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow_client.set_terminated(run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
    except Exception as problem:  # noqa: BLE001
        errors.print(f"could not record the failure in MLflow run {run_id}: {escape(str(problem))}", highlight=False)


def cmd_sweep(args: argparse.Namespace) -> int:
    from experiments.progress import clock
    from experiments.sweep import format_axis_value, load_ablation, run_sweep
    from experiments.tracking import tracking_uri

    ablation = load_ablation(args.ablation)
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"vidlab sweep: --jobs must be at least 1, got {args.jobs}")
    try:
        results = run_sweep(args.ablation, jobs=args.jobs)
    except KeyboardInterrupt:
        errors.print("sweep interrupted: the running arms are recorded KILLED; run the same command again to "
                     "continue them (finished arms are skipped)", highlight=False)
        return 130
    samples, logs = any(r.samples_dir for r in results), [Path(r.log_file) for r in results if r.log_file]
    table = Table(title=f"ablation {ablation.name}")
    columns = ["arm", "status", "final train/loss", "time", "run"] + ["samples"] * samples + ["log"] * bool(logs)
    for column in columns:
        table.add_column(column, overflow="fold")
    for r in results:
        axes = "\n".join(f"{k}={format_axis_value(v)}" for k, v in r.arm.values.items())
        row = [axes, r.status, "-" if r.final_loss is None else f"{r.final_loss:.4f}",
               clock(r.seconds) if r.seconds else "-", r.run_id[:8]]
        row += [_relative(r.samples_dir) if r.samples_dir else "-"] * samples
        row += [Path(r.log_file).name if r.log_file else "-"] * bool(logs)
        table.add_row(*row)
    console.print(table)
    for folder in sorted({str(log.parent) for log in logs}):
        console.print(f"logs: {_relative(folder)}/", soft_wrap=True)
    for r in results:
        if r.error:
            console.print(f"[red]{r.status}[/] {escape(r.arm.key)}: {escape(r.error)}", soft_wrap=True, highlight=False)
    composed = compose(ablation.experiment)
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


def cmd_compare(args: argparse.Namespace) -> int:
    from experiments.compare import run_compare

    metrics = [m.strip() for m in (args.metrics or "").split(",") if m.strip()]
    result = run_compare(args.source, out=args.out, metrics=metrics or None)
    header, rows = result.comparison.table()
    table = Table(title=f"vidlab compare: {result.comparison.title}")
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"report: {_relative(str(result.report_dir / 'report.md'))} (and report.html)", soft_wrap=True)
    logged = f"logged to run {result.logged_to} under report/" if result.logged_to else "not logged: no parent run"
    console.print(logged, soft_wrap=True)
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
    fit.add_argument("--run-id", metavar="RUN_ID", help="train into this existing MLflow run, created empty by "
                     "someone else (`vidlab sweep` creates one per arm), instead of a new run")
    fit.set_defaults(func=cmd_fit)

    sweep = sub.add_parser("sweep", help="run an ablation grid (resumes: finished arms are skipped)")
    sweep.add_argument("ablation", help="a YAML file such as configs/ablation/demo.yaml")
    sweep.add_argument("--jobs", "-j", type=int, metavar="N", help="arms at a time, each a `vidlab fit` process "
                       "with cores // N threads and its log under <output_dir>/sweeps/ (default: the file's "
                       "'jobs:', else 1, in this process); distributed arms always run alone")
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

    cmp = sub.add_parser("compare", help="per-arm statistics over seeds, winners, plots and a report for a sweep")
    cmp.add_argument("source", metavar="PARENT_RUN_ID|EXPERIMENT", help="a sweep's parent run id, an MLflow "
                     "experiment (every sweep in it) or a sweep name (its newest parent run)")
    cmp.add_argument("--out", metavar="DIR", help="report folder (default: <output_dir>/reports/<run or experiment>)")
    cmp.add_argument("--metrics", help="comma list of metric names or patterns such as 'eval/*' (default: all)")
    cmp.set_defaults(func=cmd_compare)
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
