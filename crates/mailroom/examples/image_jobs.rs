//! Competing consumers: image-resize jobs sent to one queue are shared by a pool of workers, each
//! taking one job at a time (prefetch 1), so a slow image does not hold others back. Runs on the
//! embedded broker; `--url amqp://guest:guest@127.0.0.1:5672/%2F` runs it against a server (a
//! comma-separated list names cluster nodes).

use mailroom::{Amqp, AmqpConfig, Bus, Envelope};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
struct ResizeImage {
    image: String,
    width: u32,
}

const QUEUE: &str = "example.image-jobs";
const JOBS: u32 = 12;

async fn bus_from_args() -> Result<Bus, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    Ok(match args.iter().position(|a| a == "--url") {
        Some(i) => Bus::new(Amqp::connect(AmqpConfig::new(args.get(i + 1).ok_or("--url needs a value")?)).await?),
        None => Bus::embedded()?,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = bus_from_args().await?;
    let done: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 1..=3 {
        let done = done.clone();
        let name = format!("worker-{w}");
        workers.push(
            bus.worker(QUEUE)
                .prefetch(1)
                .concurrency(1)
                .handle(move |job: Envelope<ResizeImage>, _| {
                    let (done, name) = (done.clone(), name.clone());
                    async move {
                        // Bigger images take longer: the pool balances by who is free, not round robin.
                        tokio::time::sleep(Duration::from_millis(job.body.width as u64 / 20)).await;
                        println!("{name}: resized {} to {}px", job.body.image, job.body.width);
                        done.lock().unwrap().entry(name).or_default().push(job.body.image.clone());
                        Ok(())
                    }
                })
                .run()
                .await?,
        );
    }
    for n in 1..=JOBS {
        let width = if n % 4 == 0 { 1600 } else { 320 };
        bus.send(QUEUE, ResizeImage { image: format!("photo-{n}.jpg"), width }).await?;
    }
    for _ in 0..200 {
        if done.lock().unwrap().values().map(Vec::len).sum::<usize>() == JOBS as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in workers {
        w.stop().await;
    }
    let done = done.lock().unwrap().clone();
    for (worker, images) in &done {
        println!("{worker} handled {} jobs", images.len());
    }
    let total: usize = done.values().map(Vec::len).sum();
    for q in [QUEUE.to_owned(), format!("{QUEUE}.dlq")] {
        bus.transport().delete_queue(&q).await?;
    }
    if total != JOBS as usize {
        return Err(format!("only {total} of {JOBS} jobs done").into());
    }
    Ok(())
}
