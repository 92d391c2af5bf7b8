"""The `hpcaux` command: train, eval, analyze, bench (and bench report), data, launch.

A UserError anywhere becomes one line `hpcaux: error: ...` on stderr (from rank 0 only
when launched with several ranks) and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from hpcaux.comm import launch
from hpcaux.errors import UserError, storage_problem
from hpcaux.train.run.rundir import check_run_dir, create_run


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one `hpcaux: error:` line (exit 2)
    like every other bad input, not a usage block; --help still prints the usage."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpcaux", description="Layer-parallel ResNet training with auxiliary-variable networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (serial, or layer-parallel under mpirun/srun/horovodrun)",
                           description="Train a model. Layer-parallel runs need parallel.K x parallel.D ranks.")
    train.add_argument("--config", help="YAML file under configs/ (not with --resume)")
    train.add_argument("--out", help="run directory (created; an existing run is refused)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint (its config, plus overrides)")
    train.add_argument("--max-epochs", type=int, metavar="N",
                       help="stop after N epochs of this invocation, checkpointed (continue with --resume)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.05")

    ev = sub.add_parser("eval", help="re-evaluate a finished run from its latest checkpoint",
                        description="Accuracy of the composed network of a run, in one process (no MPI needed).")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--subset", type=int, default=0, help="stratified test subset (0 = full test set)")
    ev.add_argument("--data-root", help="data root, if it moved since training")

    an = sub.add_parser("analyze", help="summarise a run's aux.h5 offline: table and PNG plots",
                        description="Read RUN/aux.h5 (no MPI needed): print a per-epoch table (gap, multiplier "
                                    "norm, z statistics, snapshot drift per boundary) and write PNG plots.")
    an.add_argument("store", help="path to RUN/aux.h5")
    an.add_argument("--out", help="folder for the plots (default: RUN/analysis)")

    _add_bench_parser(sub)

    data = sub.add_parser("data", help="prepare a data set in the standard layout",
                          description="Lay out CIFAR in the standard python-pickle format from the original release "
                                      "tarball or from a JPEG-folder archive (train/<class>/, test/<class>/); or "
                                      "unpack, check and count an ImageNet-format folder tree (imagenet, imagenette: "
                                      "train/<class>/, val/<class>/), used with data.dataset=imagenet data.root=DEST.")
    data.add_argument("dataset", choices=["cifar10", "cifar100", "imagenet", "imagenette"])
    data.add_argument("dest", help="destination root (gets cifar-10-batches-py/, cifar-100-python/, or train/ and val/)")
    data.add_argument("--from", dest="archive", required=True, help="archive to read")

    guard = sub.add_parser("launch", help="run mpirun/srun so that TERM or Ctrl-C saves and stops the job (exit 0)",
                           description="Run LAUNCHER ARGS... (e.g. mpirun -np 2 hpcaux train ...) and turn every "
                                       "SIGTERM, SIGINT, SIGHUP or SIGUSR1 it gets into SIGUSR1 for the launcher, "
                                       "which forwards it to the ranks: they finish the step, save and exit 0 "
                                       "(mpirun alone kills them one second after a TERM). Exit status: the "
                                       "launcher's.")
    guard.add_argument("launcher", nargs=argparse.REMAINDER, metavar="LAUNCHER ARGS", help="the launcher command")
    return parser


def _add_bench_parser(sub):
    """`hpcaux bench`: the longest option list, kept apart so _parser stays readable."""
    bench = sub.add_parser("bench", help="run the compared methods side by side; speedup, accuracy, cost model",
                           description="Run serial, data-parallel, pipeline and layer-parallel training one after "
                                       "another on the same data (a bench file under configs/), then write "
                                       "BENCH/results.json, results.md and plots (docs/benchmarks.md). "
                                       "`hpcaux bench report` rewrites the docs' tables from the results files.")
    bench.add_argument("--config", help="bench file, e.g. configs/bench_cifar10_resnet20.yaml (not with --model)")
    bench.add_argument("--out", required=True, help="bench directory")
    bench.add_argument("--quick", action="store_true", help="the bench file's quick overrides (minutes, not hours)")
    bench.add_argument("--reuse", action="store_true", help="keep methods that already finished in --out")
    bench.add_argument("--overwrite", action="store_true", help="run every method again")
    bench.add_argument("--K", type=int, metavar="N", help="run the methods with N stages (ranks) instead of the file's K")
    bench.add_argument("--max-epochs", type=int, metavar="N",
                       help="train each layer-parallel method at most N epochs in this invocation (checkpointed); "
                            "--reuse continues an unfinished one. Other methods run whole")
    bench.add_argument("--model", action="store_true",
                       help="only the cost model's GPU projection, the same for every bench: the speedup of each "
                            "method at larger K and models (BENCH/projection.json, BENCH/cost_model.md)")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")


def _train(args) -> int:
    from hpcaux.train.run.stop_request import StopRequest

    stop = StopRequest()  # before the heavy imports: a signal during set-up is held until the first step
    from hpcaux.config import load_config
    from hpcaux.train.run.runtime import select_device, set_threads

    if args.resume:
        if args.config or args.out:
            raise UserError("--resume RUN takes the run's own config and directory; drop --config/--out")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"run directory {run_dir} holds no run to resume (config.yaml is missing)")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        if not args.config or not args.out:
            raise UserError("train needs --config FILE and --out RUN (or --resume RUN)")
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out)
    if args.max_epochs is not None and args.max_epochs < 1:
        raise UserError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    device = select_device(launch.local_rank(), cfg.train.device)
    set_threads(cfg.train.threads)
    if cfg.method == "serial":
        stop.release()  # serial runs are not resumable: a signal ends them as usual
        if launch.world_size() > 1:
            raise UserError(f"method serial runs in one process, but {launch.world_size()} ranks were launched")
        if args.resume or args.max_epochs:
            raise UserError("--resume and --max-epochs are for layer-parallel runs")
        check_run_dir(run_dir, args.overwrite)
        from hpcaux.train.run.runtime import seed_everything
        from hpcaux.train.serial import train_serial
        seed_everything(cfg.seed)
        summary = train_serial(cfg, run_dir, device, lambda: create_run(run_dir, cfg.to_yaml(), args.overwrite))
    else:
        if cfg.method != "layer_parallel" and (args.resume or args.max_epochs):
            raise UserError("--resume and --max-epochs are for layer-parallel runs")
        try:
            summary = _train_distributed(cfg, run_dir, device, args, stop)
        finally:
            stop.settle()
    if "stopped_after_epoch" in summary or "stopped_by_signal" in summary:
        if launch.world_rank() == 0:
            print(json.dumps({**summary, "resume_with": f"hpcaux train --resume {run_dir}"}))
        return 0
    if launch.world_rank() == 0:
        print(json.dumps({k: summary[k] for k in ("method", "model", "K", "D", "epochs", "test_acc",
                                                  "train_samples_per_s", "wall_s")}))
    return 0


def _train_distributed(cfg, run_dir: Path, device, args, stop) -> dict:
    """Layer-parallel training, or one of the bench's distributed baselines."""
    from hpcaux.comm import create_comm
    from hpcaux.train.baselines import DataParallelTrainer, PipelineTrainer
    from hpcaux.train.layer_parallel import LayerParallelTrainer
    sends = cfg.method == "pipeline" or (cfg.method == "layer_parallel" and cfg.lp.exchanges)
    comm = create_comm(cfg.comm.backend, cfg.comm.timeout_s, device, sends_every_step=sends)
    # Rank 0 alone inspects the run directory; every rank learns the verdict, so all exit alike.
    problem = None
    if comm.rank == 0:
        try:
            check_run_dir(run_dir, args.overwrite, resume=bool(args.resume))
        except UserError as err:
            problem = str(err)
    problem = comm.broadcast_object(problem, root=0)
    if problem:
        raise UserError(problem)
    def create():
        create_run(run_dir, cfg.to_yaml(), args.overwrite, resume=bool(args.resume))

    try:
        if cfg.method == "layer_parallel":
            trainer = LayerParallelTrainer(cfg, run_dir, comm, device, resume=bool(args.resume), stop=stop,
                                           create_run=create)
            return trainer.run(args.max_epochs)
        baseline = {"data_parallel": DataParallelTrainer, "pipeline": PipelineTrainer}[cfg.method]
        return baseline(cfg, run_dir, comm, device, create).run()
    finally:
        comm.finalize()


