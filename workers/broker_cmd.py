"""`vmh broker start|stop|status`: the local single-node Apache Kafka broker (see pipeline/bus/broker.py).

The broker's client listener follows the Kafka client settings: PLAINTEXT by default, SASL_PLAINTEXT with a SCRAM
user when vmh.toml's ``[kafka]`` table (or the VMH_KAFKA_* variables) says so."""

from __future__ import annotations

import argparse
import sys

from pipeline.settings import add_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("start", "stop", "status"))
    add_settings(parser, "broker-port", "cache-dir")
    parser.add_argument("--port", dest="broker_port", type=int, default=argparse.SUPPRESS,
                        help="alias of --broker-port")
    parser.add_argument("--data-dir", default=None,
                        help="broker data and log dir [default: <cache-dir>/brokers/<port>]; stop and status find "
                             "the broker by it, whatever its port")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for start or stop")
    parser.epilog = ("The client listener asks for a SCRAM login when the Kafka settings say so: security_protocol = "
                     '"SASL_PLAINTEXT", sasl_mechanism, sasl_username and sasl_password in the [kafka] table of '
                     "vmh.toml, or VMH_KAFKA_SECURITY_PROTOCOL and so on.")


def run(args: argparse.Namespace) -> int:
    from pipeline.bus.broker import BrokerError, broker_status, ensure_broker, stop_broker

    port, cache = args.broker_port, args.cache_dir
    where = f"on port {port}" if args.data_dir is None else f"with data dir {args.data_dir}"
    try:
        running = broker_status(port, cache_dir=cache, data_dir=args.data_dir)
        if args.action == "status":
            if running is None:
                print(f"no broker runs {where}")
                return 1
            print(f"broker pid {running.pid} serves {running.bootstrap} ({running.security}), "
                  f"data in {running.data_dir}")
        elif args.action == "start":
            if running is not None:
                print(f"already running: pid {running.pid} serves {running.bootstrap} ({running.security}), "
                      f"data in {running.data_dir}")
            if running is not None and running.port != port:
                return 0
            bootstrap = ensure_broker(port, data_dir=args.data_dir, cache_dir=cache, timeout_s=args.timeout)
            if running is None:
                state = broker_status(port, cache_dir=cache)
                print(f"started: pid {state.pid} serves {bootstrap} ({state.security}), data in {state.data_dir}")
        else:
            stopped = stop_broker(port, cache_dir=cache, timeout_s=args.timeout, data_dir=args.data_dir)
            print(f"stopped broker pid {stopped.pid} on port {stopped.port}" if stopped else f"no broker runs {where}")
    except BrokerError as e:
        print(f"vmh broker {args.action}: {e}", file=sys.stderr)
        return 2
    return 0
