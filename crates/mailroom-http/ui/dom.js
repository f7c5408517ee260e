// Building the page: elements from plain values (every value goes in as text, never as HTML, so message
// contents cannot inject anything), number formats, sortable tables, forms and notices.

/**
 * An element: `h('td', {class: 'num', onclick: f}, 'text', child, [more])`. Attributes named `on…` are
 * listeners; `class`, `value`, `checked`, `disabled`, `selected` are set as properties; null children are
 * skipped.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (['value', 'checked', 'disabled', 'selected'].includes(k)) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

/** Appends children as `h` does (null and false skipped, arrays flattened, values as text). */
export function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** 12,345. */
export function fmtNum(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return '–';
  return Number(n).toLocaleString('en-US');
}

/** 1.2 MiB. */
export function fmtBytes(n) {
  if (n === undefined || n === null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** 12.5/s, or – when the API gives no rate. */
export function fmtRate(details) {
  if (!details || typeof details.rate !== 'number') return '–';
  return `${details.rate.toFixed(details.rate < 10 ? 1 : 0)}/s`;
}

/** 3d 4h, 5m 2s. */
export function fmtDuration(ms) {
  let s = Math.floor(ms / 1000);
  const d = Math.floor(s / 86400);
  s %= 86400;
  const hr = Math.floor(s / 3600);
  s %= 3600;
  const m = Math.floor(s / 60);
  s %= 60;
  if (d) return `${d}d ${hr}h`;
  if (hr) return `${hr}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

/** A JSON value on one line (arguments, headers). */
export function fmtJson(v) {
  if (v === undefined || v === null) return '';
  if (typeof v === 'object' && Object.keys(v).length === 0) return '';
  return JSON.stringify(v);
}

/**
 * A table: `columns` are {label, value(row) → node/text, num, sort (the API's field), title}; `sort` is
 * {key, reverse} and `onSort(key)` is called when a sortable header is clicked.
 */
export function table(columns, rows, { sort, onSort, empty = 'Nothing to show', rowClass } = {}) {
  const head = h('tr', null, columns.map((c) => {
    const active = sort && c.sort && sort.key === c.sort;
    const arrow = active ? (sort.reverse ? ' ▼' : ' ▲') : '';
    return h('th', {
      class: [c.num ? 'num' : '', c.sort && onSort ? 'sortable' : ''].join(' ').trim() || null,
      title: c.title,
      onclick: c.sort && onSort ? () => onSort(c.sort) : null,
    }, c.label + arrow);
  }));
  const body = rows.length
    ? rows.map((r) => h('tr', { class: rowClass ? rowClass(r) : null },
      columns.map((c) => h('td', { class: c.num ? 'num' : null }, c.value(r)))))
    : h('tr', null, h('td', { colspan: columns.length, class: 'empty' }, empty));
  return h('table', { class: 'list' }, h('thead', null, head), h('tbody', null, body));
}

/** A two-column table of facts: [[label, value], …]. */
export function facts(pairs) {
  return h('table', { class: 'facts' }, pairs.filter(Boolean).map(([k, v]) => h('tr', null, h('th', null, k), h('td', null, v))));
}

/** A collapsible section, as RabbitMQ's UI groups a page. */
export function section(title, open, ...content) {
  return h('details', { class: 'section', open }, h('summary', null, title), h('div', { class: 'section-body' }, content));
}

/** A labelled form row. */
export function row(label, ...inputs) {
  return h('label', { class: 'row' }, h('span', { class: 'label' }, label), h('span', { class: 'inputs' }, inputs));
}

/** A <select> of [value, label] pairs. */
export function select(name, options, value) {
  return h('select', { name }, options.map(([v, l]) => h('option', { value: v, selected: v === value }, l)));
}

/** Parses a JSON object typed into a form ('' is {}); throws with a readable message. */
export function parseObject(text, what) {
  if (!text.trim()) return {};
  let v;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not valid JSON: ${e.message}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`${what} must be a JSON object`);
  return v;
}

/** A form whose submit runs `action(form)`, shows its result or error beside the button, and never reloads. */
export function form(attrs, fields, buttonLabel, action) {
  const status = h('span', { class: 'form-status' });
  const button = h('button', { type: 'submit' }, buttonLabel);
  const f = h('form', attrs, fields, h('div', { class: 'actions' }, button, status));
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    fill(status);
    status.className = 'form-status';
    try {
      const result = await action(f);
      if (result) {
        status.classList.add('ok');
        fill(status, result);
      }
    } catch (e) {
      status.classList.add('error');
      fill(status, e.message);
    } finally {
      button.disabled = false;
    }
  });
  return f;
}

/** A short notice at the top of the page (errors stay until dismissed). */
export function notify(text, kind = 'info') {
  const box = document.getElementById('notices');
  if (!box) return;
  const n = h('div', { class: `notice ${kind}` }, text, h('button', { class: 'link', onclick: () => n.remove() }, '×'));
  box.append(n);
  if (kind !== 'error') setTimeout(() => n.remove(), 4000);
}

/** A link inside the app. */
export function link(hash, text) {
  return h('a', { href: hash }, text);
}
