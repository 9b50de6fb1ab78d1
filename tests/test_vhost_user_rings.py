"""The vhost-user ring state table (:mod:`virtio_schema.vhost_user.rings`), on its own.

The module's reading of vhost-user.rst ("Ring states"): a ring is *started* from SET_VRING_KICK to
GET_VRING_BASE and *enabled* by SET_VRING_ENABLE, and whether it is enabled is remembered while it
is stopped. So each state is a pair (started, enabled): START sets the first, STOP clears it,
ENABLE sets the second, DISABLE clears it. The device hears a change through its hooks, always
well nested: ``started`` before ``enabled``, ``disabled`` before ``stopped``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_schema.vhost_user.rings import (
    TRANSITIONS,
    RingEvent,
    RingState,
    hooks,
    transition,
)

_S = RingState
_E = RingEvent


def _pair(state: RingState) -> tuple[bool, bool]:
    return state.started, state.enabled


def _state_of(started: bool, enabled: bool) -> RingState:
    (state,) = [s for s in RingState if _pair(s) == (started, enabled)]
    return state


def _spec_reading(state: RingState, event: RingEvent) -> RingState:
    """Where the module docstring says ``event`` takes a ring in ``state``."""
    started, enabled = _pair(state)
    if event is RingEvent.START:
        started = True
    elif event is RingEvent.STOP:
        started = False
    elif event is RingEvent.ENABLE:
        enabled = True
    else:
        enabled = False
    return _state_of(started, enabled)


# --- the table -----------------------------------------------------------------------------------


def test_each_state_is_one_pair_of_started_and_enabled() -> None:
    assert sorted(_pair(s) for s in RingState) == sorted(itertools.product((False, True), repeat=2))


def test_the_table_has_an_entry_for_every_state_and_event_and_nothing_else() -> None:
    assert set(TRANSITIONS) == set(itertools.product(RingState, RingEvent))
    assert len(TRANSITIONS) == len(RingState) * len(RingEvent)
    for (state, event), new in TRANSITIONS.items():
        assert transition(state, event) is new


@pytest.mark.parametrize(("state", "event"), list(itertools.product(RingState, RingEvent)))
def test_every_transition_sets_or_clears_one_of_started_and_enabled(
    state: RingState, event: RingEvent
) -> None:
    assert transition(state, event) is _spec_reading(state, event)


def test_a_ring_enabled_before_its_kick_starts_enabled() -> None:
    assert transition(_S.STOPPED, _E.ENABLE) is _S.STOPPED_ENABLED
    assert transition(_S.STOPPED_ENABLED, _E.START) is _S.STARTED_ENABLED


def test_a_ring_started_with_protocol_features_starts_disabled() -> None:
    assert transition(_S.STOPPED, _E.START) is _S.STARTED_DISABLED


def test_a_stop_keeps_the_enabled_bit_and_a_restart_is_enabled_again() -> None:
    stopped = transition(_S.STARTED_ENABLED, _E.STOP)
    assert stopped is _S.STOPPED_ENABLED
    assert transition(stopped, _E.START) is _S.STARTED_ENABLED


def test_a_new_kick_fd_on_a_started_ring_changes_nothing() -> None:
    for state in (_S.STARTED_DISABLED, _S.STARTED_ENABLED):
        assert transition(state, _E.START) is state
        assert hooks(state, transition(state, _E.START)) == ()


# --- hooks ---------------------------------------------------------------------------------------


def test_hooks_of_a_ring_going_away_disable_before_they_stop() -> None:
    assert hooks(_S.STARTED_ENABLED, _S.STOPPED) == ("disabled", "stopped")
    assert hooks(_S.STARTED_ENABLED, _S.STOPPED_ENABLED) == ("disabled", "stopped")


def test_hooks_of_a_ring_coming_start_before_they_enable() -> None:
    assert hooks(_S.STOPPED, _S.STARTED_ENABLED) == ("started", "enabled")
    assert hooks(_S.STOPPED_ENABLED, _S.STARTED_ENABLED) == ("started", "enabled")


def test_each_single_step_calls_its_one_hook_and_a_stopped_ring_hears_nothing() -> None:
    assert hooks(_S.STOPPED, _S.STARTED_DISABLED) == ("started",)
    assert hooks(_S.STARTED_DISABLED, _S.STARTED_ENABLED) == ("enabled",)
    assert hooks(_S.STARTED_ENABLED, _S.STARTED_DISABLED) == ("disabled",)
    assert hooks(_S.STARTED_DISABLED, _S.STOPPED) == ("stopped",)
    # enabling or disabling a stopped ring: the device hears nothing (it has no queue)
    assert hooks(_S.STOPPED, _S.STOPPED_ENABLED) == ()
    assert hooks(_S.STOPPED_ENABLED, _S.STOPPED) == ()


@pytest.mark.parametrize("state", list(RingState))
def test_no_change_calls_no_hook(state: RingState) -> None:
    assert hooks(state, state) == ()


# --- the device's view over any history ----------------------------------------------------------


class _DeviceView:
    """What a device that follows the hooks believes; every hook is checked against it."""

    def __init__(self) -> None:
        self.started = False
        self.enabled = False

    def hear(self, name: str) -> None:
        if name == "started":
            assert not self.started, "started twice without a stop"
            self.started = True
        elif name == "enabled":
            assert self.started, "enabled before started"
            assert not self.enabled, "enabled twice without a disable"
            self.enabled = True
        elif name == "disabled":
            assert self.enabled, "disabled without an enable"
            self.enabled = False
        elif name == "stopped":
            assert self.started, "stopped without a start"
            assert not self.enabled, "stopped while still enabled (no disabled first)"
            self.started = False
        else:
            raise AssertionError(f"unknown hook {name!r}")


@given(st.lists(st.sampled_from(list(RingEvent)), max_size=40))
def test_over_any_event_sequence_device_hooks_are_well_nested(events: list[RingEvent]) -> None:
    state = RingState.STOPPED
    device = _DeviceView()
    for event in events:
        new = transition(state, event)
        for name in hooks(state, new):
            device.hear(name)
        state = new
        # the device's belief matches the ring: started, and live (started and enabled)
        assert device.started == state.started
        assert device.enabled == (state is RingState.STARTED_ENABLED)
    # a final stop and disable always leave the device with nothing
    for event in (RingEvent.DISABLE, RingEvent.STOP):
        new = transition(state, event)
        for name in hooks(state, new):
            device.hear(name)
        state = new
    assert (device.started, device.enabled) == (False, False)
    assert state is RingState.STOPPED


@given(
    st.sampled_from(list(RingState)),
    st.sampled_from(list(RingState)),
)
def test_hooks_between_any_two_states_are_well_nested(old: RingState, new: RingState) -> None:
    device = _DeviceView()
    device.started = old.started
    device.enabled = old is RingState.STARTED_ENABLED
    for name in hooks(old, new):
        device.hear(name)
    assert device.started == new.started
    assert device.enabled == (new is RingState.STARTED_ENABLED)
