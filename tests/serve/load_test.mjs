#!/usr/bin/env node
// Load test of `aviary serve` (Node's built-ins only): N concurrent streaming clients for S
// seconds on POST /v1/completions and /v1/chat/completions with temperature 0, plus a fraction of
// malformed requests. Every good reply must equal the greedy reply the same request gets alone
// (or the one given with --expected, e.g. from `aviary generate --temperature 0`); each client
// has its own prompt, so a reply lost, cut short or crossed with another client's shows up as a
// mismatch. Every malformed request must get a 4xx OpenAI error object, never a dropped
// connection. Prints (and with --out writes) a JSON summary: requests ok/failed by kind, time
// to first token and total latency (p50, p99), aggregate completion tokens/s. Exits 1 on any
// failure, 77 when --model is missing (skipped; a failure under CI=true).
//
//   node tests/serve/load_test.mjs --url http://127.0.0.1:8080 --clients 32 --seconds 60
//   node tests/serve/load_test.mjs --aviary build/aviary --model M.bin --clients 8 --seconds 10
//
// With --aviary and --model it starts `aviary serve --port 0` itself (extra flags with
// --server-arg=..., repeated), and at the end stops it with SIGTERM and expects exit status 0.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

const usage = `usage: load_test.mjs (--url URL | --aviary BIN --model PATH [--server-arg=ARG ...])
  [--clients 8] [--seconds 10] [--malformed-fraction 0.1] [--max-tokens 32]
  [--prompts FILE] [--expected FILE] [--save-expected FILE] [--kinds completion,chat]
  [--out FILE] [--seed 1]
  [--api-key KEY] [--connection keep-alive|close] [--solo-whole yes|no]
--prompts: a JSON array of strings, or a text file with one prompt per line (client i uses
  prompt i mod count). --expected: JSON {"completion": {prompt: reply}, "chat": {prompt: reply}}
  (any part may be missing); replies not given are taken from the request sent alone first,
  streamed and whole (which must agree; --solo-whole no: streamed only). --save-expected writes
  every expected reply in that form.`;

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string' },
    aviary: { type: 'string' },
    model: { type: 'string' },
    'server-arg': { type: 'string', multiple: true, default: [] },
    clients: { type: 'string', default: '8' },
    seconds: { type: 'string', default: '10' },
    'malformed-fraction': { type: 'string', default: '0.1' },
    'max-tokens': { type: 'string', default: '32' },
    prompts: { type: 'string' },
    expected: { type: 'string' },
    'save-expected': { type: 'string' },
    kinds: { type: 'string', default: 'completion,chat' },
    out: { type: 'string' },
    seed: { type: 'string', default: '1' },
    'api-key': { type: 'string' },
    connection: { type: 'string', default: 'keep-alive' },
    'solo-whole': { type: 'string', default: 'yes' },
    help: { type: 'boolean', default: false },
  },
});
if (opt.help) {
  console.log(usage);
  process.exit(0);
}
const fatal = (message, code = 2) => {
  console.error(`load_test: ${message}`);
  process.exit(code);
};
const number = (name, min, max) => {
  const v = Number(opt[name]);
  if (!Number.isFinite(v) || v < min || v > max) fatal(`--${name} must be a number in [${min}, ${max}]\n${usage}`);
  return v;
};
const clients = Math.trunc(number('clients', 1, 4096));
const seconds = number('seconds', 0.1, 86400);
const malformedFraction = number('malformed-fraction', 0, 1);
const maxTokens = Math.trunc(number('max-tokens', 1, 100000));
const kinds = opt.kinds.split(',').filter(Boolean);
for (const k of kinds) if (k !== 'completion' && k !== 'chat') fatal(`--kinds: unknown kind '${k}'`);
if (!kinds.length) fatal('--kinds is empty');
if (!opt.url === !opt.aviary) fatal(`give either --url or --aviary with --model\n${usage}`);
if (opt.aviary && !opt.model) fatal('--aviary needs --model');
if (opt.connection !== 'keep-alive' && opt.connection !== 'close') fatal('--connection: keep-alive or close');
if (opt['solo-whole'] !== 'yes' && opt['solo-whole'] !== 'no') fatal('--solo-whole: yes or no');
if (opt.model && !fs.existsSync(opt.model)) {
  if (process.env.CI === 'true') fatal(`model not found: ${opt.model} (CI=true: required)`, 1);
  console.error(`SKIP: model not found: ${opt.model} (needs ../shared)`);
  process.exit(77);
}

