"""`vmh ui`: the web view. Open http://127.0.0.1:8765 (``--ui-address``, ``--ui-port``).

A thin loop around :class:`pipeline.ui.view.LiveView`: one group-less read_committed consumer reads the whole
queries topic and the last ``--ui-history`` seconds of the keyframes, matches and errors topics, then follows
them; every change goes to the open pages as a server-sent event (``pipeline.ui.app``). Being group-less, every
instance sees everything, so any number of them can run behind a load balancer and a restarted one rebuilds its
view from the log. ``/healthz`` answers 503 once the consumer loop has not completed a poll for
``--health-deadline`` seconds.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

from pipeline.settings import add_settings

log = logging.getLogger(__name__)
SHOWN = ("queries", "keyframes", "matches", "errors")  # topic kinds the view reads; queries first in every poll


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "ui-address", "ui-port", "ui-history", "ui-keyframe-memory", "checkpoint",
                 "bootstrap-servers", "topic-prefix", "health-deadline")


def address(host: str, port: int) -> str:
    """The page's URL for a bind address (a wildcard address is reached as localhost)."""
    host = "localhost" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from kafka.errors import KafkaError

    from pipeline.bus.kafka import BusError, bootstrap_servers
    from pipeline.bus.topics import create_topics, topics
    from pipeline.client import Client
    from pipeline.ui.app import LOOPBACK_HOSTS, Hub, UiServer, create_app
    from pipeline.ui.view import LiveView
    from workers.common import EXIT_BUS
    from workers.metrics import Heartbeat

    bootstrap = bootstrap_servers(args.bootstrap_servers)
    names = topics(args.topic_prefix)
    create_topics(bootstrap, prefix=args.topic_prefix)
    view, hub, heartbeat = LiveView(int(args.ui_keyframe_memory * 2**20)), Hub(), Heartbeat(args.health_deadline)
    client = Client(bootstrap, args.topic_prefix, checkpoint=args.checkpoint or None)
    app = create_app(view, hub, client, heartbeat, loopback_only=args.ui_address in LOOPBACK_HOSTS)
    server = UiServer(uvicorn.Config(app, host=args.ui_address, port=args.ui_port, log_config=None, access_log=False,
                                     timeout_graceful_shutdown=2), hub)
    stop, failed = threading.Event(), []

    def follow() -> None:
        try:
            feed(names, bootstrap, args.ui_history, view, hub, heartbeat, stop)
        except (BusError, KafkaError) as e:
            log.error("giving up on the bus: %s; exiting with code %d", e, EXIT_BUS)
            failed.append(e)
            server.should_exit = True

    consumer_thread = threading.Thread(target=follow, name="ui-feed", daemon=True)
    consumer_thread.start()
    log.info("web view running", extra={"fields": {"url": address(args.ui_address, args.ui_port),
                                                   "prefix": args.topic_prefix}})
    try:
        server.run()
    finally:
        stop.set()
        consumer_thread.join(10)
    return EXIT_BUS if failed else 0


def feed(names, bootstrap: str, history_s: float, view, hub, heartbeat, stop: threading.Event) -> None:
    """Read the view's topics into ``view`` and their events into ``hub`` until ``stop``."""
    from pipeline.bus.kafka import read_committed_consumer

    kinds = {names.name(kind): kind for kind in SHOWN}
    consumer = read_committed_consumer(list(kinds), bootstrap=bootstrap)
    try:
        recent = [tp for tp in consumer.assignment() if tp.topic != names.queries]
        since_ms = int((time.time() - history_s) * 1000)
        found, ends = consumer.offsets_for_times({tp: since_ms for tp in recent}), consumer.end_offsets(recent)
        for tp in recent:
            consumer.seek(tp, found[tp].offset if found.get(tp) is not None else ends[tp])
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=500)
            for tp in sorted(polled, key=lambda tp: SHOWN.index(kinds[tp.topic])):
                for record in polled[tp]:
                    hub.publish(view.apply(kinds[tp.topic], record.key, record.value))
            heartbeat.beat()
    finally:
        consumer.close()
