// Queues: the paged list with a declare form, and one queue's page: live depth chart, details, consumers,
// bindings, peek (Mailroom's non-destructive read), get, publish, dead-letter redrive, purge and delete.

import { api, exchangeSeg, get, seg } from './api.js';
import { COLORS, History, lineChart } from './chart.js';
import {
  facts, fill, fmtBytes, fmtJson, fmtNum, fmtRate, form, h, link, notify, parseObject, row, section, select, table,
} from './dom.js';
import { bindingsTable, features, pagedList, publishForm, vhostSelect } from './pages.js';

const rate = (q, key) => fmtRate(q.message_stats && q.message_stats[`${key}_details`]);

/** Queues: paged, filtered and sorted by the API; depth, consumers, memory and paged-out columns. */
export function queues(root, app) {
  const list = pagedList(app, {
    id: 'queues',
    path: (v) => (v ? `/api/queues/${seg(v)}` : '/api/queues'),
    columns: (ctx) => [
      ctx.vhost ? null : { label: 'Virtual host', sort: 'vhost', value: (q) => q.vhost },
      { label: 'Name', sort: 'name', value: (q) => link(`#/queues/${seg(q.vhost)}/${seg(q.name)}`, q.name) },
      { label: 'Type', value: (q) => q.type },
      { label: 'Features', value: features },
      { label: 'State', value: (q) => q.state },
      { label: 'Ready', num: true, sort: 'messages_ready', value: (q) => fmtNum(q.messages_ready) },
      { label: 'Unacked', num: true, sort: 'messages_unacknowledged', value: (q) => fmtNum(q.messages_unacknowledged) },
      { label: 'Total', num: true, sort: 'messages', value: (q) => fmtNum(q.messages) },
      { label: 'Consumers', num: true, sort: 'consumers', value: (q) => fmtNum(q.consumers) },
      { label: 'Bytes', num: true, sort: 'message_bytes', title: 'Message bodies held by the queue', value: (q) => fmtBytes(q.message_bytes) },
      { label: 'In memory', num: true, sort: 'message_bytes_ram', title: 'Message bytes held in RAM', value: (q) => fmtBytes(q.message_bytes_ram) },
      { label: 'Paged out', num: true, sort: 'messages_paged_out', title: 'Ready messages whose body is on disk only', value: (q) => fmtNum(q.messages_paged_out) },
      { label: 'Incoming', num: true, sort: 'message_stats.publish_details.rate', value: (q) => rate(q, 'publish') },
      { label: 'Deliver / get', num: true, sort: 'message_stats.deliver_get_details.rate', value: (q) => rate(q, 'deliver_get') },
      { label: 'Ack', num: true, sort: 'message_stats.ack_details.rate', value: (q) => rate(q, 'ack') },
    ].filter(Boolean),
    empty: 'No queues',
  });
  const add = form({ id: 'add-queue' }, [
    row('Virtual host', vhostSelect(app)),
    row('Name', h('input', { name: 'name', required: true })),
    row('Durability', select('durable', [['true', 'Durable'], ['false', 'Transient']], 'true')),
    row('Auto delete', select('auto_delete', [['false', 'No'], ['true', 'Yes']], 'false')),
    row('Arguments (JSON)', h('textarea', {
      name: 'arguments', rows: 3,
      placeholder: '{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "orders.dlq", "x-message-ttl": 60000, "x-max-length": 10000}',
    })),
  ], 'Add queue', async (f) => {
    const body = { durable: f.durable.value === 'true', auto_delete: f.auto_delete.value === 'true', arguments: parseObject(f.arguments.value, 'Arguments') };
    await api('PUT', `/api/queues/${seg(f.vhost.value)}/${seg(f.name.value)}`, body);
    list.refresh();
    return `Queue ${f.name.value} declared`;
  });
  root.append(h('h1', null, 'Queues'), list.el, section('Add a new queue', false, add));
  return { refresh: list.refresh };
}

// ---- messages: how peek and get show them ----

function decodeBase64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

/** The payload's bytes, whatever encoding the API chose. */
function payloadBytes(m) {
  return m.payload_encoding === 'base64' ? decodeBase64(m.payload) : new TextEncoder().encode(m.payload);
}