// ---- Deterministic randomness (which requests are malformed, and how).
let rngState = Number(opt.seed) >>> 0 || 1;
const random = () => {  // mulberry32
  rngState = (rngState + 0x6d2b79f5) >>> 0;
  let t = rngState;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};

// ---- Prompts: one per client, distinct, so crossed replies are detectable.
const builtinSeeds = [
  'The old lighthouse keeper climbed the stairs',
  'In the beginning the river was',
  'My grandmother always said that bread',
  'The spaceship drifted past the moons of',
  'A recipe for a quiet afternoon:',
  'The committee met on Tuesday to decide',
  'Under the bridge, the fox waited for',
  'Dear diary, today the garden',
];
let prompts;
if (opt.prompts) {
  const text = fs.readFileSync(opt.prompts, 'utf8');
  try {
    prompts = JSON.parse(text);
  } catch {
    prompts = text.split('\n').filter((l) => l.length > 0);
  }
  if (!Array.isArray(prompts) || !prompts.length || !prompts.every((p) => typeof p === 'string'))
    fatal(`${opt.prompts}: want a JSON array of strings or one prompt per line`);
} else {
  prompts = Array.from({ length: clients }, (_, i) => `${builtinSeeds[i % builtinSeeds.length]} (story ${i + 1})`);
}
const clientPrompt = (i) => prompts[i % prompts.length];
const usedPrompts = [...new Set(Array.from({ length: clients }, (_, i) => clientPrompt(i)))];
const givenExpected = opt.expected ? JSON.parse(fs.readFileSync(opt.expected, 'utf8')) : {};

// ---- The server: given, or started here.
let server = null;
let serverExited = null;  // set when the started server exits: {code, signal}
let serverLog = '';
async function startServer() {
  const args = ['serve', '--model', opt.model, '--host', '127.0.0.1', '--port', '0', ...opt['server-arg']];
  server = spawn(opt.aviary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  server.stderr.setEncoding('utf8');
  server.stderr.on('data', (d) => (serverLog = (serverLog + d).slice(-4000)));
  const exited = new Promise((resolve) => server.on('exit', (code, signal) => resolve((serverExited = { code, signal }))));
  server.on('error', (e) => fatal(`cannot start ${opt.aviary}: ${e.message}`, 1));
  process.on('exit', () => server && serverExited === null && server.kill('SIGKILL'));
  for (const s of ['SIGINT', 'SIGTERM']) process.on(s, () => process.exit(130));
  let out = '';
  server.stdout.setEncoding('utf8');
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no listening line within 120 s')), 120000);
    server.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/^aviary serve: listening on (http:\/\/\S+)\n/m);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    exited.then(({ code, signal }) => reject(new Error(`exited (${code ?? signal}) before listening`)));
  }).catch((e) => fatal(`aviary serve: ${e.message}\n${serverLog}`, 1));
  return { url, exited };
}

// ---- HTTP. One request: resolves with what happened, never rejects.
const agent = new http.Agent({ keepAlive: opt.connection === 'keep-alive', maxSockets: Infinity });
let baseUrl;
function send(path, body, { headers = {}, timeoutMs = 600000 } = {}) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const url = new URL(path, baseUrl);
    const payload = Buffer.isBuffer(body) ? body : Buffer.from(body);
    const h = { 'Content-Type': 'application/json', 'Content-Length': payload.length, ...headers };
    if (opt['api-key']) h.Authorization = `Bearer ${opt['api-key']}`;
    if (opt.connection === 'close') h.Connection = 'close';
    const result = { status: 0, headers: {}, text: '', events: [], ttftMs: null, totalMs: null, error: null };
    let settled = false;
    const finish = (error) => {
      if (settled) return;
      settled = true;
      result.totalMs = performance.now() - t0;
      if (error) result.error = error;
      resolve(result);
    };
    const req = http.request(url, { method: 'POST', agent, headers: h }, (res) => {
      result.status = res.statusCode;
      result.headers = res.headers;
      res.setEncoding('utf8');
      const sse = (res.headers['content-type'] || '').startsWith('text/event-stream');
      let pending = '';
      res.on('data', (chunk) => {
        if (!sse) {
          result.text += chunk;
          return;
        }
        pending += chunk;
        let end;
        while ((end = pending.indexOf('\n\n')) >= 0) {
          const event = pending.slice(0, end);
          pending = pending.slice(end + 2);
          const lines = event.split('\n');
          // Lines starting with ':' are SSE comments (the server's keep-alives while it waits).
          if (lines.every((l) => l.startsWith(':'))) continue;
          if (!lines.every((l) => l.startsWith('data: ') || l.startsWith(':'))) {
            result.events.push({ bad: event });
            continue;
          }
          const data = lines.filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
          let json = null;
          if (data !== '[DONE]') {
            try {
              json = JSON.parse(data);
            } catch {}
          }
          if (result.ttftMs === null && json?.choices?.some((c) => c.text || c.delta?.content))
            result.ttftMs = performance.now() - t0;
          result.events.push({ data, json });
        }
      });
      res.on('end', () => {
        if (pending.trim()) result.events.push({ bad: pending });
        finish(null);
      });
      res.on('aborted', () => finish('connection dropped during the response'));
      res.on('error', (e) => finish(`response error: ${e.code || e.message}`));
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`no progress for ${timeoutMs / 1000} s`)));
    req.on('error', (e) => finish(`${result.status ? 'response' : 'request'} failed: ${e.code || e.message}`));
    req.end(payload);
  });
}

