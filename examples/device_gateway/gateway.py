"""An MQTT 3.1.1 device gateway built on keepconn: it never accumulates dead connections.

Run it::

    python examples/device_gateway/gateway.py --host 127.0.0.1 --port 1883 \\
        --users users.txt --data telemetry.sqlite3 --hello-timeout 10 --status-port 8080

It prints ``listening on HOST:PORT`` once bound (``--port 0`` picks a free port and prints it)
and stops cleanly on SIGINT or SIGTERM. ``python gateway.py --help`` lists every option.
``python gateway.py passwd USERS_FILE USERNAME`` adds a user to the users file (hashed; see
:mod:`device_gateway.users`). With ``--tls-cert``/``--tls-key`` it speaks MQTT over TLS (port
8883 by convention), with ``--tls-ca`` it accepts client certificates, and with
``--require-client-cert`` it demands one and takes the user from its CN.

What it does with each connection (the MQTT parts are in ``sessions.py``; keepconn does the
rest):

* **Hello** (:meth:`Gateway.identify`): under TLS the handshake first, then the first packet
  must be CONNECT, both within ``--hello-timeout``. Credentials are checked against ``--users``
  (``username:scrypt$...`` per line, written by the ``passwd`` command; clear-text lines only
  with ``--allow-plaintext-users``): a wrong password gets CONNACK 4, no username CONNACK 5, and
  the connection is closed
  with AUTH_FAILED; a device already connected with that client id is never disturbed. The
  session identity is ``(username, client id)``, so one user can never take over another
  user's device. An empty client id (clean session) gets one assigned.
* **Liveness**: each session's timeout is 1.5 x its CONNECT keepalive (MQTT-3.1.2-24), the
  keepalive first capped at ``--max-keepalive``; keepalive 0 means ``--idle-timeout``. Any
  complete packet counts as life, a trickle of partial bytes does not. TCP keepalive is set on
  every socket for devices that vanish while keepalive 0 lets them stay silent.
* **Session** (:meth:`Gateway.handler`): CONNACK 0 is sent once keepconn has opened the session
  (``Hello.welcome``: a takeover has already happened and admission/flapping checks have passed,
  so no client is welcomed and then refused). PUBLISH QoS
  0/1 goes to the telemetry sink (SQLite by default); a QoS 1 PUBLISH is acknowledged only once
  stored. Every PUBLISH is also delivered to the same user's sessions whose subscriptions match:
  that is how commands reach devices (a device subscribes to ``devices/<id>/commands/#`` and
  anyone logged in as that user publishes there). SUBSCRIBE is granted at most QoS 1.
  PINGREQ gets PINGRESP. DISCONNECT closes cleanly and discards the will; any other end (a
  dead, silent or misbehaving device) publishes the will to subscribers.
* **Refusals the client can see**: admission control (loop lag, accept rate,
  ``--max-sessions``) answers CONNACK 3 (server unavailable) and closes; so does a CONNECT for
  a client id banned for flapping or held as a duplicate (``Hello.refusal``).
* **Status**: with ``--status-port`` a loopback HTTP page (``GET /status`` JSON, ``GET /`` for
  humans) shows sessions, closes by reason, takeovers and the kernel's census of the port. It
  has no authentication, so it stays on 127.0.0.1 unless ``--status-host`` says otherwise.
* **Cluster** (``--cluster redis://HOST:PORT[/DB] --node-id NAME``): the gateway is one node
  of several sharing sessions through Redis (``keepconn.cluster``): a device that connects to
  another node is taken over there and its connection here is reset; while the store cannot
  be reached new CONNECTs get CONNACK 3 and live sessions end (OWNERSHIP_LOST) once the
  node's ``--node-ttl`` lease could have expired. ``--workers N`` runs N processes on one port
  (``workers.py``).
* **Metrics**: keepconn's Prometheus metrics (``keepconn.metrics``, the ``prometheus`` extra) at
  ``GET /metrics`` on the status page and, with ``--metrics-port``, on a port of their own
  (loopback unless ``--metrics-host`` says otherwise).

Sibling modules: ``options`` (the command line), ``sessions`` (the MQTT session logic:
``Gateway``), ``workers`` (``--workers``), ``mqtt_codec`` (the
sans-I/O protocol), ``sink`` (where telemetry goes), ``status`` (the HTTP page), ``topics``
(subscription matching). They are imported as ``device_gateway.*``: the package is installed
(``pip install -e examples``, which ``make setup`` runs), or the folder holding
``device_gateway`` is the current one and it runs as ``python -m device_gateway.gateway``.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from device_gateway.mqtt_codec import PROTOCOL_MAX_REMAINING_LENGTH
from device_gateway.options import build_parser
from device_gateway.sessions import Gateway, Options, Users, UsersFileError
from device_gateway.sink import Recorder, SQLiteSink
from device_gateway.status import Metrics, serve_metrics, serve_status
from device_gateway.topics import topic_matches
from device_gateway.users import CONVERT_HINT, passwd_main
from device_gateway.workers import for_worker, supervise
from keepconn import AdmissionConfig, FlappingConfig, GcPacing, ServerConfig, check_backend
from keepconn.tcp import TcpKeepalive

if TYPE_CHECKING:
    from keepconn.cluster import RedisCluster

__all__ = ["Gateway", "Users", "UsersFileError", "build_parser", "main", "topic_matches"]

logger = logging.getLogger("gateway")

#: Seconds between the socket audits behind the keepconn_audit_* metrics (each reads the
#: kernel's table in a worker thread; /status requests refresh them in between).
METRICS_AUDIT_INTERVAL = 15.0


# ----------------------------------------------------------------------------------------------
# From the command line (build_parser() is in options.py) to keepconn's objects.


def server_config(args: argparse.Namespace) -> ServerConfig:
    """keepconn's configuration from the command line."""
    keepalive = None
    if not args.no_tcp_keepalive:
        keepalive = TcpKeepalive(
            idle=args.tcp_keepalive_idle,
            interval=args.tcp_keepalive_interval,
            count=args.tcp_keepalive_count,
        )
    admission = None
    if not args.no_admission:
        admission = AdmissionConfig(
            accept_rate=args.accept_rate,
            accept_burst=args.accept_burst,
            max_pending_hellos=args.max_pending_hellos,
            max_sessions=args.max_sessions,
            max_loop_lag=None if args.no_load_shedding else args.max_loop_lag,
            max_accept_delay=None if args.no_load_shedding else args.max_accept_delay,
        )
    flapping = None
    if not args.no_flapping:
        flapping = FlappingConfig(
            max_hellos=args.flap_max_hellos, window=args.flap_window, ban=args.flap_ban
        )
    return ServerConfig(
        idle_timeout=args.idle_timeout,
        resolution=args.resolution,
        hello_timeout=args.hello_timeout,
        keepalive=keepalive,
        admission=admission,
        flapping=flapping,
        shutdown_grace=args.shutdown_grace,
        gc_pacing=None if args.no_gc_pacing else gc_pacing(args),
    )


