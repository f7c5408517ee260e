// The node-wide pages: overview, connections, channels, exchanges (list and one exchange), and the pieces
// other pages share: the paged list and the publish form.

import { api, exchangeSeg, get, listPath, seg } from './api.js';
import { COLORS, lineChart } from './chart.js';
import {
  append, facts, fill, fmtBytes, fmtDuration, fmtJson, fmtNum, fmtRate, form, h, link, notify, parseObject, row, section,
  select, table,
} from './dom.js';

const listState = new Map(); // per list: {page, pageSize, name, regex, sort}

/**
 * A list paged, filtered and sorted by the API (`page`, `page_size`, `name`, `use_regex`, `sort`,
 * `sort_reverse`), as RabbitMQ's UI lists queues. `path(vhost)` names the listing for a vhost ('' = all).
 */
export function pagedList(app, { id, path, columns, sort = { key: 'name', reverse: false }, empty }) {
  const state = listState.get(id) || { page: 1, pageSize: 50, name: '', regex: false, sort };
  listState.set(id, state);
  const filter = h('input', { type: 'search', placeholder: 'Filter by name', value: state.name, class: 'filter', id: `${id}-filter` });
  const regex = h('input', { type: 'checkbox', checked: state.regex });
  const size = select('page_size', [['20', '20'], ['50', '50'], ['100', '100'], ['500', '500']], String(state.pageSize));
  const summary = h('span', { class: 'summary' });
  const pager = h('span', { class: 'pager' });
  const body = h('div', { id: `${id}-table` });
  let debounce = null;
  const reload = () => { state.page = 1; refresh(); };
  filter.addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { state.name = filter.value; reload(); }, 250);
  });
  regex.addEventListener('change', () => { state.regex = regex.checked; reload(); });
  size.addEventListener('change', () => { state.pageSize = Number(size.value); reload(); });
  const onSort = (key) => {
    state.sort = { key, reverse: state.sort.key === key ? !state.sort.reverse : false };
    refresh();
  };
  async function refresh() {
    const params = {
      page: state.page, page_size: state.pageSize, name: state.name, use_regex: state.regex ? 'true' : '',
      sort: state.sort.key, sort_reverse: state.sort.reverse ? 'true' : '',
    };
    let data;
    try {
      data = await get(listPath(path(app.vhost), params));
    } catch (e) {
      if (e.status === 400 && state.page > 1) { // the page ran out (items went away): back to the first
        state.page = 1;
        return refresh();
      }
      fill(body, h('p', { class: 'error' }, e.message));
      return;
    }
    fill(summary, `${fmtNum(data.filtered_count)} of ${fmtNum(data.total_count)} shown on ${data.page_count} page(s)`);
    const go = (p) => () => { state.page = p; refresh(); };
    fill(pager,
      h('button', { class: 'small', disabled: data.page <= 1, onclick: go(data.page - 1) }, '‹ Previous'),
      ` page ${data.page} of ${data.page_count} `,
      h('button', { class: 'small', disabled: data.page >= data.page_count, onclick: go(data.page + 1) }, 'Next ›'));
    fill(body, table(columns(app), data.items, { sort: state.sort, onSort, empty }));
  }
  const el = h('div', { class: 'paged' },
    h('div', { class: 'list-controls' }, filter, h('label', null, regex, ' Regex'), h('label', null, 'Page size ', size), summary, pager),
    body);
  return { el, refresh };
}

/** Yes/No. */
const yn = (b) => (b ? 'yes' : 'no');

/** The short feature tags RabbitMQ shows beside a queue or exchange (D, AD, I, Excl, arguments). */
export function features(o) {
  const tags = [];
  if (o.durable) tags.push(['D', 'durable']);
  if (o.auto_delete) tags.push(['AD', 'auto-delete']);
  if (o.internal) tags.push(['I', 'internal']);
  if (o.exclusive) tags.push(['Excl', 'exclusive']);
  const args = o.arguments || {};
  const short = {
    'x-dead-letter-exchange': 'DLX', 'x-dead-letter-routing-key': 'DLK', 'x-message-ttl': 'TTL', 'x-expires': 'Exp',
    'x-max-length': 'Lim', 'x-max-length-bytes': 'Lim B', 'x-max-priority': 'Pri', 'x-overflow': 'Ovl',
    'x-queue-mode': 'Mode', 'x-single-active-consumer': 'SAC', 'x-delayed-type': 'Delayed',
  };
  for (const [k, v] of Object.entries(args)) tags.push([short[k] || k, `${k}: ${JSON.stringify(v)}`]);
  return h('span', { class: 'tags' }, tags.map(([t, title]) => h('abbr', { title, class: 'tag' }, t)),
    o.policy ? h('abbr', { title: 'policy', class: 'tag policy' }, o.policy) : null);
}

