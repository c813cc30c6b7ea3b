"""``server.groups.Groups``: membership with expiry, time passed in."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from django_message_broker.server.groups import Groups


def test_add_and_members_in_the_order_added():
    g = Groups()
    g.add("room", "b", 10, now=0)
    g.add("room", "a", 10, now=0)
    g.add("room", "c", 10, now=0)
    assert g.members("room", now=1) == ["b", "a", "c"]
    assert len(g) == 1 and g.memberships() == 3
    assert g.members("other", now=1) == []


def test_add_is_idempotent_and_renews():
    g = Groups()
    g.add("room", "a", 10, now=0)
    g.add("room", "a", 10, now=8)  # renewed: now lives until 18
    assert g.memberships() == 1
    assert g.members("room", now=15) == ["a"]
    assert g.members("room", now=18) == []


def test_members_expire_at_their_deadline():
    g = Groups()
    g.add("room", "short", 5, now=0)
    g.add("room", "long", 50, now=0)
    assert g.members("room", now=4.999) == ["short", "long"]
    assert g.members("room", now=5) == ["long"]  # deadline reached: gone
    assert g.memberships() == 1  # and dropped, not just hidden
    assert g.members("room", now=50) == []
    assert len(g) == 0  # an empty group is forgotten


def test_discard():
    g = Groups()
    g.add("room", "a", 10, now=0)
    g.add("room", "b", 10, now=0)
    g.discard("room", "a")
    assert g.members("room", now=0) == ["b"]
    g.discard("room", "a")  # not a member: no-op
    g.discard("nogroup", "a")  # no group: no-op
    g.discard("room", "b")
    assert len(g) == 0 and g.memberships() == 0


def test_sweep_drops_expired_members_and_empty_groups():
    g = Groups()
    g.add("g1", "a", 1, now=0)
    g.add("g2", "a", 1, now=0)
    g.add("g2", "b", 10, now=0)
    g.sweep(now=1)
    assert len(g) == 1 and g.memberships() == 1
    assert g.members("g2", now=1) == ["b"]


def test_clear():
    g = Groups()
    g.add("g1", "a", 1, now=0)
    g.add("g2", "a", 1, now=0)
    g.clear()
    assert len(g) == 0 and g.memberships() == 0
    assert g.members("g1", now=0) == []


def test_a_channel_can_be_in_many_groups():
    g = Groups()
    for group in ("g1", "g2", "g3"):
        g.add(group, "a", 10, now=0)
    g.discard("g2", "a")
    assert g.members("g1", now=0) == ["a"] and g.members("g3", now=0) == ["a"]
    assert g.members("g2", now=0) == []


class GroupsMachine(RuleBasedStateMachine):
    """Against a model: {(group, channel): deadline}."""

    def __init__(self):
        super().__init__()
        self.g = Groups()
        self.model: dict[tuple[str, str], float] = {}
        self.now = 0.0

    groups = st.sampled_from(["g1", "g2", "g3"])
    channels = st.sampled_from(["a", "b", "c", "d"])

    @rule(group=groups, channel=channels, ttl=st.integers(1, 10))
    def add(self, group, channel, ttl):
        self.g.add(group, channel, ttl, self.now)
        self.model[(group, channel)] = self.now + ttl

    @rule(group=groups, channel=channels)
    def discard(self, group, channel):
        self.g.discard(group, channel)
        self.model.pop((group, channel), None)

    @rule(seconds=st.integers(0, 6))
    def tick(self, seconds):
        self.now += seconds

    @rule()
    def sweep(self):
        self.g.sweep(self.now)
        self.model = {k: d for k, d in self.model.items() if d > self.now}
        assert self.g.memberships() == len(self.model)
        assert len(self.g) == len({grp for grp, _ in self.model})

    @invariant()
    def live_members_match(self):
        for group in ("g1", "g2", "g3"):
            got = self.g.members(group, self.now)
            expected = {c for (grp, c), d in self.model.items() if grp == group and d > self.now}
            assert set(got) == expected
            assert len(got) == len(set(got))


TestGroupsMachine = GroupsMachine.TestCase
TestGroupsMachine.settings = settings(max_examples=50, stateful_step_count=25, deadline=None)
