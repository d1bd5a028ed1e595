"""`vmh broker start|stop|status`: the local single-node Apache Kafka broker (see pipeline/bus/broker.py)."""

from __future__ import annotations

import argparse
import sys

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("start", "stop", "status"))
    add_settings(parser, "broker-port", "cache-dir")
    parser.add_argument("--port", dest="broker_port", type=int, default=argparse.SUPPRESS,
                        help="alias of --broker-port")
    parser.add_argument("--data-dir", default=None, help="broker data and log dir [default: <cache-dir>/brokers/<port>]")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for start or stop")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.broker import BrokerError, broker_status, ensure_broker, stop_broker

    port, cache = args.broker_port, args.cache_dir
    try:
        running = broker_status(port, cache_dir=cache)
        if args.action == "status":
            if running is None:
                print(f"no broker runs on port {port}")
                return 1
            print(f"broker pid {running.pid} serves {running.bootstrap}, data in {running.data_dir}")
        elif args.action == "start":
            if running is not None:
                print(f"already running: pid {running.pid} serves {running.bootstrap}, data in {running.data_dir}")
            bootstrap = ensure_broker(port, data_dir=args.data_dir, cache_dir=cache, timeout_s=args.timeout)
            if running is None:
                state = broker_status(port, cache_dir=cache)
                print(f"started: pid {state.pid} serves {bootstrap}, data in {state.data_dir}")
        else:
            stopped = stop_broker(port, cache_dir=cache, timeout_s=args.timeout)
            print(f"stopped broker pid {stopped.pid} on port {port}" if stopped else f"no broker runs on port {port}")
    except BrokerError as e:
        print(f"vmh broker {args.action}: {e}", file=sys.stderr)
        return 2
    return 0