// ---- overview ----

/** Overview: totals, live charts (queued messages, rates when the API has them, connections), node, alarms. */
export function overview(root, app) {
  const totals = h('div', { class: 'totals', id: 'totals' });
  const charts = h('div', { class: 'charts' });
  const nodes = h('div');
  const alarms = h('div', { id: 'overview-alarms' });
  const store = h('div');
  const listeners = h('div');
  root.append(h('h1', null, 'Overview'), totals,
    section('Totals', true, charts),
    section('Alarms', true, alarms),
    section('Nodes', true, nodes),
    section('Message store', false, store),
    section('Ports', false, listeners));
  return {
    refresh() {
      const o = app.overview;
      if (!o) return;
      const t = o.object_totals || {};
      const q = o.queue_totals || {};
      const card = (label, value, hash) => h('a', { class: 'total', href: hash }, h('b', null, fmtNum(value)), h('span', null, label));
      fill(totals,
        card('Connections', t.connections, '#/connections'), card('Channels', t.channels, '#/channels'),
        card('Exchanges', t.exchanges, '#/exchanges'), card('Queues', t.queues, '#/queues'),
        card('Consumers', t.consumers, '#/queues'), card('Messages', q.messages, '#/queues'));
      const hist = app.history;
      const lines = (names) => names.map(([k, label], i) => ({ label, color: COLORS[i], points: hist.points(k) }));
      const rates = lines([['publish', 'Publish'], ['deliver', 'Deliver / get'], ['ack', 'Ack'], ['confirm', 'Confirm'], ['redeliver', 'Redelivered']]);
      const hasRates = rates.some((l) => l.points.length);
      fill(charts,
        lineChart('Queued messages', lines([['ready', 'Ready'], ['unacked', 'Unacked'], ['total', 'Total']]), { format: fmtNum }),
        hasRates
          ? lineChart('Message rates', rates.filter((l) => l.points.length), { format: (v) => `${v.toFixed(1)}/s` })
          : h('figure', { class: 'chart-box note' }, h('figcaption', null, 'Message rates'),
            h('p', null, 'This broker\u2019s API reports no message rates yet (message_stats is empty in /api/overview).')),
        lineChart('Connections', lines([['connections', 'Connections'], ['channels', 'Channels'], ['consumers', 'Consumers']]), { format: fmtNum }));
      const raised = [];
      for (const n of app.nodes) {
        if (n.mem_alarm) raised.push(`memory (${n.name})`);
        if (n.disk_free_alarm) raised.push(`disk space (${n.name})`);
      }
      fill(alarms, raised.length
        ? h('p', { class: 'alarm' }, 'Resource alarms in effect, publishers blocked: ', raised.join(', '))
        : h('p', { class: 'ok', id: 'no-alarms' }, 'No alarms: memory and disk within limits.'));
      fill(nodes, table([
        { label: 'Name', value: (n) => n.name },
        { label: 'Type', value: (n) => n.type },
        { label: 'Memory used', num: true, value: (n) => fmtBytes(n.mem_used) },
        { label: 'Memory alarm', value: (n) => (n.mem_alarm ? h('b', { class: 'error' }, 'alarm') : 'ok') },
        { label: 'Disk alarm', value: (n) => (n.disk_free_alarm ? h('b', { class: 'error' }, 'alarm') : 'ok') },
        { label: 'Processors', num: true, value: (n) => n.processors },
        { label: 'Uptime', value: (n) => fmtDuration(n.uptime) },
        { label: 'OS pid', value: (n) => n.os_pid },
      ], app.nodes));
      const s = o.store_totals || {};
      fill(store, facts([
        ['fsync calls', fmtNum(s.fsyncs)], ['Group-commit rounds', fmtNum(s.sync_rounds)],
        ['Records made durable', fmtNum(s.records_synced)], ['Time in fsync', `${(s.fsync_seconds || 0).toFixed(3)} s`],
        ['Failed rounds', fmtNum(s.sync_failures)], ['Stores failing now', fmtNum(s.stores_failing)],
        ['Quarantined records', fmtNum(s.quarantined_records)],
      ]));
      fill(listeners, table([
        { label: 'Protocol', value: (l) => l.protocol },
        { label: 'Bound to', value: (l) => l.ip_address },
        { label: 'Port', num: true, value: (l) => l.port },
      ], o.listeners || []));
    },
  };
}

