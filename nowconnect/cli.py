"""
The C{nowconnect} console command: C{nowconnect demo} and C{nowconnect check}.

The hub and agent themselves run under twistd (C{twistd -n nowconnect-hub --config ...});
this command is for trying NowConnect out and for checking a deployment:

 - C{demo} (L{nowconnect.demo}): hub, agent and echo target in one process, self-checked.
 - C{check} (L{nowconnect.check}): the users' ping-pong runbook against a running hub.

Exit statuses: 0 success, 1 a check failed, 2 bad arguments (argparse's own convention).
"""
# -*- test-case-name: tests.test_cli -*-

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence

from nowconnect import __version__

DEMO_HELP = """\
Start a local echo target, a hub (web port + a listener for connector "demo") and an agent in
one process on 127.0.0.1, wait until the agent is registered, push a ping-pong through the
listener and print the hub's /metrics counters with their deltas and a PASS or FAIL line.
Ports are ephemeral unless --port-base is given; the real addresses are printed. Without
--once it keeps serving (try `curl <web>/metrics` or `nowconnect check`) until Ctrl-C.
Exit status: 0 PASS (or a clean Ctrl-C after a PASS), 1 FAIL."""

CHECK_HELP = """\
The ping-pong runbook as one command. Steps, one PASS/FAIL/SKIP line each:
 1 hub /healthz answers 200;
 2 nowconnect_agents_connected{connector=NAME} >= 1 in /metrics;
 3 a round trip through the listener: plain TCP sends a ~30-byte probe and passes if it is
   echoed, answered, or the connection is neither closed nor reset within 1 s; with
   --ldap-base, an anonymous LDAP bind and base-scope search of DN (needs ldap3);
 4 deltas of nowconnect_tcp_connections_total{connector} (>= 1), nowconnect_tcp_bytes_total
   c2a (>= bytes sent) and a2c (>= bytes received), and the target connected (open_seconds).
A FAIL line names the likely cause and the log event to look for.
Exit status: 0 all passed, 1 a step failed, 2 bad arguments."""


def _port_base(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65534:
        raise argparse.ArgumentTypeError("must be between 1 and 65534 (N and N+1 are used)")
    return value


def _target(text: str) -> tuple[str, int]:
    from nowconnect.config import parse_target

    try:
        return parse_target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be > 0 and <= 3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (C{nowconnect --help}, C{nowconnect demo|check --help})."""
    parser = argparse.ArgumentParser(
        prog="nowconnect",
        description="NowConnect, a reverse TCP tunnel: try it out (demo) and check a "
                    "deployment (check). Hub and agent run under twistd: "
                    "twistd -n nowconnect-hub --config hub.yaml / nowconnect-agent.",
    )
    parser.add_argument("--version", action="version", version=f"nowconnect {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="hub, agent and echo target in one process, with a self-check",
        description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--once", action="store_true",
                      help="exit after the self-check (0 on PASS, 1 on FAIL, within 20 s)")
    demo.add_argument("--port-base", type=_port_base, metavar="N",
                      help="web port N and listener port N+1 (default: ephemeral ports)")
    demo.add_argument("-v", "--verbose", action="store_true",
                      help="log every event at info and above, not only NowConnect's own")
    # Test and experiment aids, documented in nowconnect.demo; they skip the self-check.
    demo.add_argument("--no-agent", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--target", type=_target, help=argparse.SUPPRESS)
    demo.add_argument("--allow-cidr", type=_cidr, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check", help="the ping-pong runbook against a running hub, as one command",
        description=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--hub", required=True, metavar="URL",
                       help="the hub's web port, e.g. http://nowconnect-cloud:8765")
    check.add_argument("--listener", required=True, metavar="HOST:PORT",
                       help="the hub listener for the connector, e.g. nowconnect-cloud:389")
    check.add_argument("--connector", required=True, metavar="NAME",
                       help="the connector behind that listener, e.g. addomain")
    check.add_argument("--ldap-base", metavar="DN",
                       help="round trip as an anonymous LDAP bind + base search of DN")
    check.add_argument("--timeout", type=_seconds, default=5.0, metavar="S",
                       help="per network operation (default: 5)")
    check.add_argument("--ca-file", metavar="PATH",
                       help="for an https:// hub: trust this CA bundle (default: the system's)")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object with every step instead of text lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the C{nowconnect} console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from nowconnect.demo import DemoOptions, run_demo

        if args.once and (args.no_agent or args.target or args.allow_cidr):
            parser.error("--once needs the self-check, which --no-agent, --target and "
                         "--allow-cidr skip")
        run_demo(DemoOptions(once=args.once, port_base=args.port_base, verbose=args.verbose,
                             no_agent=args.no_agent, target=args.target,
                             allow_cidr=args.allow_cidr))
    from nowconnect.check import UsageError, check_main, make_options

    try:
        options = make_options(args.hub, args.listener, args.connector, args.ldap_base,
                               args.timeout, args.ca_file)
    except UsageError as e:
        sys.stderr.write(f"nowconnect check: error: {e}\n")
        return 2
    return check_main(options, sys.stdout, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