// A good request's body.
function goodBody(kind, prompt, stream) {
  const common = { max_tokens: maxTokens, temperature: 0, stream };
  if (stream) common.stream_options = { include_usage: true };
  return JSON.stringify(kind === 'chat' ? { messages: [{ role: 'user', content: prompt }], ...common } : { prompt, ...common });
}
const pathOf = (kind) => (kind === 'chat' ? '/v1/chat/completions' : '/v1/completions');

// Checks a good request's response; returns {text, tokens} or {failure}.
function checkGood(kind, r, stream) {
  if (r.error) return { failure: r.error };
  if (r.status !== 200) return { failure: `status ${r.status}: ${r.text.slice(0, 300)}` };
  if (!stream) {
    let j;
    try {
      j = JSON.parse(r.text);
    } catch {
      return { failure: `not JSON: ${r.text.slice(0, 200)}` };
    }
    const c = j.choices?.[0];
    const text = kind === 'chat' ? c?.message?.content : c?.text;
    if (typeof text !== 'string') return { failure: `no reply text in ${r.text.slice(0, 200)}` };
    return { text, tokens: j.usage?.completion_tokens ?? null };
  }
  if (!(r.headers['content-type'] || '').startsWith('text/event-stream'))
    return { failure: `stream: Content-Type ${r.headers['content-type']}: ${r.text.slice(0, 200)}` };
  let text = '';
  let tokens = null;
  let finished = false;
  let done = false;
  let chunks = 0;
  for (const e of r.events) {
    if (e.bad !== undefined) return { failure: `not an SSE data event: ${JSON.stringify(e.bad.slice(0, 200))}` };
    if (done) return { failure: 'events after [DONE]' };
    if (e.data === '[DONE]') {
      done = true;
      continue;
    }
    const j = e.json;
    if (!j) return { failure: `event is not JSON: ${e.data.slice(0, 200)}` };
    if (j.error) return { failure: `error event in the stream: ${e.data.slice(0, 300)}` };
    if (j.usage) tokens = j.usage.completion_tokens;
    for (const c of j.choices ?? []) {
      if (c.index !== 0) return { failure: `choice index ${c.index} in an n=1 stream` };
      const piece = kind === 'chat' ? c.delta?.content : c.text;
      if (typeof piece === 'string') text += piece;
      if (piece) ++chunks;
      if (c.finish_reason) finished = true;
    }
  }
  if (!done) return { failure: `stream ended without [DONE] (${r.events.length} events, text ${JSON.stringify(text)})` };
  if (!finished) return { failure: 'no chunk carried a finish_reason' };
  return { text, tokens: tokens ?? chunks };
}