// ---- connections and channels ----

async function closeConnection(name) {
  const reason = prompt(`Close connection ${name}?\nReason sent to the client:`, 'Closed via management UI');
  if (reason === null) return false;
  await api('DELETE', `/api/connections/${seg(name)}`, undefined, { 'X-Reason': reason });
  notify(`Connection ${name} closed`);
  return true;
}

const closeButton = (name, after) => h('button', {
  class: 'small danger',
  onclick: async () => {
    try {
      if (await closeConnection(name)) after();
    } catch (e) {
      notify(e.message, 'error');
    }
  },
}, 'Close');

/** Connections: paged list, each with a close button. */
export function connections(root, app) {
  const list = pagedList(app, {
    id: 'connections',
    path: (v) => (v ? `/api/vhosts/${seg(v)}/connections` : '/api/connections'),
    columns: () => [
      { label: 'Name', sort: 'name', value: (c) => link(`#/connections/${seg(c.name)}`, c.name) },
      { label: 'Client-provided name', value: (c) => c.user_provided_name || '' },
      { label: 'User', sort: 'user', value: (c) => c.user },
      { label: 'Virtual host', sort: 'vhost', value: (c) => c.vhost },
      { label: 'State', value: (c) => c.state },
      { label: 'Protocol', value: (c) => c.protocol },
      { label: 'Channels', num: true, sort: 'channels', value: (c) => c.channels },
      { label: 'Client', value: (c) => clientName(c.client_properties) },
      { label: 'Connected', sort: 'connected_at', value: (c) => new Date(c.connected_at).toLocaleString() },
      { label: 'From client', num: true, value: (c) => fmtRate(c.recv_oct_details) },
      { label: 'To client', num: true, value: (c) => fmtRate(c.send_oct_details) },
      { label: 'Send pending', num: true, sort: 'send_pend', title: 'Bytes queued for the client, not yet written to its socket', value: (c) => fmtBytes(c.send_pend || 0) },
      { label: '', value: (c) => closeButton(c.name, () => list.refresh()) },
    ],
    empty: 'No connections',
  });
  root.append(h('h1', null, 'Connections'), list.el);
  return { refresh: list.refresh };
}

function clientName(props) {
  if (!props) return '';
  return [props.product, props.version].filter(Boolean).join(' ');
}

/** One connection: its details, client properties, channels; close with a reason. */
export function connection(root, app, name) {
  const details = h('div');
  const channelsBox = h('div');
  root.append(h('h1', null, 'Connection ', h('span', { class: 'name' }, name)),
    section('Details', true, details), section('Channels', true, channelsBox),
    section('Close this connection', false,
      form({ id: 'close-connection' }, [row('Reason', h('input', { name: 'reason', value: 'Closed via management UI' }))], 'Force close',
        async (f) => {
          await api('DELETE', `/api/connections/${seg(name)}`, undefined, { 'X-Reason': f.reason.value });
          return 'Closed';
        })));
  return {
    async refresh() {
      let c;
      try {
        c = await get(`/api/connections/${seg(name)}`);
      } catch (e) {
        fill(details, h('p', { class: 'error' }, e.message));
        fill(channelsBox);
        return;
      }
      fill(details, facts([
        ['Client-provided name', c.user_provided_name || ''], ['User', c.user], ['Virtual host', c.vhost],
        ['Peer', `${c.peer_host}:${c.peer_port}`], ['Local', `${c.host}:${c.port}`], ['Protocol', c.protocol],
        ['Authentication', c.auth_mechanism], ['TLS', yn(c.ssl)], ['Heartbeat', `${c.timeout} s`],
        ['Frame max', fmtNum(c.frame_max)], ['Channel max', fmtNum(c.channel_max)],
        ['Connected at', new Date(c.connected_at).toLocaleString()],
        ['Send pending', `${fmtBytes(c.send_pend || 0)} (queued for the client, not yet written)`],
        ['Client properties', h('pre', null, JSON.stringify(c.client_properties, null, 2))],
      ]));
      const chs = await get(`/api/connections/${seg(name)}/channels`);
      fill(channelsBox, table(channelColumns(), chs, { empty: 'No channels' }));
    },
  };
}

