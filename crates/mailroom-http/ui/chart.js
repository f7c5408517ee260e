// Small live line charts drawn as inline SVG, and the sample history they draw: the page samples the API
// on each refresh (the API keeps no history of its own), so a chart fills from when the page was opened.

const SVG = 'http://www.w3.org/2000/svg';
/** Samples kept per series: ten minutes at the default 5 s refresh. */
const MAX_SAMPLES = 120;

function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

/** Named series of (time, value) samples, kept across page changes. */
export class History {
  constructor() {
    this.series = new Map();
  }

  /** Adds one sample per named value (a missing value is skipped, not drawn as 0). */
  add(values, t = Date.now()) {
    for (const [name, v] of Object.entries(values)) {
      if (typeof v !== 'number' || Number.isNaN(v)) continue;
      let points = this.series.get(name);
      if (!points) this.series.set(name, (points = []));
      points.push([t, v]);
      if (points.length > MAX_SAMPLES) points.shift();
    }
  }

  /** The samples of `name` (empty if none). */
  points(name) {
    return this.series.get(name) || [];
  }
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

/**
 * A line chart: `lines` are {label, color, points: [[t, v]…]}; `format` writes the values. The legend
 * shows each line's latest value, as RabbitMQ's charts do.
 */
export function lineChart(title, lines, { format = (v) => String(v), width = 420, height = 150 } = {}) {
  const pad = { l: 46, r: 8, t: 8, b: 18 };
  const all = lines.flatMap((l) => l.points);
  const svg = s('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': title });
  const wrap = document.createElement('figure');
  wrap.className = 'chart-box';
  const caption = document.createElement('figcaption');
  caption.textContent = title;
  wrap.append(caption, svg);
  const plotW = width - pad.l - pad.r;
  const plotH = height - pad.t - pad.b;
  const tMax = all.length ? Math.max(...all.map((p) => p[0])) : Date.now();
  const tMin = Math.min(all.length ? Math.min(...all.map((p) => p[0])) : tMax, tMax - 60_000);
  const vMax = niceMax(all.length ? Math.max(...all.map((p) => p[1])) : 0);
  const x = (t) => pad.l + ((t - tMin) / Math.max(1, tMax - tMin)) * plotW;
  const y = (v) => pad.t + plotH - (v / vMax) * plotH;
  for (const frac of [0, 0.5, 1]) {
    const yy = y(vMax * frac);
    svg.append(s('line', { x1: pad.l, x2: width - pad.r, y1: yy, y2: yy, class: 'grid' }));
    const label = s('text', { x: pad.l - 4, y: yy + 4, 'text-anchor': 'end', class: 'axis' });
    label.textContent = format(vMax * frac);
    svg.append(label);
  }
  const span = s('text', { x: pad.l, y: height - 4, class: 'axis' });
  span.textContent = `last ${Math.round((tMax - tMin) / 1000)} s`;
  svg.append(span);
  for (const line of lines) {
    if (!line.points.length) continue;
    const d = line.points.map(([t, v], i) => `${i ? 'L' : 'M'}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
    svg.append(s('path', { d, fill: 'none', stroke: line.color, 'stroke-width': 2, class: 'series' }));
  }
  const legend = document.createElement('div');
  legend.className = 'legend';
  for (const line of lines) {
    const last = line.points.length ? line.points[line.points.length - 1][1] : null;
    const item = document.createElement('span');
    const swatch = document.createElement('i');
    swatch.style.background = line.color;
    const value = document.createElement('b');
    value.textContent = last === null ? '–' : format(last);
    item.append(swatch, `${line.label} `, value);
    legend.append(item);
  }
  wrap.append(legend);
  return wrap;
}

/** The colours of RabbitMQ's charts, in its order (ready, unacked, total / publish, deliver, ack …). */
export const COLORS = ['#edc240', '#afd8f8', '#cb4b4b', '#4da74d', '#9440ed', '#e8590c'];
