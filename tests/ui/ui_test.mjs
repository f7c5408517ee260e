// Drives Mailroom's web UI in Debian's headless Chromium (playwright-core, no browser download).
// Run by test_ui.py, which starts the broker, creates the queues and messages with pika, and answers
// this script's requests on stdin: a line "PUBLISH n" on stdout asks it to publish n messages to the
// source queue; "LOGIN user password vhost" asks it to open an AMQP connection as that user (the one the
// UI created); it answers "OK" (or what went wrong). Environment: MAILROOM_UI_URL, UI_ARTIFACTS, CHROMIUM (default
// /usr/bin/chromium), SOURCE_QUEUE, DLQ, VICTIM_CONNECTION, CONSUMED_QUEUE.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const base = process.env.MAILROOM_UI_URL;
const artifacts = process.env.UI_ARTIFACTS;
const source = process.env.SOURCE_QUEUE;
const dlq = process.env.DLQ;
const victim = process.env.VICTIM_CONNECTION;
const consumed = process.env.CONSUMED_QUEUE;
const TIMEOUT = 20_000;
mkdirSync(artifacts, { recursive: true });
rmSync(join(artifacts, 'failure.png'), { force: true }); // an earlier run's

const stdin = createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();
/** Asks the Python side to do something with a real AMQP client; waits for its "OK". */
async function harness(command) {
  console.log(command);
  const { value, done } = await lines.next();
  if (done || value.trim() !== 'OK') throw new Error(`harness did not do "${command}": ${value}`);
}

function step(text) {
  console.log(`STEP ${text}`);
}

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

