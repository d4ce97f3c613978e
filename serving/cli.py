"""Command-line hooks for ``ctrstream serve`` and ``ctrstream score`` (argparse).

``pipeline.cli`` wires them in::

    add_serve_arguments(subparsers.add_parser("serve", help=...)); -> serve_command(args)
    add_score_arguments(subparsers.add_parser("score", help=...)); -> score_command(args)

Flags left unset fall back to ``CTRSTREAM_SERVE_*`` environment variables, then to the defaults
of :class:`serving.config.ServerConfig`. ``python -m serving.cli serve|score ...`` runs them
without the umbrella CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_score_arguments", "add_serve_arguments", "main", "score_command", "serve_command"]

# argparse dest -> ServerConfig field (same name unless listed)
_SERVE_FIELDS = (
    "store", "model_name", "model_dir", "alias", "tracking_uri", "poll_interval_s", "host", "port",
    "metrics_port", "metrics_host", "max_message_bytes", "workers", "max_queue", "torch_threads", "cache_mb",
    "max_candidates", "min_deadline_ms", "max_model_age_s", "max_poll_staleness_s", "tls_cert", "tls_key",
    "tls_client_ca", "token_file", "grace_s", "log_format", "log_level",
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ctrstream serve`` (all optional on the command line; ``--store`` and one of
    ``--model-name``/``--model-dir`` must come from flags or the environment)."""
    a = parser.add_argument
    a("--store", help="sequence store URI: lmdb:///path, redis://host:port/db [env CTRSTREAM_SERVE_STORE]")
    a("--model-name", help="MLflow registered model to serve (follows --alias)")
    a("--model-dir", help="serve from a folder of saved rankers instead of MLflow (alias file inside)")
    a("--alias", help="registry alias to follow (default: champion)")
    a("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI)")
    a("--poll-interval", dest="poll_interval_s", type=float, help="seconds between alias polls (default: 10)")
    a("--host", help="bind address (default: 127.0.0.1, loopback only)")
    a("--port", type=int, help="gRPC port (default: 50051; 0 = ephemeral)")
    a("--metrics-port", type=int, help="serve Prometheus /metrics on this HTTP port (default: off)")
    a("--metrics-host", help="bind address of the metrics endpoint (default: 127.0.0.1)")
    a("--max-message-bytes", type=int, help="max request/response size (default: 4 MiB)")
    a("--workers", type=int, help="scoring threads (default: 1)")
    a("--max-queue", type=int, help="requests allowed to wait for a worker before RESOURCE_EXHAUSTED (default: 32)")
    a("--torch-threads", type=int, help="torch intra-op threads (default: 1; see ServerConfig)")
    a("--cache-mb", type=int, help="per-user encoding cache budget in MiB (default: 256; 0 = off)")
    a("--max-candidates", type=int, help="max candidates per request (default: 2000)")
    a("--min-deadline-ms", type=float, help="refuse requests with less deadline left (default: 2)")
    a("--max-model-age", dest="max_model_age_s", type=float,
      help="'ranker' health turns NOT_SERVING when the model version is older (s; default: off)")
    a("--max-poll-staleness", dest="max_poll_staleness_s", type=float,
      help="'ranker' health turns NOT_SERVING after this long without a good registry poll (default: 5 polls)")
    a("--tls-cert", help="PEM server certificate chain (enables TLS, with --tls-key)")
    a("--tls-key", help="PEM server private key")
    a("--tls-client-ca", help="PEM CA of client certificates (enables mutual TLS)")
    a("--token-file", help="file of accepted bearer tokens, one per line (or env CTRSTREAM_SERVE_TOKENS=a,b)")
    a("--grace", dest="grace_s", type=float, help="seconds in-flight requests get on SIGTERM (default: 10)")
    a("--log-format", choices=("json", "text"), help="log line format (default: json)")
    a("--log-level", help="log level (default: INFO)")


def serve_command(args: argparse.Namespace) -> int:
    """Run the scorer until SIGTERM/SIGINT. Returns the exit code (0 clean, 2 bad settings)."""
    from pydantic import ValidationError

    from serving._logging import configure_logging
    from serving.config import ServerConfig
    from serving.server import serve

    given: dict[str, Any] = {k: getattr(args, k) for k in _SERVE_FIELDS if getattr(args, k, None) is not None}
    try:
        config = ServerConfig(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"ctrstream serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    return serve(config)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ctrstream score``."""
    a = parser.add_argument
    a("--target", default="127.0.0.1:50051", help="scorer address host:port (default: 127.0.0.1:50051)")
    a("--user", required=True, help="user id")
    a("--item", required=True, help="candidate item ids, comma-separated: I[,I...]")
    a("--category", help="candidate category ids, comma-separated, one per item or one for all "
                         "(default: the item id)")
    a("--timeout", type=float, default=2.0, help="deadline in seconds (default: 2)")
    a("--token-file", help="file holding the bearer token (or env CTRSTREAM_TOKEN)")
    a("--tls-ca", help="PEM CA that signed the server certificate (enables TLS)")
    a("--tls-cert", help="PEM client certificate (mutual TLS)")
    a("--tls-key", help="PEM client private key (mutual TLS)")
    a("--tls-server-name", help="name to check the server certificate against")


def score_command(args: argparse.Namespace) -> int:
    """One Score call; prints ``{"model_name", "model_version", "scores": [{"item", "score"}]}``.
    Returns 0, or 1 with the gRPC status on stderr."""
    import grpc

    from serving.client import ScorerClient, TlsConfig

    items = [i.strip() for i in args.item.split(",") if i.strip()]
    cats = [c.strip() for c in args.category.split(",")] if args.category else list(items)
    if len(cats) == 1 and len(items) > 1:
        cats = cats * len(items)
    if len(cats) != len(items):
        print(f"ctrstream score: {len(items)} items but {len(cats)} categories", file=sys.stderr)
        return 2
    token = os.environ.get("CTRSTREAM_TOKEN")
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = TlsConfig.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    with ScorerClient(args.target, token=token, tls=tls) as client:
        try:
            scores, name, version = client.score(args.user, items, cats, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"ctrstream score: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    out = {"model_name": name, "model_version": version,
           "scores": [{"item": i, "score": round(s, 6)} for i, s in zip(items, scores, strict=True)]}
    print(json.dumps(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.cli", description="ctrstream gRPC scorer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="run the gRPC scorer"))
    add_score_arguments(sub.add_parser("score", help="score candidates for a user"))
    args = parser.parse_args(argv)
    return serve_command(args) if args.command == "serve" else score_command(args)


if __name__ == "__main__":
    sys.exit(main())
