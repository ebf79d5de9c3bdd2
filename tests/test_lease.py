"""The sequencer lease in the log core: grants, renewals, expiry, takeovers, fencing.

Sans-IO: broker handles on one region in this process stand for broker
processes (each handle has its own file description, so the region's lock
keeps them apart as it keeps processes apart), each lease names its own
made-up pid, the host's clock is a number the test moves, and the broker
table is what the test says it is (or, where a test says so, the real one,
read from the broker ids' locks). A ``kill -9`` is injected before each of
the lease's stores and the sequencer's, and the next holder goes on from the
region alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from memory import close_log, lose_lock, open_small_log
from test_sequencer import HOLE_NS, CountingStruct, Crash, check_order, commit

from trio_embarcadero.errors import SequencerDeposed
from trio_embarcadero.log import CxlLog, open_log
from trio_embarcadero.log import lease as lease_module
from trio_embarcadero.log import sequencer as sequencer_module
from trio_embarcadero.log.layout import LEASE_OFFSET, LEASE_SIZE
from trio_embarcadero.log.lease import LeaseRecord, SequencerLease, holder_gone, read_lease
from trio_embarcadero.log.members import BrokerMember, MemberStatus
from trio_embarcadero.log.reader import region_brokers

LEASE_NS = 1_000_000_000


class World:
    """The host's clock and the broker table, as the test sets them."""

    def __init__(self) -> None:
        self.now = 5 * LEASE_NS
        #: broker id -> (status, pid) of the brokers the table lists.
        self.table: dict[int, tuple[MemberStatus, int]] = {}

    def clock(self) -> int:
        return self.now

    def members(self) -> list[BrokerMember]:
        return [
            BrokerMember(broker_id, status, pid, "127.0.0.1", 1214, 0, 0.1, 1, 2.0)
            for broker_id, (status, pid) in sorted(self.table.items())
        ]

    def lease(self, log: CxlLog, pid: int, *, real_members: bool = False) -> SequencerLease:
        """Broker ``log.broker_id``'s side of the lease, in process ``pid``."""
        members = (
            (lambda: region_brokers(log.region, log.path, log.geometry.max_brokers))
            if real_members
            else self.members
        )
        return log.sequencer_lease(LEASE_NS, members=members, clock=self.clock, pid=pid)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def brokers(cxl_path: str) -> Iterator[tuple[CxlLog, CxlLog]]:
    """Brokers 0 and 1 on one small region (as test_sequencer's), both ordering topics."""
    zero, one = (open_small_log(cxl_path, broker_id=b, unit_size=4096) for b in (0, 1))
    zero.topic_order = one.topic_order = lambda _topic: 5
    yield zero, one
    close_log(zero)
    close_log(one)


@pytest.fixture
def leases(brokers: tuple[CxlLog, CxlLog], world: World) -> tuple[SequencerLease, SequencerLease]:
    """Broker 0's (pid 100) and broker 1's (pid 101) sides of the lease, both live."""
    world.table = {0: (MemberStatus.LIVE, 100), 1: (MemberStatus.LIVE, 101)}
    return world.lease(brokers[0], 100), world.lease(brokers[1], 101)


def lease_bytes(log: CxlLog) -> bytes:
    return bytes(log.region[LEASE_OFFSET : LEASE_OFFSET + LEASE_SIZE])