function channelColumns(refresh) {
  return [
    { label: 'Channel', sort: 'name', value: (c) => c.name },
    { label: 'User', sort: 'user', value: (c) => c.user },
    { label: 'Virtual host', sort: 'vhost', value: (c) => c.vhost },
    { label: 'Mode', title: 'C: confirm, T: transactional', value: (c) => [c.confirm ? 'C' : '', c.transactional ? 'T' : ''].join(' ').trim() },
    { label: 'Prefetch', num: true, sort: 'prefetch_count', value: (c) => c.prefetch_count || c.global_prefetch_count || '' },
    { label: 'Unacked', num: true, sort: 'messages_unacknowledged', value: (c) => fmtNum(c.messages_unacknowledged) },
    { label: 'Unconfirmed', num: true, sort: 'messages_unconfirmed', value: (c) => fmtNum(c.messages_unconfirmed) },
    { label: 'Uncommitted', num: true, value: (c) => fmtNum(c.messages_uncommitted) },
    { label: 'Consumers', num: true, sort: 'consumer_count', value: (c) => fmtNum(c.consumer_count) },
    { label: 'Publish', num: true, value: (c) => fmtRate(c.message_stats && c.message_stats.publish_details) },
    { label: 'Deliver / get', num: true, value: (c) => fmtRate(c.message_stats && c.message_stats.deliver_get_details) },
    refresh ? {
      label: '',
      title: 'The API closes connections, not single channels: this closes the channel\u2019s connection',
      value: (c) => h('span', { title: 'Closes the whole connection (the API has no channel close)' },
        closeButton(c.connection_details.name, refresh)),
    } : null,
  ].filter(Boolean);
}

/** Channels: paged list; closing one closes its connection (the API has no per-channel close). */
export function channels(root, app) {
  const list = pagedList(app, {
    id: 'channels',
    path: (v) => (v ? `/api/vhosts/${seg(v)}/channels` : '/api/channels'),
    columns: () => channelColumns(() => list.refresh()),
    empty: 'No channels',
  });
  root.append(h('h1', null, 'Channels'), list.el,
    h('p', { class: 'hint' }, 'Close acts on the channel\u2019s connection: the management API closes connections only.'));
  return { refresh: list.refresh };
}

// ---- exchanges ----

const exchangeLabel = (name) => (name === '' ? '(AMQP default)' : name);

/** Exchanges: paged list and a declare form. */
export function exchanges(root, app) {
  const list = pagedList(app, {
    id: 'exchanges',
    path: (v) => (v ? `/api/exchanges/${seg(v)}` : '/api/exchanges'),
    columns: (ctx) => [
      ctx.vhost ? null : { label: 'Virtual host', sort: 'vhost', value: (e) => e.vhost },
      { label: 'Name', sort: 'name', value: (e) => link(`#/exchanges/${seg(e.vhost)}/${exchangeSeg(e.name)}`, exchangeLabel(e.name)) },
      { label: 'Type', sort: 'type', value: (e) => e.type },
      { label: 'Features', value: features },
      { label: 'Message rate in', num: true, value: (e) => fmtRate(e.message_stats && e.message_stats.publish_in_details) },
      { label: 'Message rate out', num: true, value: (e) => fmtRate(e.message_stats && e.message_stats.publish_out_details) },
    ].filter(Boolean),
  });
  const types = ((app.overview && app.overview.exchange_types) || [{ name: 'direct' }, { name: 'fanout' }, { name: 'topic' }, { name: 'headers' }])
    .map((t) => [t.name, t.name]);
  const add = form({ id: 'add-exchange' }, [
    row('Virtual host', vhostSelect(app)),
    row('Name', h('input', { name: 'name', required: true })),
    row('Type', select('type', types, 'direct')),
    row('Durability', select('durable', [['true', 'Durable'], ['false', 'Transient']], 'true')),
    row('Auto delete', select('auto_delete', [['false', 'No'], ['true', 'Yes']], 'false')),
    row('Internal', select('internal', [['false', 'No'], ['true', 'Yes']], 'false')),
    row('Arguments (JSON)', h('textarea', { name: 'arguments', rows: 2, placeholder: '{"alternate-exchange": "ae"}' })),
  ], 'Add exchange', async (f) => {
    const body = {
      type: f.type.value, durable: f.durable.value === 'true', auto_delete: f.auto_delete.value === 'true',
      internal: f.internal.value === 'true', arguments: parseObject(f.arguments.value, 'Arguments'),
    };
    await api('PUT', `/api/exchanges/${seg(f.vhost.value)}/${seg(f.name.value)}`, body);
    list.refresh();
    return `Exchange ${f.name.value} declared`;
  });
  root.append(h('h1', null, 'Exchanges'), list.el, section('Add a new exchange', false, add));
  return { refresh: list.refresh };
}