def _eval(args) -> int:
    from hpcaux.train.reevaluate import evaluate_run

    result = evaluate_run(Path(args.run), subset=args.subset, data_root=args.data_root)
    print(json.dumps(result))
    return 0


def _analyze(args) -> int:
    from hpcaux.analysis.report import analyze

    table, plots = analyze(Path(args.store), Path(args.out) if args.out else None)
    print(table)
    for plot in plots:
        print(f"wrote {plot}")
    return 0


def _bench(args) -> int:
    from hpcaux.bench.main import bench

    print(bench(args.config, Path(args.out), quick=args.quick, reuse=args.reuse, overwrite=args.overwrite,
                model_only=args.model, overrides=args.overrides, K=args.K, max_epochs=args.max_epochs))
    return 0


def _bench_report(argv: list[str]) -> int:
    """`hpcaux bench report`: its own parser, so `hpcaux bench --config ...` stays as it is."""
    from hpcaux.bench.doc_tables import refresh

    parser = _Parser(prog="hpcaux bench report",
                     description="Rewrite the result tables of README.md and docs/*.md from the committed "
                                 "docs/bench/*/results.json files, as docs/tables.yaml lays them out.")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; fail if a table differs from its files")
    parser.add_argument("--root", default=".", help="the repository (default: the current directory)")
    args = parser.parse_args(argv)
    stale = refresh(Path(args.root), check=args.check)
    if args.check and stale:
        raise UserError(f"tables differ from their results files: {', '.join(stale)} (run hpcaux bench report)")
    print(f"rewrote {', '.join(stale)}" if stale and not args.check else "every table matches its results files")
    return 0


