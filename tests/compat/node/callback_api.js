// amqplib's callback API in the style of older Node services: a confirm channel publishing with
// per-message callbacks, a prefetch-limited consumer acking each message, a basic.get, a channel error on
// its own channel, then a clean close. Prints JSON lines. Usage: node callback_api.js <url> <queue>
'use strict';
const amqp = require('amqplib/callback_api');

const [url, queue] = process.argv.slice(2);
const out = (o) => console.log(JSON.stringify(o));
const n = 300;
let cancelled = false;

function check(err) {
  if (err) {
    out({ event: 'failed', error: String(err) });
    process.exit(1);
  }
}

amqp.connect(url, (err, conn) => {
  check(err);
  conn.createConfirmChannel((err, ch) => {
    check(err);
    ch.assertQueue(queue, { durable: false }, (err) => {
      check(err);
      let acked = 0;
      for (let i = 0; i < n; i++) {
        ch.sendToQueue(queue, Buffer.from(String(i)), { persistent: true, headers: { i } }, (err) => {
          if (!err) acked++;
        });
      }
      ch.waitForConfirms((err) => {
        check(err);
        out({ event: 'confirmed', acked });
        // One message by basic.get, the rest through a consumer.
        ch.get(queue, { noAck: false }, (err, msg) => {
          check(err);
          ch.ack(msg);
          out({ event: 'got', body: msg.content.toString(), header: msg.properties.headers.i });
          consume(conn);
        });
      });
    });
  });
});

function consume(conn) {
  conn.createChannel((err, ch) => {
    check(err);
    ch.prefetch(10);
    const seen = [];
    ch.consume(queue, (msg) => {
      if (msg === null) {
        // basic.cancel from the broker: the queue was deleted below.
        cancelled = true;
        out({ event: 'consumer-cancelled' });
        return;
      }
      seen.push(Number(msg.content.toString()));
      ch.ack(msg);
      if (seen.length === n - 1) {
        out({ event: 'consumed', count: seen.length, inOrder: seen.every((v, i) => v === i + 1) });
        channelError(conn);
      }
    }, {}, check);
  });
}

function channelError(conn) {
  conn.createChannel((err, ch) => {
    check(err);
    ch.on('error', () => {});
    ch.checkQueue(queue + '.missing', (err) => {
      const code = err ? err.code : null;
      conn.createChannel((err2, other) => {
        check(err2);
        other.deleteQueue(queue, {}, (err3, ok) => {
          check(err3);
          out({ event: 'channel-error', code, deletedWith: ok.messageCount });
          // The consumer's basic.cancel may come after delete-ok (RabbitMQ writes each channel's frames
          // separately): give it a moment before closing.
          let waited = 0;
          (function closeWhenCancelled() {
            if (!cancelled && waited < 2000) {
              waited += 20;
              setTimeout(closeWhenCancelled, 20);
              return;
            }
            conn.close((err4) => out({ event: 'closed', error: err4 ? String(err4) : null }));
          })();
        });
      });
    });
  });
}