def gc_pacing(args: argparse.Namespace) -> GcPacing:
    """Full collections of 15,000 connections' objects stall the loop for 0.2-0.4 s each,
    and a storm sets off one every second or two: they wait until the storm is over. And
    rather than walked, what survives is frozen at every look, as a storm's tail of late
    devices would meet that collection too, and between storms the messages devices send
    bring one on within a minute; but only where a closed session is freed by reference
    counting (plain TCP on asyncio and uvloop, tested): elsewhere frozen garbage cycles would
    be kept until the thaw. The young collections at every look are on either way."""
    native = not args.tls_cert and args.backend in ("asyncio", "uvloop")
    return GcPacing(freeze=native and not args.gc_collect)


def cluster_of(args: argparse.Namespace) -> RedisCluster | None:
    """The cluster store adapter from the command line (None without ``--cluster``); raises
    ImportError without the redis extra and ValueError (ConfigError) for a bad value."""
    if not args.cluster:
        return None
    from keepconn.cluster import ClusterConfig, RedisCluster, node_id_default

    if not args.cluster.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--cluster takes redis://HOST:PORT[/DB], got {args.cluster!r}")
    config = ClusterConfig(
        node_id=args.node_id or node_id_default(),
        node_ttl=args.node_ttl,
        store_timeout=args.store_timeout,
    )
    return RedisCluster(args.cluster, config)


