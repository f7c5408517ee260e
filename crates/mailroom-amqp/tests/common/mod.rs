//! Shared helpers for the AMQP integration tests: an in-process server on 127.0.0.1:0 and lapin helpers.
#![allow(dead_code)]

use futures_lite::StreamExt;
use lapin::{options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use mailroom_amqp::{AmqpServer, ServerConfig};
use mailroom_broker::{Broker, BrokerConfig};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The longest any single wait in these tests may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server running in this process, stopped by [`TestServer::shutdown`] (or aborted on drop).
pub struct TestServer {
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// The broker behind it, for direct inspection.
    pub broker: Broker,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A server with the default configuration (listening on 127.0.0.1:0 only).
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server whose configuration `tweak` may change (consumer timeout, heartbeat, frame_max…).
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        Self::start_on(Broker::open(BrokerConfig::default()).expect("broker opens"), tweak).await
    }

    /// A server in front of `broker` (e.g. one with a data directory), configured by `tweak`.
    #[allow(dead_code)]
    pub async fn start_on(broker: Broker, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut config = ServerConfig { listen: vec!["127.0.0.1:0".parse().unwrap()], ..Default::default() };
        tweak(&mut config);
        let server = AmqpServer::bind(broker.clone(), config).await.expect("server binds");
        let addr = server.local_addrs()[0];
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            url: format!("amqp://guest:guest@{addr}/%2f"),
            addr,
            broker,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Triggers the server's shutdown future without waiting for it to finish.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Triggers shutdown and waits (bounded) for `run` to return.
    pub async fn shutdown(mut self) {
        self.trigger_shutdown();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(WAIT, h).await.expect("server stops in time").expect("server task ok");
        }
    }

    /// A new lapin connection to this server.
    pub async fn connect(&self) -> Connection {
        connect(&self.url).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Connects with lapin (bounded wait).
pub async fn connect(url: &str) -> Connection {
    tokio::time::timeout(WAIT, Connection::connect(url, ConnectionProperties::default()))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Opens a channel (bounded wait).
pub async fn channel(conn: &Connection) -> Channel {
    tokio::time::timeout(WAIT, conn.create_channel()).await.expect("channel in time").expect("channel opens")
}

/// Declares a non-durable, non-exclusive queue with no arguments; returns its name.
pub async fn declare(ch: &Channel, name: &str) -> String {
    declare_with(ch, name, QueueDeclareOptions::default(), FieldTable::default()).await
}

/// Declares a queue with the given options and arguments; returns its name.
pub async fn declare_with(ch: &Channel, name: &str, options: QueueDeclareOptions, args: FieldTable) -> String {
    let q = ch.queue_declare(name.into(), options, args).await.expect("queue.declare");
    q.name().as_str().to_owned()
}

/// Publishes through the default exchange; waits for the publish to be written (and confirmed, if the
/// channel is in confirm mode).
pub async fn publish(ch: &Channel, queue: &str, body: &[u8]) {
    publish_with(ch, "", queue, body, BasicProperties::default()).await;
}

/// Publishes with properties; waits for the publish (and its confirm, in confirm mode).
pub async fn publish_with(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, props)
        .await
        .expect("basic.publish")
        .await
        .expect("publish confirm");
}

/// Starts a consumer with a server-named tag.
pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions { no_ack, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .expect("basic.consume")
}

/// The consumer's next delivery (panics after [`WAIT`] or if the consumer ended or failed).
pub async fn next(consumer: &mut Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("consumer still running")
        .expect("delivery without error")
}

/// The consumer's next delivery within `within`, or None if nothing arrives in that time.
pub async fn next_within(consumer: &mut Consumer, within: Duration) -> Option<lapin::message::Delivery> {
    match tokio::time::timeout(within, consumer.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("consumer error: {e}"),
        Ok(None) => None,
        Err(_) => None,
    }
}

/// The AMQP reply code inside a lapin error, if it is a protocol error.
pub fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Polls `cond` every 10 ms until it holds; panics after [`WAIT`] with `what`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