// ---- Malformed requests: each must be a 4xx with an OpenAI error object.
const deep = '['.repeat(5000) + ']'.repeat(5000);
const malformedCases = [
  ['bad-json', '/v1/completions', '{"prompt": "abc", "max_tokens": '],
  ['empty-body', '/v1/chat/completions', ''],
  ['not-an-object', '/v1/completions', '[1, 2, 3]'],
  ['prompt-number', '/v1/completions', '{"prompt": 42, "stream": true}'],
  ['messages-string', '/v1/chat/completions', '{"messages": "hello", "stream": true}'],
  ['messages-empty', '/v1/chat/completions', '{"messages": [], "stream": true}'],
  ['message-without-role', '/v1/chat/completions', '{"messages": [{"content": "hi"}], "stream": true}'],
  ['max-tokens-string', '/v1/completions', '{"prompt": "a", "max_tokens": "ten", "stream": true}'],
  ['max-tokens-negative', '/v1/chat/completions', '{"messages": [{"role": "user", "content": "a"}], "max_tokens": -5}'],
  ['max-tokens-huge', '/v1/completions', '{"prompt": "a", "max_tokens": 1000000000000, "stream": true}'],
  ['temperature-absurd', '/v1/completions', '{"prompt": "a", "temperature": 1000, "stream": true}'],
  ['top-p-zero', '/v1/chat/completions', '{"messages": [{"role": "user", "content": "a"}], "top_p": 0}'],
  ['n-huge', '/v1/chat/completions', '{"messages": [{"role": "user", "content": "a"}], "n": 1000000, "stream": true}'],
  ['stream-string', '/v1/completions', '{"prompt": "a", "stream": "yes"}'],
  ['penalty-absurd', '/v1/completions', '{"prompt": "a", "presence_penalty": 50}'],
  ['too-many-stops', '/v1/completions', '{"prompt": "a", "stop": ["a", "b", "c", "d", "e"], "stream": true}'],
  ['unknown-model', '/v1/chat/completions', '{"model": "no-such-model", "messages": [{"role": "user", "content": "a"}]}'],
  ['deep-nesting', '/v1/completions', `{"prompt": "a", "extra": ${deep}}`],
  ['invalid-utf8', '/v1/completions', Buffer.concat([Buffer.from('{"prompt": "a'), Buffer.from([0xff, 0xfe]), Buffer.from('"}')])],
  ['body-too-large', '/v1/completions', `{"prompt": "${'x'.repeat(2 << 20)}"}`],
];
function checkMalformed(r) {
  if (r.error) return r.error;
  if (r.status < 400 || r.status > 499) return `status ${r.status} (want 4xx): ${r.text.slice(0, 200)}`;
  let j;
  try {
    j = JSON.parse(r.text);
  } catch {
    return `status ${r.status}, body not JSON: ${r.text.slice(0, 200)}`;
  }
  const e = j?.error;
  if (!e || typeof e.message !== 'string' || !e.message || typeof e.type !== 'string')
    return `status ${r.status}, not an OpenAI error object: ${r.text.slice(0, 200)}`;
  return null;
}

// ---- Statistics.
const percentile = (values, p) => {
  if (!values.length) return null;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
};
const round = (v, digits = 1) => (v === null ? null : Number(v.toFixed(digits)));
const failures = [];
const fail = (what) => {
  failures.push(what);
  if (failures.length <= 20) console.error(`FAIL: ${what}`);
};

