// amqplib's promise API in the habits of ordinary applications. One scenario per run; each prints JSON
// lines describing what the client saw. Usage: node promise_api.js <scenario> <url> <name>
'use strict';
const amqp = require('amqplib');

const [scenario, url, name] = process.argv.slice(2);
const out = (o) => console.log(JSON.stringify(o));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const scenarios = {
  // Server properties and the capabilities clients look for.
  async capabilities() {
    const conn = await amqp.connect(url);
    out({ event: 'server', properties: conn.connection.serverProperties });
    await conn.close();
  },

  // Confirms (the broker coalesces acks with `multiple`), then a prefetch-limited consumer that acks every
  // tenth delivery with `multiple`.
  async confirms() {
    const conn = await amqp.connect(url);
    const ch = await conn.createConfirmChannel();
    await ch.assertQueue(name, { durable: false });
    const n = 1000;
    let acked = 0;
    for (let i = 0; i < n; i++) {
      ch.sendToQueue(name, Buffer.from(String(i)), {}, (err) => {
        if (!err) acked++;
      });
    }
    await ch.waitForConfirms();
    out({ event: 'confirmed', acked, published: n });
    const consumer = await conn.createChannel();
    await consumer.prefetch(50);
    const got = [];
    let maxUnacked = 0;
    let unacked = 0;
    await new Promise((resolve, reject) => {
      consumer.consume(name, (msg) => {
        got.push(Number(msg.content.toString()));
        unacked++;
        maxUnacked = Math.max(maxUnacked, unacked);
        if (got.length % 10 === 0) {
          consumer.ack(msg, true);
          unacked = 0;
        }
        if (got.length === n) resolve();
      }).catch(reject);
    });
    const inOrder = got.every((v, i) => v === i);
    const left = await consumer.checkQueue(name);
    out({ event: 'consumed', count: got.length, inOrder, maxUnacked, left: left.messageCount });
    await conn.close();
  },

  // A mandatory publish nobody can route comes back as a 'return' (312 NO_ROUTE) and is still confirmed.
  async returns() {
    const conn = await amqp.connect(url);
    const ch = await conn.createConfirmChannel();
    const returned = new Promise((resolve) => ch.on('return', resolve));
    let confirmed = null;
    ch.publish('', name, Buffer.from('nobody'), { mandatory: true }, (err) => (confirmed = !err));
    const msg = await returned;
    await ch.waitForConfirms();
    out({ event: 'returned', replyCode: msg.fields.replyCode, replyText: msg.fields.replyText, routingKey: msg.fields.routingKey, body: msg.content.toString(), confirmed });
    await conn.close();
  },

  // basic.cancel from the broker (queue deleted under a consumer): amqplib calls the consumer with null.
  async cancel() {
    const conn = await amqp.connect(url);
    const ch = await conn.createChannel();
    await ch.assertQueue(name, { durable: false });
    const cancelled = new Promise((resolve) => {
      ch.consume(name, (msg) => {
        if (msg === null) resolve();
      });
    });
    await sleep(100);
    const other = await conn.createChannel();
    await other.deleteQueue(name);
    await Promise.race([cancelled, sleep(5000).then(() => { throw new Error('no cancel notification'); })]);
    // The channel stays usable after the notification.
    const q = await ch.assertQueue('', { exclusive: true });
    out({ event: 'cancelled', channelUsable: q.queue.length > 0 });
    await conn.close();
  },

  // A channel error (404) closes only that channel; the connection and the other channels go on.
  async channelError() {
    const conn = await amqp.connect(url);
    let connError = null;
    conn.on('error', (e) => (connError = String(e)));
    const ch = await conn.createChannel();
    const closed = new Promise((resolve) => ch.on('close', resolve));
    ch.on('error', () => {});
    let code = null;
    try {
      await ch.checkQueue(name);
    } catch (e) {
      code = e.code;
    }
    await closed;
    const other = await conn.createChannel();
    const q = await other.assertQueue(name, { durable: false });
    out({ event: 'channel-error', code, otherChannelWorks: q.queue === name, connError });
    await conn.close();
  },

  // Heartbeats negotiated at 1 s: an idle connection stays up for several intervals.
  async heartbeat() {
    const conn = await amqp.connect(url + (url.includes('?') ? '&' : '?') + 'heartbeat=1');
    let closedEarly = null;
    conn.on('close', (e) => (closedEarly = e ? String(e) : 'closed'));
    conn.on('error', () => {});
    const ch = await conn.createChannel();
    await sleep(3500);
    const q = await ch.assertQueue(name, { durable: false });
    out({ event: 'heartbeat', heartbeat: conn.connection.heartbeat, alive: q.queue === name, closedEarly });
    await conn.close();
  },

  // Connect over IPv6 and round-trip one message.
  async ipv6() {
    const conn = await amqp.connect(url);
    const ch = await conn.createChannel();
    await ch.assertQueue(name, { durable: false });
    ch.sendToQueue(name, Buffer.from('over v6'));
    let msg = false;
    for (let i = 0; i < 50 && !msg; i++) {
      msg = await ch.get(name, { noAck: true });
      if (!msg) await sleep(20);
    }
    out({ event: 'ipv6', body: msg ? msg.content.toString() : null });
    await ch.deleteQueue(name);
    await conn.close();
  },

  // connection.blocked / unblocked (a broker with a tiny memory watermark): publishing blocks the
  // connection; once another connection purges the queue, it is unblocked and publishing goes on.
  async blocked() {
    const conn = await amqp.connect(url);
    const seen = [];
    let wake = () => {};
    conn.on('blocked', (reason) => { seen.push('blocked: ' + reason); wake(); });
    conn.on('unblocked', () => { seen.push('unblocked'); wake(); });
    const until = async (n) => {
      for (let i = 0; i < 100 && seen.length < n; i++) await new Promise((r) => { wake = r; setTimeout(r, 100); });
    };
    const ch = await conn.createChannel();
    await ch.assertQueue(name, { durable: false });
    for (let i = 0; i < 64; i++) ch.sendToQueue(name, Buffer.alloc(1024, 'b'));
    await until(1);
    const admin = await amqp.connect(url);
    const ach = await admin.createChannel();
    const after = name + '.after';
    await ach.assertQueue(after, { durable: false });
    // A blocked connection is not read: the rest of the burst waits in the socket until it is unblocked.
    const purged = await ach.purgeQueue(name);
    await until(2);
    ch.sendToQueue(after, Buffer.from('after'));
    let msg = false;
    for (let i = 0; i < 100 && !msg; i++) {
      msg = await ach.get(after, { noAck: true });
      if (!msg) await sleep(20);
    }
    out({ event: 'blocked', seen, purged: purged.messageCount, after: msg ? msg.content.toString() : null });
    await ach.deleteQueue(name);
    await ach.deleteQueue(after);
    await admin.close();
    await conn.close();
  },

  // The burst-then-close program of issue 19 with the promise API.
  async closeAfterBurst() {
    const started = Date.now();
    const conn = await amqp.connect(url);
    const ch = await conn.createChannel();
    await ch.assertQueue(name, { durable: false });
    let sent = 0;
    while (sent < 200000) {
      sent++;
      if (!ch.sendToQueue(name, Buffer.from('0123456789abcdef'))) break;
    }
    await conn.close();
    await sleep(500);
    out({ event: 'closed', sent, ms: Date.now() - started });
  },
};

scenarios[scenario]().catch((e) => {
  out({ event: 'failed', error: String(e && e.stack ? e.stack : e) });
  process.exit(1);
});
