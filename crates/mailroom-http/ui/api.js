// The management API over fetch: basic auth as RabbitMQ's UI does it (credentials kept for the browser
// session, or across sessions when the user asks), JSON in and out, RabbitMQ's {error, reason} bodies
// turned into exceptions.

const KEY = 'mailroom.auth';
let auth = sessionStorage.getItem(KEY) || localStorage.getItem(KEY);

/** An answer other than 2xx: the status and the API's reason text. */
export class ApiError extends Error {
  constructor(status, reason) {
    super(reason);
    this.status = status;
  }
}

/** Whether credentials are stored. */
export function loggedIn() {
  return !!auth;
}

/** The logged-in user's name. */
export function currentUser() {
  if (!auth) return '';
  const text = new TextDecoder().decode(Uint8Array.from(atob(auth), (c) => c.charCodeAt(0)));
  return text.slice(0, text.indexOf(':'));
}

function basic(username, password) {
  const bytes = new TextEncoder().encode(`${username}:${password}`);
  return btoa(String.fromCharCode(...bytes));
}

/** Checks the credentials against the API and keeps them. */
export async function login(username, password, remember) {
  const candidate = basic(username, password);
  const resp = await fetch('/api/overview', { headers: { Authorization: `Basic ${candidate}` }, credentials: 'omit' });
  if (resp.status === 401) throw new ApiError(401, 'Login failed: wrong user name or password');
  if (!resp.ok) throw new ApiError(resp.status, `Login failed: ${resp.status} ${resp.statusText}`);
  auth = candidate;
  (remember ? localStorage : sessionStorage).setItem(KEY, auth);
}

/** Forgets the credentials. */
export function logout() {
  auth = null;
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

/** Called when the API stops accepting the stored credentials (the app shows the login form). */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(f) {
  onUnauthorized = f;
}

/** One request: `body` is sent as JSON (a string as is); answers the parsed JSON, or null. */
export async function api(method, path, body, headers = {}) {
  // credentials 'omit': the header carries them; a 401 (with its WWW-Authenticate) then comes back to
  // this code instead of making the browser pop up its own login dialog.
  const init = { method, headers: { Authorization: `Basic ${auth}`, ...headers }, credentials: 'omit' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = typeof body === 'string' ? body : JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    logout();
    onUnauthorized();
    throw new ApiError(401, 'Not authorised: log in again');
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!resp.ok) {
    const reason = (data && data.reason) || `${resp.status} ${resp.statusText}`;
    throw new ApiError(resp.status, reason);
  }
  return data;
}

/** GET `path`. */
export const get = (path) => api('GET', path);

/** One path segment (a vhost `/` becomes `%2F`, as the API wants). */
export const seg = (s) => encodeURIComponent(s);

/** The default exchange `""` as the API names it in paths. */
export const exchangeSeg = (name) => seg(name === '' ? 'amq.default' : name);

/** A listing path with RabbitMQ's paging parameters (page, page_size, name, use_regex, sort, sort_reverse). */
export function listPath(base, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '' && v !== false) q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${base}?${s}` : base;
}
