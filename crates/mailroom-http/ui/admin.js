// Admin: virtual hosts (add, delete), users (add, update, delete), permissions (set, clear), policies, and
// definitions download and upload. Where the API has no such path the page says so.

import { api, get, seg } from './api.js';
import { fill, fmtJson, fmtNum, form, h, notify, parseObject, row, section, select, table } from './dom.js';
import { vhostSelect } from './pages.js';

const SUBTABS = [['vhosts', 'Virtual hosts'], ['users', 'Users'], ['permissions', 'Permissions'], ['policies', 'Policies'], ['definitions', 'Definitions']];

/** The admin page: one sub-tab at a time. */
export function admin(root, app, sub) {
  const body = h('div', { class: 'admin-body' });
  root.append(h('div', { class: 'admin' },
    h('aside', null, SUBTABS.map(([id, label]) => h('a', { href: `#/admin/${id}`, class: id === sub ? 'active' : null }, label))),
    body));
  const pages = { vhosts, users, permissions, policies, definitions };
  return (pages[sub] || vhosts)(body, app);
}

/** A list that an API path may not serve yet: shows the table, or says which path is missing. */
async function optional(path, box, render) {
  try {
    render(await get(path));
  } catch (e) {
    if (e.status === 404 || e.status === 405) {
      fill(box, h('p', { class: 'hint missing' }, `This broker's management API does not serve ${path} yet, so there is nothing to show here.`));
    } else {
      fill(box, h('p', { class: 'error' }, e.message));
    }
  }
}

/** A small red button that asks first, runs `action`, then `done` (or shows the error). */
function deleteButton(label, question, action, done) {
  return h('button', {
    class: 'small danger',
    onclick: async () => {
      if (!confirm(question)) return;
      try {
        await action();
        done();
      } catch (e) {
        notify(e.message, 'error');
      }
    },
  }, label);
}

function vhosts(root) {
  const box = h('div');
  const refresh = () => optional('/api/vhosts', box, (list) => fill(box, table([
    { label: 'Name', value: (v) => v.name },
    { label: 'Description', value: (v) => v.description || '' },
    { label: 'Default queue type', value: (v) => v.default_queue_type || '' },
    { label: 'Ready', num: true, value: (v) => fmtNum(v.messages_ready) },
    { label: 'Unacked', num: true, value: (v) => fmtNum(v.messages_unacknowledged) },
    { label: 'Total', num: true, value: (v) => fmtNum(v.messages) },
    {
      label: '',
      value: (v) => deleteButton('Delete', `Delete virtual host ${v.name} with all its queues, exchanges and messages?`,
        () => api('DELETE', `/api/vhosts/${seg(v.name)}`), refresh),
    },
  ], list)));
  const add = form({ id: 'add-vhost' }, [
    row('Name', h('input', { name: 'name', required: true })),
  ], 'Add virtual host', async (f) => {
    await api('PUT', `/api/vhosts/${seg(f.name.value)}`, {});
    refresh();
    return `Virtual host ${f.name.value} added (reload to see it in the virtual host menu)`;
  });
  root.append(h('h1', null, 'Virtual hosts'), box, section('Add a virtual host', false, add));
  return { refresh };
}

const tagList = (u) => (Array.isArray(u.tags) ? u.tags.join(', ') : u.tags || '');

function users(root) {
  const box = h('div');
  const refresh = () => optional('/api/users', box, (list) => fill(box, table([
    { label: 'Name', value: (u) => u.name },
    { label: 'Tags', value: tagList },
    { label: 'Has password', value: (u) => (u.password_hash ? 'yes' : 'no') },
    {
      label: '',
      value: (u) => deleteButton('Delete', `Delete user ${u.name} and its permissions?`,
        () => api('DELETE', `/api/users/${seg(u.name)}`), refresh),
    },
  ], list, { empty: 'No users' })));
  const add = form({ id: 'add-user' }, [
    row('Username', h('input', { name: 'name', required: true, autocomplete: 'off' })),
    row('Password', h('input', { name: 'password', type: 'password', autocomplete: 'new-password' })),
    row('Tags', h('input', { name: 'tags', placeholder: 'administrator, monitoring, policymaker, management' })),
    h('p', { class: 'hint' }, 'An existing user is updated; leave the password empty to keep theirs.'),
  ], 'Add / update user', async (f) => {
    const name = f.name.value;
    const tags = f.tags.value.split(',').map((t) => t.trim()).filter(Boolean);
    const body = { tags };
    if (f.password.value) {
      body.password = f.password.value;
    } else {
      // Keep the password of an existing user by sending its hash back; a new user needs one.
      let existing = null;
      try {
        existing = await get(`/api/users/${seg(name)}`);
      } catch (e) {
        if (e.status !== 404) throw e;
      }
      if (!existing) throw new Error('A new user needs a password');
      body.password_hash = existing.password_hash || '';
      body.hashing_algorithm = existing.hashing_algorithm || 'rabbit_password_hashing_md5';
    }
    await api('PUT', `/api/users/${seg(name)}`, body);
    f.password.value = '';
    refresh();
    return `User ${name} saved`;
  });
  root.append(h('h1', null, 'Users'), box, section('Add / update a user', true, add));
  return { refresh };
}

