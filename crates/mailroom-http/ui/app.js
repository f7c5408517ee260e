// The shell: login, the tab bar (RabbitMQ's: Overview, Connections, Channels, Exchanges, Queues, Admin),
// the vhost filter, the refresh timer, the alarm banner and the hash router that picks a page.

import { ApiError, currentUser, get, loggedIn, login, logout, setUnauthorizedHandler } from './api.js';
import { History } from './chart.js';
import { fill, fmtDuration, h, notify, select } from './dom.js';
import * as pages from './pages.js';
import * as queues from './queue.js';
import * as admin from './admin.js';

const TABS = [
  ['overview', 'Overview'],
  ['connections', 'Connections'],
  ['channels', 'Channels'],
  ['exchanges', 'Exchanges'],
  ['queues', 'Queues'],
  ['admin', 'Admin'],
];
const INTERVALS = [['2000', 'every 2 seconds'], ['5000', 'every 5 seconds'], ['10000', 'every 10 seconds'],
  ['30000', 'every 30 seconds'], ['0', 'off']];

/** What every page shares: the selected vhost, the latest overview, the sample histories. */
const app = {
  vhost: localStorage.getItem('mailroom.vhost') || '',
  overview: null,
  nodes: [],
  history: new History(), // node-wide samples (overview charts)
  queueHistory: new Map(), // per queue: `${vhost}/${name}` → History
  refresh: () => tick(),
};

let current = null; // the page shown: {refresh?, dispose?}
let timer = null;
let ticking = false;

function route() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  return parts[0] ? parts : ['overview'];
}

/** Chooses the page for the current hash: a function (root, app) → {refresh?, dispose?}. */
function pageFor(parts) {
  const [tab, a, b] = parts;
  switch (tab) {
    case 'overview': return pages.overview;
    case 'connections': return a !== undefined ? (root, ctx) => pages.connection(root, ctx, a) : pages.connections;
    case 'channels': return pages.channels;
    case 'exchanges': return a !== undefined ? (root, ctx) => pages.exchange(root, ctx, a, b) : pages.exchanges;
    case 'queues': return a !== undefined ? (root, ctx) => queues.queue(root, ctx, a, b) : queues.queues;
    case 'admin': return (root, ctx) => admin.admin(root, ctx, a || 'vhosts');
    default: return null;
  }
}

function showLogin(message) {
  stopTimer();
  current = null;
  const status = h('p', { class: 'error', id: 'login-error' }, message || '');
  const user = h('input', { name: 'username', autocomplete: 'username', value: 'guest', required: true });
  const pass = h('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const remember = h('input', { type: 'checkbox', name: 'remember' });
  const f = h('form', { class: 'login', id: 'login' },
    h('img', { src: '/ui/favicon.svg', alt: '', class: 'login-logo' }),
    h('h1', null, 'Mailroom'),
    h('label', null, 'Username', user),
    h('label', null, 'Password', pass),
    h('label', { class: 'check' }, remember, ' Stay logged in on this browser'),
    h('button', { type: 'submit' }, 'Login'),
    status);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    fill(status);
    try {
      await login(user.value, pass.value, remember.checked);
      start();
    } catch (e) {
      fill(status, e.message);
    }
  });
  fill(document.getElementById('app'), f);
  pass.focus();
}

function shell() {
  const [tab] = route();
  const vhostSelect = h('select', { id: 'vhost', title: 'Virtual host shown by the lists' });
  vhostSelect.addEventListener('change', () => {
    app.vhost = vhostSelect.value;
    localStorage.setItem('mailroom.vhost', app.vhost);
    navigate();
  });
  const interval = select('refresh', INTERVALS, localStorage.getItem('mailroom.refresh') || '5000');
  interval.id = 'refresh';
  interval.addEventListener('change', () => {
    localStorage.setItem('mailroom.refresh', interval.value);
    startTimer();
  });
  const header = h('header', null,
    h('div', { class: 'brand' }, h('img', { src: '/ui/favicon.svg', alt: '' }), h('span', null, 'Mailroom')),
    h('div', { class: 'meta', id: 'meta' }),
    h('div', { class: 'controls' },
      h('label', null, 'Refresh ', interval),
      h('label', null, 'Virtual host ', vhostSelect),
      h('span', { class: 'user' }, 'User ', h('b', null, currentUser())),
      h('button', { class: 'link', id: 'logout', onclick: () => { logout(); showLogin(); } }, 'Log out')));
  const nav = h('nav', null, TABS.map(([id, label]) =>
    h('a', { href: `#/${id}`, class: id === tab ? 'active' : null, id: `tab-${id}` }, label)));
  return h('div', { class: 'shell' }, header, nav,
    h('div', { id: 'alarms' }), h('div', { id: 'notices' }), h('main', { id: 'page' }));
}

