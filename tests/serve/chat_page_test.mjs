// The chat page (GET /) in headless Chromium against a real `aviary serve`: a reply streams in
// and the speed line shows tokens/s, the conversation goes back to the server whole, Stop ends
// a long reply, New chat starts over, API errors are shown, and a server with --api-key gets
// the key typed into the page. Saves a screenshot of a short conversation.
//   node chat_page_test.mjs AVIARY_BINARY MODEL_PATH SCREENSHOT_PATH
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  Checks, checkCleanExits, deadline, haveModule, parseArgs, requireOrSkip, sleep, startServer, stopAll,
} from './serve_helpers.mjs';

const CHROMIUM = '/usr/bin/chromium';
const [binary, model, screenshotPath] = parseArgs(['AVIARY_BINARY', 'MODEL_PATH', 'SCREENSHOT_PATH']);
requireOrSkip(haveModule('puppeteer-core'), 'tests/serve/node_modules is missing (npm ci --prefix tests/serve)');
requireOrSkip(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing (apt install chromium)`);
const { default: puppeteer } = await import('puppeteer-core');

let browser = null;
deadline(420, async () => {
  if (browser) await browser.close();
  await stopAll();
});

const API_KEY = 'page-test-key';
const checks = new Checks();

// The page's requests to the chat endpoint, as sent: parsed body and headers.
function recordChatRequests(page) {
  const requests = [];
  page.on('request', (req) => {
    if (req.url().endsWith('/v1/chat/completions') && req.method() === 'POST') {
      requests.push({ body: JSON.parse(req.postData() ?? '{}'), headers: req.headers() });
    }
  });
  return requests;
}

async function openPage(url) {
  const page = await browser.newPage();
  await page.setViewport({ width: 760, height: 620 });
  const problems = [];
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    // A failed request (the 401s and 400s the test provokes) is logged by Chromium itself.
    if (msg.type() === 'error' && !/Failed to load resource/.test(msg.text())) {
      problems.push(`console error: ${msg.text()}`);
    }
  });
  page.on('request', (req) => {
    if (!req.url().startsWith(url) && !req.url().startsWith('data:')) {
      problems.push(`request outside the server: ${req.url()}`);
    }
  });
  const requests = recordChatRequests(page);
  const response = await page.goto(url + '/', { waitUntil: 'load', timeout: 30000 });
  assert.equal(response.status(), 200, 'GET / status');
  assert.match(response.headers()['content-type'] ?? '', /text\/html/, 'GET / content type');
  return { page, problems, requests };
}

async function setField(page, selector, value) {
  await page.$eval(selector, (el, v) => {
    el.value = v;
    el.dispatchEvent(new Event('change', { bubbles: true }));
  }, String(value));
}

async function openSettings(page) {
  if (await page.$eval('#settings', (el) => el.hidden)) await page.click('#settings-toggle');
}

// Every time the last reply's text changes (once per batch of chunks the page reads), its length
// is recorded in the page: growth in several steps is what streaming looks like.
async function watchLastReply(page) {
  await page.evaluate(() => {
    window.__lengths = [];
    const observer = new MutationObserver(() => {
      const replies = document.querySelectorAll('#messages .assistant');
      const last = replies[replies.length - 1];
      const content = last && last.querySelector('.content');
      if (!content) return;
      const n = content.textContent.length;
      const lengths = window.__lengths;
      if (lengths.length === 0 || lengths[lengths.length - 1] !== n) lengths.push(n);
    });
    observer.observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
    window.__observer?.disconnect();
    window.__observer = observer;
  });
}

const lastReply = (page) => page.evaluate(() => {
  const replies = document.querySelectorAll('#messages .assistant, #messages .error');
  const last = replies[replies.length - 1];
  if (!last) return null;
  return {
    cls: last.className, state: last.dataset.state ?? '',
    text: last.querySelector('.content')?.textContent ?? '', all: last.textContent,
  };
});

async function sendMessage(page, text) {
  await page.click('#input');
  await page.type('#input', text);
  await page.click('#send');
}

async function waitForState(page, states, timeoutMs) {
  await page.waitForFunction((wanted) => {
    const replies = document.querySelectorAll('#messages .assistant, #messages .error');
    const last = replies[replies.length - 1];
    return last && wanted.includes(last.dataset.state);
  }, { timeout: timeoutMs, polling: 20 }, states);
  return lastReply(page);
}

// A value of the server's Prometheus text (GET /metrics).
async function metric(server, name) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const m = text.match(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'm'));
  assert.ok(m, `${name} is not in /metrics`);
  return Number(m[1]);
}

const visible = (page, selector) => page.$eval(selector, (el) => !el.hidden && el.offsetParent !== null);

let server = null;

async function main() {
  server = await startServer(binary, ['--model', model]);
  console.log(`server ${server.url} (pid ${server.pid})`);
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
  });
  const { page, problems, requests } = await openPage(server.url);
  let firstReply = '';

  await checks.run('the page has its controls', async () => {
    for (const id of ['#input', '#send', '#stop', '#messages', '#speed', '#new-chat']) {
      assert.ok(await page.$(id), `${id} is missing`);
    }
    assert.ok(await visible(page, '#send'), '#send is visible');
    assert.ok(!(await visible(page, '#stop')), '#stop is hidden while idle');
    await page.waitForFunction(() => document.getElementById('model-name').textContent.length > 0,
                               { timeout: 10000 });
    const name = await page.$eval('#model-name', (el) => el.textContent);
    assert.equal(name, path.basename(model).replace(/\.[^.]+$/, ''), 'the model id in the header');
  });

  await checks.run('a reply streams in and the speed line shows tokens/s', async () => {
    await openSettings(page);
    await setField(page, '#max-tokens', 120);
    await setField(page, '#temperature', 0.8);
    await setField(page, '#system-prompt', 'You are a helpful assistant.');
    await page.click('#settings-toggle');
    await watchLastReply(page);
    await sendMessage(page, 'Hello! What can you do?');
    const reply = await waitForState(page, ['done', 'error', 'stopped'], 60000);
    assert.equal(reply.state, 'done', `reply ended as ${reply.state}: ${reply.all}`);
    assert.ok(reply.text.length > 0, 'the reply has text');
    firstReply = reply.text;
    assert.equal(await page.$$eval('#messages .assistant .content *', (els) => els.length), 0,
                 'the reply is text, never parsed as HTML');
    const lengths = await page.evaluate(() => window.__lengths);
    assert.ok(lengths.some((n) => n > 0), `the reply text appeared (lengths seen: ${lengths})`);
    const speed = await page.$eval('#speed', (el) => el.textContent);
    assert.match(speed, /\d+(\.\d+)? tokens\/s/, `#speed: "${speed}"`);
    assert.match(speed, /prompt \d+ tokens/, `#speed shows the usage: "${speed}"`);
    assert.equal(await page.$eval('#input', (el) => el.value), '', 'the input is cleared');
    assert.ok(await visible(page, '#send'), '#send is back after the reply');
  });

  await checks.run('the request is streamed, asks for usage and names the conversation', async () => {
    assert.equal(requests.length, 1, 'one chat request');
    const { body, headers } = requests[0];
    assert.equal(body.stream, true);
    assert.deepEqual(body.stream_options, { include_usage: true });
    assert.equal(body.max_tokens, 120);
    assert.equal(body.temperature, 0.8);
    assert.deepEqual(body.messages, [
      { role: 'system', content: 'You are a helpful assistant.' },
      { role: 'user', content: 'Hello! What can you do?' },
    ]);
    assert.match(headers['x-conversation-id'] ?? '', /^[0-9a-f]{32}$/, 'X-Conversation-Id');
    assert.equal(headers['authorization'], undefined, 'no key is sent to a server that asks none');
  });

  await checks.run('the second message sends the whole conversation', async () => {
    await sendMessage(page, 'Tell me more.');
    const reply = await waitForState(page, ['done', 'error', 'stopped'], 60000);
    assert.equal(reply.state, 'done', `reply ended as ${reply.state}: ${reply.all}`);
    assert.equal(requests.length, 2);
    assert.deepEqual(requests[1].body.messages, [
      { role: 'system', content: 'You are a helpful assistant.' },
      { role: 'user', content: 'Hello! What can you do?' },
      { role: 'assistant', content: firstReply },
      { role: 'user', content: 'Tell me more.' },
    ]);
    assert.equal(requests[1].headers['x-conversation-id'], requests[0].headers['x-conversation-id'],
                 'the same conversation id');
    assert.equal(await page.$$eval('#messages .assistant', (els) => els.length), 2);
    assert.equal(await page.$$eval('#messages .user', (els) => els.length), 2);
  });

  await checks.run('screenshot', async () => {
    fs.mkdirSync(path.dirname(path.resolve(screenshotPath)), { recursive: true });
    await page.screenshot({ path: screenshotPath });
    assert.ok(fs.statSync(screenshotPath).size > 1000, 'the screenshot was written');
    console.log(`screenshot: ${screenshotPath}`);
  });

  await checks.run('New chat clears the conversation and takes a new id', async () => {
    await page.click('#new-chat');
    assert.equal(await page.$$eval('#messages .message', (els) => els.length), 0);
    await sendMessage(page, 'Hi');
    const reply = await waitForState(page, ['done', 'error', 'stopped'], 60000);
    assert.equal(reply.state, 'done', `reply ended as ${reply.state}: ${reply.all}`);
    const last = requests[requests.length - 1];
    assert.deepEqual(last.body.messages.map((m) => m.role), ['system', 'user']);
    assert.notEqual(last.headers['x-conversation-id'], requests[0].headers['x-conversation-id']);
  });

  await checks.run('Stop ends a long reply, which then stops growing', async () => {
    await page.click('#new-chat');
    await openSettings(page);
    // Greedy: the tiny model then repeats itself without ever ending its turn, so the reply is
    // still running when Stop is clicked.
    await setField(page, '#temperature', 0);
    await setField(page, '#max-tokens', 4096);
    await page.click('#settings-toggle');
    await watchLastReply(page);
    // The tiny model writes a whole reply faster than a person could press Stop: the page's
    // downloads are slowed so that the reply is still arriving when Stop is clicked.
    await page.emulateNetworkConditions({ download: 40 * 1024, upload: 1024 * 1024, latency: 0 });
    const cancelledBefore = await metric(server, 'aviary_requests_cancelled_total');
    await sendMessage(page, 'Write a very long story.');
    // Streaming: the text grows in at least two steps before the reply is stopped.
    await page.waitForFunction(() => window.__lengths.filter((n) => n > 0).length >= 2,
                               { timeout: 60000, polling: 5 });
    assert.ok(await visible(page, '#stop'), '#stop is visible while a reply streams');
    await page.click('#stop');
    const stopped = await waitForState(page, ['done', 'error', 'stopped'], 10000);
    assert.equal(stopped.state, 'stopped', `the reply ended as ${stopped.state} (too short to stop?)`);
    const lengths = await page.evaluate(() => window.__lengths);
    const grew = lengths.filter((n) => n > 0);
    assert.ok(grew.length >= 2 && grew.every((n, i) => i === 0 || n > grew[i - 1]),
              `the reply grew step by step: ${lengths.join(' ')}`);
    await page.emulateNetworkConditions(null);
    await sleep(1500);
    const later = await lastReply(page);
    assert.equal(later.text.length, stopped.text.length, 'the reply stopped growing');
    assert.match(later.all, /\(stopped\)/, 'the reply is marked as stopped');
    assert.ok(await visible(page, '#send'), '#send is back');
    assert.ok(!(await visible(page, '#stop')), '#stop is hidden again');
    // The server noticed the closed stream and dropped the request.
    const cancelledAfter = await metric(server, 'aviary_requests_cancelled_total');
    assert.equal(cancelledAfter, cancelledBefore + 1, 'aviary_requests_cancelled_total');
    // The server is free again, and the stopped reply is part of the conversation.
    await setField(page, '#max-tokens', 16);
    await sendMessage(page, 'Thanks.');
    const next = await waitForState(page, ['done', 'error', 'stopped'], 60000);
    assert.equal(next.state, 'done', `the next reply ended as ${next.state}: ${next.all}`);
    const last = requests[requests.length - 1];
    assert.equal(last.body.messages.length, 4);
    assert.equal(last.body.messages[2].role, 'assistant');
    assert.equal(last.body.messages[2].content, stopped.text);
  });

  await checks.run('an API error is shown readably and the text is given back', async () => {
    await openSettings(page);
    await setField(page, '#temperature', 5);
    await page.click('#settings-toggle');
    const before = await page.$$eval('#messages .user', (els) => els.length);
    await sendMessage(page, 'Too hot');
    const reply = await waitForState(page, ['error', 'done', 'stopped'], 30000);
    assert.equal(reply.state, 'error');
    assert.match(reply.cls, /\berror\b/);
    assert.match(reply.all, /^Error 400\b.*temperature/i, `the error: "${reply.all}"`);
    assert.doesNotMatch(reply.all, /[{}]/, 'the message, not the JSON');
    assert.equal(await page.$eval('#input', (el) => el.value), 'Too hot', 'the text is back in the input');
    assert.equal(await page.$$eval('#messages .user', (els) => els.length), before, 'the exchange is taken back');
    await setField(page, '#temperature', 0.8);
  });

  await checks.run('the page loaded nothing from outside and raised no error', async () => {
    assert.deepEqual(problems, []);
  });
  await page.close();

  const keyServer = await startServer(binary, ['--model', model, '--api-key', API_KEY]);
  await checks.run('a server with --api-key: the page asks for the key and then uses it', async () => {
    const { page, problems, requests } = await openPage(keyServer.url);
    await page.waitForFunction(() => /key/i.test(document.getElementById('model-name').textContent),
                               { timeout: 10000 });
    await setField(page, '#max-tokens', 32);
    await sendMessage(page, 'Hello?');
    const refused = await waitForState(page, ['error', 'done', 'stopped'], 30000);
    assert.equal(refused.state, 'error');
    assert.match(refused.all, /^Error 401\b/, `the error: "${refused.all}"`);
    assert.ok(await visible(page, '#api-key'), 'the key field is shown');
    await setField(page, '#api-key', API_KEY);
    await page.click('#send');  // the refused text is back in the input
    const reply = await waitForState(page, ['done', 'error', 'stopped'], 60000);
    assert.equal(reply.state, 'done', `reply ended as ${reply.state}: ${reply.all}`);
    assert.ok(reply.text.length > 0);
    assert.equal(requests[requests.length - 1].headers['authorization'], `Bearer ${API_KEY}`);
    assert.equal(await page.evaluate(() => localStorage.getItem('aviary.apiKey')), API_KEY,
                 'the key is kept in localStorage');
    await page.reload({ waitUntil: 'load' });
    assert.equal(await page.$eval('#api-key', (el) => el.value), API_KEY, 'the key survives a reload');
    assert.deepEqual(problems, []);
    await page.close();
  });

  await browser.close();
  browser = null;
  await checkCleanExits(checks, [server, keyServer]);
}

try {
  await main();
} catch (err) {
  console.log(`FAIL: ${err && err.stack ? err.stack : err}`);
  checks.failures.push('setup');
} finally {
  if (browser) await browser.close().catch(() => {});
  await stopAll();
}
checks.finish();
