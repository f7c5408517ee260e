#!/usr/bin/env python3
"""Measures how promptly expired messages leave a queue with no consumers (issue 6's TTL figure).

Publishes N messages to a queue with x-message-ttl and a dead-letter exchange, then polls the queue and
the dead-letter queue until every message has moved. Prints the delay between the last message's due
time (its publish time + TTL) and the moment the queue was empty and the DLQ held all N.

    .venv/bin/python bench/ttl_expiry.py --url amqp://guest:guest@127.0.0.1:5673/%2F --count 100000 --ttl-ms 1000
"""
import argparse
import time
import uuid

import pika


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--ttl-ms", type=int, default=1000)
    args = ap.parse_args()
    conn = pika.BlockingConnection(pika.URLParameters(args.url))
    ch = conn.channel()
    tag = uuid.uuid4().hex[:8]
    dlx, dlq, q = f"ttl-dlx-{tag}", f"ttl-dlq-{tag}", f"ttl-src-{tag}"
    ch.exchange_declare(dlx, "fanout", auto_delete=True)
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(q, arguments={"x-message-ttl": args.ttl_ms, "x-dead-letter-exchange": dlx})
    body = b"x" * 16
    start = time.monotonic()
    for _ in range(args.count):
        ch.basic_publish("", q, body)
    ch.queue_declare(q, passive=True)  # round trip: every publish has been processed
    last_due = time.monotonic() + args.ttl_ms / 1000.0
    publish_s = time.monotonic() - start
    while True:
        ready = ch.queue_declare(q, passive=True).method.message_count
        dead = ch.queue_declare(dlq, passive=True).method.message_count
        if ready == 0 and dead == args.count:
            break
        if time.monotonic() - last_due > 60:
            raise SystemExit(f"gave up: ready={ready} dead={dead}")
        time.sleep(0.01)
    done = time.monotonic()
    print(f"RESULT count={args.count} ttl_ms={args.ttl_ms} publish_s={publish_s:.2f} "
          f"gone_after_due_ms={(done - last_due) * 1000:.0f}")
    ch.queue_delete(q)
    ch.queue_delete(dlq)
    conn.close()


if __name__ == "__main__":
    main()
