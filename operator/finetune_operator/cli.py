"""`ftjob`: run a FineTuneJob on this machine, look at a job (local or on a cluster), validate and
render manifests, and generate the CRD and API docs."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_operator.api import FineTuneJob, describe, resolve_trainer_config
from finetune_operator.api.crd import render_crd_yaml, write_crd
from finetune_operator.api.docs import render_api_docs
from finetune_operator.api.job import validate_manifest
from finetune_operator.builders import BuildContext, build_attempt
from finetune_operator.cli_errors import (
    EXIT_FAILED,
    EXIT_INPUT_MISSING,
    EXIT_INVALID,
    CliError,
    cluster_errors,
)
from finetune_operator.manifests import read_jobs
from finetune_operator.pipes import quiet_stdout
from finetune_operator.policy import grace
from finetune_operator.settings import DEFAULT_TRAINER_IMAGE

LOCAL_RUNS = Path("ftjob-runs")  # where `ftjob run` puts a job's workdir unless told otherwise


def _name_of(doc: dict[str, Any], index: int) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else f"document {index + 1}"


def _parse(path: Path, doc: dict[str, Any], index: int) -> FineTuneJob | None:
    """The job, or None after printing each problem with its field and the fix."""
    try:
        return validate_manifest(doc)
    except ValidationError as exc:
        print(f"{path}: FineTuneJob {_name_of(doc, index)} is invalid:", file=sys.stderr)
        for line in describe(exc):
            print(f"  {line}", file=sys.stderr)
        return None


def _load_jobs(path: Path) -> list[FineTuneJob] | None:
    parsed = [_parse(path, doc, index) for index, doc in enumerate(read_jobs(path))]
    jobs = [job for job in parsed if job is not None]
    return jobs if len(jobs) == len(parsed) else None


def _warn_grace_period(path: Path, job: FineTuneJob) -> None:
    """A manifest with status (`kubectl get ftj NAME -o yaml`) carries the job's measured save
    (status.latestCheckpoint.durationSeconds): warn, as the operator does, when the grace period
    cannot hold it. Without one nothing is measured, and nothing is said: a floor by model size
    would be a guess, since the storage link, not the model, sets most of a save's time."""
    ref = job.status.latest_checkpoint if job.status else None
    warning = grace.warning(
        job.spec.run_policy.termination_grace_period_seconds, ref.duration_seconds if ref else None
    )
    if warning is not None:
        print(f"{path}: {job.metadata.name} warning: {warning}", file=sys.stderr)


def _cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            jobs = _load_jobs(path)
        except CliError as exc:  # report every file, not only the first bad one
            print(f"ftjob validate: {exc.message}", file=sys.stderr)
            status = max(status, exc.code)
            continue
        if jobs is None:
            status = EXIT_INVALID
            continue
        for job in jobs:
            cfg = resolve_trainer_config(job)
            parallel = cfg.parallelism
            model_parallel = (
                f" in {job.spec.data_parallel_size} data-parallel group(s) of sequence {parallel.sequence} x "
                f"tensor {parallel.tensor}"
                if parallel.model_parallel_size > 1
                else ""
            )
            print(
                f"{path}: {job.metadata.name} ok: {cfg.world.nnodes} node(s) x {cfg.world.nproc_per_node} "
                f"process(es) = world size {cfg.world.world_size}{model_parallel}; "
                f"global batch {cfg.schedule.global_batch_size} "
                f"= micro {job.spec.training.micro_batch_size} x {'data-parallel ' if model_parallel else ''}"
                f"world x accumulation {cfg.schedule.gradient_accumulation_steps}; "
                f"checkpoints under {cfg.checkpoint.job_uri}"
            )
            _warn_grace_period(path, job)
    return status


def _cmd_render(args: argparse.Namespace) -> int:
    jobs = _load_jobs(args.file)
    if jobs is None:
        return EXIT_INVALID
    ctx = BuildContext(default_image=args.image)
    objects = [obj for job in jobs for obj in build_attempt(job, args.attempt, ctx)]
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
    return 0


def _cmd_crd(args: argparse.Namespace) -> int:
    if args.write:
        for directory in args.write:
            with _writing(directory):
                print(f"wrote {write_crd(directory)}")
    else:
        sys.stdout.write(render_crd_yaml())
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    if args.write:
        with _writing(args.write):
            args.write.write_text(render_api_docs())
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(render_api_docs())
    return 0


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise CliError(
            EXIT_INPUT_MISSING, f"cannot write {exc.filename or path} ({exc.strerror}); check the path"
        ) from None


