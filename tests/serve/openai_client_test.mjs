// `aviary serve` through OpenAI's official Node client: what a client written for OpenAI gets
// from it (the model list, chat and text completions whole and streamed, usage, the errors as
// the client's error classes), and a server started with --api-key.
//   node openai_client_test.mjs AVIARY_BINARY MODEL_PATH LONG_REPLY_TOKENS
// LONG_REPLY_TOKENS sizes the reply that must take longer than a second (smaller in sanitizer
// builds, which generate several times slower).
import assert from 'node:assert/strict';
import path from 'node:path';
import {
  Checks, checkCleanExits, deadline, haveModule, parseArgs, requireOrSkip, startServer, stopAll,
} from './serve_helpers.mjs';

const [binary, model, longReplyArg] = parseArgs(['AVIARY_BINARY', 'MODEL_PATH', 'LONG_REPLY_TOKENS']);
const LONG_REPLY_TOKENS = Number(longReplyArg);
requireOrSkip(haveModule('openai'), 'tests/serve/node_modules is missing (npm ci --prefix tests/serve)');
const { default: OpenAI } = await import('openai');

deadline(420, stopAll);

const MODEL_ID = path.basename(model).replace(/\.[^.]+$/, '');
const API_KEY = 'client-test-key';
const MESSAGES = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Name three colours.' },
];
const MAX_TOKENS = 24;
const checks = new Checks();

function client(server, apiKey = 'unused', extra = {}) {
  // No retries: a 429 or 5xx the client retried would hide what the server answered.
  return new OpenAI({ baseURL: `${server.url}/v1`, apiKey, maxRetries: 0, timeout: 60000, ...extra });
}

// The error the call rejects with (the test fails when it resolves).
async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the request succeeded');
}