async function navigate() {
  if (!loggedIn()) return showLogin();
  if (current && current.dispose) current.dispose();
  const parts = route();
  document.querySelectorAll('nav a').forEach((a) => a.classList.toggle('active', a.id === `tab-${parts[0]}`));
  const page = pageFor(parts);
  const root = document.getElementById('page');
  fill(root);
  if (!page) {
    fill(root, h('h1', null, 'Not found'), h('p', null, 'No such page: ', location.hash));
    current = null;
    return;
  }
  current = page(root, app) || {};
  await tick();
}

/** Samples the node (overview and alarms), then refreshes the page shown. */
async function tick() {
  if (ticking || !loggedIn()) return;
  ticking = true;
  try {
    const [overview, nodes, vhosts] = await Promise.all([get('/api/overview'), get('/api/nodes'), get('/api/vhosts')]);
    app.overview = overview;
    app.nodes = nodes;
    const q = overview.queue_totals || {};
    const o = overview.object_totals || {};
    const ms = overview.message_stats || {};
    const rate = (k) => (ms[`${k}_details`] ? ms[`${k}_details`].rate : undefined);
    app.history.add({
      ready: q.messages_ready, unacked: q.messages_unacknowledged, total: q.messages,
      connections: o.connections, channels: o.channels, consumers: o.consumers,
      publish: rate('publish'), deliver: rate('deliver_get'), ack: rate('ack'), confirm: rate('confirm'),
      redeliver: rate('redeliver'),
    });
    showMeta(overview, nodes);
    showVhosts(vhosts);
    if (current && current.refresh) await current.refresh();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) notify(`Refresh failed: ${e.message}`, 'error');
  } finally {
    ticking = false;
  }
}

function showMeta(overview, nodes) {
  const node = nodes[0] || {};
  fill(document.getElementById('meta'),
    h('span', null, `${overview.product_name || 'Mailroom'} ${overview.product_version || ''}`),
    h('span', null, 'Cluster ', h('b', null, overview.cluster_name)),
    node.uptime !== undefined ? h('span', null, 'Uptime ', h('b', null, fmtDuration(node.uptime))) : null);
  const alarms = [];
  for (const n of nodes) {
    if (n.mem_alarm) alarms.push(`Memory alarm on ${n.name}: publishers are blocked`);
    if (n.disk_free_alarm) alarms.push(`Disk alarm on ${n.name}: publishers are blocked`);
  }
  fill(document.getElementById('alarms'), alarms.map((a) => h('div', { class: 'alarm' }, a)));
}

function showVhosts(vhosts) {
  const sel = document.getElementById('vhost');
  const names = vhosts.map((v) => v.name);
  const want = ['', ...names].join('\n');
  if (sel.dataset.names !== want) {
    sel.dataset.names = want;
    fill(sel, h('option', { value: '' }, 'All'), names.map((n) => h('option', { value: n }, n)));
  }
  sel.value = names.includes(app.vhost) ? app.vhost : '';
}

function stopTimer() {
  if (timer) clearInterval(timer);
  timer = null;
}

function startTimer() {
  stopTimer();
  const ms = Number(localStorage.getItem('mailroom.refresh') || '5000');
  if (ms > 0) timer = setInterval(tick, ms);
}

function start() {
  fill(document.getElementById('app'), shell());
  startTimer();
  navigate();
}

setUnauthorizedHandler(() => showLogin('The API refused the stored credentials: log in again.'));
window.addEventListener('hashchange', () => {
  if (loggedIn()) navigate();
});
if (loggedIn()) start();
else showLogin();
