//! Asks open connections for their channel snapshots: all at once, and for the rate sampler only the
//! connections that did channel work since its last sample (an idle connection, heartbeats and all, is
//! never woken for it).

use mailroom_broker::{ChannelSnapshot, ConnectionHandle};
use std::collections::HashMap;

/// Connections with their channels; `None` where a connection did not answer in time.
pub type Clients = Vec<(ConnectionHandle, Option<Vec<ChannelSnapshot>>)>;

/// Asks every connection for its channels at once (a busy connection costs one timeout, not one per
/// connection listed after it); the answers keep the connections' order.
pub async fn with_channels(connections: Vec<ConnectionHandle>) -> Clients {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in connections.iter().enumerate() {
        let c = c.clone();
        tasks.spawn(async move { (i, c.channels().await) });
    }
    let mut answers: Vec<Option<Vec<ChannelSnapshot>>> = vec![None; connections.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, channels)) = done {
            answers[i] = channels;
        }
    }
    connections.into_iter().zip(answers).collect()
}

/// The rate sampler's last snapshots, by connection name, with the connection's channel turns
/// (`ConnectionTraffic::channel_turns`) when they were taken.
#[derive(Default)]
pub(crate) struct SnapshotCache {
    last: HashMap<String, (u64, Vec<ChannelSnapshot>)>,
}

impl SnapshotCache {
    /// Snapshots of `connections`: asked afresh only where the connection did channel work since the
    /// cached one (frames other than heartbeats, deliveries, confirms), reused elsewhere.
    pub(crate) async fn refresh(&mut self, connections: Vec<ConnectionHandle>) -> Clients {
        let mut stale = Vec::new();
        let mut out: Clients = Vec::with_capacity(connections.len());
        let mut seen = HashMap::with_capacity(connections.len());
        for c in connections {
            let turns = c.info().traffic.channel_turns();
            let name = c.info().name();
            match self.last.remove(&name) {
                Some((at, channels)) if at == turns => {
                    seen.insert(name, (at, channels.clone()));
                    out.push((c, Some(channels)));
                }
                _ => {
                    stale.push(out.len());
                    seen.insert(name, (turns, Vec::new()));
                    out.push((c, None));
                }
            }
        }
        let asked = with_channels(stale.iter().map(|&i| out[i].0.clone()).collect()).await;
        for (&i, (c, channels)) in stale.iter().zip(asked) {
            if let Some(channels) = &channels {
                if let Some(entry) = seen.get_mut(&c.info().name()) {
                    // Channels that counted nothing give the sampler only zeros, which it does not keep:
                    // an idle connection's channel costs the cache nothing.
                    entry.1 = channels.iter().filter(|ch| counted_something(ch)).cloned().collect();
                }
            } else {
                seen.remove(&c.info().name()); // not answered: ask again next time
            }
            out[i].1 = channels;
        }
        self.last = seen; // connections gone since the last sample drop out
        out
    }
}

/// The channel has counted a message: its snapshot matters to the rate sampler.
fn counted_something(ch: &ChannelSnapshot) -> bool {
    !ch.publishes.is_empty() || !ch.deliveries.is_empty() || ch.message_stats != Default::default()
}
