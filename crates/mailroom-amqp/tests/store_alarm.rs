//! Issue 13 item 4 over the wire: while a durable store cannot fsync, publishes to it are nacked and the
//! publishing connection gets `connection.blocked`; once the disk works again the store recovers by itself,
//! the connection is unblocked and publishes are confirmed, without a restart.

mod common;

use common::{channel, connect, WAIT};
use lapin::{options::*, types::FieldTable, BasicProperties};
use mailroom_amqp::{AmqpServer, ServerConfig};
use mailroom_broker::store::segment::{OsIo, StoreFile, StoreIo};
use mailroom_broker::store::SyncerConfig;
use mailroom_broker::{Broker, BrokerConfig};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The real file system, except that fsyncs of files under `under` fail with EIO while `fail` is set.
#[derive(Debug)]
struct FlakyDisk {
    fail: Arc<AtomicBool>,
    under: PathBuf,
}

#[derive(Debug)]
struct FlakyFile {
    inner: Arc<dyn StoreFile>,
    fail: Option<Arc<AtomicBool>>,
}

impl StoreFile for FlakyFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.fail.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn file_len(&self) -> io::Result<u64> {
        self.inner.file_len()
    }
}

impl StoreIo for FlakyDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StoreFile>> {
        let fail = path.starts_with(&self.under).then(|| self.fail.clone());
        Ok(Arc::new(FlakyFile { inner: OsIo.open(path, create)?, fail }))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OsIo.sync_dir(dir)
    }
}

async fn publish(ch: &lapin::Channel, body: &str) -> bool {
    let props = BasicProperties::default().with_delivery_mode(2);
    let confirm =
        ch.basic_publish("".into(), "sq".into(), BasicPublishOptions::default(), body.as_bytes(), props).await.unwrap();
    tokio::time::timeout(WAIT, confirm).await.expect("confirm in time").expect("confirm").is_ack()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_nacks_blocks_publishers_and_recovers_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("mailroom-amqp-store-alarm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fail = Arc::new(AtomicBool::new(false));
    let broker = Broker::open(BrokerConfig {
        data_dir: Some(dir.clone()),
        store_io: Some(Arc::new(FlakyDisk { fail: fail.clone(), under: dir.join("msgs") })),
        syncer: SyncerConfig { retry_backoff: Duration::from_millis(20), ..Default::default() },
        ..BrokerConfig::default()
    })
    .unwrap();
    let config = ServerConfig { listen: vec!["127.0.0.1:0".parse().unwrap()], ..Default::default() };
    let server = AmqpServer::bind(broker.clone(), config).await.unwrap();
    let addr = server.local_addrs()[0];
    let task = tokio::spawn(server.run(std::future::pending()));

    let conn = connect(&format!("amqp://guest:guest@{addr}/%2f")).await;
    let ch = channel(&conn).await;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("sq".into(), durable, FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    assert!(publish(&ch, "before").await);

    fail.store(true, Ordering::SeqCst);
    assert!(!publish(&ch, "during").await, "a publish whose fsync failed must be nacked");
    until("connection.blocked", || conn.status().blocked()).await;

    fail.store(false, Ordering::SeqCst);
    until("connection.unblocked", || !conn.status().blocked()).await;
    assert!(publish(&ch, "after").await, "confirmed again once the store recovered");

    let mut bodies = Vec::new();
    while let Some(m) = ch.basic_get("sq".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        bodies.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    assert!(bodies.contains(&"before".to_owned()) && bodies.contains(&"after".to_owned()), "{bodies:?}");
    task.abort();
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