/** A classic hex dump: offset, 16 bytes, their printable characters. */
export function hexDump(bytes) {
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const chunk = bytes.slice(i, i + 16);
    const hex = [...chunk].map((b) => b.toString(16).padStart(2, '0')).join(' ');
    const text = [...chunk].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${i.toString(16).padStart(8, '0')}  ${hex.padEnd(47)}  ${text}`);
  }
  return lines.join('\n');
}

/** The payload as a view: 'text', 'json' (pretty-printed, or why not) or 'hex'. */
export function renderPayload(m, view) {
  const bytes = payloadBytes(m);
  if (view === 'hex') return hexDump(bytes);
  const text = new TextDecoder('utf-8', { fatal: false }).decode(bytes);
  if (view === 'json') {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (e) {
      return `(not JSON: ${e.message})\n\n${text}`;
    }
  }
  return text;
}

/** The best first view: JSON when the body parses or says so, hex when it is not UTF-8, else text. */
function defaultView(m) {
  if (m.payload_encoding === 'base64') return 'hex';
  const ct = (m.properties && m.properties.content_type) || '';
  try {
    JSON.parse(m.payload);
    return 'json';
  } catch {
    return ct.includes('json') ? 'json' : 'text';
  }
}

/** One message as a card: position, routing, properties, headers and the body with a view switch. */
export function messageCard(m, index) {
  const props = { ...(m.properties || {}) };
  const headers = props.headers || {};
  delete props.headers;
  const body = h('pre', { class: 'payload' });
  let view = defaultView(m);
  const buttons = ['text', 'json', 'hex'].map((v) => h('button', {
    type: 'button', class: 'small view', 'data-view': v,
    onclick: () => { view = v; show(); },
  }, v.toUpperCase()));
  const show = () => {
    fill(body, renderPayload(m, view));
    buttons.forEach((b) => b.classList.toggle('active', b.dataset.view === view));
  };
  show();
  return h('div', { class: 'message', 'data-index': index },
    h('div', { class: 'message-head' },
      h('b', null, `Message ${index + 1}`),
      h('span', null, 'Exchange ', h('code', null, m.exchange === '' ? '(AMQP default)' : m.exchange)),
      h('span', null, 'Routing key ', h('code', null, m.routing_key)),
      h('span', null, m.redelivered ? 'redelivered' : 'not redelivered'),
      h('span', null, `${fmtNum(m.payload_bytes)} bytes${m.payload_encoding === 'base64' ? ' (binary)' : ''}`),
      h('span', null, `${fmtNum(m.message_count)} after it`)),
    h('div', { class: 'message-meta' },
      h('div', null, h('h4', null, 'Properties'), Object.keys(props).length
        ? facts(Object.entries(props).map(([k, v]) => [k, typeof v === 'object' ? JSON.stringify(v) : String(v)]))
        : h('p', { class: 'hint' }, 'none')),
      h('div', null, h('h4', null, 'Headers'), Object.keys(headers).length
        ? facts(Object.entries(headers).map(([k, v]) => [k, typeof v === 'object' ? h('pre', null, JSON.stringify(v, null, 2)) : String(v)]))
        : h('p', { class: 'hint' }, 'none'))),
    h('div', { class: 'message-body' }, h('div', { class: 'views' }, 'Payload as ', buttons), body));
}

function messages(list, emptyText) {
  if (!list.length) return h('p', { class: 'hint' }, emptyText);
  return h('div', { class: 'messages' }, list.map((m, i) => messageCard(m, i)));
}

// ---- one queue ----

function historyOf(app, vhost, name) {
  const key = `${vhost}\n${name}`;
  if (!app.queueHistory.has(key)) app.queueHistory.set(key, new History());
  return app.queueHistory.get(key);
}

/** One queue's page. */
export function queue(root, app, vhost, name) {
  const base = `/api/queues/${seg(vhost)}/${seg(name)}`;
  const hist = historyOf(app, vhost, name);
  const stats = h('div', { class: 'queue-stats', id: 'queue-stats' });
  const charts = h('div', { class: 'charts' });
  const details = h('div');
  const consumersBox = h('div', { id: 'queue-consumers' });
  const bindingsBox = h('div');
  const peekOut = h('div', { id: 'peek-result' });
  const getOut = h('div', { id: 'get-result' });

  const peek = form({ id: 'peek-form', class: 'inline' }, [
    row('From position', h('input', { name: 'offset', type: 'number', min: 0, value: 0 })),
    row('Messages', h('input', { name: 'count', type: 'number', min: 1, max: 1000, value: 10 })),
  ], 'Peek messages', async (f) => {
    const got = await get(`${base}/peek?offset=${Number(f.offset.value)}&count=${Number(f.count.value)}`);
    fill(peekOut, messages(got, 'The queue holds no ready messages at that position.'));
    return `${got.length} message(s); nothing was taken from the queue`;
  });

  const getForm = form({ id: 'get-form', class: 'inline' }, [
    row('Ack mode', select('ackmode', [
      ['ack_requeue_true', 'Nack message requeue true'],
      ['ack_requeue_false', 'Automatic ack (removes it)'],
      ['reject_requeue_true', 'Reject requeue true'],
      ['reject_requeue_false', 'Reject requeue false (dead-letters it)'],
    ], 'ack_requeue_true')),
    row('Encoding', select('encoding', [['auto', 'Auto string / base64'], ['base64', 'base64']], 'auto')),
    row('Messages', h('input', { name: 'count', type: 'number', min: 1, value: 1 })),
    row('Truncate at (bytes)', h('input', { name: 'truncate', type: 'number', min: 1, value: 50000 })),
  ], 'Get message(s)', async (f) => {
    const requeue = f.ackmode.value.endsWith('true');
    if (!requeue && !confirm('These messages leave the queue. Go on?')) return null;
    const got = await api('POST', `${base}/get`, {
      count: Number(f.count.value), ackmode: f.ackmode.value, encoding: f.encoding.value,
      truncate: f.truncate.value ? Number(f.truncate.value) : undefined,
    });
    fill(getOut, messages(got, 'Queue is empty'));
    page.refresh();
    return `${got.length} message(s)`;
  });

  const targetQueue = h('input', { name: 'target_queue', placeholder: 'queue name', list: 'queue-names' });
  const queueNames = h('datalist', { id: 'queue-names' });
  const redrive = form({ id: 'redrive-form' }, [
    h('p', { class: 'hint' }, 'Moves dead-lettered messages out of this queue, oldest first, each one safely stored at its target before it leaves here.'),
    row('Messages', h('input', { name: 'count', type: 'number', min: 1, placeholder: 'all' })),
    row('Target', h('span', { class: 'choices' },
      h('label', null, h('input', { type: 'radio', name: 'target', value: 'source', checked: true }), ' Where each was dead-lettered from (x-death)'),
      h('label', null, h('input', { type: 'radio', name: 'target', value: 'queue' }), ' Queue ', targetQueue, queueNames),
      h('label', null, h('input', { type: 'radio', name: 'target', value: 'exchange' }), ' Exchange ',
        h('input', { name: 'target_exchange', placeholder: 'exchange' }), ' routing key ', h('input', { name: 'target_key' })))),
    row('Only with header', h('input', { name: 'header_name', placeholder: 'header name' }), ' = ', h('input', { name: 'header_value', placeholder: 'value' })),
  ], 'Redrive', async (f) => {
    const body = {};
    if (f.count.value) body.count = Number(f.count.value);
    const target = f.querySelector('input[name=target]:checked').value;
    if (target === 'queue') {
      if (!targetQueue.value) throw new Error('Name the target queue');
      body.target = { queue: targetQueue.value };
    } else if (target === 'exchange') {
      body.target = { exchange: f.target_exchange.value, routing_key: f.target_key.value };
    }
    if (f.header_name.value) body.header_filter = { name: f.header_name.value, value: f.header_value.value };
    const r = await api('POST', `${base}/redrive`, body);
    page.refresh();
    return `Moved ${fmtNum(r.moved)}, skipped ${fmtNum(r.skipped)}`;
  });

  const bind = form({ id: 'add-queue-binding' }, [
    row('From exchange', h('input', { name: 'source', required: true })),
    row('Routing key', h('input', { name: 'routing_key' })),
    row('Arguments (JSON)', h('textarea', { name: 'arguments', rows: 2 })),
  ], 'Bind', async (f) => {
    await api('POST', `/api/bindings/${seg(vhost)}/e/${exchangeSeg(f.source.value)}/q/${seg(name)}`,
      { routing_key: f.routing_key.value, arguments: parseObject(f.arguments.value, 'Arguments') });
    page.refresh();
    return 'Bound';
  });

  const purge = h('button', {
    class: 'danger', id: 'purge',
    onclick: async () => {
      if (!confirm(`Purge every ready message of ${name}?`)) return;
      try {
        await api('DELETE', `${base}/contents`);
        notify(`Queue ${name} purged`);
        page.refresh();
      } catch (e) {
        notify(e.message, 'error');
      }
    },
  }, 'Purge messages');

  const del = form({ id: 'delete-queue' }, [
    row('Only if empty', h('input', { type: 'checkbox', name: 'if_empty' })),
    row('Only if unused', h('input', { type: 'checkbox', name: 'if_unused' })),
  ], 'Delete queue', async (f) => {
    if (!confirm(`Delete queue ${name}?`)) return null;
    const q = new URLSearchParams();
    if (f.if_empty.checked) q.set('if-empty', 'true');
    if (f.if_unused.checked) q.set('if-unused', 'true');
    await api('DELETE', `${base}${q.toString() ? `?${q}` : ''}`);
    notify(`Queue ${name} deleted`);
    location.hash = '#/queues';
    return null;
  });

  root.append(
    h('h1', null, 'Queue ', h('span', { class: 'name', id: 'queue-name' }, name), h('small', null, ` in virtual host ${vhost}`)),
    stats,
    section('Overview', true, charts, details),
    section('Consumers', true, consumersBox),
    section('Bindings', false, bindingsBox, h('h3', null, 'Add binding to this queue'), bind),
    section('Peek messages', true, peek, peekOut),
    section('Get messages', false, h('p', { class: 'hint' }, 'Getting messages takes them from the queue (then requeues or acks them): peek leaves them alone.'), getForm, getOut),
    section('Publish message', false, publishForm(vhost, '', name)),
    section('Dead-letter redrive', true, redrive),
    section('Purge', false, purge),
    section('Delete', false, del),
  );

  const page = {
    async refresh() {
      let q;
      try {
        q = await get(base);
      } catch (e) {
        fill(stats, h('p', { class: 'error' }, e.message));
        return;
      }
      hist.add({ ready: q.messages_ready, unacked: q.messages_unacknowledged, total: q.messages });
      const cell = (label, value, id) => h('div', { class: 'stat', id }, h('b', null, value), h('span', null, label));
      fill(stats,
        cell('Ready', fmtNum(q.messages_ready), 'stat-ready'), cell('Unacked', fmtNum(q.messages_unacknowledged), 'stat-unacked'),
        cell('Total', fmtNum(q.messages), 'stat-total'), cell('Consumers', fmtNum(q.consumers), 'stat-consumers'),
        cell('Bytes', fmtBytes(q.message_bytes)), cell('In memory', fmtBytes(q.message_bytes_ram)),
        cell('Paged out', fmtNum(q.messages_paged_out)));
      const line = (k, label, i) => ({ label, color: COLORS[i], points: hist.points(k) });
      fill(charts, lineChart('Queued messages', [line('ready', 'Ready', 0), line('unacked', 'Unacked', 1), line('total', 'Total', 2)], { format: fmtNum }));
      fill(details, facts([
        ['Type', q.type], ['State', q.state], ['Features', features(q)], ['Arguments', fmtJson(q.arguments)],
        ['Policy', q.policy || ''], ['Effective policy definition', fmtJson(q.effective_policy_definition)],
        ['Node', q.node], ['Message bytes (ready / unacked)', `${fmtBytes(q.message_bytes_ready)} / ${fmtBytes(q.message_bytes_unacknowledged)}`],
        ['Quarantined records', fmtNum(q.quarantined)], ['Body read errors', fmtNum(q.read_errors)],
        ['Incoming', rate(q, 'publish')], ['Deliver / get', rate(q, 'deliver_get')], ['Ack', rate(q, 'ack')],
      ]));
      const [consumers, bindings, names] = await Promise.all([
        get(`/api/consumers/${seg(vhost)}`),
        get(`${base}/bindings`),
        get(`/api/queues/${seg(vhost)}?columns=name`),
      ]);
      fill(consumersBox, table([
        { label: 'Channel', value: (c) => c.channel_details.name },
        { label: 'Consumer tag', value: (c) => c.consumer_tag },
        { label: 'Ack required', value: (c) => (c.ack_required ? 'yes' : 'no') },
        { label: 'Exclusive', value: (c) => (c.exclusive ? 'yes' : 'no') },
        { label: 'Prefetch', num: true, value: (c) => c.prefetch_count },
        { label: 'Active', value: (c) => (c.active ? 'yes' : 'no') },
        { label: 'Arguments', value: (c) => fmtJson(c.arguments) },
      ], consumers.filter((c) => c.queue.name === name), { empty: 'No consumers' }));
      fill(bindingsBox, bindingsTable(bindings, { to: false, onChange: () => page.refresh() }));
      fill(queueNames, names.map((n) => h('option', { value: n.name })));
    },
  };
  return page;
}
