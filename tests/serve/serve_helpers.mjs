// What the client-side tests of `aviary serve` share: the skip rule, starting and stopping servers
// (always stopped, even when a test throws or times out), an overall deadline, and a runner of
// named checks that goes on after a failure so one run reports every broken check.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const SKIP = 77;  // ctest's SKIP_RETURN_CODE for these tests, as for the PyTorch ones
const inCI = process.env.CI === 'true';

// A missing prerequisite (npm packages, Chromium, ../shared) fails in CI, which installs them
// all, and skips elsewhere with the reason.
export function requireOrSkip(ok, what) {
  if (ok) return;
  if (inCI) {
    console.error(`FAIL: ${what} (CI=true needs it)`);
    process.exit(1);
  }
  console.log(`SKIP: ${what}`);
  process.exit(SKIP);
}

export function haveModule(name) {
  return fs.existsSync(new URL(`./node_modules/${name}/package.json`, import.meta.url));
}

export function parseArgs(names) {
  const args = process.argv.slice(2);
  if (args.length !== names.length) {
    console.error(`usage: node ${path.basename(process.argv[1])} ${names.join(' ')}`);
    process.exit(2);
  }
  if (!fs.existsSync(args[0])) {
    console.error(`FAIL: no aviary binary at ${args[0]}`);
    process.exit(1);
  }
  requireOrSkip(fs.existsSync(args[1]), `model not found: ${args[1]} (needs ../shared)`);
  return args;
}

const servers = new Set();

function killAll() {
  for (const s of servers) {
    try { s.child.kill('SIGKILL'); } catch { /* already gone */ }
  }
}
process.on('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => { killAll(); process.exit(1); });
}

// Ends the process with a failure when the whole test runs past `seconds`: a server or a
// browser that hangs must not hang ctest.
export function deadline(seconds, onTimeout = async () => {}) {
  const timer = setTimeout(async () => {
    console.error(`FAIL: the test ran past its ${seconds} s deadline`);
    try { await Promise.race([onTimeout(), sleep(5000)]); } catch { /* best effort */ }
    killAll();
    process.exit(1);
  }, seconds * 1000);
  timer.unref();
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Starts `aviary serve` on a free port and resolves once it prints its listening line.
export function startServer(binary, args, { readySeconds = 120 } = {}) {
  const child = spawn(binary, ['serve', ...args, '--host', '127.0.0.1', '--port', '0'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '', stderr = '';
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const server = { child, pid: child.pid, url: null, exited, log: () => `stdout:\n${stdout}\nstderr:\n${stderr}` };
  servers.add(server);
  child.stderr.on('data', (d) => { stderr += d; });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      reject(new Error(`aviary serve printed no listening line in ${readySeconds} s\n${server.log()}`));
    }, readySeconds * 1000);
    child.on('error', (err) => { clearTimeout(timer); reject(err); });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      if (!server.url) reject(new Error(`aviary serve exited (${code ?? signal}) before listening\n${server.log()}`));
    });
    child.stdout.on('data', (d) => {
      stdout += d;
      const m = stdout.match(/^aviary serve: listening on (http:\/\/\S+)$/m);
      if (m && !server.url) {
        server.url = m[1];
        clearTimeout(timer);
        resolve(server);
      }
    });
  });
}

// SIGTERM, then SIGKILL if it has not exited after `graceSeconds`; resolves to its exit.
export async function stopServer(server, graceSeconds = 20) {
  if (!servers.has(server)) return server.exited;
  if (server.child.exitCode === null && server.child.signalCode === null) server.child.kill('SIGTERM');
  const result = await Promise.race([server.exited, sleep(graceSeconds * 1000).then(() => null)]);
  servers.delete(server);
  if (result) return result;
  server.child.kill('SIGKILL');
  const killed = await server.exited;
  return { ...killed, hung: true };
}

// Stops each server with SIGTERM, one named check per server: it exits 0 within the grace time.
export async function checkCleanExits(checks, servers) {
  for (const s of servers) {
    const exit = await stopServer(s);
    await checks.run(`server ${s.url} exits 0 on SIGTERM`, async () => {
      assert.ok(!exit.hung, `it did not exit within the grace time\n${s.log()}`);
      assert.equal(exit.code, 0, `exit ${exit.code ?? exit.signal}\n${s.log()}`);
    });
  }
}

export async function stopAll() {
  await Promise.all([...servers].map((s) => stopServer(s)));
}

// Named checks: each failure is printed with its reason and the run goes on; finish() exits 1
// when any failed.
export class Checks {
  failures = [];
  async run(name, fn) {
    const started = Date.now();
    try {
      await fn();
      console.log(`ok   ${name} (${Date.now() - started} ms)`);
    } catch (err) {
      this.failures.push(name);
      console.log(`FAIL ${name}: ${err && err.stack ? err.stack : err}`);
    }
  }
  finish() {
    if (this.failures.length) {
      console.log(`${this.failures.length} check(s) failed: ${this.failures.join('; ')}`);
      process.exit(1);
    }
    console.log('all checks passed');
    process.exit(0);
  }
}
