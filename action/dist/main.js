// The action's main step: ringfence binary, daemon, a job holding Runner.Worker (and so
// every later step), the root watcher that reports and ends it, then (disable-sudo) the
// runner user's sudo removed so no later step can stop it.
'use strict';

const fs = require('fs');
const path = require('path');
const os = require('os');
const https = require('https');
const crypto = require('crypto');
const lib = require('./lib');

// What Runner.Worker itself calls after our step (log and result uploads, artifacts,
// caches, action downloads): always allowed, or a block-mode job could not report. The
// names are GitHub's documented ones for self-hosted runners.
const RUNNER_ENDPOINTS = [
  'github.com:443',
  'api.github.com:443',
  'codeload.github.com:443',
  'objects.githubusercontent.com:443',
  'pipelines.actions.githubusercontent.com:443',
  'results-receiver.actions.githubusercontent.com:443',
  '*.actions.githubusercontent.com:443',
  'productionresultssa*.blob.core.windows.net:443',
].join(' ');

// Where the root-owned pieces live: the installed binary, each job's served reports.
const ROOT_DIR = process.env.RINGFENCE_ACTION_DIR || '/var/lib/ringfence-action';

function readInputs() {
  const inputs = {
    mode: lib.getChoiceInput('egress-policy', ['audit', 'block']),
    allowed: lib.getInput('allowed-endpoints').split(/\s+/).filter(Boolean),
    disableSudo: lib.getBooleanInput('disable-sudo'),
    disableTelemetry: lib.getBooleanInput('disable-telemetry'),
    directIp: lib.getChoiceInput('direct-ip', ['audit', 'block']),
    policyFile: lib.getInput('policy-file'),
    failOnBlock: lib.getBooleanInput('fail-on-block'),
    binary: lib.getInput('binary'),
  };
  for (const e of inputs.allowed) {
    // The endpoint grammar is ringfence's to judge (it names the token); here only what
    // could not be one at all, so the message names the input.
    if (/[",;'`$\\]/.test(e)) {
      throw new lib.InputError(`input allowed-endpoints: ${JSON.stringify(e)} is not an endpoint (host:port, *.domain:port, CIDR)`);
    }
  }
  if (inputs.policyFile) {
    const ws = process.env.GITHUB_WORKSPACE || process.cwd();
    const p = path.resolve(ws, inputs.policyFile);
    if (!fs.existsSync(p)) {
      throw new lib.InputError(`input policy-file: ${p} does not exist`);
    }
    inputs.policyFile = p;
  }
  if (inputs.binary) {
    try {
      fs.accessSync(inputs.binary, fs.constants.X_OK);
    } catch (e) {
      throw new lib.InputError(`input binary: ${inputs.binary} is not an executable file (${e.code})`);
    }
  }
  return inputs;
}

function fetchUrl(url, hops = 0) {
  return new Promise((resolve, reject) => {
    https
      .get(url, { headers: { 'User-Agent': 'ringfence-action' } }, (res) => {
        if ([301, 302, 303, 307, 308].includes(res.statusCode) && res.headers.location && hops < 5) {
          res.resume();
          resolve(fetchUrl(new URL(res.headers.location, url).toString(), hops + 1));
          return;
        }
        if (res.statusCode !== 200) {
          res.resume();
          reject(new Error(`GET ${url}: HTTP ${res.statusCode}`));
          return;
        }
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve(Buffer.concat(chunks)));
        res.on('error', reject);
      })
      .on('error', (e) => reject(new Error(`GET ${url}: ${e.message}`)));
  });
}

