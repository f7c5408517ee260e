//! The broker restarts under the SDK: a durable Mailroom server (data dir) is shut down and started again
//! on the same port and data dir while work is in flight. The AMQP transport reconnects, re-declares its
//! topology and resumes; every message sent (confirmed) before or during the outage is handled, and a
//! request after the restart is answered.

mod common;

use common::eventually;
use mailroom::{Amqp, AmqpConfig, Bus, Envelope};
use mailroom_amqp::{AmqpServer, ServerConfig};
use mailroom_broker::{Broker, BrokerConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    n: u32,
}

/// Starts a durable server on `addr` (port 0 first, then the same port again) and returns its address.
async fn start_durable(addr: SocketAddr, data_dir: &Path) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let broker = Broker::open(BrokerConfig { data_dir: Some(data_dir.to_path_buf()), ..Default::default() }).unwrap();
    // The old listener may need a moment to release the port after its shutdown.
    let mut attempts = 0;
    let server = loop {
        match AmqpServer::bind(broker.clone(), ServerConfig { listen: vec![addr], ..Default::default() }).await {
            Ok(s) => break s,
            Err(e) if attempts < 50 => {
                attempts += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    };
    let bound = server.local_addrs()[0];
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (bound, tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survives_a_broker_restart() {
    let data = std::env::temp_dir().join(format!("mailroom-sdk-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let (addr, stop, task) = start_durable("127.0.0.1:0".parse().unwrap(), &data).await;
    let url = format!("amqp://guest:guest@{addr}/%2F");
    let amqp = Amqp::connect(AmqpConfig::new(&url)).await.unwrap();
    let bus = Bus::new(amqp.clone());
    let q = format!("t.restart.{}", &mailroom::envelope::new_message_id()[24..]);
    let seen: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let s = seen.clone();
    let worker = bus
        .worker(&q)
        .prefetch(8)
        .handle(move |m: Envelope<Job>, _| {
            let s = s.clone();
            async move {
                s.lock().unwrap().insert(m.body.n);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let responder = bus
        .responder(&format!("{q}.rpc"))
        .handle_request(|m: Envelope<Job>, _| async move { Ok(Job { n: m.body.n * 10 }) })
        .run()
        .await
        .unwrap();
    for n in 0..20 {
        bus.send(&q, Job { n }).await.unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || seen.lock().unwrap().len() == 20).await);

    // Restart the broker while sends are in flight: each send returns Ok once confirmed after reconnecting.
    let publisher = {
        let bus = bus.clone();
        let q = q.clone();
        tokio::spawn(async move {
            for n in 20..60 {
                bus.send(&q, Job { n }).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(40)).await;
    let _ = stop.send(());
    task.await.unwrap();
    let (_, stop2, task2) = start_durable(addr, &data).await;
    publisher.await.unwrap();
    assert!(amqp.generation() >= 2, "reconnected");
    assert!(
        eventually(Duration::from_secs(20), || seen.lock().unwrap().len() == 60).await,
        "every confirmed send handled; got {}",
        seen.lock().unwrap().len()
    );
    let r: Job = bus.request(&format!("{q}.rpc"), Job { n: 4 }).timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(r, Job { n: 40 });
    worker.stop().await;
    responder.stop().await;
    amqp.close().await;
    let _ = stop2.send(());
    let _ = task2.await;
    let _ = std::fs::remove_dir_all(&data);
}
