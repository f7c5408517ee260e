//! Scatter-gather: a search fans out to three catalogue shards and gathers their hits before a
//! deadline. One shard is slow: gathering "all" with a short deadline returns the partial result and
//! names the shard that did not answer; "first 2" returns as soon as two shards answered; a topic
//! scatter reaches every shard subscribed to the search topic. Runs on the embedded broker;
//! `--url amqp://guest:guest@127.0.0.1:5672/%2F` runs it against a server.

use mailroom::{Amqp, AmqpConfig, Bus, Envelope, Strategy, Target};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Search {
    text: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hits {
    titles: Vec<String>,
}

const TOPIC: &str = "example.search.query";

async fn bus_from_args() -> Result<Bus, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    Ok(match args.iter().position(|a| a == "--url") {
        Some(i) => Bus::new(Amqp::connect(AmqpConfig::new(args.get(i + 1).ok_or("--url needs a value")?)).await?),
        None => Bus::embedded()?,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = bus_from_args().await?;
    let shards = [("example.search.books", 20), ("example.search.music", 50), ("example.search.films", 1500)];
    let mut running = Vec::new();
    for (shard, delay_ms) in shards {
        running.push(
            bus.responder(shard)
                .topic(TOPIC) // also answers searches published to the topic
                .handle_request(move |q: Envelope<Search>, _| async move {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    let kind = shard.rsplit('.').next().unwrap_or(shard);
                    Ok(Hits { titles: vec![format!("{} ({kind})", q.body.text)] })
                })
                .run()
                .await?,
        );
    }
    let queues: Vec<String> = shards.iter().map(|(s, _)| s.to_string()).collect();
    let search = Search { text: "rust".into() };

    let all = bus
        .scatter::<Hits, _>(Target::Queues(queues.clone()), search.clone())
        .gather(Strategy::All)
        .deadline(Duration::from_millis(500))
        .await?;
    println!("all, 500 ms deadline: complete={} replies={} missing={:?}", all.complete, all.replies.len(), all.missing);
    for (shard, hits) in &all.replies {
        println!("  {shard}: {:?}", hits.titles);
    }

    let first = bus
        .scatter::<Hits, _>(Target::Queues(queues), search.clone())
        .gather(Strategy::FirstN(2))
        .deadline(Duration::from_secs(3))
        .await?;
    println!(
        "first 2: complete={} from {:?}",
        first.complete,
        first.replies.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );

    let topic = bus
        .scatter::<Hits, _>(Target::Topic(TOPIC.into()), search)
        .gather(Strategy::UntilDeadline)
        .deadline(Duration::from_secs(2))
        .await?;
    println!("topic, until 2 s: {} shards answered", topic.replies.len());

    for r in running {
        r.stop().await;
    }
    for (shard, _) in shards {
        for name in [shard.to_owned(), format!("{shard}.dlq")] {
            bus.transport().delete_queue(&name).await?;
        }
    }
    if all.complete || all.missing != ["example.search.films"] || !first.complete || topic.replies.len() != 3 {
        return Err("unexpected gather results".into());
    }
    Ok(())
}
