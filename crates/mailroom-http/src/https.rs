//! HTTPS for the API: what the listener needs to know of TLS. The configuration itself (PEM files,
//! TLS 1.2 and 1.3 only, client verification, reload on SIGHUP) is built where the AMQPS listener's is,
//! and handed in as a [`TlsConfigSource`], so both listeners share one loader and one reload and this
//! crate does not depend on the AMQP one.

use std::sync::Arc;

/// Returns the TLS configuration a newly accepted connection gets (called once per connection, so a
/// reloaded certificate reaches the next connection while open ones keep theirs).
pub type TlsConfigSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;