function permissions(root, app) {
  const box = h('div');
  const refresh = () => optional('/api/permissions', box, (list) => fill(box, table([
    { label: 'User', value: (p) => p.user },
    { label: 'Virtual host', value: (p) => p.vhost },
    { label: 'Configure', value: (p) => p.configure },
    { label: 'Write', value: (p) => p.write },
    { label: 'Read', value: (p) => p.read },
    {
      label: '',
      value: (p) => deleteButton('Clear', `Clear ${p.user}'s permissions on ${p.vhost}?`,
        () => api('DELETE', `/api/permissions/${seg(p.vhost)}/${seg(p.user)}`), refresh),
    },
  ], list, { empty: 'No permissions' })));
  const userSelect = h('select', { name: 'user', required: true });
  get('/api/users').then((list) => fill(userSelect, list.map((u) => h('option', { value: u.name }, u.name))))
    .catch((e) => notify(e.message, 'error'));
  const set = form({ id: 'set-permission' }, [
    row('User', userSelect),
    row('Virtual host', vhostSelect(app)),
    row('Configure regexp', h('input', { name: 'configure', value: '.*' })),
    row('Write regexp', h('input', { name: 'write', value: '.*' })),
    row('Read regexp', h('input', { name: 'read', value: '.*' })),
  ], 'Set permission', async (f) => {
    await api('PUT', `/api/permissions/${seg(f.vhost.value)}/${seg(f.user.value)}`, {
      configure: f.configure.value, write: f.write.value, read: f.read.value,
    });
    refresh();
    return `Permission set for ${f.user.value} on ${f.vhost.value}`;
  });
  root.append(h('h1', null, 'Permissions'), box, section('Set a permission', true, set));
  return { refresh };
}

function policies(root, app) {
  const box = h('div');
  const refresh = () => optional(app.vhost ? `/api/policies/${seg(app.vhost)}` : '/api/policies', box, (list) => fill(box, table([
    { label: 'Virtual host', value: (p) => p.vhost },
    { label: 'Name', value: (p) => p.name },
    { label: 'Pattern', value: (p) => p.pattern },
    { label: 'Apply to', value: (p) => p['apply-to'] },
    { label: 'Definition', value: (p) => fmtJson(p.definition) },
    { label: 'Priority', num: true, value: (p) => p.priority },
    {
      label: '',
      value: (p) => h('button', {
        class: 'small danger',
        onclick: async () => {
          if (!confirm(`Delete policy ${p.name}?`)) return;
          try {
            await api('DELETE', `/api/policies/${seg(p.vhost)}/${seg(p.name)}`);
            refresh();
          } catch (e) {
            notify(e.message, 'error');
          }
        },
      }, 'Delete'),
    },
  ], list, { empty: 'No policies' })));
  const add = form({ id: 'add-policy' }, [
    row('Virtual host', vhostSelect(app)),
    row('Name', h('input', { name: 'name', required: true })),
    row('Pattern', h('input', { name: 'pattern', required: true, placeholder: '^orders\\.' })),
    row('Apply to', select('apply_to', [['all', 'Exchanges and queues'], ['queues', 'Queues'], ['exchanges', 'Exchanges']], 'queues')),
    row('Priority', h('input', { name: 'priority', type: 'number', value: 0 })),
    row('Definition (JSON)', h('textarea', { name: 'definition', rows: 3, required: true, placeholder: '{"max-length": 10000, "dead-letter-exchange": "dlx"}' })),
  ], 'Add / update policy', async (f) => {
    await api('PUT', `/api/policies/${seg(f.vhost.value)}/${seg(f.name.value)}`, {
      pattern: f.pattern.value, 'apply-to': f.apply_to.value, priority: Number(f.priority.value || 0),
      definition: parseObject(f.definition.value, 'Definition'),
    });
    refresh();
    return `Policy ${f.name.value} set`;
  });
  root.append(h('h1', null, 'Policies'), box, section('Add / update a policy', false, add));
  return { refresh };
}

function definitions(root, app) {
  const scope = h('select', { name: 'scope', id: 'definitions-scope' });
  const names = [...document.querySelectorAll('#vhost option')].map((o) => o.value).filter(Boolean);
  fill(scope, h('option', { value: '' }, 'All virtual hosts'), names.map((n) => h('option', { value: n }, n)));
  const download = form({ id: 'download-definitions' }, [row('Virtual host', scope)], 'Download broker definitions', async () => {
    const path = scope.value ? `/api/definitions/${seg(scope.value)}` : '/api/definitions';
    const doc = await get(path);
    const blob = new Blob([JSON.stringify(doc, null, 2)], { type: 'application/json' });
    const a = h('a', { href: URL.createObjectURL(blob), download: `mailroom-definitions${scope.value ? `-${scope.value.replace(/[^A-Za-z0-9_.-]/g, '_')}` : ''}.json` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
    const count = (k) => (Array.isArray(doc[k]) ? doc[k].length : 0);
    return `Downloaded: ${count('queues')} queues, ${count('exchanges')} exchanges, ${count('bindings')} bindings, ${count('policies')} policies`;
  });
  const file = h('input', { type: 'file', name: 'file', accept: 'application/json,.json', required: true, id: 'definitions-file' });
  const upload = form({ id: 'upload-definitions' }, [
    row('Definitions file', file),
    h('p', { class: 'hint' }, 'RabbitMQ\u2019s definitions JSON (what rabbitmqctl export_definitions writes). Existing queues, exchanges and bindings are kept; policies are overwritten.'),
  ], 'Upload broker definitions', async () => {
    if (!file.files.length) throw new Error('Choose a file');
    const text = await file.files[0].text();
    parseObject(text, 'The file');
    await api('POST', '/api/definitions', text);
    return 'Definitions imported';
  });
  root.append(h('h1', null, 'Definitions'),
    section('Export definitions', true, download),
    section('Import definitions', true, upload));
  return {};
}
