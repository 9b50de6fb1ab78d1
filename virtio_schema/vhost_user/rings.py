"""vhost-user ring states as a table: what each message does to a ring, and what the device hears.

Theory of operation. vhost-user.rst ("Ring states") gives a ring three states: *stopped* (the
back-end must not process it at all), *started but disabled* (processed without side effects: the
device is not handed its chains) and *started and enabled*. A ring starts with SET_VRING_KICK and
stops with GET_VRING_BASE; SET_VRING_ENABLE enables and disables it. Whether a ring is enabled is
tracked while it is stopped too (the reading QEMU's libvhost-user and the 2023 clarification of the
specification share): a ring enabled before its kick arrives starts enabled, and SET_FEATURES
without ``VHOST_USER_F_PROTOCOL_FEATURES`` simply enables every ring. So the table has four states,
two of which the specification calls "stopped".

Rules of this module:

1. Every change of a ring's state is a lookup in :data:`TRANSITIONS`; no other code decides where a
   ring goes. :func:`hooks` names the device hooks a change calls, in order.
2. No I/O and no knowledge of queues: states and events only (the back-end acts on them).
"""

from __future__ import annotations

import enum

__all__ = ["TRANSITIONS", "RingEvent", "RingState", "hooks", "transition"]


class RingState(enum.Enum):
    """Where a ring is. ``started`` and ``enabled`` say which of the specification's states."""

    STOPPED = "stopped"
    """Stopped, and disabled (the initial state with protocol features)."""
    STOPPED_ENABLED = "stopped (enabled)"
    """Stopped, but enabled already: it starts enabled."""
    STARTED_DISABLED = "started but disabled"
    STARTED_ENABLED = "started and enabled"

    @property
    def started(self) -> bool:
        return self in (RingState.STARTED_DISABLED, RingState.STARTED_ENABLED)

    @property
    def enabled(self) -> bool:
        return self in (RingState.STOPPED_ENABLED, RingState.STARTED_ENABLED)


class RingEvent(enum.Enum):
    """What can happen to a ring."""

    START = "start"
    """SET_VRING_KICK (with an fd, or NOFD for polling) once size, addresses and memory are known."""
    STOP = "stop"
    """GET_VRING_BASE, RESET_OWNER, a kick fd at end-of-file, the connection closing."""
    ENABLE = "enable"
    """SET_VRING_ENABLE 1, or SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES."""
    DISABLE = "disable"
    """SET_VRING_ENABLE 0."""


_S = RingState
_E = RingEvent

TRANSITIONS: dict[tuple[RingState, RingEvent], RingState] = {
    (_S.STOPPED, _E.START): _S.STARTED_DISABLED,
    (_S.STOPPED, _E.STOP): _S.STOPPED,
    (_S.STOPPED, _E.ENABLE): _S.STOPPED_ENABLED,
    (_S.STOPPED, _E.DISABLE): _S.STOPPED,
    (_S.STOPPED_ENABLED, _E.START): _S.STARTED_ENABLED,
    (_S.STOPPED_ENABLED, _E.STOP): _S.STOPPED_ENABLED,
    (_S.STOPPED_ENABLED, _E.ENABLE): _S.STOPPED_ENABLED,
    (_S.STOPPED_ENABLED, _E.DISABLE): _S.STOPPED,
    (_S.STARTED_DISABLED, _E.START): _S.STARTED_DISABLED,  # a new kick fd: nothing changes
    (_S.STARTED_DISABLED, _E.STOP): _S.STOPPED,
    (_S.STARTED_DISABLED, _E.ENABLE): _S.STARTED_ENABLED,
    (_S.STARTED_DISABLED, _E.DISABLE): _S.STARTED_DISABLED,
    (_S.STARTED_ENABLED, _E.START): _S.STARTED_ENABLED,
    (_S.STARTED_ENABLED, _E.STOP): _S.STOPPED_ENABLED,
    (_S.STARTED_ENABLED, _E.ENABLE): _S.STARTED_ENABLED,
    (_S.STARTED_ENABLED, _E.DISABLE): _S.STARTED_DISABLED,
}
"""Every (state, event) pair and the state it leads to: the table is complete."""


def transition(state: RingState, event: RingEvent) -> RingState:
    """The state ``event`` leads to from ``state``."""
    return TRANSITIONS[state, event]


def hooks(old: RingState, new: RingState) -> tuple[str, ...]:
    """The device hooks a change from ``old`` to ``new`` calls, in order: ``disabled`` before
    ``stopped`` when a ring goes away, ``started`` before ``enabled`` when it comes. A device is
    handed a queue by ``started`` (it may look, not serve) and may serve it from ``enabled`` until
    ``disabled``."""
    calls: list[str] = []
    live_old = old is RingState.STARTED_ENABLED
    live_new = new is RingState.STARTED_ENABLED
    if live_old and not live_new:
        calls.append("disabled")
    if old.started and not new.started:
        calls.append("stopped")
    if new.started and not old.started:
        calls.append("started")
    if live_new and not live_old:
        calls.append("enabled")
    return tuple(calls)
