"""``ctrstream``: one entry point, a sub-command per process (DESIGN.md §6).

Flags of the long-running commands are generated from their settings classes (``pipeline.config``,
``models.online``), so every flag also reads ``CTRSTREAM_<NAME>`` and ``--config FILE.toml``, and
the defaults live in one place. A bad setting exits 2 with one readable line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast, get_args, get_origin

from pydantic_settings import BaseSettings

from pipeline.exceptions import ConfigError, PipelineError

__all__ = ["main", "build_parser"]

log = logging.getLogger("ctrstream")


def _flag_type(annotation: Any) -> Callable[[str], Any]:
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if get_origin(annotation) is not None and args else annotation
    if get_origin(base) is not None:  # Literal[...]
        return str
    if base in (int, float):
        return cast("Callable[[str], Any]", base)
    return str  # also the plain type for any other annotation: argparse keeps the string


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseSettings],
                           skip: Sequence[str] = ()) -> None:
    """One ``--flag`` per settings field (default None = not given, so env/TOML/defaults apply)."""
    for name, f in cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"CTRSTREAM_{name.upper()}"
        help_ = f"default: {f.default!r} (env {env})"
        if f.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            choices = None
            if any(get_origin(a) is not None and str(get_origin(a)).endswith("Literal") for a in [f.annotation]):
                choices = list(get_args(f.annotation))
            parser.add_argument(flag, type=_flag_type(f.annotation), default=None, choices=choices, help=help_)
    parser.add_argument("--config", default=None, help="TOML file with settings (flags and env win over it)")


def _settings(cls: type[BaseSettings], args: argparse.Namespace, section: str) -> Any:
    from pipeline.config import load_settings

    return load_settings(cls, vars(args), getattr(args, "config", None), section)


# ---- commands ---------------------------------------------------------------------------------------

def cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipeline.broker import EmbeddedBroker

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(port=args.port, quiet=not args.verbose) as b:
        print(f"broker listening on {b.bootstrap} (memory storage; Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            if b.proc is None or b.proc.poll() is not None:
                print("broker exited", file=sys.stderr)
                return 1
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from pipeline.config import ProduceSettings
    from pipeline.produce import iter_dataset, produce_events

    s = _settings(ProduceSettings, args, "produce")
    opts = json.loads(args.options) if args.options else {}
    n = produce_events(s, iter_dataset(args.dataset, seed=args.seed, **opts))
    print(json.dumps({"produced": n, "topic": s.events_topic}))
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    """Create the events, samples and dead-letter topics (a deployment's first step; existing ones are
    left as they are). The worker's group spreads the events topic's partitions over its members, so
    its partition count caps how many workers share the load."""
    from pipeline.broker import create_topics, wait_for_kafka
    from pipeline.config import ProduceSettings
    from pipeline.exceptions import BrokerError

    s = _settings(ProduceSettings, args, "produce")
    want = {s.events_topic: s.partitions, s.samples_topic: s.partitions, s.dlq_topic: 1}
    try:  # a broker that is still starting (a compose stack) is waited for, up to --wait seconds
        wait_for_kafka(s.bootstrap_servers, args.wait)
    except BrokerError as e:
        print(f"topics: {e}", file=sys.stderr)
        return 1
    created = create_topics(s.bootstrap_servers, want, args.replication)
    print(json.dumps({"created": created, "topics": want, "replication": args.replication}))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.config import WorkerSettings
    from pipeline.worker import run_worker

    s = _settings(WorkerSettings, args, "worker")
    stats = run_worker(s)
    print(json.dumps({"worker": stats.as_dict()}), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.online import run_trainer
    from pipeline.config import TrainerSettings

    s = _settings(TrainerSettings, args, "trainer")
    reports = run_trainer(s)

    def metric(x: float) -> float | None:  # strict JSON: no NaN (a rank > 0 or a run with no labels)
        return None if math.isnan(x) else x

    for r in reports:
        line = {"model": r.preset, "registered": r.registered_name, "samples": r.samples,
                "progressive_auc": metric(r.auc), "logloss": metric(r.logloss), "versions": r.versions,
                "champion": r.champion}
        if s.world_size > 1:  # only rank 0 gathers every rank's predictions, so only it has metrics
            line["rank"] = s.rank
        print(json.dumps(line, allow_nan=False), flush=True)
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from pipeline.events import hash_id
    from pipeline.state import open_store

    store = open_store(args.store, readonly=args.action != "stats" or True)
    try:
        if args.action == "stats":
            print(json.dumps(dict(store.stats())))
        elif args.action == "digest":
            print(store.digest())
        elif args.action == "dump":
            users = [hash_id(args.user)] if args.user else list(store.users())[: args.limit]
            for u in users:
                b = store.read(u, max_len=args.max_len)
                print(json.dumps({"user_hash": u, "start": b.start, "end": b.end,
                                  "item": b.item.tolist(), "category": b.category.tolist(),
                                  "action": b.action.tolist(), "ts": b.ts.tolist()}))
    finally:
        store.close()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from models.registry import CHAMPION, set_alias, version_table
    from models.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if args.action == "list":
        client = MlflowClient(uri)
        names = [args.name] if args.name else [m.name for m in client.search_registered_models()]
        for n in names:
            for row in version_table(n, uri):
                print(json.dumps({"name": n, **row}))
        return 0
    if not args.name or not args.version:
        raise ConfigError("models promote needs --name and --version")
    set_alias(MlflowClient(uri), args.name, args.alias or CHAMPION, args.version)
    print(json.dumps({"name": args.name, "alias": args.alias or CHAMPION, "version": args.version}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(args)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    from pipeline.config import ProduceSettings, TrainerSettings, WorkerSettings

    p = argparse.ArgumentParser(prog="ctrstream", description="Streaming CTR ranking over lifelong behavior sequences.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole pipeline on embedded defaults, end to end")
    d.add_argument("--workdir", default=".demo", help="where the demo keeps its store and MLflow data")
    d.add_argument("--users", type=int, default=None, help="synthetic users (default: the demo size)")
    d.add_argument("--behaviors", type=int, default=None, help="behaviors per user")
    d.add_argument("--impressions", type=int, default=None, help="impressions per user")
    d.add_argument("--models", default="din,sdim", help="presets to train")
    d.add_argument("--score-calls", type=int, default=300, help="gRPC scoring calls at the end")
    d.add_argument("--candidates", type=int, default=200, help="candidates per scoring call")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON here")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("broker", help="run the embedded Kafka-protocol broker in the foreground")
    b.add_argument("--port", type=int, default=9092)
    b.set_defaults(func=cmd_broker)

    pr = sub.add_parser("produce", help="replay a dataset into the events topic")
    pr.add_argument("dataset", help="synthetic | movielens | taobao | amazon | PATH")
    pr.add_argument("--seed", type=int, default=7)
    pr.add_argument("--options", default=None, help='dataset options as JSON, e.g. \'{"users": 50}\'')
    add_settings_arguments(pr, ProduceSettings)
    pr.set_defaults(func=cmd_produce)

    tp = sub.add_parser("topics", help="create the events, samples and dead-letter topics")
    tp.add_argument("--replication", type=int, default=1, help="replication factor of new topics")
    tp.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the broker to answer")
    add_settings_arguments(tp, ProduceSettings, skip=("limit",))
    tp.set_defaults(func=cmd_topics)

    w = sub.add_parser("worker", help="the stream worker")
    add_settings_arguments(w, WorkerSettings)
    w.set_defaults(func=cmd_worker)

    t = sub.add_parser("train", help="the online trainer")
    add_settings_arguments(t, TrainerSettings)
    t.set_defaults(func=cmd_train)

    try:
        from serving.cli import add_score_arguments, add_serve_arguments, score_command, serve_command

        s = sub.add_parser("serve", help="the gRPC scorer")
        add_serve_arguments(s)
        s.set_defaults(func=serve_command)
        c = sub.add_parser("score", help="call a scorer and print scores")
        add_score_arguments(c)
        c.set_defaults(func=score_command)
    except ImportError as e:  # pragma: no cover - serving extras missing
        log.debug("serving commands unavailable: %s", e)

    st = sub.add_parser("store", help="inspect the sequence store")
    st.add_argument("action", choices=["stats", "dump", "digest"])
    st.add_argument("--store", default="lmdb://./.ctrstream/store")
    st.add_argument("--user", default=None, help="user id (dump one user)")
    st.add_argument("--limit", type=int, default=10, help="users to dump when --user is not given")
    st.add_argument("--max-len", type=int, default=None, help="behaviors per user to dump (latest)")
    st.set_defaults(func=cmd_store)

    m = sub.add_parser("models", help="registry view and manual promotion")
    m.add_argument("action", choices=["list", "promote"])
    m.add_argument("--name", default=None, help="registered model name, e.g. ctrstream-sdim")
    m.add_argument("--version", default=None)
    m.add_argument("--alias", default=None, help="alias to move (default champion)")
    m.add_argument("--tracking-uri", default=None)
    m.set_defaults(func=cmd_models)

    ev = sub.add_parser("evaluate", help="offline time-ordered evaluation of several models")
    if command == "evaluate":  # its flags import torch: only for this command (keeps `worker` starting fast)
        from models.evaluate import add_evaluate_arguments, evaluate_command

        add_evaluate_arguments(ev)
        ev.set_defaults(func=evaluate_command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    # MLflow: no artifact progress bars; its pyfunc-pickling notice does not apply (our model holds
    # no state: weights travel as state_dict + config and are rebuilt by models.load_ranker).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.ERROR if not args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"ctrstream {args.command}: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"ctrstream {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