async function main() {
  const server = await startServer(binary, ['--model', model]);
  console.log(`server ${server.url} (pid ${server.pid})`);
  const openai = client(server);
  let greedy = null;  // the non-streamed greedy reply

  await checks.run('models.list names the model', async () => {
    const ids = [];
    for await (const m of openai.models.list()) ids.push(m.id);
    assert.deepEqual(ids, [MODEL_ID]);
  });

  await checks.run('chat.completions.create: content, finish_reason, usage', async () => {
    const { data, response } = await openai.chat.completions
      .create({ model: MODEL_ID, messages: MESSAGES, max_tokens: MAX_TOKENS, temperature: 0 })
      .withResponse();
    assert.equal(data.object, 'chat.completion');
    assert.equal(data.model, MODEL_ID);
    assert.match(data.id, /^chatcmpl-/);
    assert.equal(data.choices.length, 1);
    const choice = data.choices[0];
    assert.equal(choice.index, 0);
    assert.equal(choice.message.role, 'assistant');
    assert.equal(typeof choice.message.content, 'string');
    assert.ok(['stop', 'length'].includes(choice.finish_reason), `finish_reason ${choice.finish_reason}`);
    assert.ok(data.usage.prompt_tokens > 0, 'usage.prompt_tokens');
    assert.ok(data.usage.completion_tokens > 0, 'usage.completion_tokens');
    assert.ok(data.usage.completion_tokens <= MAX_TOKENS, 'max_tokens is kept');
    assert.equal(data.usage.total_tokens, data.usage.prompt_tokens + data.usage.completion_tokens);
    if (choice.finish_reason === 'length') assert.equal(data.usage.completion_tokens, MAX_TOKENS);
    assert.equal(response.headers.get('x-aviary-instance'), String(server.pid), 'X-Aviary-Instance');
    greedy = data;
  });

  await checks.run('greedy chat is deterministic; the repeated prompt comes from the state cache', async () => {
    const again = await openai.chat.completions.create({
      model: MODEL_ID, messages: MESSAGES, max_tokens: MAX_TOKENS, temperature: 0,
    });
    assert.equal(again.choices[0].message.content, greedy.choices[0].message.content);
    assert.equal(again.usage.prompt_tokens, greedy.usage.prompt_tokens);
    const cached = again.usage.prompt_tokens_details?.cached_tokens;
    assert.ok(cached > 0 && cached <= again.usage.prompt_tokens,
              `usage.prompt_tokens_details.cached_tokens ${cached} of ${again.usage.prompt_tokens}`);
  });

  await checks.run('streamed chat: chunks join to the non-streamed greedy reply, usage at the end', async () => {
    const stream = await openai.chat.completions.create({
      model: MODEL_ID, messages: MESSAGES, max_tokens: MAX_TOKENS, temperature: 0,
      stream: true, stream_options: { include_usage: true },
    });
    let text = '', pieces = 0, finish = null, usage = null, role = null, id = null;
    for await (const chunk of stream) {
      assert.equal(chunk.object, 'chat.completion.chunk');
      id ??= chunk.id;
      assert.equal(chunk.id, id, 'one id for the whole stream');
      if (chunk.usage) {
        assert.deepEqual(chunk.choices, [], 'the usage chunk has no choices');
        usage = chunk.usage;
        continue;
      }
      assert.equal(usage, null, 'nothing after the usage chunk');
      const choice = chunk.choices[0];
      role ??= choice.delta.role ?? null;
      if (choice.delta.content) {
        text += choice.delta.content;
        pieces++;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    assert.equal(role, 'assistant', 'the first chunk carries the role');
    assert.ok(pieces > 1, `the reply came in ${pieces} piece(s)`);
    assert.equal(text, greedy.choices[0].message.content);
    assert.equal(finish, greedy.choices[0].finish_reason);
    assert.ok(usage, 'a usage chunk (stream_options.include_usage)');
    // cached_tokens differs: this prompt was fed before.
    assert.equal(usage.prompt_tokens, greedy.usage.prompt_tokens);
    assert.equal(usage.completion_tokens, greedy.usage.completion_tokens);
    assert.equal(usage.total_tokens, greedy.usage.total_tokens);
  });

  await checks.run('completions.create: text, streamed the same', async () => {
    const params = { model: MODEL_ID, prompt: 'In the beginning', max_tokens: MAX_TOKENS, temperature: 0 };
    const whole = await openai.completions.create(params);
    assert.equal(whole.object, 'text_completion');
    assert.match(whole.id, /^cmpl-/);
    assert.equal(typeof whole.choices[0].text, 'string');
    assert.ok(whole.choices[0].text.length > 0, 'the completion has text');
    assert.ok(whole.usage.completion_tokens > 0);
    let text = '';
    for await (const chunk of await openai.completions.create({ ...params, stream: true })) {
      text += chunk.choices[0]?.text ?? '';
    }
    assert.equal(text, whole.choices[0].text);
  });

  await checks.run('seeded sampling repeats', async () => {
    const params = { model: MODEL_ID, messages: MESSAGES, max_tokens: MAX_TOKENS, temperature: 1, seed: 7 };
    const a = await openai.chat.completions.create(params);
    const b = await openai.chat.completions.create(params);
    assert.equal(a.choices[0].message.content, b.choices[0].message.content);
  });

  await checks.run('an absent model is accepted', async () => {
    const r = await openai.chat.completions.create({ messages: MESSAGES, max_tokens: 4 });
    assert.equal(r.model, MODEL_ID);
  });

  await checks.run('temperature 5 is a BadRequestError (400) naming the field', async () => {
    const err = await rejection(openai.chat.completions.create({
      model: MODEL_ID, messages: MESSAGES, temperature: 5,
    }));
    assert.ok(err instanceof OpenAI.BadRequestError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 400);
    assert.equal(err.type, 'invalid_request_error');
    assert.equal(err.param, 'temperature');
    assert.ok(err.message.length > 0);
  });

  await checks.run('no messages is a BadRequestError (400)', async () => {
    const err = await rejection(openai.chat.completions.create({ model: MODEL_ID, messages: [] }));
    assert.ok(err instanceof OpenAI.BadRequestError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 400);
  });

  await checks.run('an unknown model is a NotFoundError (404)', async () => {
    const err = await rejection(openai.chat.completions.create({
      model: 'gpt-4o', messages: MESSAGES, max_tokens: 4,
    }));
    assert.ok(err instanceof OpenAI.NotFoundError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 404);
    assert.equal(err.code, 'model_not_found');
  });

  await checks.run('GET /health and an unknown route', async () => {
    const health = await fetch(`${server.url}/health`);
    assert.equal(health.status, 200);
    assert.deepEqual(await health.json(), { status: 'ok' });
    const missing = await fetch(`${server.url}/v1/nothing-here`);
    assert.equal(missing.status, 404);
    assert.ok((await missing.json()).error, 'an OpenAI error object');
  });

  await checks.run(`a whole reply that takes longer than a second (n: 8, ${LONG_REPLY_TOKENS} tokens each)`, async () => {
    // The server answers a whole reply that is not ready within a second as a chunked body (it
    // writes to find out whether the client left), a path the short replies above never take.
    const started = Date.now();
    const r = await openai.chat.completions.create({
      model: MODEL_ID, messages: MESSAGES, max_tokens: LONG_REPLY_TOKENS, temperature: 0, n: 8,
    }, { timeout: 300000 });  // sanitizer builds are slow
    console.log(`     (took ${Date.now() - started} ms)`);
    assert.equal(r.choices.length, 8);
    const first = r.choices[0].message.content;
    assert.ok(first.startsWith(greedy.choices[0].message.content), 'the greedy reply, longer');
    for (const c of r.choices) {
      assert.equal(c.message.content, first, `choice ${c.index}: greedy choices are equal`);
      assert.ok(['stop', 'length'].includes(c.finish_reason), `finish_reason ${c.finish_reason}`);
    }
    assert.equal(r.usage.completion_tokens % 8, 0, 'every choice counted');
    assert.equal((await fetch(`${server.url}/health`)).status, 200, 'the server is still up');
  });

  const keyServer = await startServer(binary, ['--model', model, '--api-key', API_KEY]);
  console.log(`server with --api-key ${keyServer.url} (pid ${keyServer.pid})`);

  await checks.run('--api-key: no key is an AuthenticationError (401)', async () => {
    // The client insists on a key; a null Authorization header leaves it out of the request.
    const noKey = client(keyServer, 'unused', { defaultHeaders: { Authorization: null } });
    const err = await rejection(noKey.models.list());
    assert.ok(err instanceof OpenAI.AuthenticationError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 401);
    const raw = await fetch(`${keyServer.url}/v1/chat/completions`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ messages: MESSAGES, max_tokens: 4 }),
    });
    assert.equal(raw.status, 401, 'a request without Authorization');
  });

  await checks.run('--api-key: a wrong key is an AuthenticationError (401)', async () => {
    const err = await rejection(client(keyServer, 'wrong-key').chat.completions.create({
      model: MODEL_ID, messages: MESSAGES, max_tokens: 4,
    }));
    assert.ok(err instanceof OpenAI.AuthenticationError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 401);
  });

  await checks.run('--api-key: the right key works, /health and / stay open', async () => {
    const keyed = client(keyServer, API_KEY);
    const r = await keyed.chat.completions.create({
      model: MODEL_ID, messages: MESSAGES, max_tokens: MAX_TOKENS, temperature: 0,
    });
    assert.equal(r.choices[0].message.content, greedy.choices[0].message.content,
                 'the same greedy reply as the server without a key');
    assert.equal((await fetch(`${keyServer.url}/health`)).status, 200);
    assert.equal((await fetch(`${keyServer.url}/`)).status, 200);
  });

  await checkCleanExits(checks, [server, keyServer]);
}

try {
  await main();
} catch (err) {
  console.log(`FAIL: ${err && err.stack ? err.stack : err}`);
  checks.failures.push('setup');
} finally {
  await stopAll();
}
checks.finish();
