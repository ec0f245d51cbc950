// The action's post step: the report so far (every step of the job) from the root
// watcher, into the job summary, $RUNNER_TEMP/ringfence/ (for upload as an artifact) and
// annotations. It runs inside the job and, after disable-sudo, without sudo: it asks the
// watcher, it cannot end the job (the watcher does, when Runner.Worker exits).
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const lib = require('./lib');

const MAX_ANNOTATIONS = 20;
// GitHub refuses a step summary over 1 MiB whole.
const MAX_SUMMARY = 1000 * 1024;

function sleep(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** One ::error per blocked destination, as `ringfence job end` prints them. */
function annotations(report) {
  const out = [];
  const rows = (report.rows || []).filter((r) => r.verdict === 'blocked');
  for (const r of rows.slice(0, MAX_ANNOTATIONS)) {
    let title;
    let to;
    if (r.domain && r.reason === 'dns-query') {
      title = `ringfence blocked a DNS query for ${r.domain}`;
      to = `resolver ${r.address} port ${r.port} asking for ${r.domain}`;
    } else if (r.domain) {
      title = `ringfence blocked ${r.domain}:${r.port}`;
      to = `${r.domain} (${r.address}) port ${r.port}`;
    } else {
      title = `ringfence blocked ${r.address}:${r.port}`;
      to = `${r.address} port ${r.port}`;
    }
    const times = r.count > 1 ? `, ${r.count} times` : '';
    out.push([
      `job ${report.job}: ${r.proto} to ${to} from process ${r.first_comm} (pid ${r.first_pid}) was blocked (${r.reason}${times})`,
      { title },
    ]);
  }
  const listed = rows.slice(0, MAX_ANNOTATIONS).reduce((n, r) => n + r.count, 0);
  const blocked = (report.totals && report.totals.blocked) || 0;
  if (blocked > listed) {
    out.push([`job ${report.job}: ${blocked - listed} more blocked flows (see the job's report)`, { title: 'ringfence blocked more calls' }]);
  }
  return out;
}

function post() {
  const raw = lib.getState('ringfence');
  if (!raw) {
    lib.warning('ringfence: no state from the main step (it failed or did not run): no report');
    return;
  }
  const state = JSON.parse(raw);
  const nonce = crypto.randomBytes(8).toString('hex');
  fs.mkdirSync(state.requests, { recursive: true });
  fs.writeFileSync(path.join(state.requests, `req-${nonce}`), '');
  const served = path.join(state.out, nonce);
  const deadline = Date.now() + 120000;
  while (!fs.existsSync(path.join(served, 'done'))) {
    if (Date.now() > deadline) {
      throw new Error(`the ringfence watcher did not answer within 120 s (${served}); the job is still enforced and ends when the runner's worker exits`);
    }
    sleep(200);
  }
  const problems = fs.readFileSync(path.join(served, 'done'), 'utf8').trim();
  if (problems) lib.warning(`ringfence: ${problems}`);

  const artifacts = lib.artifactDir();
  fs.mkdirSync(artifacts, { recursive: true });
  for (const f of ['report.md', 'report.html', 'report.json', 'events.jsonl']) {
    const from = path.join(served, f);
    if (fs.existsSync(from)) fs.copyFileSync(from, path.join(artifacts, f));
  }
  const md = fs.existsSync(path.join(artifacts, 'report.md')) ? fs.readFileSync(path.join(artifacts, 'report.md'), 'utf8') : '';

  if (process.env.GITHUB_STEP_SUMMARY && md) {
    let text = md;
    if (Buffer.byteLength(text) > MAX_SUMMARY) {
      text = Buffer.from(text).subarray(0, MAX_SUMMARY).toString('utf8') + `\n\n*(cut: the whole report is report.md in the ringfence artifact)*\n`;
    }
    try {
      fs.appendFileSync(process.env.GITHUB_STEP_SUMMARY, `${text}\n`);
    } catch (e) {
      lib.warning(`ringfence: cannot write the job summary ${process.env.GITHUB_STEP_SUMMARY}: ${e.message}`);
    }
  }
  // The report in the log too, with workflow commands off around it: it quotes names the
  // job chose.
  const token = `ringfence-${crypto.randomBytes(8).toString('hex')}`;
  console.log(`::stop-commands::${token}`);
  console.log(md);
  console.log(`::${token}::`);
  console.log(`ringfence: report, insights page and events in ${artifacts} (upload it with actions/upload-artifact)`);

  let report = null;
  try {
    report = JSON.parse(fs.readFileSync(path.join(artifacts, 'report.json'), 'utf8'));
  } catch (e) {
    lib.warning(`ringfence: the JSON report does not read (${e.message}): no annotations`);
  }
  if (report) {
    for (const [msg, props] of annotations(report)) lib.error(msg, props);
    const blocked = (report.totals && report.totals.blocked) || 0;
    if (state.failOnBlock && blocked > 0) {
      lib.error(`ringfence: fail-on-block: ${blocked} flows were blocked in job ${state.id}`);
      process.exitCode = 1;
    }
  } else if (state.failOnBlock) {
    // Cannot tell: a security check that cannot judge fails.
    lib.error('ringfence: fail-on-block: the report could not be read, so the job cannot be told clean');
    process.exitCode = 1;
  }
}

try {
  post();
} catch (e) {
  lib.error(`ringfence: ${e.message}`);
  process.exitCode = 1;
}