/** The released binary for this runner's architecture, checked against its .sha256. */
async function download(dir) {
  const arch = { x64: 'x86_64', arm64: 'aarch64' }[process.arch];
  if (!arch) throw new Error(`no released ringfence binary for ${process.arch}: give input binary`);
  const repo = process.env.GITHUB_ACTION_REPOSITORY;
  const ref = process.env.GITHUB_ACTION_REF;
  if (!repo || !ref) {
    throw new Error('GITHUB_ACTION_REPOSITORY/GITHUB_ACTION_REF are not set, so the release to download is unknown: give input binary');
  }
  const base = `https://github.com/${repo}/releases/download/${ref}/ringfence-${arch}-linux`;
  const bin = await fetchUrl(base);
  const sum = (await fetchUrl(`${base}.sha256`)).toString('utf8').trim().split(/\s+/)[0];
  const got = crypto.createHash('sha256').update(bin).digest('hex');
  if (got !== sum) throw new Error(`${base}: sha256 ${got}, the release says ${sum}`);
  fs.mkdirSync(dir, { recursive: true });
  const out = path.join(dir, 'ringfence.download');
  fs.writeFileSync(out, bin, { mode: 0o755 });
  return out;
}

function must(r, what) {
  if (r.status !== 0) {
    throw new Error(`${what} (exit ${r.status}): ${(r.stderr || r.stdout).trim()}`);
  }
  return r;
}

/**
 * The binary root runs, root-owned: the watcher runs it again at the job's end, and a copy
 * the job's user could rewrite would hand a later step root.
 */
function installBinary(src) {
  const dst = path.join(ROOT_DIR, 'bin', 'ringfence');
  must(lib.run(lib.asRoot(['install', '-D', '-o', '0', '-g', '0', '-m', '0755', src, dst])), `installing ${src} as ${dst}`);
  return dst;
}

function daemonUp(rf, socket) {
  return lib.run(lib.asRoot([rf, 'status', '--socket', socket])).status === 0;
}

