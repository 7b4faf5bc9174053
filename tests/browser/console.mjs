// Browser test of the console (src/api/console.html), run by
// tests/browser/run.sh against a daemon started by tests/support/with-daemon.sh.
//
// Headless Chromium (the system's, driven by playwright-core) loads the page
// through a small reverse proxy of this script that serves the daemon under
// the path prefix /ops/scramjet/, so the page is tested behind a prefix, and
// does what an operator does: signs in (a wrong token first), finds the type
// with a rejected record and reads the record's errors, fixes the schema and
// revalidates, looks the record up as a resource, and sees its `created`
// event arrive in the live feed. Then it takes a full-page screenshot.
//
// Environment (the harness sets all but the optional ones):
//   SCRAMJET_URL              the daemon's base URL, e.g. http://127.0.0.1:40123
//   SCRAMJET_TOKEN            its http.bearer_token
//   SCRAMJET_TYPE             a type with rejected records (strict schema)
//   SCRAMJET_ID               a rejected record of it that the fixed schema accepts
//   SCRAMJET_DATA             that record's data (JSON)
//   SCRAMJET_ERROR_TEXT       text of the record's validation error (default "name")
//   SCRAMJET_STILL_INVALID_ID optional: a rejected record the fixed schema still rejects
//   SCRAMJET_SCHEMA_FILE      the type's schema file, <schema_dir>/<type>.json
//   SCRAMJET_FIXED_SCHEMA     the fixed schema (JSON text) written there before Revalidate
//   SCRAMJET_SCREENSHOT       optional: PNG path (default target/browser/console.png)
//   CHROMIUM                  optional: the browser (default /usr/bin/chromium)
//
// Exits 0 when every step passed, 1 with the failing step on stderr.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { chromium } from 'playwright-core';

const PREFIX = '/ops/scramjet/';
const STEP_TIMEOUT_MS = 10_000;
const FEED_TIMEOUT_MS = 15_000;

function need(name) {
  const value = process.env[name];
  if (value === undefined || value === '') throw new Error(`environment variable ${name} is not set`);
  return value;
}

let current = 'reading the environment';
const step = (name) => {
  current = name;
  console.log(`console test: ${name}`);
};

