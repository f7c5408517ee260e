//! Definitions are on disk before they are acknowledged: a failed save closes the connection with 541.

mod common;

use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use mailroom_broker::store::segment::{OsIo, StoreFile, StoreIo};
use mailroom_broker::{Broker, BrokerConfig};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The real file system, where writes to the definitions files fail with ENOSPC while `full` is set.
#[derive(Debug)]
struct FullDisk {
    full: Arc<AtomicBool>,
}

#[derive(Debug)]
struct FullFile {
    inner: Arc<dyn StoreFile>,
    full: Arc<AtomicBool>,
}

impl StoreFile for FullFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28));
        }
        self.inner.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn file_len(&self) -> io::Result<u64> {
        self.inner.file_len()
    }
}

impl StoreIo for FullDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StoreFile>> {
        let inner = OsIo.open(path, create)?;
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("definitions.")) {
            return Ok(Arc::new(FullFile { inner, full: Arc::clone(&self.full) }));
        }
        Ok(inner)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OsIo.sync_dir(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_definitions_save_closes_the_connection_with_541() {
    let dir = std::env::temp_dir().join(format!("mailroom-amqp-defs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let full = Arc::new(AtomicBool::new(false));
    let broker = Broker::open(BrokerConfig {
        data_dir: Some(dir.clone()),
        store_io: Some(Arc::new(FullDisk { full: Arc::clone(&full) })),
        ..BrokerConfig::default()
    })
    .unwrap();
    let server = TestServer::start_on(broker, |_| {}).await;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };

    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    full.store(true, Ordering::SeqCst);
    let err = ch.queue_declare("orders".into(), durable, FieldTable::default()).await.unwrap_err();
    assert_eq!(reply_code(&err), Some(541), "{err}");
    assert!(err.to_string().contains("definitions"), "the reply names the failed write: {err}");
    eventually("the connection is closed", || !conn.status().connected()).await;

    // Space is back: a new connection declares the queue, and it is on disk.
    full.store(false, Ordering::SeqCst);
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("orders".into(), durable, FieldTable::default()).await.unwrap();
    assert!(conn.status().connected());
    let _ = std::fs::remove_dir_all(&dir);
}
