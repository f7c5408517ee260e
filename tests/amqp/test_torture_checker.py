"""The crash torture's checker (torture.py) classifies sightings exactly: no broker needed, the ledger is fed by
hand. Guards against a checker that cannot fail."""
import torture
from torture import Copy, NONE, SETTLED, UNSETTLED, Q_DIRECT, Q_DLQ, Q_FAN_B, Q_WORK, Q_DELAYED


def checker(life=1):
    t = torture.Torture(killable=None, seed=0, rounds=0, round_s=1.0, log=lambda line: None)
    t.life = t.rnd = life
    t.kill_times = {0: 100.0}
    return t


def test_a_settled_ack_coming_back_is_a_violation_an_unsettled_one_a_duplicate():
    t = checker()
    t.ledger[("direct.0.1", Q_DIRECT)] = Copy(confirmed=True, acked=SETTLED, settled_life=0, hops={0})
    t.ledger[("direct.0.2", Q_DIRECT)] = Copy(confirmed=True, acked=UNSETTLED, ack_life=0, hops={0})
    t.seen(Q_DIRECT, ("direct.0.1", Q_DIRECT), "drain", 0, False, 0.0)
    t.seen(Q_DIRECT, ("direct.0.2", Q_DIRECT), "drain", 0, False, 0.0)
    assert t.t.counts["resurrected"] == 1 and t.t.duplicates == 1 and t.t.dup_kinds["lost_ack"] == 1


def test_redelivery_after_an_ack_in_the_same_lifetime_is_a_violation():
    t = checker(life=0)
    t.ledger[("direct.0.3", Q_DIRECT)] = Copy(confirmed=True, acked=UNSETTLED, ack_life=0, hops={0})
    t.seen(Q_DIRECT, ("direct.0.3", Q_DIRECT), "consumer", 0, False, 0.0)
    assert t.t.counts["resurrected"] == 1


def test_drained_twice_in_one_queue_is_a_violation():
    t = checker()
    t.ledger[("direct.0.4", Q_DIRECT)] = Copy(confirmed=True, drained=True, drained_life=1,
                                              drained_queue=Q_DIRECT, hops={0})
    t.seen(Q_DIRECT, ("direct.0.4", Q_DIRECT), "drain", 0, False, 0.0)
    assert t.t.counts["resurrected"] == 1


def test_dlq_copy_never_rejected_is_misplaced_a_rejected_one_is_not():
    t = checker()
    t.ledger[("fanout.0.1", Q_FAN_B)] = Copy(confirmed=True)
    t.ledger[("fanout.0.2", Q_FAN_B)] = Copy(confirmed=True, rejected=SETTLED, settled_life=0)
    t.seen(Q_DLQ, ("fanout.0.1", Q_FAN_B), "drain", 1, False, 0.0)
    t.seen(Q_DLQ, ("fanout.0.2", Q_FAN_B), "drain", 1, False, 0.0)
    assert t.t.counts["misplaced"] == 1


def test_unknown_and_pruned_messages():
    t = checker(life=5)
    t.pruned_below = 3
    t.seen(Q_DIRECT, ("nobody.4.1", Q_DIRECT), "drain", 0, False, 0.0)
    t.seen(Q_DIRECT, ("direct.1.1", Q_DIRECT), "drain", 0, False, 0.0)
    assert t.t.counts["unknown"] == 1 and t.t.counts["resurrected"] == 1


def test_hop_copies_and_expiry_redone_are_duplicates_but_not_plain_returns():
    t = checker()
    # Acked after 4 hops; the tt.wait record behind it expired again at the restart (same incarnation, by
    # expiry), and an older incarnation (2 hops) came back too.
    t.ledger[("retry.0.1", Q_WORK)] = Copy(confirmed=True, acked=SETTLED, settled_life=0, hops={4})
    t.seen(Q_WORK, ("retry.0.1", Q_WORK), "drain", 4, True, 0.0)
    t.seen(Q_WORK, ("retry.0.1", Q_WORK), "drain", 2, True, 0.0)
    assert t.t.dup_kinds["expiry_redone"] == 1 and t.t.dup_kinds["hop_replayed"] == 1
    assert t.t.counts["resurrected"] == 0
    # Drained with 0 hops (never dead-lettered) and back with 0 hops: a consumed message returned.
    t.ledger[("retry.0.2", Q_WORK)] = Copy(confirmed=True, drained=True, drained_life=0, drained_queue=Q_WORK,
                                           hops={0})
    t.seen(Q_WORK, ("retry.0.2", Q_WORK), "drain", 0, False, 0.0)
    assert t.t.counts["resurrected"] == 1


def test_delayed_rerelease_only_inside_the_window_and_once_per_restart():
    t = checker()  # the kill ending lifetime 0 was at t=100
    t.ledger[("delayed.0.1", Q_DELAYED)] = Copy(confirmed=True, acked=SETTLED, settled_life=0, hops={0}, due=99.5)
    t.ledger[("delayed.0.2", Q_DELAYED)] = Copy(confirmed=True, acked=SETTLED, settled_life=0, hops={0}, due=90.0)
    t.seen(Q_DELAYED, ("delayed.0.1", Q_DELAYED), "drain", 0, False, 0.0)
    assert t.t.dup_kinds["delayed_rerelease"] == 1
    t.seen(Q_DELAYED, ("delayed.0.2", Q_DELAYED), "drain", 0, False, 0.0)  # released 10 s before the kill
    assert t.t.counts["resurrected"] == 1
    t.ledger[("delayed.0.1", Q_DELAYED)].drained = True
    t.ledger[("delayed.0.1", Q_DELAYED)].drained_life = 1
    t.ledger[("delayed.0.1", Q_DELAYED)].drained_queue = Q_DELAYED
    t.seen(Q_DELAYED, ("delayed.0.1", Q_DELAYED), "drain", 0, False, 0.0)  # a second one after the same restart
    assert t.t.counts["resurrected"] == 2


def test_a_reject_to_the_dlq_undone_by_the_kill_is_a_duplicate():
    t = checker()
    t.ledger[("topic.0.1", Q_FAN_B)] = Copy(confirmed=True, rejected=SETTLED, settled_life=0)
    t.seen(Q_FAN_B, ("topic.0.1", Q_FAN_B), "drain", 0, False, 0.0)
    assert t.t.dup_kinds["reject_undone"] == 1 and not t.t.violations
    assert t.ledger[("topic.0.1", Q_FAN_B)].acked == NONE


def test_delayed_delivered_just_after_the_kill_timestamp_counts_as_released_before_it():
    t = checker(life=0)  # pika hands over a delivery read before the kill a moment after the kill was recorded
    t.ledger[("delayed.0.3", Q_DELAYED)] = Copy(confirmed=True, hops=set(), due=100.2)
    t.seen(Q_DELAYED, ("delayed.0.3", Q_DELAYED), "consumer", 0, False, 100.001)
    c = t.ledger[("delayed.0.3", Q_DELAYED)]
    c.acked, c.settled_life, c.hops = SETTLED, 0, {0}
    t.life = t.rnd = 1
    t.seen(Q_DELAYED, ("delayed.0.3", Q_DELAYED), "drain", 0, False, 101.0)
    assert t.t.dup_kinds["delayed_rerelease"] == 1 and not t.t.violations