def test_a_grant_is_renewed_and_taken_over_only_once_it_expires(
    brokers: tuple[CxlLog, CxlLog], world: World, leases: tuple[SequencerLease, SequencerLease]
) -> None:
    head, other = leases
    assert read_lease(brokers[0].region) == LeaseRecord(0, 0, 0, 0, 0)  # layout 3's zeros
    assert other.try_acquire(fresh=False) is None  # a first lease is the head's to take
    grant = head.try_acquire()
    assert grant is not None
    assert grant.lease == LeaseRecord(1, 0, 100, world.now + LEASE_NS, world.now)
    assert grant.reason == "the region had no sequencer yet"
    assert read_lease(brokers[1].region) == grant.lease
    assert head.try_acquire() is None  # held already
    world.now += LEASE_NS - 1
    assert other.try_acquire() is None  # held by a live broker, not expired
    assert head.renew()
    assert read_lease(brokers[0].region).expiry_ns == world.now + LEASE_NS
    world.now += LEASE_NS - 1
    assert other.try_acquire() is None  # the renewal counts from when it was made
    stats = other.statistics()
    assert (stats.epoch, stats.holder, stats.holder_pid, stats.held) == (1, 0, 100, False)
    assert head.statistics().held
    world.now += 1  # the holder stopped renewing (SIGSTOP): it expires
    taken = other.try_acquire()
    assert taken is not None
    assert taken.lease == LeaseRecord(2, 1, 101, world.now + LEASE_NS, world.now)
    assert taken.previous.epoch == 1
    assert taken.reason == "broker 0 (pid 100) stopped renewing it 0.000 s ago"
    before = lease_bytes(brokers[0])
    assert not head.renew()  # it resumes: its epoch is stale, and it writes nothing
    assert lease_bytes(brokers[0]) == before
    assert head.epoch is None
    assert (head.statistics().deposed, head.statistics().held) == (1, False)
    assert (other.statistics().takeovers, other.statistics().held) == (1, True)
    assert head.try_acquire() is None  # the new holder is alive and renews
    assert not head.release()  # nothing to let go of
    assert read_lease(brokers[0].region) == taken.lease


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(
    brokers: tuple[CxlLog, CxlLog], world: World
) -> None:
    # The real broker table: broker 0's lock tells whether its process runs.
    head = world.lease(brokers[0], os.getpid(), real_members=True)
    other = world.lease(brokers[1], os.getpid(), real_members=True)
    assert head.try_acquire() is not None
    assert other.try_acquire() is None  # broker 0's id is held, by the lease's pid
    lose_lock(brokers[0])  # as its process dying would
    taken = other.try_acquire()
    assert taken is not None
    assert taken.reason == f"broker 0 (pid {os.getpid()}) is gone"
    assert taken.lease.epoch == 2
    assert world.now < taken.previous.expiry_ns  # long before it would have expired


def test_holder_gone_reads_the_broker_table(world: World) -> None:
    record = LeaseRecord(3, 1, 200, 0, 0)
    for table, gone in (
        ({1: (MemberStatus.LIVE, 200)}, False),
        ({1: (MemberStatus.UNRESPONSIVE, 200)}, False),  # stopped: the expiry decides
        ({1: (MemberStatus.DRAINING, 200)}, False),
        ({1: (MemberStatus.DEAD, 200)}, True),
        ({1: (MemberStatus.LIVE, 201)}, True),  # its broker id runs in another process
        ({1: (MemberStatus.ATTACHED, 201)}, True),  # restarted, not listening yet
        ({0: (MemberStatus.LIVE, 200)}, True),  # not listed at all
    ):
        world.table = table
        assert holder_gone(record, world.members()) is gone, table


def test_a_released_lease_is_taken_at_once_and_a_busy_lock_is_not_waited_for(
    brokers: tuple[CxlLog, CxlLog], world: World, leases: tuple[SequencerLease, SequencerLease]
) -> None:
    head, other = leases
    assert head.try_acquire() is not None
    assert head.release()
    assert not head.release()
    record = read_lease(brokers[1].region)
    assert (record.epoch, record.expiry_ns) == (1, 0)
    stats = other.statistics()
    assert (stats.holder, stats.holder_pid, stats.held) == (None, None, False)
    with brokers[0]._lock():  # another process is in the region's lock
        assert other.try_acquire() is None
    taken = other.try_acquire()
    assert taken is not None
    assert taken.reason == "broker 0 (pid 100) released it"
    assert taken.lease.epoch == 2
    # A release that finds the lock taken leaves the lease to expire.
    with brokers[0]._lock():
        assert not other.release()
    assert read_lease(brokers[0].region).expiry_ns == world.now + LEASE_NS