/** Polls `f` (async, answers truthy when done) until it holds; its last value is in the error. */
async function waitUntil(what, f, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await f();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** A table on the page as rows of {header label: cell text}. */
function readTable(page, selector) {
  return page.evaluate((sel) => {
    const t = document.querySelector(`${sel} table`);
    if (!t) return [];
    const heads = [...t.querySelectorAll('thead th')].map((th) => th.textContent.replace(/[▲▼]/g, '').trim());
    return [...t.querySelectorAll('tbody tr')].map((tr) => {
      const row = {};
      [...tr.children].forEach((td, i) => { row[heads[i]] = td.textContent.trim(); });
      return row;
    });
  }, selector);
}

/** Keeps a screenshot, after checking the page shows no rendering junk (undefined, NaN, a stray null). */
async function shot(page, name, fullPage = true) {
  const text = await page.evaluate(() => document.body.innerText);
  const junk = text.split('\n').find((l) => /undefined|NaN|\[object Object\]|^\s*null\s*$/.test(l));
  check(junk === undefined, `${name}: the page shows "${junk}"`);
  await page.screenshot({ path: join(artifacts, name), fullPage });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
  headless: true,
});
const problems = [];
try {
  const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 820 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // Failed requests are judged by the response handler below (it sees their URLs); anything else
    // logged as an error is a bug (a CSP violation, an exception).
    if (m.type() === 'error' && !/^Failed to load resource/.test(m.text())) problems.push(`console error: ${m.text()}`);
  });
  page.on('response', (r) => {
    const path = new URL(r.url()).pathname;
    // Expected: the wrong password's 401.
    const expected = r.status() === 401 && path === '/api/overview';
    if (r.status() >= 400 && !expected) problems.push(`HTTP ${r.status()} for ${r.request().method()} ${path}`);
  });
  // confirm() and prompt() (its default text: the close reason) are accepted.
  page.on('dialog', (d) => d.accept(d.type() === 'prompt' ? d.defaultValue() : undefined));

  step('login page; a wrong password is refused');
  await page.goto(base);
  await page.waitForSelector('form#login');
  await page.fill('input[name=username]', 'guest');
  await page.fill('input[name=password]', 'wrong');
  await page.click('form#login button');
  await page.waitForFunction(() => /Login failed/.test(document.querySelector('#login-error').textContent));
  await shot(page, 'login.png', false);

  step('log in as guest');
  await page.fill('input[name=password]', 'guest');
  await page.click('form#login button');
  await page.waitForSelector('#tab-overview.active');
  await page.selectOption('#refresh', '2000');

  step('overview: totals, charts, no alarms');
  await page.waitForSelector('#totals .total');
  const totals = await page.locator('#totals').innerText();
  check(/Queues/.test(totals) && /Connections/.test(totals), `totals: ${totals}`);
  await page.waitForSelector('#no-alarms');
  // Two samples or more: the queued-messages and connections charts draw lines.
  await page.waitForFunction(() => [...document.querySelectorAll('svg.chart path.series')]
    .filter((p) => p.getAttribute('d').includes('L')).length >= 6);
  await shot(page, 'overview.png', false);

  step('queues: the test\'s queue is listed with its depth');
  await page.click('#tab-queues');
  await page.fill('#queues-filter', 'ui-');
  const row = async (name) => (await readTable(page, '#queues-table')).find((r) => r.Name === name);
  const before = await waitUntil(`${source} listed`, async () => row(source));
  check(before.Ready === '3' && before.Total === '3', `depth before: ${JSON.stringify(before)}`);
  check((await row(dlq)).Ready === '1', 'the DLQ holds the dead-lettered message');

  step('depth changes as a client publishes');
  const published = Date.now();
  await harness('PUBLISH 2');
  await waitUntil(`${source} ready = 5`, async () => (await row(source))?.Ready === '5');
  console.log(`METRIC depth change seen after ${Date.now() - published} ms`);

  step('sorting by Total, largest first');
  await page.click('#queues-table th:has-text("Total")');
  await page.click('#queues-table th:has-text("Total")');
  await waitUntil('sorted by total, descending', async () => (await readTable(page, '#queues-table'))[0]?.Name === source);
  await shot(page, 'queues.png', false);

  step('paging: 25 queues, 20 a page');
  await page.fill('#queues-filter', 'ui-page-');
  await page.selectOption('.list-controls select[name=page_size]', '20');
  await page.waitForFunction(() => /^25 of \d+ shown on 2 page/.test(document.querySelector('.summary').textContent));
  check((await readTable(page, '#queues-table')).length === 20, 'a page of 20');
  await page.click('.pager button:has-text("Next")');
  await waitUntil('page 2 with the last 5', async () => {
    const rows = await readTable(page, '#queues-table');
    return rows.length === 5 && rows.every((r) => r.Name.startsWith('ui-page-'));
  });
  await page.selectOption('.list-controls select[name=page_size]', '50');
  await page.fill('#queues-filter', 'ui-');
  await waitUntil(`${source} listed again`, async () => row(source));

  step('queue page: stats, chart, peek (non-destructive) with JSON, text and hex views');
  await page.click(`#queues-table a:text-is("${source}")`);
  await page.waitForFunction((n) => document.querySelector('#queue-name')?.textContent === n, source);
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '5');
  await page.click('#peek-form button[type=submit]');
  await page.waitForFunction(() => document.querySelectorAll('#peek-result .message').length === 5);
  const first = page.locator('#peek-result .message').nth(0);
  check(/"item": "book"/.test(await first.locator('pre.payload').innerText()), 'a JSON body is shown pretty-printed');
  check(/x-tenant/.test(await first.locator('.message-meta').innerText()) && /acme/.test(await first.locator('.message-meta').innerText()), 'headers shown');
  const binary = page.locator('#peek-result .message').nth(2);
  check(/00 01 ff 68 65 6c 6c 6f/.test(await binary.locator('pre.payload').innerText()), 'a binary body is shown as hex');
  const plain = page.locator('#peek-result .message').nth(1);
  await plain.locator('button[data-view=hex]').click();
  check(/^00000000  70 6c 61 69 6e/.test(await plain.locator('pre.payload').innerText()), 'text body switched to hex');
  await plain.locator('button[data-view=text]').click();
  check((await plain.locator('pre.payload').innerText()) === 'plain text order 2', 'text view');
  await page.waitForTimeout(2500); // a refresh after the peek: still 5
  check(await page.locator('#stat-ready b').innerText() === '5', 'peek left the messages in the queue');
  await shot(page, 'queue-peek.png');
  await page.evaluate(() => document.querySelector('#peek-form').closest('details').scrollIntoView());
  await shot(page, 'queue-peek-view.png', false);

  step('get with requeue shows a message and keeps it');
  await page.locator('details:has(#get-form) > summary').click();
  await page.click('#get-form button[type=submit]');
  await page.waitForFunction(() => document.querySelectorAll('#get-result .message').length === 1);
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '5');

  step('dead-letter queue: x-death shown, redrive 1 back to its source');
  await page.goto(`${base}/#/queues/%2F/${encodeURIComponent(dlq)}`);
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '1');
  await page.click('#peek-form button[type=submit]');
  await page.waitForFunction(() => /x-death/.test(document.querySelector('#peek-result')?.textContent || ''));
  await page.fill('#redrive-form input[name=count]', '1');
  await page.click('#redrive-form button[type=submit]');
  await page.waitForFunction(() => /Moved 1, skipped 0/.test(document.querySelector('#redrive-form .form-status').textContent));
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '0');
  await shot(page, 'redrive.png');
  await page.goto(`${base}/#/queues/%2F/${encodeURIComponent(source)}`);
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '6');
  await page.click('#peek-form button[type=submit]');
  await page.waitForFunction(() => document.querySelectorAll('#peek-result .message').length === 6);
  check(/order 99/.test(await page.locator('#peek-result .message').nth(5).innerText()), 'the redriven message is back at the end of its source');

  step('a consumer is listed on its queue\'s page');
  await page.goto(`${base}/#/queues/%2F/${encodeURIComponent(consumed)}`);
  await waitUntil('the consumer listed', async () => (await readTable(page, '#queue-consumers')).some((r) => r['Consumer tag'] === 'ui-test-consumer'));
  check(await page.locator('#stat-consumers b').innerText() === '1', 'consumer count');

  step('declare a queue from the UI, publish to it, purge it, delete it');
  await page.click('#tab-queues');
  await page.locator('details:has(#add-queue) > summary').click();
  await page.fill('#add-queue input[name=name]', 'ui-scratch');
  await page.click('#add-queue button[type=submit]');
  await page.waitForFunction(() => /declared/.test(document.querySelector('#add-queue .form-status').textContent));
  await page.goto(`${base}/#/queues/%2F/ui-scratch`);
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '0');
  await page.locator('details:has(#publish-form) > summary').click();
  await page.fill('#publish-form textarea[name=payload]', 'scratch');
  for (let i = 0; i < 2; i += 1) {
    await page.click('#publish-form button[type=submit]');
    await page.waitForFunction(() => /Message published\./.test(document.querySelector('#publish-form .form-status').textContent));
  }
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '2');
  await page.locator('details:has(#purge) > summary').click();
  await page.click('#purge');
  await page.waitForFunction(() => document.querySelector('#stat-ready b')?.textContent === '0');
  await page.locator('details:has(#delete-queue) > summary').click();
  await page.check('#delete-queue input[name=if_empty]');
  await page.click('#delete-queue button[type=submit]');
  await page.waitForSelector('h1:text-is("Queues")'); // the delete went back to the list

  step('connections: close one from the UI');
  await page.click('#tab-connections');
  await waitUntil(`connection ${victim} listed`, async () => (await readTable(page, '#connections-table')).some((r) => r['Client-provided name'] === victim));
  await shot(page, 'connections.png', false);
  await page.locator('#connections-table tr', { hasText: victim }).locator('button:text-is("Close")').click();
  await waitUntil(`connection ${victim} gone`, async () => !(await readTable(page, '#connections-table')).some((r) => r['Client-provided name'] === victim));

  step('channels and exchanges pages list things');
  await page.click('#tab-channels');
  await waitUntil('a channel listed', async () => (await readTable(page, '#channels-table')).length >= 1);
  await shot(page, 'channels.png', false);
  await page.click('#tab-exchanges');
  await waitUntil('amq.direct listed', async () => (await readTable(page, '#exchanges-table')).some((r) => r.Name === 'amq.direct'));

  step('exchange page: bind amq.direct to the source queue, publish through it');
  await page.click('#exchanges-table a:text-is("amq.direct")');
  await page.waitForSelector('#add-binding');
  await page.fill('#add-binding input[name=destination]', source);
  await page.fill('#add-binding input[name=routing_key]', 'ui-key');
  await page.click('#add-binding button[type=submit]');
  await waitUntil('the binding listed', async () => (await readTable(page, 'details:has(#add-binding) .section-body > div')).some((r) => r['Routing key'] === 'ui-key'));
  await page.locator('details:has(#publish-form) > summary').click();
  await page.fill('#publish-form input[name=routing_key]', 'ui-key');
  await page.fill('#publish-form textarea[name=payload]', 'via amq.direct');
  await page.click('#publish-form button[type=submit]');
  await page.waitForFunction(() => /Message published\./.test(document.querySelector('#publish-form .form-status').textContent));
  await page.fill('#publish-form input[name=routing_key]', 'nowhere');
  await page.click('#publish-form button[type=submit]');
  await page.waitForFunction(() => /not routed/.test(document.querySelector('#publish-form .form-status').textContent));
  await shot(page, 'exchange.png');

  step('admin: definitions download');
  await page.goto(`${base}/#/admin/definitions`);
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.click('#download-definitions button[type=submit]'),
  ]);
  const defsPath = join(artifacts, 'definitions.json');
  await download.saveAs(defsPath);
  const defs = JSON.parse(readFileSync(defsPath, 'utf8'));
  const q = defs.queues.find((x) => x.name === source);
  check(q && q.arguments['x-dead-letter-routing-key'] === dlq, 'the download holds the source queue with its arguments');
  check(defs.queues.some((x) => x.name === dlq), 'and the DLQ');

  step('admin: definitions upload');
  const upload = join(artifacts, 'upload.json');
  writeFileSync(upload, JSON.stringify({ queues: [{ name: 'ui-imported', vhost: '/', durable: true, auto_delete: false, arguments: {} }] }));
  await page.setInputFiles('#definitions-file', upload);
  await page.click('#upload-definitions button[type=submit]');
  await page.waitForFunction(() => /Definitions imported/.test(document.querySelector('#upload-definitions .form-status').textContent));
  await shot(page, 'admin-definitions.png', false);
  await page.click('#tab-queues');
  await waitUntil('the imported queue listed', async () => (await readTable(page, '#queues-table')).some((r) => r.Name === 'ui-imported'));

  step('admin: a vhost, a user and a permission created through the UI');
  await page.goto(`${base}/#/admin/vhosts`);
  await page.waitForSelector('.admin-body table');
  await page.locator('details:has(#add-vhost) > summary').click();
  await page.fill('#add-vhost input[name=name]', 'ui-vhost');
  await page.click('#add-vhost button[type=submit]');
  await waitUntil('the vhost listed', async () => (await readTable(page, '.admin-body')).some((r) => r.Name === 'ui-vhost'));
  await page.goto(`${base}/#/admin/users`);
  await page.waitForSelector('.admin-body table');
  await page.fill('#add-user input[name=name]', 'ui-user');
  await page.fill('#add-user input[name=password]', 'ui-secret');
  await page.fill('#add-user input[name=tags]', 'monitoring, management');
  await page.click('#add-user button[type=submit]');
  await waitUntil('the user listed with its tags', async () => (await readTable(page, '.admin-body'))
    .some((r) => r.Name === 'ui-user' && r.Tags === 'monitoring, management' && r['Has password'] === 'yes'));
  await shot(page, 'admin-users.png', false);
  await page.goto(`${base}/#/admin/permissions`);
  await page.waitForSelector('.admin-body table');
  await waitUntil('the user offered', async () => page.$('#set-permission select[name=user] option[value="ui-user"]'));
  await waitUntil('the vhost offered', async () => page.$('#set-permission select[name=vhost] option[value="ui-vhost"]'));
  await page.selectOption('#set-permission select[name=user]', 'ui-user');
  await page.selectOption('#set-permission select[name=vhost]', 'ui-vhost');
  await page.fill('#set-permission input[name=configure]', '^ui-');
  await page.click('#set-permission button[type=submit]');
  await waitUntil('the permission listed', async () => (await readTable(page, '.admin-body'))
    .some((r) => r.User === 'ui-user' && r['Virtual host'] === 'ui-vhost' && r.Configure === '^ui-' && r.Read === '.*'));
  await shot(page, 'admin-permissions.png', false);
  await harness('LOGIN ui-user ui-secret ui-vhost');
  await page.goto(`${base}/#/admin/policies`);
  await page.locator('details:has(#add-policy) > summary').click();
  await page.fill('#add-policy input[name=name]', 'ui-cap');
  await page.fill('#add-policy input[name=pattern]', '^ui-capped$');
  await page.fill('#add-policy textarea[name=definition]', '{"max-length": 100}');
  await page.click('#add-policy button[type=submit]');
  await waitUntil('the policy listed', async () => (await readTable(page, '.admin-body')).some((r) => r.Name === 'ui-cap'));
  await shot(page, 'admin-policies.png', false);

  step('overview after a while: the charts have history');
  await page.click('#tab-overview');
  await page.waitForSelector('#totals .total');
  await shot(page, 'overview-later.png', false);

  step('log out');
  await page.click('#logout');
  await page.waitForSelector('form#login');
} catch (e) {
  problems.push(e.stack || String(e));
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages.length) await pages[0].screenshot({ path: join(artifacts, 'failure.png'), fullPage: true });
  } catch { /* the failure is reported below either way */ }
} finally {
  await browser.close();
}
stdin.close(); // else the open stdin keeps node running
if (problems.length) {
  console.error(problems.join('\n'));
  process.exit(1);
}
console.log('ALL OK');
