"""The ``asyppo`` command: ``train``, ``submit``, ``eval`` and ``config``.

``asyppo train`` with no arguments runs the built-in job (embedded local Ray, tiny bootstrapped model, arithmetic
task). Every subcommand takes ``--config FILE.yaml`` and dotted ``key=value`` overrides, validated before anything
starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from asyppo.cluster.config import ConfigError, JobConfig, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML job file (see examples/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. rollout.num_workers=2 critics.num_critics=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyppo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=False)

    train = sub.add_parser("train", help="run a training job on RAY_ADDRESS or an embedded local cluster")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue trainer.name from its latest checkpoint")

    submit = sub.add_parser("submit", help="submit `asyppo train` to a Ray cluster as a Ray job")
    _add_config_args(submit)
    submit.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--resume", action="store_true")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    submit.add_argument("--working-dir", default=".", help="directory shipped to the cluster (runtime_env)")

    evaluate = sub.add_parser("eval", help="held-out accuracy of a policy checkpoint (HF directory)")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, type=Path,
                          help="a policy directory, or a run's checkpoints/step-N directory")

    config = sub.add_parser("config", help="validate a job config and print it fully resolved")
    _add_config_args(config)
    return parser


def _load(args) -> JobConfig:
    return load_config(args.config, args.overrides)


def _train(args) -> int:
    from asyppo.cluster.driver import train

    summary = train(_load(args), resume=args.resume)
    if "base_accuracy" in summary and "final_accuracy" in summary:
        print(f"held-out accuracy: {summary['base_accuracy']:.3f} (start) -> {summary['final_accuracy']:.3f} "
              f"(after {summary['steps']} steps)")
    print(f"run directory: {summary['run_dir']} (config.yaml, metrics.jsonl, eval.jsonl, checkpoints/)")
    return 0


def _submit(args) -> int:
    import asyncio

    from ray.job_submission import JobStatus, JobSubmissionClient

    _load(args)  # fail here, not on the cluster, if the config is wrong
    command = ["asyppo", "train", *(["--config", str(args.config)] if args.config else []),
               *(["--resume"] if args.resume else []), *args.overrides]
    env_vars = {key: os.environ[key] for key in ("WANDB_API_KEY", "WANDB_MODE") if key in os.environ}
    client = JobSubmissionClient(args.address)
    with tempfile.TemporaryDirectory(prefix="asyppo-submit-") as staging:
        runtime_env = {"working_dir": args.working_dir, "py_modules": [str(stage_package(Path(staging)))],
                       "env_vars": env_vars}
        job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env)
    print(f"submitted {job_id} to {args.address}: {shlex.join(command)}")
    if args.no_wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="")

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


# The packages under `asyppo` (pyproject.toml's package-dir; tests/test_packaging.py checks that they agree).
SUBPACKAGES = ("actors", "cluster", "core", "critics", "learner", "tasks", "weight_sync")


def stage_package(target: Path) -> Path:
    """This installation's ``asyppo`` copied into ``target/asyppo``, one directory for a Ray job's ``py_modules``.

    The repository's top-level folders are installed under the name ``asyppo`` by a package-dir mapping, so a job's
    ``working_dir`` alone does not make them importable as ``asyppo.*``: without this the cluster would run the copy
    installed in its image. The staged copy is a regular package, which Python prefers to the image's namespace
    package wherever it sits on the path.
    """
    staged = target / "asyppo"
    staged.mkdir(parents=True)
    (staged / "__init__.py").write_text('"""asyppo, staged for a Ray job by `asyppo submit`."""\n')
    for name in SUBPACKAGES:
        source = Path(importlib.import_module(f"asyppo.{name}").__file__).parent
        shutil.copytree(source, staged / name, ignore=shutil.ignore_patterns("__pycache__"))
    return staged


def _eval(args) -> int:
    from asyppo.cluster.driver import evaluate_policy

    checkpoint = args.checkpoint
    policy_dir = checkpoint / "policy" if (checkpoint / "policy" / "config.json").is_file() else checkpoint
    accuracy, count = evaluate_policy(_load(args), str(policy_dir))
    print(json.dumps({"policy": str(policy_dir), "eval_accuracy": accuracy, "eval_problems": count}))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    handlers = {"train": _train, "submit": _submit, "eval": _eval}
    try:
        if args.command == "config":
            print(_load(args).to_yaml(), end="")
            return 0
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"asyppo: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's job is to turn known failures into one clear line
        from asyppo.tasks.problems import DatasetError
        from asyppo.cluster.driver import JobFailed

        if isinstance(exc, (DatasetError, JobFailed)):
            print(f"asyppo: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