// Polls `probe` until it returns a truthy value; fails naming what was awaited.
async function until(what, probe, timeoutMs = STEP_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      const seen = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last seen: ${seen})`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

// A reverse proxy serving `target` under PREFIX: strips it, forwards the
// method, headers and body, and streams the answer back chunk by chunk (so
// Server-Sent Events pass through unbuffered). Requests outside the prefix
// get 404 and are counted: the page must never leave its prefix.
function startProxy(target) {
  const upstream = new URL(target);
  const outside = [];
  const hop = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding',
    'te', 'trailer', 'upgrade', 'proxy-authorization', 'proxy-authenticate']);
  const server = http.createServer((req, res) => {
    if (!req.url.startsWith(PREFIX)) {
      outside.push(`${req.method} ${req.url}`);
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('outside the proxy prefix\n');
      return;
    }
    const headers = {};
    for (const [k, v] of Object.entries(req.headers)) if (!hop.has(k)) headers[k] = v;
    headers.host = upstream.host;
    headers['x-forwarded-prefix'] = PREFIX.replace(/\/$/, '');
    const forward = http.request({
      host: upstream.hostname,
      port: upstream.port,
      method: req.method,
      path: '/' + req.url.slice(PREFIX.length),
      headers,
    }, (answer) => {
      const out = {};
      for (const [k, v] of Object.entries(answer.headers)) if (!hop.has(k)) out[k] = v;
      res.writeHead(answer.statusCode, answer.statusMessage, out);
      res.flushHeaders();
      answer.on('data', (chunk) => res.write(chunk));
      answer.on('end', () => res.end());
      answer.on('error', () => res.destroy());
    });
    forward.on('error', (e) => {
      if (!res.headersSent) res.writeHead(502, { 'content-type': 'text/plain' });
      res.end(`proxy: ${e.message}\n`);
    });
    // A client that goes away (the page reconnecting its stream) ends the upstream request.
    res.on('close', () => forward.destroy());
    req.pipe(forward);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve({ server, outside, port: server.address().port }));
  });
}

const testid = (id) => `[data-testid="${id}"]`;

async function main() {
  const url = need('SCRAMJET_URL').replace(/\/+$/, '');
  const token = need('SCRAMJET_TOKEN');
  const type = need('SCRAMJET_TYPE');
  const id = need('SCRAMJET_ID');
  const data = JSON.parse(need('SCRAMJET_DATA'));
  const errorText = process.env.SCRAMJET_ERROR_TEXT || 'name';
  const stillInvalid = process.env.SCRAMJET_STILL_INVALID_ID || '';
  const schemaFile = need('SCRAMJET_SCHEMA_FILE');
  const fixedSchema = need('SCRAMJET_FIXED_SCHEMA');
  JSON.parse(fixedSchema); // fail early on a broken fixture
  const screenshot = process.env.SCRAMJET_SCREENSHOT || path.join('target', 'browser', 'console.png');

  let proxy;
  let browser;
  const pageErrors = [];
  try {
    step('starting the proxy');
    proxy = await startProxy(url);
    const base = `http://127.0.0.1:${proxy.port}${PREFIX}`;

    step('launching Chromium');
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    page.on('pageerror', (e) => pageErrors.push(e.message));
    page.on('console', (m) => { if (m.type() === 'error') console.log(`  page console: ${m.text()}`); });

    step(`loading ${base}ui`);
    const answer = await page.goto(`${base}ui`);
    assert.equal(answer.status(), 200, `GET ${PREFIX}ui answered ${answer.status()}`);
    assert.match(answer.headers()['content-type'] || '', /^text\/html/, 'GET /ui is not text/html');
    await page.locator(testid('token-input')).waitFor({ state: 'visible' });

    step('a wrong token brings the form back with an error');
    await page.locator(testid('token-input')).fill(`${token}-wrong`);
    await page.locator(testid('token-submit')).click();
    await until('the token error', async () => (await page.locator(testid('token-error')).textContent()).trim());
    assert.ok(await page.locator(testid('token-panel')).isVisible(), 'the token form is gone after a wrong token');
    assert.ok(!(await page.locator('#app').isVisible()), 'the console shows after a wrong token');

    step('the right token shows the console');
    await page.locator(testid('token-input')).fill(token);
    await page.locator(testid('token-submit')).click();
    const row = page.locator(`${testid('type-row')}[data-type="${type}"]`);
    await row.waitFor({ state: 'visible' });
    assert.ok(!(await page.locator(testid('token-panel')).isVisible()), 'the token form stays after the right token');
    const stored = await page.evaluate(() => sessionStorage.getItem('scramjet.console.token'));
    assert.equal(stored, token, 'the token is not kept in sessionStorage');
    step('a reload keeps the token of the tab');
    await page.reload();
    await row.waitFor({ state: 'visible' });
    assert.ok(!(await page.locator(testid('token-panel')).isVisible()), 'the token form is back after a reload');
    const rejectedBefore = Number(await row.locator(testid('type-rejected')).textContent());
    assert.ok(rejectedBefore >= 1, `type ${type} shows ${rejectedBefore} rejected records`);

    step('health shows both services connected');
    await until('PostgreSQL and RabbitMQ connected in Health', async () =>
      (await page.locator(testid('health-postgres')).textContent()) === 'connected'
      && (await page.locator(testid('health-rabbitmq')).textContent()) === 'connected'
      && /^\d+ event/.test(await page.locator(testid('health-outbox')).textContent()));

    step(`choosing ${type} lists its rejected record ${JSON.stringify(id)}`);
    await row.locator(testid('type-select')).click();
    const records = page.locator(testid('rejected-record'));
    const record = records.filter({ has: page.locator(testid('record-id')).getByText(id, { exact: true }) });
    await record.waitFor({ state: 'visible' });
    const messages = await record.locator(testid('record-error-message')).allTextContents();
    assert.ok(messages.some((m) => m.includes(errorText)),
      `the record's errors ${JSON.stringify(messages)} do not mention ${JSON.stringify(errorText)}`);
    await record.locator('summary').click();
    assert.deepEqual(JSON.parse(await record.locator(testid('record-data')).textContent()), data,
      'the rejected record shows other data');

    step('the live feed is connected');
    await until('the feed to connect', async () =>
      (await page.locator(testid('feed-status')).getAttribute('data-state')) === 'connected');

    step('fixing the schema and revalidating');
    fs.writeFileSync(schemaFile, fixedSchema);
    const revalidate = page.locator(testid('revalidate'));
    assert.equal((await revalidate.textContent()).trim(), `Revalidate ${type}`);
    await revalidate.click();
    const created = page.locator(testid('revalidate-created'));
    await created.waitFor({ state: 'visible' });
    const counts = {};
    for (const key of ['checked', 'created', 'updated', 'unchanged', 'still-invalid']) {
      counts[key] = Number(await page.locator(testid(`revalidate-${key}`)).getAttribute('data-count'));
    }
    assert.ok(counts.created >= 1, `revalidation created ${counts.created}: ${JSON.stringify(counts)}`);
    assert.ok(counts.checked >= rejectedBefore, `revalidation checked ${counts.checked}: ${JSON.stringify(counts)}`);
    if (stillInvalid) assert.ok(counts['still-invalid'] >= 1, `nothing still invalid: ${JSON.stringify(counts)}`);

    step('the record left the rejected list');
    await until(`${JSON.stringify(id)} to leave the rejected list`, async () => (await record.count()) === 0);
    if (stillInvalid) {
      await records.filter({ has: page.locator(testid('record-id')).getByText(stillInvalid, { exact: true }) })
        .waitFor({ state: 'visible' });
    }
    await until('the rejected count to drop', async () =>
      Number(await row.locator(testid('type-rejected')).textContent()) < rejectedBefore);

    step(`looking up ${type} ${JSON.stringify(id)}`);
    await page.locator(testid('lookup-type')).fill(type);
    await page.locator(testid('lookup-id')).fill(id);
    await page.locator(testid('lookup-submit')).click();
    await page.locator(testid('lookup-data')).waitFor({ state: 'visible' });
    assert.deepEqual(JSON.parse(await page.locator(testid('lookup-data')).textContent()), data,
      'the lookup shows other data');
    const hash = (await page.locator(testid('lookup-hash')).textContent()).trim();
    assert.match(hash, /^[0-9a-f]{64}$/, 'the lookup shows no hash');
    assert.equal((await page.locator(testid('lookup-found-id')).textContent()), id);

    step('the lookup of an unknown id says not found');
    await page.locator(testid('lookup-id')).fill(`${id} (no such id)`);
    await page.locator(testid('lookup-submit')).click();
    await page.locator(testid('lookup-notfound')).waitFor({ state: 'visible' });

    step('the created event arrives in the live feed');
    const event = page.locator(`${testid('feed-event')}[data-op="created"]`)
      .filter({ has: page.locator(testid('feed-key')).getByText(`${type} / ${id}`, { exact: true }) });
    await event.first().waitFor({ state: 'visible', timeout: FEED_TIMEOUT_MS });

    step('looking up from the feed');
    await event.first().locator(testid('feed-key')).click();
    await until('the lookup from the feed', async () =>
      (await page.locator(testid('lookup-hash')).count()) === 1
      && (await page.locator(testid('lookup-hash')).textContent()).trim() === hash);

    step('no request left the prefix');
    assert.deepEqual(proxy.outside, [], 'requests outside the proxy prefix');
    assert.deepEqual(pageErrors, [], 'errors thrown in the page');

    step(`taking a screenshot to ${screenshot}`);
    if (stillInvalid) {
      const other = records.filter({ has: page.locator(testid('record-id')).getByText(stillInvalid, { exact: true }) });
      await other.locator('summary').click();
    }
    fs.mkdirSync(path.dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot, fullPage: true });

    console.log('console test: passed');
  } finally {
    if (browser) await browser.close().catch(() => {});
    if (proxy) {
      if (proxy.outside.length) console.error(`console test: requests outside ${PREFIX}: ${proxy.outside.join(', ')}`);
      proxy.server.closeAllConnections();
      await new Promise((r) => proxy.server.close(r));
    }
  }
}

main().then(() => process.exit(0), (e) => {
  console.error(`console test FAILED while ${current}: ${e.message}`);
  if (e.stack && !(e instanceof assert.AssertionError)) console.error(e.stack);
  process.exit(1);
});
