"""The vhost-user server options every example's command line shares.

``add_server_arguments(parser)`` adds ``--vhost-user``, ``--trace``, ``--max-connections`` and the
server's defences (``--io-timeout``, ``--budget``, ``--max-clients``, ``--memory-policy``) and
``--busy-poll``;
``make_server(args, factory)`` builds the :class:`~virtio_schema.vhost_user.VhostUserServer` they
describe.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from virtio_schema.vhost_user import MemoryPolicy, VhostUserDevice, VhostUserServer

__all__ = ["add_server_arguments", "make_server"]


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vhost-user", metavar="SOCKET", required=True, help="unix socket to listen on")
    p.add_argument("--trace", action="store_true", help="log every vhost-user message decoded")
    p.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="exit after N front-ends have come and gone (default: serve until stopped)",
    )
    p.add_argument(
        "--io-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="a front-end must send each whole message within this time (default 5)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        metavar="CHAINS",
        help="chains served per turn of a ring before the others get theirs (default: queue size)",
    )
    p.add_argument(
        "--max-clients", type=int, default=64, metavar="N", help="connections at once (default 64)"
    )
    p.add_argument(
        "--memory-policy",
        choices=[m.value for m in MemoryPolicy],
        default=MemoryPolicy.TRUST.value,
        help="guest memory that cannot be sealed against shrinking: trust the front-end (and log"
        " it) or refuse it (default trust)",
    )
    p.add_argument(
        "--busy-poll",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep polling a ring, its kicks off, for this long after its last turn that found"
        " work (default 0: wait for kicks; a streaming driver is served faster with 0.0005, at"
        " the cost of a busy CPU)",
    )


def make_server(
    args: argparse.Namespace,
    factory: Callable[[], VhostUserDevice],
    *,
    capture: str | None = None,
) -> VhostUserServer:
    return VhostUserServer(
        args.vhost_user,
        factory,
        trace=args.trace,
        capture=capture,
        io_timeout=args.io_timeout,
        budget=args.budget,
        max_clients=args.max_clients,
        memory_policy=MemoryPolicy(args.memory_policy),
        busy_poll=args.busy_poll,
    )