/**
 * A <select name="vhost"> of the vhosts: at once those the header knows, then the broker's own list, so a
 * vhost created a moment ago is offered even before the header's next refresh.
 */
export function vhostSelect(app) {
  const names = [...document.querySelectorAll('#vhost option')].map((o) => o.value).filter(Boolean);
  const list = names.length ? names : ['/'];
  const sel = select('vhost', list.map((n) => [n, n]), app.vhost || list[0]);
  get('/api/vhosts').then((vhosts) => {
    const fresh = vhosts.map((v) => v.name);
    if (fresh.join('\n') === list.join('\n')) return;
    const chosen = sel.value;
    fill(sel, fresh.map((n) => h('option', { value: n }, n)));
    sel.value = fresh.includes(chosen) ? chosen : (app.vhost && fresh.includes(app.vhost) ? app.vhost : fresh[0] || '');
  }).catch((e) => notify(e.message, 'error'));
  return sel;
}

/** Bindings as a table, with an unbind button for each explicit one. */
export function bindingsTable(bindings, { from = true, to = true, onChange } = {}) {
  return table([
    from ? { label: 'From', value: (b) => (b.source === '' ? '(AMQP default)' : link(`#/exchanges/${seg(b.vhost)}/${exchangeSeg(b.source)}`, b.source)) } : null,
    to ? {
      label: 'To',
      value: (b) => (b.destination_type === 'queue'
        ? h('span', null, link(`#/queues/${seg(b.vhost)}/${seg(b.destination)}`, b.destination), ' (queue)')
        : h('span', null, link(`#/exchanges/${seg(b.vhost)}/${exchangeSeg(b.destination)}`, b.destination), ' (exchange)')),
    } : null,
    { label: 'Routing key', value: (b) => b.routing_key },
    { label: 'Arguments', value: (b) => fmtJson(b.arguments) },
    {
      label: '',
      value: (b) => (b.source === '' ? h('span', { class: 'hint' }, 'default binding') : h('button', {
        class: 'small',
        onclick: async () => {
          const kind = b.destination_type === 'queue' ? 'q' : 'e';
          try {
            await api('DELETE', `/api/bindings/${seg(b.vhost)}/e/${exchangeSeg(b.source)}/${kind}/${seg(b.destination)}/${seg(b.properties_key)}`);
            notify('Binding removed');
            if (onChange) onChange();
          } catch (e) {
            notify(e.message, 'error');
          }
        },
      }, 'Unbind')),
    },
  ].filter(Boolean), bindings, { empty: 'No bindings' });
}

/**
 * The "Publish message" form: to `exchange` of `vhost`, with the routing key fixed when `routingKey` is
 * given (a queue page publishes through the default exchange).
 */
