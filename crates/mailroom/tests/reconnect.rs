//! Recovery of the AMQP transport: the connection is cut by a TCP proxy (as a broker restart or a
//! network failure would) while publishing, consuming and requesting. Only AMQP targets: the embedded
//! transport has no connection to lose.

mod common;

use common::{eventually, split_url, start_server, Proxy};
use mailroom::{Amqp, AmqpConfig, Bus, Envelope};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    n: u32,
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

async fn survives_a_dropped_connection(url: String) {
    init_tracing();
    let (auth, upstream, vhost) = split_url(&url);
    let proxy = Proxy::start(upstream).await;
    let proxied = format!("{auth}@{}/{vhost}", proxy.addr);
    let amqp = Amqp::connect(AmqpConfig::new(&proxied)).await.unwrap();
    let bus = Bus::new(amqp.clone());
    let q = format!("t.reconnect.{}", &mailroom::envelope::new_message_id()[24..]);
    let seen: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let ids: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (s, i) = (seen.clone(), ids.clone());
    let worker = bus
        .worker(&q)
        .prefetch(8)
        .handle(move |m: Envelope<Job>, _| {
            let (s, i) = (s.clone(), i.clone());
            async move {
                s.lock().unwrap().insert(m.body.n);
                i.lock().unwrap().insert(m.id.clone());
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let responder = bus
        .responder(&format!("{q}.rpc"))
        .handle_request(|m: Envelope<Job>, _| async move { Ok(Job { n: m.body.n + 1 }) })
        .run()
        .await
        .unwrap();
    for n in 0..10 {
        bus.send(&q, Job { n }).await.unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || seen.lock().unwrap().len() == 10).await);
    assert_eq!(amqp.generation(), 1);

    // Publish continuously while the connection is cut: every send must return Ok (resent after
    // reconnecting until confirmed), and every message must be handled.
    let publisher = {
        let bus = bus.clone();
        let q = q.clone();
        tokio::spawn(async move {
            for n in 10..60 {
                bus.send(&q, Job { n }).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    proxy.cut();
    publisher.await.unwrap();
    assert!(amqp.generation() >= 2, "reconnected");
    assert!(
        eventually(Duration::from_secs(15), || seen.lock().unwrap().len() == 60).await,
        "consumers resumed; got {}",
        seen.lock().unwrap().len()
    );
    // Request-reply works on the new connection (reply consumer restarted, topology re-declared).
    let r: Job = bus.request(&format!("{q}.rpc"), Job { n: 1 }).timeout(Duration::from_secs(5)).await.unwrap();
    assert_eq!(r, Job { n: 2 });
    worker.stop().await;
    responder.stop().await;
    for name in [q.clone(), format!("{q}.dlq"), format!("{q}.rpc"), format!("{q}.rpc.dlq")] {
        let _ = bus.transport().delete_queue(&name).await;
    }
    amqp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server() {
    let (url, _stop) = start_server().await;
    survives_a_dropped_connection(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbit() {
    if !common::can_run(&[common::Service::RabbitMq], "reconnect::rabbit") {
        return;
    }
    survives_a_dropped_connection(common::rabbit_url()).await;
}

/// Several node URLs: a dead first node is skipped at connect, and when the connected node goes away
/// the transport fails over to the next one (two proxies to one Mailroom server stand in for nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fails_over_to_the_next_url() {
    init_tracing();
    let (url, _stop) = start_server().await;
    let (auth, upstream, vhost) = split_url(&url);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed again: connection refused
    let (a, b) = (Proxy::start(upstream).await, Proxy::start(upstream).await);
    let node = |addr: std::net::SocketAddr| format!("{auth}@{addr}/{vhost}");
    let config = AmqpConfig::new(format!("{},{},{}", node(dead), node(a.addr), node(b.addr)));
    assert_eq!(config.urls.len(), 3);
    let amqp = Amqp::connect(config).await.unwrap();
    assert_eq!(amqp.connected_url(), Some(node(a.addr)), "the dead first node was skipped");
    let bus = Bus::new(amqp.clone());
    let q = format!("t.failover.{}", &mailroom::envelope::new_message_id()[24..]);
    let got: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let g = got.clone();
    let worker = bus
        .worker(&q)
        .handle(move |m: Envelope<Job>, _| {
            g.lock().unwrap().insert(m.body.n);
            async { Ok(()) }
        })
        .run()
        .await
        .unwrap();
    bus.send(&q, Job { n: 1 }).await.unwrap();
    drop(a); // node a goes away: its listener closes and its connections are cut
    bus.send(&q, Job { n: 2 }).await.unwrap();
    assert_eq!(amqp.connected_url(), Some(node(b.addr)), "failed over past the dead node to b");
    assert!(amqp.generation() >= 2);
    assert!(eventually(Duration::from_secs(10), || got.lock().unwrap().len() == 2).await, "the worker resumed on b");
    worker.stop().await;
    for name in [q.clone(), format!("{q}.dlq")] {
        let _ = bus.transport().delete_queue(&name).await;
    }
    amqp.close().await;
}
