//! Channels open per user over all connections, for the `max-channels` user limit (RabbitMQ counts a
//! user's channels across its connections). A [`ChannelSlot`] holds one; dropping it gives it back.

use super::limits::{LimitError, UserLimits};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Open channels by user name.
#[derive(Debug, Default)]
pub(super) struct ChannelCounts(Mutex<HashMap<String, u64>>);

/// One open channel of a user; counted until dropped.
#[derive(Debug)]
pub struct ChannelSlot {
    counts: Arc<ChannelCounts>,
    user: String,
}

impl ChannelCounts {
    /// Counts a channel `user` opens, or refuses it with 530 when `limits` (the user's) say it has enough.
    pub(super) fn open(self: &Arc<Self>, user: &str, limits: UserLimits) -> Result<ChannelSlot, LimitError> {
        let mut counts = self.lock();
        let open = counts.get(user).copied().unwrap_or(0);
        limits.check_channel(user, open)?;
        counts.insert(user.to_owned(), open + 1);
        Ok(ChannelSlot { counts: Arc::clone(self), user: user.to_owned() })
    }

    /// Channels `user` has open now.
    pub(super) fn open_now(&self, user: &str) -> u64 {
        self.lock().get(user).copied().unwrap_or(0)
    }

    /// Channels open now, all users.
    pub(super) fn open_total(&self) -> u64 {
        self.lock().values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::access::{AccessControl, UserLimits};

    #[test]
    fn max_channels_counts_over_connections_and_frees_on_drop() {
        let ac = AccessControl::default();
        ac.add_user("u", b"p", vec![]).unwrap();
        ac.set_user_limits("u", UserLimits { max_connections: None, max_channels: Some(2) }).unwrap();
        let a = ac.open_channel("u").unwrap();
        let _b = ac.open_channel("u").unwrap();
        let refused = ac.open_channel("u").unwrap_err();
        assert_eq!(refused.reply_code(), 530);
        drop(a);
        assert_eq!(ac.open_channels("u"), 1);
        ac.open_channel("u").unwrap();
    }
}