async function main() {
  let started = null;
  if (opt.aviary) {
    started = await startServer();
    baseUrl = started.url;
  } else {
    baseUrl = opt.url.replace(/\/$/, '');
  }
  console.error(`load_test: ${baseUrl}, ${clients} clients, ${seconds} s, max_tokens ${maxTokens}, ` +
    `malformed ${malformedFraction}, kinds ${kinds.join('+')}, ${usedPrompts.length} distinct prompts`);
  if (usedPrompts.length < clients)
    console.error(`load_test: warning: ${clients} clients share ${usedPrompts.length} prompts; replies crossed between clients with the same prompt go unseen`);

  // Expected replies: from --expected, else each distinct request alone, streamed and whole,
  // which must agree.
  const expected = { completion: new Map(), chat: new Map() };
  for (const kind of kinds) {
    for (const prompt of usedPrompts) {
      const given = givenExpected[kind]?.[prompt];
      if (typeof given === 'string') {
        expected[kind].set(prompt, given);
        continue;
      }
      const streamed = checkGood(kind, await send(pathOf(kind), goodBody(kind, prompt, true)), true);
      const whole = opt['solo-whole'] === 'yes'
        ? checkGood(kind, await send(pathOf(kind), goodBody(kind, prompt, false)), false)
        : streamed;
      if (streamed.failure || whole.failure) {
        fail(`solo ${kind} ${JSON.stringify(prompt)}: ${streamed.failure || whole.failure}`);
        continue;
      }
      if (streamed.text !== whole.text)
        fail(`solo ${kind} ${JSON.stringify(prompt)}: streamed ${JSON.stringify(streamed.text)} != whole ${JSON.stringify(whole.text)}`);
      expected[kind].set(prompt, streamed.text);
    }
    const distinct = new Set(expected[kind].values()).size;
    if (distinct < expected[kind].size)
      console.error(`load_test: warning: ${kind}: ${expected[kind].size} prompts give only ${distinct} distinct replies`);
  }
  if (opt['save-expected'] && !failures.length) {
    const all = Object.fromEntries(kinds.map((k) => [k, Object.fromEntries(expected[k])]));
    fs.writeFileSync(opt['save-expected'], JSON.stringify(all, null, 1) + '\n');
  }
  if (failures.length) return finish(started, null);

  // The load: each client sends requests back to back until the deadline.
  const kindsAll = [...kinds, 'malformed'];
  const stats = Object.fromEntries(kindsAll.map((k) => [k, { ok: 0, failed: 0 }]));
  const malformedStats = {};
  const ttft = [];
  const latency = [];
  let completionTokens = 0;
  const t0 = performance.now();
  const deadline = t0 + seconds * 1000;
  const client = async (i) => {
    const prompt = clientPrompt(i);
    for (let n = 0; performance.now() < deadline; ++n) {
      if (serverExited) return;
      if (random() < malformedFraction) {
        const [name, path, body] = malformedCases[Math.floor(random() * malformedCases.length)];
        const problem = checkMalformed(await send(path, body, { headers: { 'X-Conversation-Id': `client-${i}` } }));
        const m = (malformedStats[name] ??= { ok: 0, failed: 0 });
        if (problem) {
          ++stats.malformed.failed;
          ++m.failed;
          fail(`malformed ${name}: ${problem}`);
        } else {
          ++stats.malformed.ok;
          ++m.ok;
        }
        continue;
      }
      const kind = kinds[(i + n) % kinds.length];
      const r = await send(pathOf(kind), goodBody(kind, prompt, true), { headers: { 'X-Conversation-Id': `client-${i}` } });
      const c = checkGood(kind, r, true);
      const want = expected[kind].get(prompt);
      if (!c.failure && c.text !== want)
        c.failure = `reply differs from the expected reply:\n  got  ${JSON.stringify(c.text)}\n  want ${JSON.stringify(want)}`;
      if (c.failure) {
        ++stats[kind].failed;
        fail(`client ${i} ${kind}: ${c.failure}`);
        continue;
      }
      ++stats[kind].ok;
      completionTokens += c.tokens;
      if (r.ttftMs !== null) ttft.push(r.ttftMs);
      latency.push(r.totalMs);
    }
  };
  await Promise.all(Array.from({ length: clients }, (_, i) => client(i)));
  const wallS = (performance.now() - t0) / 1000;
  const summary = {
    url: baseUrl,
    clients,
    seconds,
    max_tokens: maxTokens,
    malformed_fraction: malformedFraction,
    kinds,
    wall_s: round(wallS, 2),
    requests: stats,
    malformed_cases: malformedStats,
    ttft_ms: { p50: round(percentile(ttft, 50)), p99: round(percentile(ttft, 99)) },
    latency_ms: { p50: round(percentile(latency, 50)), p99: round(percentile(latency, 99)) },
    completion_tokens: completionTokens,
    tokens_per_s: round(completionTokens / wallS, 2),
  };
  if (kinds.every((k) => stats[k].ok === 0)) fail('no good request completed');
  return finish(started, summary);
}

async function finish(started, summary) {
  if (started) {
    if (serverExited) {
      fail(`aviary serve exited during the test (${serverExited.code ?? serverExited.signal})\n${serverLog}`);
    } else {
      server.kill('SIGTERM');
      const timer = setTimeout(() => server.kill('SIGKILL'), 30000);
      const { code, signal } = await started.exited;
      clearTimeout(timer);
      if (code !== 0) fail(`aviary serve exited with ${code ?? signal} after SIGTERM (want 0)\n${serverLog}`);
    }
  }
  const result = { ...(summary ?? {}), ok: failures.length === 0, failures: failures.slice(0, 50), failure_count: failures.length };
  const json = JSON.stringify(result, null, 2);
  console.log(json);
  if (opt.out) fs.writeFileSync(opt.out, json + '\n');
  if (summary) {
    const r = summary.requests;
    console.error(Object.entries(r).map(([k, v]) => `${k} ${v.ok} ok/${v.failed} failed`).join(', ') +
      `; TTFT p50 ${summary.ttft_ms.p50} p99 ${summary.ttft_ms.p99} ms; latency p50 ${summary.latency_ms.p50} ` +
      `p99 ${summary.latency_ms.p99} ms; ${summary.tokens_per_s} completion tokens/s`);
  }
  console.error(failures.length ? `load_test: FAILED (${failures.length} failures)` : 'load_test: PASS');
  agent.destroy();
  process.exit(failures.length ? 1 : 0);
}

main().catch((e) => {
  console.error(`load_test: ${e.stack || e}`);
  process.exit(1);
});
