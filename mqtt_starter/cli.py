"""Command line: arguments → settings → logging → platform.run(...) → exit code."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mqtt_starter import __version__
from mqtt_starter.config import (
    LogSettings,
    MqttSettings,
    Settings,
    file_problems,
    load_settings,
    settings_from_mapping,
)
from mqtt_starter.core.errors import EXIT_CONFIG, ConfigError, MqttStarterError
from mqtt_starter.ops import platform
from mqtt_starter.ops.logs import configure_logging
from mqtt_starter.ops.platform import StopSignals

if TYPE_CHECKING:
    from mqtt_starter.simulators.cloud.server import CloudSimulator
    from mqtt_starter.simulators.qrs.server import QrsSimulator

# Each command imports what it needs when it runs: the daemon then does not carry the
# simulator, the demo or certificate generation in memory (about 10 MiB).


def default_config() -> Path:
    """`-c`'s default: $MQTT_STARTER_CONFIG (the container image sets /config/...), else this
    platform's place (/etc/mqtt-starter/ or %ProgramData%\\mqtt-starter\\)."""
    return Path(os.environ.get("MQTT_STARTER_CONFIG") or platform.default_config_path())


def _config_failed(error: ConfigError) -> int:
    print("mqtt-starter: invalid configuration:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _run(args: argparse.Namespace) -> int:
    path: Path = args.config

    def load() -> Settings:
        settings = load_settings(path)
        problems = file_problems(settings)
        if problems:
            raise ConfigError(problems)
        return settings

    try:
        settings = load()
    except ConfigError as error:
        return _config_failed(error)
    configure_logging(settings.log)
    from mqtt_starter.daemon import Daemon

    try:
        return platform.run(Daemon(settings, reload=load, config_path=path).run())
    except ConfigError as error:
        # A certificate or key that exists but cannot be used shows only when it is loaded.
        return _config_failed(error)


def _check(args: argparse.Namespace) -> int:
    from mqtt_starter.commands.check import run_checks

    checks, code = platform.run(run_checks(args.config))
    print(f"mqtt-starter check: {args.config}")
    for check in checks:
        print(check.line())
    print("everything works" if code == 0 else "something does not work: see FAIL above")
    return code


def _tasks(args: argparse.Namespace) -> int:
    from mqtt_starter.commands.tasks import list_tasks, parse_selectors, render_json, render_table

    try:
        settings = load_settings(args.config)
        selectors = parse_selectors(args.id, args.tag, args.cp, args.name, args.space)
    except ConfigError as error:
        return _config_failed(error)
    except ValueError as exc:
        print(f"mqtt-starter: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log.model_copy(update={"level": "WARNING"}))
    try:
        resolution = platform.run(list_tasks(settings, selectors))
    except MqttStarterError as exc:
        print(f"mqtt-starter: {exc}", file=sys.stderr)
        return 1
    print(render_json(settings, resolution) if args.json else render_table(settings, resolution))
    return 0


def _health(args: argparse.Namespace) -> int:
    from mqtt_starter.commands.health import check_health

    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        return _config_failed(error)
    health = check_health(settings)
    print(
        f"mqtt-starter health: {health.line}", file=sys.stdout if health.code == 0 else sys.stderr
    )
    return health.code


def _demo(args: argparse.Namespace) -> int:
    from mqtt_starter.commands.demo import run_demo

    configure_logging(LogSettings(level="WARNING"))
    return platform.run(run_demo(sys.stdout, once=args.once, port=args.port, cloud=args.cloud))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqtt-starter",
        description="Start Qlik Sense tasks when a machine publishes an MQTT message.",
    )
    parser.add_argument("--version", action="version", version=f"mqtt-starter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    configured = {}
    for name, text in (
        ("run", "run the daemon"),
        ("check", "validate the configuration, reach the broker and the site, say what fails"),
        ("tasks", "resolve selectors against the site and list the tasks; starts nothing"),
        ("health", "exit 0 when the local daemon's /readyz says ready (a container health check)"),
    ):
        configured[name] = commands.add_parser(name, help=text)
        configured[name].add_argument(
            "-c",
            "--config",
            type=Path,
            default=default_config(),
            help=f"configuration file (default: {default_config()})",
        )
    tasks = configured["tasks"]
    tasks.add_argument("--id", action="append", default=[], metavar="ID", help="task id")
    tasks.add_argument("--tag", action="append", default=[], metavar="TAG", help="tag")
    tasks.add_argument(
        "--cp", action="append", default=[], metavar="NAME=VALUE", help="custom property value"
    )
    tasks.add_argument("--name", action="append", default=[], metavar="NAME", help="task name")
    tasks.add_argument(
        "--space", action="append", default=[], metavar="SPACE", help="Qlik Cloud space name"
    )
    tasks.add_argument("--json", action="store_true", help="print JSON instead of a table")

    demo = commands.add_parser(
        "demo",
        help="a local broker, the QRS simulator and the daemon, end to end, with a short tour",
    )
    demo.add_argument("--once", action="store_true", help="play the tour, then stop and exit")
    demo.add_argument(
        "--cloud", action="store_true", help="the tour against the Qlik Cloud simulator"
    )
    demo.add_argument(
        "--port",
        type=int,
        default=1883,
        help="the broker's port when it is free (default 1883, where the example flow"
        " connects; 0: any free port)",
    )

    trig = commands.add_parser(
        "trigger",
        help="start tasks through a running daemon and say in the exit code how it went",
        description="Exit codes: 0 everything started (--wait: every run succeeded); 1 a run"
        " did not succeed; 2 not everything started; 3 the wait timed out; 4 no answer;"
        " 78 bad configuration or arguments.",
    )
    for flag, meta, text in (
        ("--id", "ID", "task id (Qlik Cloud: app id)"),
        ("--tag", "TAG", "tag"),
        ("--cp", "NAME=VALUE", "custom property value"),
        ("--name", "NAME", "task name"),
        ("--space", "NAME", "Qlik Cloud space"),
    ):
        trig.add_argument(flag, action="append", default=[], metavar=meta, help=text)
    trig.add_argument("--wait", action="store_true", help="follow the runs to their end")
    trig.add_argument("--timeout", type=float, help="with --wait: longest wait in seconds")
    trig.add_argument("--dry-run", action="store_true", help="check everything, start nothing")
    trig.add_argument("--json", action="store_true", help="print the replies as received")
    trig.add_argument("-c", "--config", type=Path, help="take the broker from this configuration")
    trig.add_argument("--broker", metavar="HOST[:PORT]", help="the broker (default: localhost)")
    trig.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version")
    trig.add_argument("--username", help="broker user name")
    trig.add_argument("--password-file", type=Path, help="file holding the broker password")
    trig.add_argument("--tls", action="store_true", help="connect over TLS")
    trig.add_argument("--ca-file", type=Path, help="with --tls: the broker's CA")
    trig.add_argument("--cert-file", type=Path, help="with --tls: a client certificate")
    trig.add_argument("--key-file", type=Path, help="with --tls: its key")
    trig.add_argument("--base-topic", help="the daemon's mqtt.base_topic (default: butler)")
    trig.add_argument(
        "--reply-timeout", type=float, default=30.0, help="seconds to wait for the first reply"
    )

    sim = commands.add_parser("simulate-qrs", help="run the QRS simulator (HTTPS, mutual TLS)")
    sim.add_argument("--tasks", type=Path, help="task fixture (YAML or JSON); default: samples")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=4242, help="port to listen on (0: any free)")
    sim.add_argument(
        "--cert-dir",
        type=Path,
        default=None,
        help="where root.pem, client.pem and client_key.pem are written or reused",
    )
    sim.add_argument(
        "--cert-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another name on the server certificate (a container's service name, say)",
    )
    sim.add_argument("--prefix", default="", help="virtual proxy prefix (proxy mode)")
    sim.add_argument(
        "--token",
        default=None,
        help="bearer token required instead of a client certificate (proxy mode)",
    )
    sim.add_argument(
        "--session-limit",
        type=int,
        default=5,
        help="proxy mode: parallel proxy sessions a user may hold",
    )
    sim.add_argument(
        "--bad-token",
        choices=("redirect", "401", "html"),
        default="redirect",
        help="proxy mode: how a bad token is answered",
    )
    cloud = commands.add_parser(
        "simulate-cloud", help="run the Qlik Cloud simulator (HTTPS, API keys and OAuth)"
    )
    cloud.add_argument("--apps", type=Path, help="tenant fixture (YAML or JSON); default: samples")
    cloud.add_argument("--host", default="127.0.0.1", help="address to listen on")
    cloud.add_argument("--port", type=int, default=8443, help="port to listen on (0: any free)")
    cloud.add_argument(
        "--cert-dir", type=Path, default=None, help="where root.pem is written or reused"
    )
    return parser


async def _serve_until_signal(sim: QrsSimulator) -> None:
    stop = asyncio.Event()
    StopSignals(asyncio.get_running_loop(), stop.set).install()
    await sim.start()
    certs = sim.certs
    print(f"QRS simulator on {sim.url} with {len(sim.fixture.tasks)} tasks", flush=True)
    print(f"certificates in {certs.folder}", flush=True)
    auth = (
        f"-H 'Authorization: Bearer {sim.token}'"
        if sim.token
        else f"--cert {certs.client} --key {certs.client_key}"
    )
    print(
        f"try: curl --cacert {certs.root} {auth} -H 'X-Qlik-Xrfkey: 0123456789abcdef' "
        "-H 'X-Qlik-User: UserDirectory=INTERNAL; UserId=sa_repository' "
        f"'{sim.url}/qrs/task?xrfkey=0123456789abcdef'",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await sim.stop()


def _simulate_qrs(args: argparse.Namespace) -> int:
    from mqtt_starter.simulators.certs import default_cert_dir, ensure_certificates
    from mqtt_starter.simulators.qrs.fixtures import FixtureError, load_fixture
    from mqtt_starter.simulators.qrs.server import QrsSimulator

    try:
        fixture = load_fixture(args.tasks)
    except (FixtureError, OSError) as exc:
        print(f"mqtt-starter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    certs = ensure_certificates(args.cert_dir or default_cert_dir(), (args.host, *args.cert_name))
    sim = QrsSimulator(
        fixture,
        certs,
        host=args.host,
        port=args.port,
        prefix=args.prefix,
        token=args.token,
        session_limit=args.session_limit,
        bad_token=args.bad_token,
    )
    platform.run(_serve_until_signal(sim))
    return 0


async def _serve_cloud_until_signal(sim: CloudSimulator) -> None:
    stop = asyncio.Event()
    StopSignals(asyncio.get_running_loop(), stop.set).install()
    await sim.start()
    fixture = sim.fixture
    print(f"Qlik Cloud simulator on {sim.url} with {len(fixture.apps)} apps", flush=True)
    print(f"CA certificate: {sim.certs.root}", flush=True)
    key = fixture.api_keys[0] if fixture.api_keys else "<api key>"
    print(
        f"try: curl --cacert {sim.certs.root} -H 'Authorization: Bearer {key}'"
        f" '{sim.url}/api/v1/items?resourceType=app'",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await sim.stop()


def _simulate_cloud(args: argparse.Namespace) -> int:
    from mqtt_starter.simulators.certs import default_cert_dir, ensure_certificates
    from mqtt_starter.simulators.cloud.fixtures import FixtureError, load_cloud_fixture
    from mqtt_starter.simulators.cloud.server import CloudSimulator

    try:
        fixture = load_cloud_fixture(args.apps)
    except (FixtureError, OSError) as exc:
        print(f"mqtt-starter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    folder = args.cert_dir or default_cert_dir().with_name("cloud-sim")
    certs = ensure_certificates(folder, (args.host,))
    platform.run(
        _serve_cloud_until_signal(CloudSimulator(fixture, certs, host=args.host, port=args.port))
    )
    return 0


def _trigger(args: argparse.Namespace) -> int:
    from mqtt_starter.commands.trigger import Ask, trigger

    try:
        settings = _trigger_broker(args)
    except ConfigError as error:
        return _config_failed(error)
    custom = []
    for text in args.cp:
        name, sep, value = text.partition("=")
        if not sep or not name:
            print(f"mqtt-starter trigger: --cp {text!r}: expected NAME=VALUE", file=sys.stderr)
            return EXIT_CONFIG
        custom.append((name, value))
    ask = Ask(
        task_ids=args.id,
        tags=args.tag,
        custom_properties=custom,
        names=args.name,
        spaces=args.space,
        wait=args.wait,
        timeout_s=args.timeout,
        dry_run=args.dry_run,
    )
    if ask.empty():
        print(
            "usage: mqtt-starter trigger [--id ID]... [--tag TAG]... [--cp NAME=VALUE]..."
            " [--name NAME]... [--space NAME]... [--wait] ...",
            file=sys.stderr,
        )
        print("mqtt-starter trigger: say what to start: --id, --tag, --cp, --name or --space",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    return platform.run(
        trigger(settings, ask, reply_timeout_s=args.reply_timeout, as_json=args.json)
    )


def _trigger_broker(args: argparse.Namespace) -> MqttSettings:
    """The broker settings: the configuration's (`-c`), or the flags' (default localhost)."""
    if args.config is not None:
        settings = load_settings(args.config).mqtt
        return settings.model_copy(
            update={"base_topic": args.base_topic} if args.base_topic else {}
        )
    broker = args.broker or "localhost"
    host, colon, port = broker.rpartition(":")
    if not colon:
        host, port = broker, ""
    values: dict[str, object] = {"host": host, "protocol": args.protocol}
    if port:
        values["port"] = port
    if args.username:
        values["username"] = args.username
    if args.password_file:
        try:
            values["password"] = args.password_file.read_text("utf-8").strip()
        except OSError as exc:
            raise ConfigError.unusable("--password-file", args.password_file, exc) from None
    if args.tls:
        values["tls"] = {
            "enabled": True,
            "ca_file": args.ca_file,
            "cert_file": args.cert_file,
            "key_file": args.key_file,
        }
    if args.base_topic:
        values["base_topic"] = args.base_topic
    # The site is not this command's business: any will do for the broker's settings.
    return settings_from_mapping({"mqtt": values, "qrs": {"url": "https://unused"}}, {}).mqtt


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(arguments)
    except SystemExit as exc:
        # For schedulers, a bad trigger call is a configuration error (78), as documented.
        if exc.code == 2 and arguments[:1] == ["trigger"]:
            return EXIT_CONFIG
        raise
    commands = {
        "run": _run,
        "check": _check,
        "health": _health,
        "tasks": _tasks,
        "demo": _demo,
        "simulate-qrs": _simulate_qrs,
        "simulate-cloud": _simulate_cloud,
        "trigger": _trigger,
    }
    return commands[args.command](args)
