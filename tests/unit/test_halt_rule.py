"""The halt rule (halt.py) as a truth table, and the exit status of a signal."""

from __future__ import annotations

import signal

import pytest

from corevisor.halt import HaltState, machine_stuck
from corevisor.kvm import bindings as b
from corevisor.signals import describe, exit_status

HALTED, RUNNABLE = b.KVM_MP_STATE_HALTED, b.KVM_MP_STATE_RUNNABLE
WAIT_SIPI, INIT_RECEIVED = b.KVM_MP_STATE_UNINITIALIZED, b.KVM_MP_STATE_INIT_RECEIVED


@pytest.mark.parametrize(
    ("state", "stuck"),
    [
        (HaltState(HALTED, interrupts_on=False, nmi_can_wake=False), True),  # cli; hlt
        (HaltState(HALTED, interrupts_on=True, nmi_can_wake=False), False),  # sti; hlt
        (HaltState(HALTED, interrupts_on=False, nmi_can_wake=True), False),  # an NMI may come
        (HaltState(RUNNABLE, interrupts_on=False, nmi_can_wake=False), False),  # runs
        (HaltState(WAIT_SIPI, interrupts_on=False, nmi_can_wake=False), True),  # an idle AP
        (HaltState(INIT_RECEIVED, interrupts_on=True, nmi_can_wake=True), True),
    ],
)
def test_one_vcpu(state: HaltState, stuck: bool) -> None:
    assert state.stuck is stuck


def test_a_machine_is_stuck_only_if_every_vcpu_is_and_one_halted() -> None:
    halted = HaltState(HALTED, False, False)
    ap = HaltState(WAIT_SIPI, False, False)
    running = HaltState(RUNNABLE, True, False)
    assert machine_stuck([halted])
    assert machine_stuck([halted, ap])
    assert not machine_stuck([ap, ap])  # nothing halted: cannot happen, never reported
    assert not machine_stuck([halted, running])  # vCPU 1 may still send an NMI or INIT


def test_signal_exit_status_and_reason() -> None:
    assert [exit_status(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == [
        130, 143, 129,
    ]
    assert describe(signal.SIGINT) == "interrupted by the user"
    assert describe(signal.SIGTERM) == "received SIGTERM"
    assert describe(signal.SIGHUP) == "received SIGHUP"