def test_a_deposed_sequencer_writes_nothing_and_its_successor_goes_on(
    brokers: tuple[CxlLog, CxlLog], world: World, leases: tuple[SequencerLease, SequencerLease]
) -> None:
    head, other = leases
    assert head.try_acquire() is not None
    old = brokers[0].sequencer(HOLE_NS, lease=head)
    sent = {1: 0, 2: 0}
    for b in (0, 1, 0):
        commit(brokers[b], [64, 64], b + 1, sent[b + 1])
        sent[b + 1] += 2
    assert len(old.step(0)) == 3
    world.now += LEASE_NS  # stopped outside the lock: the lease expires
    assert other.try_acquire() is not None
    new = brokers[1].sequencer(HOLE_NS, lease=other)
    for b in (1, 0):
        commit(brokers[b], [64], b + 1, sent[b + 1])
        sent[b + 1] += 1
    region = brokers[0].region.copy()
    with pytest.raises(SequencerDeposed, match=r"epoch 1\) is stale: broker 1 \(pid 101\)"):
        old.step(0)  # resumed: it had orders to give, and gives none
    assert np.array_equal(brokers[0].region, region)
    assert len(new.step(0)) == 2
    check_order(brokers[0], sent)
    with open_log(brokers[0].path) as reader:
        assert reader.sequencer_lease().epoch == 2
        assert reader.sequencer_lease().held(world.now)
    # A sequencer made for a lease it does not hold writes nothing either.
    with pytest.raises(SequencerDeposed, match="does not hold the lease"):
        brokers[0].sequencer(HOLE_NS, lease=head)
    old.close()
    new.close()


def test_a_kill_at_any_store_of_a_takeover_or_a_step_forks_nothing(
    brokers: tuple[CxlLog, CxlLog], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broker 0 orders, then stops renewing; broker 1 takes the lease over
    and orders, and dies before the k-th store of its takeover or its first
    step, k = 0, 1, ...; broker 1 started again (another pid) takes the lease
    over and goes on. Only the kill before the first store leaves broker 0
    the holder; epochs only grow; broker 0, deposed, writes nothing; the order
    stays gap-free with every message once."""
    for module in (lease_module, sequencer_module):
        for name in ("U32", "U64", "INDEX_ENTRY", "SEGMENT_HEADER"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, CountingStruct(getattr(module, name)))
    sent = {1: 0, 2: 0}

    def commit_some() -> None:
        for b in (0, 1, 0):
            commit(brokers[b], [64], b + 1, sent[b + 1])
            sent[b + 1] += 1

    pid = 1000
    world.table = {0: (MemberStatus.LIVE, 100)}
    head = world.lease(brokers[0], 100)
    epochs = []
    crash_at = -1
    got_through = False
    while not got_through:
        crash_at += 1
        world.now += LEASE_NS
        assert head.try_acquire() is not None
        epochs.append(head.epoch)
        old = brokers[0].sequencer(HOLE_NS, lease=head)
        commit_some()
        old.step(world.now)
        commit_some()
        world.now += LEASE_NS  # broker 0 stopped renewing (SIGSTOP)
        pid += 1
        world.table[1] = (MemberStatus.LIVE, pid)
        doomed = world.lease(brokers[1], pid)
        CountingStruct.count, CountingStruct.limit = 0, crash_at
        try:
            assert doomed.try_acquire() is not None
            doomed_sequencer = brokers[1].sequencer(HOLE_NS, lease=doomed)
            assert len(doomed_sequencer.step(world.now)) == 3
            doomed_sequencer.close()
            got_through = True  # no store left to die at: the last round
        except Crash:
            pass
        CountingStruct.limit = -1
        world.table[1] = (MemberStatus.DEAD, pid)  # its lock went with it
        assert head.renew() is (crash_at == 0)
        # Broker 1 starts again and takes the sequencer over.
        pid += 1
        world.table[1] = (MemberStatus.LIVE, pid)
        world.now += LEASE_NS
        again = world.lease(brokers[1], pid)
        grant = again.try_acquire()
        assert grant is not None
        epochs.append(grant.lease.epoch)
        region = brokers[0].region.copy()
        with pytest.raises(SequencerDeposed):
            old.step(world.now)  # broker 0 resumes (SIGCONT)
        assert np.array_equal(brokers[0].region, region)
        new = brokers[1].sequencer(HOLE_NS, lease=again)
        new.step(world.now)
        check_order(brokers[0], sent)
        old.close()
        new.close()
    # Five stores a grant, two renewals, a redone "ordered" word, then the
    # stores of three batches: a kill was tried before each of them.
    assert crash_at >= 5 + 2 + 1 + 3, crash_at
    assert epochs == sorted(set(epochs))


def test_the_reader_shows_the_lease(brokers: tuple[CxlLog, CxlLog], world: World) -> None:
    head = world.lease(brokers[0], 100)
    with open_log(brokers[0].path) as reader:
        assert reader.sequencer_lease().epoch == 0
        assert not reader.sequencer_lease().held(world.now)
        head.try_acquire()
        assert reader.sequencer_lease() == read_lease(brokers[0].region)
        assert reader.sequencer_lease().held(world.now)
