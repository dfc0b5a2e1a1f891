"""The `idempotency-proxy` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from proxy import __version__, logs
from proxy.config import ConfigError, load_config
from proxy.server import refuse, serve_config
from proxy.workers import supervise, worker_count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idempotency-proxy",
        description="A reverse proxy that makes retries safe for APIs never built for them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve the proxy")
    run.add_argument("--config", required=True, help="the YAML config file")
    run.add_argument(
        "--workers", default="1",
        help="worker processes sharing the port (SO_REUSEPORT); 'auto' = one per CPU",
    )  # fmt: skip

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", help="the YAML config file")
    _add_tool_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "run":
        return run(args.config, args.workers)
    if args.command in TOOL_COMMANDS:
        return TOOL_COMMANDS[args.command](args)
    raise AssertionError(args.command)


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.routes)} routes, store {config.store.url.split(':')[0]})")
    return 0


def run(path: str, workers: str = "1") -> int:
    try:
        config = load_config(path)
        count = worker_count(workers)
    except ConfigError as exc:
        return refuse(path, exc.problems)
    except ValueError as exc:
        return refuse(path, [f"--workers: expected a number or 'auto', got {workers!r} ({exc})"])
    if count > 1 and config.store.url.startswith("memory:"):
        return refuse(path, [
            f"--workers {count}: store.url is memory://, which one process owns; several "
            "workers would each keep their own records. Use Redis, or one worker"
        ])  # fmt: skip
    if count == 1:
        return serve_config(path)
    logs.configure(config.log_level)
    return supervise(path, count, config.shutdown_grace)


# --- demo, audit, legacy-api: parsing here, the work in their modules --------------------


def _add_tool_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from proxy import audit, demo

    show = commands.add_parser(
        "demo", help="show what a retry storm does to a payments API, with and without the proxy"
    )
    show.add_argument(
        "--requests",
        type=_positive(int),
        default=demo.DEFAULT_REQUESTS,
        help="payments in the storm, each with its own key (default %(default)s)",
    )
    show.add_argument(
        "--concurrency",
        type=_positive(int),
        default=demo.DEFAULT_CONCURRENCY,
        help="payments in flight at once (default %(default)s)",
    )
    show.add_argument(
        "--timeout",
        type=_positive(float),
        default=demo.DEFAULT_TIMEOUT,
        help="the clients' timeout in seconds (default %(default)s)",
    )
    show.add_argument("--seed", type=int, help="replay a run: the seed it printed")
    show.add_argument(
        "--no-serve",
        action="store_true",
        help="exit after the table instead of serving until Ctrl-C",
    )

    probe = commands.add_parser(
        "audit", help="probe an HTTP endpoint for duplicate-delivery safety (sends real requests)"
    )
    probe.add_argument("url", help="the endpoint, e.g. https://staging.example.com/v1/charges")
    probe.add_argument(
        "-X",
        "--method",
        default=audit.DEFAULT_METHOD,
        type=str.upper,
        help="request method (default %(default)s)",
    )
    probe.add_argument(
        "-d",
        "--data",
        default=audit.DEFAULT_DATA,
        help="request body, or @FILE (default %(default)s)",
    )
    probe.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        type=_header,
        help="extra request header 'Name: value' (repeatable)",
    )
    probe.add_argument(
        "--key-header",
        default=audit.DEFAULT_KEY_HEADER,
        help="the idempotency key header (default %(default)s)",
    )
    probe.add_argument(
        "--timeout",
        type=_positive(float),
        default=audit.DEFAULT_TIMEOUT,
        help="seconds the timeout probe waits before giving up (default %(default)s)",
    )
    probe.add_argument(
        "--concurrency",
        type=_positive(int),
        default=audit.DEFAULT_CONCURRENCY,
        help="duplicates sent at once (default %(default)s)",
    )
    probe.add_argument(
        "--max-requests",
        type=_positive(int),
        default=audit.DEFAULT_MAX_REQUESTS,
        help="never send more requests than this (default %(default)s)",
    )
    probe.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    probe.add_argument(
        "--yes", action="store_true", help="confirm: the audit sends real, mutating requests"
    )

    legacy = commands.add_parser("legacy-api", help="serve the toy non-idempotent payments API")
    legacy.add_argument(
        "--listen", default="127.0.0.1:9000", type=_address, help="HOST:PORT (default %(default)s)"
    )
    legacy.add_argument(
        "--slow-share",
        type=float,
        default=0.0,
        help="share of charge requests that answer late (default 0)",
    )
    legacy.add_argument(
        "--slow-seconds", type=_positive(float), default=2.0, help="how late (default %(default)s)"
    )
    legacy.add_argument("--seed", type=int, help="seed for choosing the slow requests")


def _demo(args: argparse.Namespace) -> int:
    from proxy import demo

    options = demo.DemoOptions(
        requests=args.requests,
        concurrency=args.concurrency,
        timeout=args.timeout,
        seed=args.seed,
        serve=not args.no_serve,
    )
    return demo.main(options)


def _audit(args: argparse.Namespace) -> int:
    from proxy import audit

    try:
        data = audit.load_data(args.data)
    except OSError as exc:
        print(f"--data {args.data}: cannot read: {exc.strerror}", file=sys.stderr)
        return 2
    options = audit.AuditOptions(
        url=args.url,
        method=args.method,
        data=data,
        headers=tuple(args.header),
        key_header=args.key_header,
        timeout=args.timeout,
        concurrency=args.concurrency,
        max_requests=args.max_requests,
        json_path=args.json,
        yes=args.yes,
    )
    return audit.main(options)


def _legacy_api(args: argparse.Namespace) -> int:
    from proxy.legacy_api import LegacyApi, run_legacy_api

    host, port = args.listen
    api = LegacyApi(slow_share=args.slow_share, slow_seconds=args.slow_seconds, seed=args.seed)
    asyncio.run(run_legacy_api(host, port, api))
    return 0


TOOL_COMMANDS = {"demo": _demo, "audit": _audit, "legacy-api": _legacy_api}
_Number = TypeVar("_Number", int, float)


def _positive(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _header(text: str) -> tuple[str, str]:
    from proxy.audit import parse_header

    try:
        return parse_header(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address(text: str) -> tuple[str, int]:
    from proxy.config import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