def _data(args) -> int:
    if args.dataset in ("imagenet", "imagenette"):
        from hpcaux.data.folders import prepare_image_folders

        folder, counts = prepare_image_folders(args.dest, args.archive)
        print(f"{args.dataset} ready in {folder}: {counts.describe()}")
        return 0
    from hpcaux.data.prepare import prepare

    folder = prepare(args.dataset, args.dest, args.archive)
    print(f"{args.dataset} ready in {folder}")
    return 0


def _launch(args) -> int:
    from hpcaux.launch_guard import run_guarded

    return run_guarded(args.launcher)


def _abort_job(code: int):
    if launch.launched_by_mpi():
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(code)
    os._exit(code)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:2] == ["bench", "report"]:
            return _bench_report(argv[2:])
        args = _parser().parse_args(argv)
        return {"train": _train, "eval": _eval, "analyze": _analyze, "bench": _bench, "data": _data,
                "launch": _launch}[args.command](args)
    except UserError as err:
        if launch.world_rank() == 0:
            print(f"hpcaux: error: {err}", file=sys.stderr, flush=True)
        return err.exit_status
    except (OSError, ValueError) as err:
        problem = storage_problem(err)
        if problem is None:
            return _unexpected()
        # Only this rank may have hit it (rank 0 writes most files): it speaks, then ends the job.
        ranks = f" (rank {launch.world_rank()})" if launch.world_size() > 1 else ""
        print(f"hpcaux: error: {problem}{ranks}", file=sys.stderr, flush=True)
        if launch.world_size() > 1:
            _abort_job(UserError.exit_status)
        return UserError.exit_status
    except Exception:
        return _unexpected()


def _unexpected() -> int:
    """A bug (called while handling it): keep the traceback. On one rank of several, the
    others would wait in a collective and mpi4py's MPI_Finalize at exit would keep this
    process alive: abort the whole job now."""
    if launch.world_size() == 1:
        raise  # re-raises the exception being handled
    traceback.print_exc()
    print(f"hpcaux: rank {launch.world_rank()} failed; aborting the job", file=sys.stderr, flush=True)
    _abort_job(1)


if __name__ == "__main__":
    sys.exit(main())
