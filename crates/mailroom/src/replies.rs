//! The bus's direct reply-to consumer: one per bus, routing each reply to the request waiting for it
//! (by the request's id, which replies carry as causation id, or as correlation id from plain RPC
//! clients) and counting replies nobody waits for.

use crate::envelope::{headers, Metadata};
use crate::error::TransportError;
use crate::transport::{Subscription, Transport};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A reply handed to the request waiting for it.
pub(crate) struct ReplyMsg {
    pub(crate) meta: Metadata,
    pub(crate) body: Bytes,
    pub(crate) recipient: String,
}

struct Pending {
    tx: mpsc::UnboundedSender<ReplyMsg>,
    recipient: String,
}

/// The bus's reply consumer and pending-request map.
pub(crate) struct ReplyRouter {
    address: String,
    pending: Mutex<HashMap<String, Pending>>,
    late: AtomicU64,
}

impl ReplyRouter {
    /// Starts the reply consumer on `transport`.
    pub(crate) async fn start(transport: &dyn Transport) -> Result<Arc<ReplyRouter>, TransportError> {
        let (address, sub) = transport.reply_endpoint().await?;
        let router = Arc::new(ReplyRouter { address, pending: Mutex::new(HashMap::new()), late: AtomicU64::new(0) });
        tokio::spawn(route_replies(Arc::downgrade(&router), sub));
        Ok(router)
    }

    /// The `reply_to` address requests carry.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Replies that arrived with no request waiting (late or unknown).
    pub(crate) fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// Routes replies to request `id` into `tx` until the guard drops.
    pub(crate) fn register(
        self: &Arc<Self>,
        id: &str,
        recipient: &str,
        tx: mpsc::UnboundedSender<ReplyMsg>,
    ) -> PendingGuard {
        self.pending.lock().unwrap().insert(id.to_owned(), Pending { tx, recipient: recipient.to_owned() });
        PendingGuard { router: Arc::clone(self), id: id.to_owned() }
    }
}

/// Removes a pending entry when the request finishes, times out or is cancelled.
pub(crate) struct PendingGuard {
    router: Arc<ReplyRouter>,
    id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.router.pending.lock().unwrap().remove(&self.id);
    }
}

async fn route_replies(router: std::sync::Weak<ReplyRouter>, mut sub: Subscription) {
    while let Some(m) = sub.next().await {
        let Some(router) = router.upgrade() else { return };
        let meta = Metadata::from_properties(&m.properties);
        let key = meta.causation_id.clone().or_else(|| meta.correlation_id.clone()).unwrap_or_default();
        let pending = router.pending.lock().unwrap();
        match pending.get(&key) {
            Some(p) => {
                let recipient =
                    meta.header(headers::RESPONDER).map(str::to_owned).unwrap_or_else(|| p.recipient.clone());
                let _ = p.tx.send(ReplyMsg { meta, body: m.body, recipient });
            }
            None => {
                router.late.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key, "late or unknown reply dropped");
            }
        }
    }
}
