//! Unit tests of the channel's settling, prefetch and mode rules.

use super::*;
use mailroom_broker::{Broker, BrokerConfig, QueueOptions};

/// A queue to stand for where deliveries came from (the channel never calls it).
fn queue() -> Arc<Queue> {
    let broker = Broker::open(BrokerConfig::default()).unwrap();
    let vhost = broker.vhost("/").unwrap();
    vhost.declare_queue("q", &QueueOptions::default(), 1).unwrap();
    vhost.queue("q", 1).unwrap()
}

/// A channel holding unacked deliveries with tags 1..=n (message ids 101..).
fn with_unacked(n: u64) -> Channel {
    let q = queue();
    let mut ch = Channel::new(1);
    for i in 1..=n {
        let d = UnackedDelivery { queue: Arc::clone(&q), id: 100 + i, sent_at: Instant::now() };
        assert_eq!(ch.next_delivery(Some(d)), i);
    }
    ch
}

fn tags(ds: &[(u64, UnackedDelivery)]) -> Vec<u64> {
    ds.iter().map(|(t, _)| *t).collect()
}

#[tokio::test]
async fn ack_one_several_or_all() {
    let mut ch = with_unacked(5);
    assert_eq!(tags(&ch.settle(2, false, true, false).unwrap().unwrap()), [2]);
    assert_eq!(tags(&ch.settle(3, true, true, false).unwrap().unwrap()), [1, 3], "multiple: up to and including");
    assert_eq!(ch.unacked_count(), 2);
    assert_eq!(tags(&ch.settle(0, true, false, true).unwrap().unwrap()), [4, 5], "tag 0 with multiple: all");
    assert_eq!(ch.unacked_count(), 0);
}

#[tokio::test]
async fn unknown_or_settled_tag_is_406() {
    let mut ch = with_unacked(2);
    ch.settle(1, false, true, false).unwrap();
    for (tag, multiple) in [(1, false), (9, true), (0, false)] {
        let e = ch.settle(tag, multiple, true, false).unwrap_err();
        assert_eq!((e.code, e.connection), (code::PRECONDITION_FAILED, false));
        assert!(e.text.contains(&format!("unknown delivery tag {tag}")), "{}", e.text);
    }
    assert_eq!(ch.unacked_count(), 1, "a failed settle takes nothing");
}

#[tokio::test]
async fn no_ack_deliveries_get_tags_but_are_not_tracked() {
    let mut ch = with_unacked(1);
    assert_eq!(ch.next_delivery(None), 2);
    assert_eq!(ch.unacked_count(), 1);
    assert!(ch.settle(2, false, true, false).is_err());
    assert!(ch.oldest_unacked().is_some());
}

#[tokio::test]
async fn transactions_hold_settlements_until_commit_and_rollback_restores_them() {
    let mut ch = with_unacked(3);
    ch.select_tx().unwrap();
    assert!(ch.settle(1, false, true, false).unwrap().is_none(), "held for commit");
    assert!(ch.settle(3, false, false, true).unwrap().is_none());
    assert_eq!(ch.unacked_count(), 1);
    assert_eq!((ch.tx().unwrap().settlements(), ch.tx().unwrap().publishes()), (2, 0));
    let ops = ch.take_tx().unwrap();
    assert_eq!(ops.len(), 2);
    ch.unsettle(ops);
    assert_eq!(ch.unacked_count(), 3, "rolled back under their tags");
    assert_eq!(tags(&ch.take_unacked(0, true).unwrap()), [1, 2, 3]);
    assert!(ch.take_tx().unwrap().is_empty(), "a new transaction starts empty");
}

#[tokio::test]
async fn confirm_and_tx_modes_exclude_each_other() {
    let mut ch = Channel::new(1);
    let e = ch.take_tx().unwrap_err();
    assert_eq!(e.code, code::PRECONDITION_FAILED);
    ch.select_confirm().unwrap();
    ch.select_confirm().unwrap();
    assert!(ch.confirms().is_some());
    let e = ch.select_tx().unwrap_err();
    assert!(e.text.contains("cannot switch from confirm to tx mode"), "{}", e.text);

    let mut ch = Channel::new(2);
    ch.select_tx().unwrap();
    ch.select_tx().unwrap();
    assert!(ch.tx().is_some() && ch.confirms().is_none());
    let e = ch.select_confirm().unwrap_err();
    assert!(e.text.contains("cannot switch from tx to confirm mode"), "{}", e.text);
}

#[tokio::test]
async fn qos_sets_the_consumer_or_the_channel_limit() {
    let mut ch = Channel::new(1);
    ch.qos(10, false);
    assert_eq!((ch.consumer_prefetch, ch.channel_prefetch.limit()), (10, 0));
    ch.qos(3, true);
    assert_eq!((ch.consumer_prefetch, ch.channel_prefetch.limit()), (10, 3));
}

#[tokio::test]
async fn recover_requeues_everything_and_refuses_requeue_false() {
    let mut ch = with_unacked(3);
    let e = ch.recover(false).unwrap_err();
    assert_eq!((e.code, e.connection), (code::NOT_IMPLEMENTED, true));
    assert_eq!(ch.unacked_count(), 3);
    let ids: Vec<_> = ch.recover(true).unwrap().iter().map(|d| d.id).collect();
    assert_eq!(ids, [101, 102, 103]);
    assert_eq!(ch.unacked_count(), 0);
}

#[tokio::test]
async fn release_returns_uncommitted_settlements_too() {
    let mut ch = with_unacked(3);
    ch.select_tx().unwrap();
    ch.settle(1, false, true, false).unwrap();
    ch.reply_queue = Some("r".into());
    let released = ch.release();
    let mut ids: Vec<_> = released.unacked.iter().map(|d| d.id).collect();
    ids.sort();
    assert_eq!(ids, [101, 102, 103]);
    assert!(released.consumers.is_empty());
    assert!(ch.reply_queue.is_none() && ch.tx().is_none() && ch.unacked_count() == 0);
}
