// The issue-19 program, as a new user writes it with amqplib's callback API: open a channel, publish with
// sendToQueue until it returns false, then close the connection. No 'error' listener on purpose: an
// 'error' event (EPIPE after the broker reset the socket) kills the process, as it does in such an app.
// Usage: node close_after_burst.js <url> <queue> [rounds]
'use strict';
const amqp = require('amqplib/callback_api');

const [url, queue, roundsArg] = process.argv.slice(2);
const rounds = Number(roundsArg || 3);
const out = (o) => console.log(JSON.stringify(o));

function round(i, done) {
  const started = Date.now();
  amqp.connect(url, (err, conn) => {
    if (err) throw err;
    conn.on('close', (e) => out({ event: 'close-event', round: i, error: e ? String(e) : null }));
    conn.createChannel((err, ch) => {
      if (err) throw err;
      ch.assertQueue(queue, { durable: false }, (err) => {
        if (err) throw err;
        const body = Buffer.from('0123456789abcdef');
        let sent = 0;
        // sendToQueue returns false once amqplib's buffer is full; the message is still buffered.
        while (sent < 200000) {
          sent++;
          if (!ch.sendToQueue(queue, body)) break;
        }
        conn.close((err) => {
          out({ event: 'closed', round: i, sent, error: err ? String(err) : null, ms: Date.now() - started });
          done();
        });
      });
    });
  });
}

let i = 0;
(function next() {
  if (i === rounds) {
    // Give a late EPIPE/ECONNRESET the time to surface before declaring success.
    setTimeout(() => out({ event: 'done', rounds }), 500);
    return;
  }
  round(i++, next);
})();