def check_options(args: argparse.Namespace) -> None:
    """Combinations the parser cannot check; ValueError saying what to change."""
    if args.require_client_cert:
        if not args.tls_ca:
            raise ValueError("--require-client-cert needs --tls-ca (the CA of client certificates)")
        if args.users:
            raise ValueError("--users is not used with --require-client-cert (the CN is the user)")
    elif not args.users:
        raise ValueError("--users is required (or --require-client-cert with TLS)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key (TLS)")
    if args.node_id is not None and not args.cluster:
        raise ValueError("--node-id needs --cluster")


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from the command line, or None for plain MQTT."""
    if not args.tls_cert:
        return None
    # Python's defaults for a server: TLS 1.2 at least, no compression, strong ciphers.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except OSError as exc:  # ssl.SSLError included
        raise ValueError(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: {exc}") from None
    if args.tls_ca:
        try:
            context.load_verify_locations(args.tls_ca)
        except OSError as exc:
            raise ValueError(f"--tls-ca {args.tls_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if args.require_client_cert else ssl.CERT_OPTIONAL
    return context


def load_users(args: argparse.Namespace) -> Users | None:
    """The users table (None when users come from certificates)."""
    if not args.users:
        return None
    return Users.load(args.users, allow_plaintext=args.allow_plaintext_users)


def _format_address(address: Sequence[Any]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status."""
    users = load_users(args)
    if users is not None and users.plaintext:
        logger.warning(
            "INSECURE: users file %s holds %d clear-text password(s) (--allow-plaintext-users): "
            "whoever reads it can log in as those users; hash it with `%s`",
            args.users,
            users.plaintext,
            CONVERT_HINT.format(path=args.users),
        )
    context = tls_context(args)
    if context is not None:
        clients = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional"}.get(
            context.verify_mode, "required (the CN is the user)"
        )
        logger.info("TLS on (%s); client certificates: %s", args.tls_cert, clients)
    status_host = args.status_host or None  # '': every interface
    if args.status_port and (
        status_host is None or not ipaddress.ip_address(status_host).is_loopback
    ):
        logger.warning(
            "the status page listens on %s, and it has no authentication", status_host or "*"
        )
    cluster = cluster_of(args)
    if cluster is not None:
        logger.info(
            "cluster node %s on %s (node ttl %g s, store timeout %g s)",
            cluster.node_id,
            args.cluster,
            args.node_ttl,
            args.store_timeout,
        )
    gateway = Gateway(
        users,
        Recorder(SQLiteSink(args.data)),
        server_config(args),
        Options(
            max_keepalive=args.max_keepalive,
            max_packet=args.max_packet,
            certificate_users=args.require_client_cert,
        ),
        cluster=cluster,
    )
    metrics: Metrics | None = None
    try:
        metrics = gateway.enable_metrics()
    except ImportError as exc:
        # main() has refused --metrics-port without prometheus_client; the page does without.
        logger.info("no /metrics: %s", exc)
    # Installed before "listening on" is printed, so a signal sent the moment a supervisor
    # sees that line is a clean shutdown, not a KeyboardInterrupt traceback.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            listener = await anyio.create_tcp_listener(
                local_host=args.host or None,
                local_port=args.port,
                backlog=4096,
                reuse_port=args.reuse_port,
            )
            status_listener = None
            if args.status_port:
                # Loopback unless asked: the page has no authentication.
                status_listener = (
                    await anyio.create_tcp_listener(
                        local_host=status_host, local_port=args.status_port
                    )
                ).listeners[0]
            metrics_listeners: list[anyio.abc.SocketListener] = []
            if args.metrics_port:
                # '' binds every interface: IPv4 and IPv6, one listener each.
                multi = await anyio.create_tcp_listener(
                    local_host=args.metrics_host or None, local_port=args.metrics_port
                )
                metrics_listeners = cast("list[anyio.abc.SocketListener]", multi.listeners)
        except OSError as exc:
            print(f"gateway: cannot listen: {exc}", file=sys.stderr)
            gateway.recorder.sink.close()
            return 1
        first = listener.listeners[0]
        address = first.extra(SocketAttribute.local_address)
        gateway.port = first.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as outer:
            await outer.start(gateway.recorder.run)
            async with anyio.create_task_group() as tasks:
                await tasks.start(gateway.outbound.run)
                # serve() takes the SocketListeners themselves, not anyio's MultiListener.
                sockets = cast("list[anyio.abc.SocketListener]", list(listener.listeners))
                await tasks.start(
                    lambda task_status: gateway.server.serve(
                        sockets, ssl_context=context, task_status=task_status
                    )
                )
                if status_listener is not None:
                    await tasks.start(
                        partial(serve_status, metrics=metrics), gateway.snapshot, status_listener
                    )
                    status_at = _format_address(
                        status_listener.extra(SocketAttribute.local_address)
                    )
                    print(f"status on http://{status_at}/", flush=True)
                if metrics is not None and metrics_listeners:
                    for one in metrics_listeners:
                        await tasks.start(serve_metrics, metrics, one)
                    bound = metrics_listeners[0].extra(SocketAttribute.local_address)
                    print(f"metrics on http://{_format_address(bound)}/metrics", flush=True)
                if gateway.metrics is not None and metrics_listeners:
                    # The opt-in probes of keepconn.metrics, run only when a Prometheus server
                    # is expected (so the gateway's default load is what it always was): 50
                    # sleeps a second for the loop's lag, and an audit of the kernel's table
                    # now and then (in a worker thread).
                    tasks.start_soon(gateway.metrics.probe_loop_lag)
                    tasks.start_soon(gateway.metrics.audit_every, METRICS_AUDIT_INTERVAL)
                # Everything made so far (modules, the users table, the parser, ...) lives as
                # long as the process: out of the cyclic collector's sight, every full
                # collection walks only what connections made. Nothing made later is frozen, so
                # no garbage of a closed connection can be kept.
                gc.collect()
                gc.freeze()
                print(f"listening on {_format_address(address)}", flush=True)
                async for signum in signals:
                    logger.warning("%s: shutting down", signal.Signals(signum).name)
                    break
                await gateway.server.shutdown()
                tasks.cancel_scope.cancel()  # the status page and the deliveries
            # Every connection has ended: write what they queued, then stop.
            await gateway.recorder.aclose()
    gateway.recorder.sink.close()
    stats = gateway.server.stats()
    logger.info(
        "stopped: %d connections accepted, %d telemetry records stored",
        stats.accepted,
        gateway.recorder.stored,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the gateway on the chosen backend (or, with ``passwd``
    first, edit a users file)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["passwd"]:
        return passwd_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.worker_index is not None:
        for_worker(args)
    worker = "" if args.worker_index is None else f"[w{args.worker_index}] "
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {worker}%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        # A backend whose package is missing fails here, in one line naming the extra to
        # install, rather than as anyio's LookupError traceback once the loop is asked for.
        check_backend(args.backend)
        check_options(args)
        load_users(args)  # fail before binding anything, with the file's own message
        tls_context(args)
        if args.status_host:
            ipaddress.ip_address(args.status_host)  # an address, not a name: what it binds
        if args.max_packet > PROTOCOL_MAX_REMAINING_LENGTH:
            raise ValueError(f"--max-packet must be at most {PROTOCOL_MAX_REMAINING_LENGTH}")
        server_config(args)
        cluster_of(args)  # the URL, the node id, the ttl and timeout, and the redis extra
        if args.metrics_port:
            import keepconn.metrics  # noqa: F401 - fails, naming the extra, without it
    except (ValueError, ImportError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_index is None:
        return supervise(args, argv)
    backend = "trio" if args.backend == "trio" else "asyncio"
    options: dict[str, Any] = {"use_uvloop": True} if args.backend == "uvloop" else {}
    result: int = anyio.run(run, args, backend=backend, backend_options=options)
    return result


if __name__ == "__main__":
    # Run as a script or with -m, this module is __main__; nothing imports it a second time as
    # device_gateway.gateway (the package's __init__ imports nothing), so there is one copy.
    raise SystemExit(main())