export function publishForm(vhost, exchange, routingKey) {
  return form({ class: 'publish', id: 'publish-form' }, [
    routingKey === undefined ? row('Routing key', h('input', { name: 'routing_key' })) : null,
    row('Delivery mode', select('delivery_mode', [['1', '1 - Non-persistent'], ['2', '2 - Persistent']], '2')),
    row('Headers (JSON)', h('textarea', { name: 'headers', rows: 2, placeholder: '{"x-tenant": "acme"}' })),
    row('Properties (JSON)', h('textarea', { name: 'properties', rows: 2, placeholder: '{"content_type": "application/json", "message_id": "m-1"}' })),
    row('Payload', h('textarea', { name: 'payload', rows: 4 })),
    row('Payload encoding', select('payload_encoding', [['string', 'String (UTF-8)'], ['base64', 'Base64']], 'string')),
  ], 'Publish message', async (f) => {
    const properties = parseObject(f.properties.value, 'Properties');
    const headers = parseObject(f.headers.value, 'Headers');
    if (Object.keys(headers).length) properties.headers = headers;
    properties.delivery_mode = Number(f.delivery_mode.value);
    const body = {
      properties, routing_key: routingKey === undefined ? f.routing_key.value : routingKey,
      payload: f.payload.value, payload_encoding: f.payload_encoding.value,
    };
    const r = await api('POST', `/api/exchanges/${seg(vhost)}/${exchangeSeg(exchange)}/publish`, body);
    return r.routed ? 'Message published.' : 'Message published, but not routed.';
  });
}

/** One exchange: details, bindings from and to it, add a binding, publish, delete. */
export function exchange(root, app, vhost, name) {
  const details = h('div');
  const source = h('div');
  const destination = h('div');
  const refreshBindings = () => page.refresh();
  const bind = form({ id: 'add-binding' }, [
    row('To', select('kind', [['q', 'Queue'], ['e', 'Exchange']], 'q'), h('input', { name: 'destination', required: true, placeholder: 'name' })),
    row('Routing key', h('input', { name: 'routing_key' })),
    row('Arguments (JSON)', h('textarea', { name: 'arguments', rows: 2 })),
  ], 'Bind', async (f) => {
    await api('POST', `/api/bindings/${seg(vhost)}/e/${exchangeSeg(name)}/${f.kind.value}/${seg(f.destination.value)}`,
      { routing_key: f.routing_key.value, arguments: parseObject(f.arguments.value, 'Arguments') });
    refreshBindings();
    return 'Bound';
  });
  const del = form({ id: 'delete-exchange' }, [row('Only if unused', h('input', { type: 'checkbox', name: 'if_unused' }))], 'Delete', async (f) => {
    if (!confirm(`Delete exchange ${name}?`)) return null;
    await api('DELETE', `/api/exchanges/${seg(vhost)}/${exchangeSeg(name)}${f.if_unused.checked ? '?if-unused=true' : ''}`);
    location.hash = '#/exchanges';
    notify(`Exchange ${name} deleted`);
    return null;
  });
  append(root, [h('h1', null, 'Exchange ', h('span', { class: 'name' }, exchangeLabel(name)), h('small', null, ` in virtual host ${vhost}`)),
    section('Details', true, details),
    section('Bindings from this exchange', true, source, name === '' ? null : h('h3', null, 'Add binding from this exchange'), name === '' ? null : bind),
    section('Bindings to this exchange', false, destination),
    section('Publish message', false, publishForm(vhost, name)),
    name === '' || name.startsWith('amq.') ? null : section('Delete this exchange', false, del)]);
  const page = {
    async refresh() {
      try {
        const e = await get(`/api/exchanges/${seg(vhost)}/${exchangeSeg(name)}`);
        fill(details, facts([
          ['Type', e.type], ['Features', features(e)], ['Arguments', fmtJson(e.arguments)],
          ['Message rate in', fmtRate(e.message_stats && e.message_stats.publish_in_details)],
          ['Message rate out', fmtRate(e.message_stats && e.message_stats.publish_out_details)],
        ]));
        if (name !== '') {
          fill(source, bindingsTable(await get(`/api/exchanges/${seg(vhost)}/${exchangeSeg(name)}/bindings/source`), { from: false, onChange: refreshBindings }));
        } else {
          fill(source, h('p', { class: 'hint' }, 'The default exchange is bound to every queue by the queue\u2019s name.'));
        }
        fill(destination, bindingsTable(await get(`/api/exchanges/${seg(vhost)}/${exchangeSeg(name)}/bindings/destination`), { to: false, onChange: refreshBindings }));
      } catch (e) {
        fill(details, h('p', { class: 'error' }, e.message));
      }
    },
  };
  return page;
}
