"""Declares N durable queues, each bound to a durable direct exchange, and times it (issue 13, item 5).

Usage: .venv/bin/python bench/declare_many.py AMQP_URL [N] [CONNECTIONS]

Each of CONNECTIONS connections declares its share of the queues one after the other, waiting for every
declare-ok and bind-ok (Mailroom sends them only once the change is fsynced). Prints the total time, the
time of the first and last 10%, and one RESULT line. Deletes what it declared afterwards.
"""
import sys
import threading
import time
import uuid

import pika


def worker(url, names, exchange, marks):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    for name in names:
        ch.queue_declare(name, durable=True)
        ch.queue_bind(name, exchange, routing_key=name)
        marks.append(time.monotonic())
    conn.close()


def cleanup(url, names, exchange):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    for name in names:
        ch.queue_delete(name)
    ch.exchange_delete(exchange)
    conn.close()


def main():
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    connections = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    run = uuid.uuid4().hex[:8]
    exchange = f"declare-bench-{run}"
    names = [f"declare-bench-{run}-{i}" for i in range(n)]
    setup = pika.BlockingConnection(pika.URLParameters(url))
    setup.channel().exchange_declare(exchange, "direct", durable=True)
    setup.close()
    marks = []
    threads = [threading.Thread(target=worker, args=(url, names[i::connections], exchange, marks))
               for i in range(connections)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.monotonic() - start
    marks.sort()
    tenth = max(1, n // 10)
    first = marks[tenth - 1] - start
    last = marks[-1] - marks[-tenth - 1]
    print(f"RESULT queues={n} connections={connections} total_s={total:.2f} "
          f"first_10pct_s={first:.2f} last_10pct_s={last:.2f} per_declare_ms={1000 * total / n * connections:.2f}")
    cleanup(url, names, exchange)


if __name__ == "__main__":
    main()