def _counted_from(first: int, what: str) -> Callable[[str], int]:
    """An argparse type for a number that counts from `first` (attempts from 1, node ranks from 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < first:
            raise argparse.ArgumentTypeError(f"{what} count from {first} (got {value})")
        return value

    return parse


_attempt = _counted_from(1, "attempts")
_rank = _counted_from(0, "node ranks")


def _workdir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.workdir) if args.workdir else LOCAL_RUNS / name


def _cmd_run(args: argparse.Namespace) -> int:
    from finetune_operator.local_run import RunOptions, local_manifest, run_manifest

    docs = read_jobs(args.file)
    if len(docs) != 1:
        raise CliError(
            EXIT_INVALID, f"{args.file}: ftjob run takes exactly one FineTuneJob (found {len(docs)})"
        )
    name = _name_of(docs[0], 0)
    options = RunOptions(workdir=_workdir(args, name), nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    # Validated after the local defaults: a manifest may leave the checkpoint uri to the workdir.
    manifest = local_manifest(docs[0], options)
    if _parse(args.file, manifest, 0) is None:
        return EXIT_INVALID
    return run_manifest(manifest, options)


def _view(args: argparse.Namespace) -> Any:
    from finetune_operator import jobview

    if args.namespace:
        with cluster_errors(args.kubeconfig):
            view = jobview.load_cluster(args.name, args.namespace, args.kubeconfig)
        where = f"namespace {args.namespace}"
    else:
        workdir = _workdir(args, args.name)
        view = jobview.load_local(workdir)
        where = f"{workdir} (a local run; use -n NAMESPACE for a cluster job)"
    if view is None:
        raise CliError(EXIT_FAILED, f"no FineTuneJob {args.name!r} in {where}")
    return view


def _cmd_status(args: argparse.Namespace) -> int:
    from finetune_operator.jobview import table, wide_row

    print(table([wide_row(_view(args).body)]))
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    from finetune_operator.jobview import describe

    print(describe(_view(args)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from finetune_operator.jobview import list_cluster, list_local, list_row, table

    if args.namespace or args.all_namespaces:
        with cluster_errors(args.kubeconfig):
            bodies = list_cluster(None if args.all_namespaces else args.namespace, args.kubeconfig)
        where = "any namespace" if args.all_namespaces else f"namespace {args.namespace}"
    else:
        bodies = list_local(args.root)
        where = f"{args.root} (local runs; use -n NAMESPACE or -A for a cluster)"
    if not bodies:
        print(f"No FineTuneJobs in {where}.", file=sys.stderr)
        return 0
    rows = []
    for body in bodies:
        row = list_row(body, wide=args.output == "wide")
        if args.all_namespaces:
            row = {"NAMESPACE": body["metadata"].get("namespace", ""), **row}
        rows.append(row)
    print(table(rows))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from finetune_operator.podlogs import LogsError, cluster_logs, local_logs

    out = quiet_stdout()
    try:
        if args.namespace:
            with cluster_errors(args.kubeconfig):
                cluster_logs(
                    args.name, args.namespace, args.rank, args.attempt, args.follow, out, args.kubeconfig
                )
        else:
            local_logs(_workdir(args, args.name), args.rank, args.attempt, args.follow, out)
    except LogsError as exc:
        print(f"ftjob logs: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C ends a follow; nothing to clean up
        pass
    return 0


def _where_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="a local run's workdir (default ftjob-runs/<name>)")
    p.add_argument("-n", "--namespace", help="read the job from the cluster, in this namespace")
    p.add_argument("--kubeconfig", help="kubeconfig for -n (default: $KUBECONFIG or ~/.kube/config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftjob", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check FineTuneJob manifests and show the derived training layout")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("render", help="print the Service, ConfigMap and Pods one attempt of a job becomes")
    p.add_argument("file", type=Path)
    p.add_argument("--attempt", type=_attempt, default=1)
    p.add_argument(
        "--image", default=DEFAULT_TRAINER_IMAGE, help="trainer image when the manifest names none"
    )
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("crd", help="print the CRD generated from the API models, or --write it")
    p.add_argument("--write", type=Path, nargs="*", metavar="DIR")
    p.set_defaults(func=_cmd_crd)

    p = sub.add_parser("docs", help="print the API reference generated from the models, or --write it")
    p.add_argument("--write", type=Path, metavar="FILE")
    p.set_defaults(func=_cmd_docs)

    p = sub.add_parser("run", help="run a FineTuneJob on this machine (each node rank a local process group)")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--workdir", help="where state, logs and (by default) checkpoints go; default ftjob-runs/<job>"
    )
    p.add_argument("--nodes", type=int, help="node ranks (overrides spec.resources.nodes)")
    p.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node rank (overrides spec.resources.gpusPerNode)"
    )
    p.set_defaults(func=_cmd_run)

    for command, func, text in (
        ("status", _cmd_status, "one line per job, as `kubectl get ftj -o wide` prints it"),
        ("describe", _cmd_describe, "phase, conditions, ranks, progress, checkpoint and recent events"),
    ):
        p = sub.add_parser(command, help=text)
        p.add_argument("name")
        _where_arguments(p)
        p.set_defaults(func=func)

    p = sub.add_parser("list", help="the jobs of local runs or of a cluster namespace, as kubectl get ftj")
    p.add_argument("--root", type=Path, default=LOCAL_RUNS, help="where the local runs' workdirs are")
    p.add_argument("-n", "--namespace", help="list the jobs of this cluster namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="list the jobs of every namespace")
    p.add_argument("--kubeconfig", help="kubeconfig for -n/-A (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("-o", "--output", choices=["wide"], help="wide: every printer column")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("logs", help="a rank's trainer log (rank 0 of the current attempt by default)")
    p.add_argument("name")
    p.add_argument("--rank", type=_rank, default=0, help="node rank (default 0, which reports progress)")
    p.add_argument("--attempt", type=_attempt, help="an earlier attempt (default: the job's current one)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the rank ends")
    _where_arguments(p)
    p.set_defaults(func=_cmd_logs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stdout = quiet_stdout()  # a closed pipe ends the output, not the command, without a traceback
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"ftjob {args.command}: {exc.message}", file=sys.stderr)
        code = exc.code
    stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
