#!/usr/bin/env node
// A chat client's conversation against `aviary serve` (Node's built-ins only): each turn sends
// the whole conversation so far plus a new user message (as chat clients do), streamed, greedy,
// and records its time to first token; after each turn it reads the server's state-cache and
// prompt-token metrics from GET /metrics. Prints a JSON summary. bench/serve_bench.sh runs it
// with the state cache on and off.
//
//   node bench/serve_conversation.mjs --url http://127.0.0.1:8080 [--turns 10] [--max-tokens 64]
//        [--user-words 60] [--tag A] [--out FILE]
// --tag makes the conversation's text differ from other runs' (a cache would otherwise serve
// its first turn from an earlier run).
import fs from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string' },
    turns: { type: 'string', default: '10' },
    'max-tokens': { type: 'string', default: '64' },
    'user-words': { type: 'string', default: '60' },
    tag: { type: 'string', default: 'A' },
    out: { type: 'string' },
  },
});
if (!opt.url) {
  console.error('usage: serve_conversation.mjs --url URL [--turns 10] [--max-tokens 64] [--user-words 60] [--tag A] [--out FILE]');
  process.exit(2);
}
const turns = Number(opt.turns);
const maxTokens = Number(opt['max-tokens']);
const userWords = Number(opt['user-words']);
// A new connection per request: on a reused connection the server's last small write can wait
// for the client's delayed ACK (Nagle's algorithm), which would be measured as cache time.
const agent = new http.Agent({ keepAlive: false });

const words = ('river harbour lantern orchard meadow copper violin glacier market library ' +
  'thunder pepper canyon ribbon compass pebble saddle marble blossom kettle falcon timber ' +
  'velvet quarry beacon parsley anchor willow cobalt furnace').split(' ');
let seed = [...opt.tag].reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, 7);
const next = () => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
function userMessage(turn) {
  const w = Array.from({ length: userWords }, () => words[next() % words.length]);
  return `Conversation ${opt.tag}, question ${turn}: tell me how these fit together: ${w.join(' ')}.`;
}

function request(method, path, body) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const data = body ? Buffer.from(JSON.stringify(body)) : null;
    const req = http.request(new URL(path, opt.url), {
      method,
      agent,
      headers: data ? { 'Content-Type': 'application/json', 'Content-Length': data.length, 'X-Conversation-Id': `bench-${opt.tag}` } : {},
    }, (res) => {
      res.setEncoding('utf8');
      let text = '';
      let ttft = null;
      let scanned = 0;  // events before this offset were checked for the first text
      res.on('data', (chunk) => {
        text += chunk;
        let end;
        while (ttft === null && (end = text.indexOf('\n\n', scanned)) >= 0) {
          const event = text.slice(scanned, end);
          scanned = end + 2;
          if (!event.startsWith('data: {')) continue;
          const j = JSON.parse(event.slice(6));
          if (j.choices?.some((c) => c.delta?.content)) ttft = performance.now() - t0;
        }
      });
      res.on('end', () => resolve({ status: res.statusCode, text, ttftMs: ttft, totalMs: performance.now() - t0 }));
      res.on('aborted', () => reject(new Error(`${path}: connection dropped`)));
    });
    req.on('error', reject);
    req.end(data);
  });
}

async function cacheMetrics() {
  const r = await request('GET', '/metrics');
  const m = {};
  for (const line of r.text.split('\n')) {
    const match = line.match(/^(aviary_(?:state_cache|prompt_tokens)\S*)\s+(\S+)/);
    if (match) m[match[1]] = Number(match[2]);
  }
  return m;
}

const messages = [];
const perTurn = [];
const metrics = [await cacheMetrics()];
for (let turn = 1; turn <= turns; ++turn) {
  messages.push({ role: 'user', content: userMessage(turn) });
  const r = await request('POST', '/v1/chat/completions', {
    messages, max_tokens: maxTokens, temperature: 0, stream: true, stream_options: { include_usage: true },
  });
  if (r.status !== 200) throw new Error(`turn ${turn}: status ${r.status}: ${r.text.slice(0, 300)}`);
  let reply = '';
  let usage = null;
  // Events, without SSE comments (the server's keep-alives).
  const events = r.text.split('\n\n').filter((e) => e && !e.startsWith(':'));
  if (events.at(-1) !== 'data: [DONE]') throw new Error(`turn ${turn}: stream did not end with [DONE]`);
  for (const e of events.slice(0, -1)) {
    const j = JSON.parse(e.slice('data: '.length));
    if (j.usage) usage = j.usage;
    for (const c of j.choices ?? []) reply += c.delta?.content ?? '';
  }
  messages.push({ role: 'assistant', content: reply });
  metrics.push(await cacheMetrics());
  // Prompt tokens this turn took from the cache (the server's counter, one request at a time).
  const cachedKey = 'aviary_prompt_tokens_cached_total';
  const cached = cachedKey in metrics.at(-1) ? metrics.at(-1)[cachedKey] - metrics.at(-2)[cachedKey] : null;
  perTurn.push({ turn, ttft_ms: Number(r.ttftMs?.toFixed(1)), total_ms: Number(r.totalMs.toFixed(1)), prompt_tokens: usage?.prompt_tokens ?? null, cached_prompt_tokens: cached, completion_tokens: usage?.completion_tokens ?? null });
  console.error(`turn ${turn}: prompt ${usage?.prompt_tokens} tokens (${cached} from the cache), TTFT ${r.ttftMs?.toFixed(1)} ms, total ${r.totalMs.toFixed(1)} ms`);
}
const result = { url: opt.url, tag: opt.tag, turns, max_tokens: maxTokens, user_words: userWords, per_turn: perTurn, metrics_before: metrics[0], metrics_after: metrics.at(-1), metrics_per_turn: metrics.slice(1) };
const json = JSON.stringify(result, null, 2);
console.log(json);
if (opt.out) fs.writeFileSync(opt.out, json + '\n');
agent.destroy();