function sleep(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** Starts `ringfence run` detached (its own session, log in ROOT_DIR) unless one serves. */
function startDaemon(rf, socket) {
  if (daemonUp(rf, socket)) {
    console.log(`ringfence: a daemon already serves ${socket}`);
    return false;
  }
  const extra = (process.env.RINGFENCE_ACTION_RUN_ARGS || '').split(/\s+/).filter(Boolean);
  const log = path.join(ROOT_DIR, 'daemon.log');
  must(
    lib.run(lib.asRoot(['sh', '-c', 'log=$1; shift; exec setsid -f "$@" </dev/null >>"$log" 2>&1', 'sh', log, rf, 'run', '--socket', socket, ...extra])),
    'starting the ringfence daemon'
  );
  const deadline = Date.now() + 120000;
  while (!daemonUp(rf, socket)) {
    if (Date.now() > deadline) {
      const tail = lib.run(lib.asRoot(['tail', '-n', '20', log])).stdout;
      throw new Error(`the ringfence daemon did not serve ${socket} within 120 s; its log (${log}):\n${tail}`);
    }
    sleep(250);
  }
  console.log(`ringfence: daemon started, serving ${socket}`);
  return true;
}

/** Lines of the sudoers files that name `user` or one of its groups are removed. */
function disableSudo(user) {
  const script = path.join(__dirname, 'root.js');
  must(lib.run(lib.asRoot([process.execPath, script, 'disable-sudo', user])), 'disable-sudo');
}

async function main() {
  const inputs = readInputs();
  if (inputs.disableTelemetry) {
    lib.notice('disable-telemetry: ringfence sends no telemetry; the input is accepted for harden-runner compatibility and ignored');
  }
  if (process.platform !== 'linux') {
    throw new Error(`ringfence runs on Linux runners only (this is ${process.platform})`);
  }
  const worker = lib.findWorker();
  if (!worker) {
    throw new Error('no Runner.Worker among this step\'s parent processes: is this a GitHub Actions job on a Linux runner (not a container: job)?');
  }
  const artifacts = lib.artifactDir();
  fs.mkdirSync(artifacts, { recursive: true });
  must(lib.run(lib.asRoot(['install', '-d', '-o', '0', '-g', '0', '-m', '0755', ROOT_DIR])), `creating ${ROOT_DIR}`);

  const src = inputs.binary || (await download(path.join(artifacts, 'bin')));
  const rf = installBinary(src);
  const socket = process.env.RINGFENCE_SOCKET || lib.DEFAULT_SOCKET;
  startDaemon(rf, socket);

  const id = lib.jobId();
  // Service containers and a job container start before the first step: on a runner of
  // one job at a time they are this job's too (the daemon claims them only if no other
  // job runs).
  const args = [rf, 'job', 'start', '--id', id, '--pid', String(worker.pid), '--socket', socket,
    '--claim-running-containers'];
  if (inputs.policyFile) args.push('--policy', inputs.policyFile);
  if (inputs.mode) args.push('--mode', inputs.mode);
  else if (!inputs.policyFile) args.push('--mode', 'audit');
  if (inputs.directIp) args.push('--direct-ip', inputs.directIp);
  if (inputs.allowed.length) args.push('--allow', inputs.allowed.join(' '));
  const runnerAllow = process.env.RINGFENCE_ACTION_RUNNER_ENDPOINTS ?? RUNNER_ENDPOINTS;
  if (runnerAllow.trim()) args.push('--allow', runnerAllow);
  if (inputs.failOnBlock) args.push('--fail-on-block');
  const started = lib.run(lib.asRoot(args));
  if (started.status !== 0) {
    const why = started.stderr.trim() || started.stdout.trim();
    // Exit 2 is the input's (a policy or endpoint that does not parse: named with its token).
    const which = inputs.policyFile ? 'policy-file or allowed-endpoints' : 'allowed-endpoints';
    if (started.status === 2) throw new lib.InputError(`${which}: ${why}`);
    throw new Error(`starting the ringfence job: ${why}`);
  }
  console.log(started.stdout.trim());
  const events = (started.stdout.match(/events: (.*)$/m) || [])[1] || '';

  // The watcher: root, its own session, outside the job (started from this step, which
  // stays where it was: only Runner.Worker moved). It serves report requests from post,
  // and ends the job once Runner.Worker has exited, so no step can end it early.
  const requests = path.join(artifacts, 'requests');
  fs.mkdirSync(requests, { recursive: true });
  const jobDir = path.join(ROOT_DIR, 'jobs', id);
  const config = {
    ringfence: rf,
    socket,
    id,
    worker,
    requests,
    out: jobDir,
    events,
  };
  const watcherLog = path.join(ROOT_DIR, `watcher-${id}.log`);
  must(
    lib.run(lib.asRoot(['sh', '-c', 'log=$1; shift; exec setsid -f "$@" </dev/null >>"$log" 2>&1', 'sh', watcherLog, process.execPath, path.join(__dirname, 'root.js'), 'watch', JSON.stringify(config)])),
    'starting the watcher'
  );
  const ready = path.join(jobDir, 'ready');
  const deadline = Date.now() + 30000;
  while (!fs.existsSync(ready)) {
    if (Date.now() > deadline) {
      lib.run(lib.asRoot([rf, 'job', 'end', '--id', id, '--socket', socket]));
      throw new Error(`the watcher did not start within 30 s (log: ${watcherLog}); the job was ended`);
    }
    sleep(100);
  }

  lib.saveState(
    'ringfence',
    JSON.stringify({ id, out: jobDir, requests, failOnBlock: inputs.failOnBlock, mode: inputs.mode || 'policy' })
  );

  if (inputs.disableSudo) {
    disableSudo(os.userInfo().username);
    console.log(`ringfence: sudo removed for ${os.userInfo().username}: later steps cannot stop ringfence`);
  }
  console.log(`ringfence: job ${id} holds Runner.Worker (pid ${worker.pid}) and every later step`);
}

main().catch((e) => {
  if (e instanceof lib.InputError) lib.error(e.message);
  else lib.error(`ringfence: ${e.message}`);
  process.exitCode = 1;
});
