"""The ``asyppo`` command: ``train``, ``submit``, ``eval``, ``config``, ``import-gguf`` and ``local-cluster``.

``asyppo train`` with no arguments runs the built-in job (embedded local Ray, tiny bootstrapped model, arithmetic
task). Every subcommand takes ``--config FILE.yaml`` and dotted ``key=value`` overrides, validated before anything
starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from asyppo.common.config import RELATIVE_RUN_DIR, ConfigError, JobConfig, load_config
from asyppo.cluster.logs import setup_console
from asyppo.cluster.metrics import describe_evaluation


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML job file (see examples/)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, vLLM's and other libraries' output on the console (logging.verbose=true)")
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

    evaluate = sub.add_parser(
        "eval", usage="asyppo eval [RUN_DIR] [--config FILE] [--checkpoint DIR] [key=value ...]",
        help="score a policy on the held-out sets as a training run does: `asyppo eval runs/<name>` uses the run's "
             "config.yaml and its latest checkpoint",
    )
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", type=Path,
                          help="a policy directory, or a run's checkpoints/step-N directory (default with RUN_DIR: "
                               "its latest)")

    config = sub.add_parser("config", help="validate a job config and print it fully resolved")
    _add_config_args(config)

    import_gguf = sub.add_parser(
        "import-gguf", help="turn a GGUF file (llama.cpp's format) into a Hugging Face model directory for "
                            "model.policy and model.critic (docs/models.md)")
    import_gguf.add_argument("gguf_file", type=Path, metavar="FILE")
    import_gguf.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new directory")

    local = sub.add_parser(
        "local-cluster", help="start a Ray cluster of several nodes on this machine, each with a node type, and add "
                              "or remove nodes from the keyboard (docs/scaling.md)")
    local.add_argument("--nodes", default="rollout_node=1,train_node=1", metavar="TYPE=COUNT,...",
                       help="the worker nodes to start; each carries the custom resource TYPE that a role's "
                            "node_type names (default: rollout_node=1,train_node=1)")
    local.add_argument("--cpus-per-node", type=float, default=2, help="logical CPUs of each worker node (default 2)")
    return parser


def _load(args) -> JobConfig:
    cfg = load_config(args.config, [*args.overrides, *(["logging.verbose=true"] if args.verbose else [])])
    setup_console(cfg.logging.verbose)
    return cfg


def _train(args) -> int:
    from asyppo.cluster.driver import train

    summary = train(_load(args), resume=args.resume)
    if "base_accuracy" in summary and "final_accuracy" in summary:
        print(f"held-out accuracy: {summary['base_accuracy']:.3f} (start) -> {summary['final_accuracy']:.3f} "
              f"(after {summary['steps']} steps)")
    print(f"run directory: {Path(summary['run_dir']).resolve()} (config.yaml, metrics.jsonl, eval.jsonl, "
          "samples.jsonl, checkpoints/, logs/)")
    return 0


def _submit(args) -> int:
    import asyncio

    # Ray's client sends a token only in token mode (read when Ray is imported); a token given without the mode would
    # go unused.
    if not os.environ.get("RAY_AUTH_MODE") and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    from asyppo.cluster.errors import JobFailed

    cfg = _load(args)  # fail here, not on the cluster, if the config is wrong
    overrides = [*args.overrides, *durable_run_dir(cfg, args.address)]
    command = ["asyppo", "train", *(["--config", str(args.config)] if args.config else []),
               *(["--resume"] if args.resume else []), *(["--verbose"] if args.verbose else []), *overrides]
    env_vars = {key: os.environ[key] for key in FORWARDED_ENV_VARS if os.environ.get(key)}
    try:
        client = JobSubmissionClient(args.address)
        with tempfile.TemporaryDirectory(prefix="asyppo-submit-") as staging:
            runtime_env = {"working_dir": args.working_dir, "py_modules": [str(stage_package(Path(staging)))],
                           "env_vars": env_vars}
            job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env)
    except AuthenticationError:
        raise JobFailed(f"{args.address} requires Ray's token authentication: set RAY_AUTH_TOKEN to the cluster's "
                        "token (or RAY_AUTH_TOKEN_PATH to a file holding it; `ray get-auth-token` on the head prints "
                        "it)") from None
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


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def durable_run_dir(cfg: JobConfig, address: str) -> list[str]:
    """A submitted job runs in Ray's temporary copy of its working directory, so a relative ``trainer.run_dir`` would
    vanish with it (docs/deploy.md, "Run directory"). For a cluster on this machine the run directory becomes the
    absolute path it names here (returned as an override, and said on stderr); for another cluster it is refused."""
    run_dir = Path(cfg.trainer.run_dir).expanduser()
    if run_dir.is_absolute() or "://" in cfg.trainer.run_dir:
        return []
    from urllib.parse import urlsplit

    if (urlsplit(address if "://" in address else f"http://{address}").hostname or "") in LOCAL_HOSTS:
        print(f"asyppo submit: the job writes its run to {run_dir.resolve()} (trainer.run_dir {cfg.trainer.run_dir!r} "
              "made absolute: the cluster runs on this machine)", file=sys.stderr)
        return [f"trainer.run_dir={run_dir.resolve()}"]
    raise ConfigError([("trainer.run_dir", RELATIVE_RUN_DIR.format(run_dir=cfg.trainer.run_dir))])


# What a submitted job takes from the submitting shell, by both submit paths (deploy/submit.sh keeps the same list).
FORWARDED_ENV_VARS = ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_BASE_URL", "WANDB_MODE")

# The packages under `asyppo` (pyproject.toml's package-dir; tests/unit/test_packaging.py checks that they agree).
SUBPACKAGES = ("actors", "cluster", "common", "core", "critics", "learner", "tasks", "weight_sync")


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
    """``asyppo eval RUN_DIR``: the run's own config and its latest checkpoint; or ``--config``/overrides with
    ``--checkpoint``."""
    from asyppo.cluster.checkpoint import CheckpointDir
    from asyppo.cluster.errors import JobFailed
    from asyppo.cluster.evaluation import evaluate_policy

    overrides = list(args.overrides)
    run_dir = Path(overrides.pop(0)) if overrides and "=" not in overrides[0] else None
    checkpoint = args.checkpoint
    if run_dir is not None:
        if not (run_dir / "config.yaml").is_file():
            raise JobFailed(f"{run_dir}: not a run directory (no config.yaml)")
        config = args.config or run_dir / "config.yaml"
        checkpoint = checkpoint or CheckpointDir(run_dir, keep=1).latest()
        if checkpoint is None:
            raise JobFailed(f"{run_dir}: no checkpoint to evaluate (checkpoints/ is empty)")
    else:
        config = args.config
        if checkpoint is None:
            raise JobFailed("asyppo eval: give a run directory (asyppo eval runs/<name>) or --checkpoint")
    cfg = load_config(config, [*overrides, *(["logging.verbose=true"] if args.verbose else [])])
    setup_console(cfg.logging.verbose)
    policy_dir = checkpoint / "policy" if (checkpoint / "policy" / "config.json").is_file() else checkpoint
    metrics = evaluate_policy(cfg, str(policy_dir))
    for line in describe_evaluation(_step_of(checkpoint), metrics):
        print(line, file=sys.stderr)
    print(json.dumps({"policy": str(policy_dir), **metrics}))
    return 0


def _step_of(checkpoint: Path) -> int | str:
    """N of a ``step-N`` checkpoint directory, else its name."""
    name = checkpoint.name if checkpoint.name != "policy" else checkpoint.parent.name
    return int(name.removeprefix("step-")) if name.removeprefix("step-").isdigit() else name


def _import_gguf(args: argparse.Namespace) -> int:
    from asyppo.tasks.pretrained import PretrainedUnavailable, import_gguf

    try:
        out_dir = import_gguf(args.gguf_file, args.out_dir)
    except (FileExistsError, FileNotFoundError, PretrainedUnavailable) as exc:
        print(f"asyppo: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - what transformers' GGUF loader refuses (an architecture it lacks)
        print(f"asyppo: {args.gguf_file} could not be imported: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir} (use it as model.policy or model.critic)")
    return 0


LOCAL_CLUSTER_HELP = """commands: add TYPE | remove NAME-or-TYPE | nodes | quit (or Ctrl-D)"""


def _local_cluster(args: argparse.Namespace) -> int:
    """Start the nodes, print how to use them, then read ``add`` / ``remove`` / ``nodes`` lines until EOF."""
    from asyppo.cluster.local_cluster import LocalCluster, parse_nodes

    try:
        nodes = parse_nodes(args.nodes)
    except ValueError as exc:
        print(f"asyppo: {exc}", file=sys.stderr)
        return 2
    cluster = LocalCluster(nodes, cpus_per_node=args.cpus_per_node)
    try:
        print(f"Ray cluster on 127.0.0.1: a head without CPUs and {len(cluster.nodes)} worker node(s), "
              f"{args.cpus_per_node:g} CPUs each: {', '.join(cluster.describe())}")
        if cluster.dashboard_url:
            print(f"Ray dashboard: {cluster.dashboard_url}")
        print(f"run a job on it from another shell:\n  RAY_ADDRESS={cluster.address} asyppo train "
              f"--config examples/multinode.yaml\n{LOCAL_CLUSTER_HELP}", flush=True)
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            try:
                if command == "add" and argument:
                    print(f"node {cluster.add(argument.strip()).name} joined", flush=True)
                elif command == "remove" and argument:
                    print(f"node {cluster.remove(argument.strip()).name} removed", flush=True)
                elif command == "nodes":
                    print(", ".join(cluster.describe()) or "no worker nodes", flush=True)
                elif command in ("quit", "exit"):
                    break
                elif command:
                    print(LOCAL_CLUSTER_HELP, flush=True)
            except ValueError as exc:
                print(exc, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
    print("cluster stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_console(verbose=False)
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    handlers = {"train": _train, "submit": _submit, "eval": _eval, "import-gguf": _import_gguf,
                "local-cluster": _local_cluster}
    try:
        if args.command == "config":
            print(_load(args).to_yaml(), end="")
            return 0
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"asyppo: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's job is to turn known failures into one clear line
        from asyppo.cluster.actor_group import PlacementError
        from asyppo.cluster.errors import JobFailed
        from asyppo.tasks.problems import DatasetError

        if isinstance(exc, (DatasetError, JobFailed, PlacementError)):
            print(f"asyppo: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
