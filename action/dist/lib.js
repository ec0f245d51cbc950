// Shared by main.js, post.js and root.js. Node built-ins only: the action is run straight
// from the repository (no npm install, no node_modules), on GitHub's node24 and on node 20.
'use strict';

const fs = require('fs');
const path = require('path');
const os = require('os');
const crypto = require('crypto');
const { spawnSync } = require('child_process');

// --- workflow commands (the runner's escaping: a name from a DNS answer cannot forge one) ---

function escapeData(s) {
  return String(s).replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A');
}

function escapeProperty(s) {
  return escapeData(s).replace(/:/g, '%3A').replace(/,/g, '%2C');
}

function command(name, message, props) {
  let p = '';
  if (props) {
    const parts = Object.entries(props).map(([k, v]) => `${k}=${escapeProperty(v)}`);
    if (parts.length) p = ' ' + parts.join(',');
  }
  process.stdout.write(`::${name}${p}::${escapeData(message)}${os.EOL}`);
}

const error = (m, props) => command('error', m, props);
const warning = (m, props) => command('warning', m, props);
const notice = (m, props) => command('notice', m, props);

/** An input-level failure: said as an ::error naming the input, exit 1. */
class InputError extends Error {}

// --- inputs, state, summary (the runner's file commands) ---

function getInput(name) {
  const v = process.env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`];
  return v === undefined ? '' : v.trim();
}

// The YAML 1.2 core schema's booleans, as @actions/core's getBooleanInput takes them.
function getBooleanInput(name) {
  const v = getInput(name);
  if (v === '' || ['false', 'False', 'FALSE'].includes(v)) return false;
  if (['true', 'True', 'TRUE'].includes(v)) return true;
  throw new InputError(`input ${name}: ${JSON.stringify(v)} is not true or false`);
}

function getChoiceInput(name, choices) {
  const v = getInput(name);
  if (v === '' || choices.includes(v)) return v;
  throw new InputError(
    `input ${name}: ${JSON.stringify(v)} is not one of ${choices.join(', ')}`
  );
}

// A file command (GITHUB_STATE, GITHUB_ENV, GITHUB_OUTPUT): name<<delimiter, value, delimiter.
function appendFileCommand(envName, name, value) {
  const file = process.env[envName];
  if (!file) throw new Error(`${envName} is not set: is this running as a GitHub Actions step?`);
  const delim = `ghadelimiter_${crypto.randomUUID()}`;
  if (name.includes(delim) || value.includes(delim)) throw new Error('delimiter collision');
  fs.appendFileSync(file, `${name}<<${delim}${os.EOL}${value}${os.EOL}${delim}${os.EOL}`);
}

function saveState(name, value) {
  appendFileCommand('GITHUB_STATE', name, value);
}

function getState(name) {
  return process.env[`STATE_${name}`] || '';
}

// --- processes ---

/** { comm, ppid, start } of a process from /proc/PID/stat, or null once it is gone. */
function procStat(pid) {
  let stat;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // The name (field 2) may hold spaces and parentheses: cut after its last ')'.
  const open = stat.indexOf('(');
  const close = stat.lastIndexOf(')');
  const rest = stat.slice(close + 2).split(' ');
  if (rest[0] === 'Z') return null; // exited, not yet reaped
  return { comm: stat.slice(open + 1, close), ppid: Number(rest[1]), start: rest[19] };
}

/**
 * The Runner.Worker this step runs under: the nearest ancestor of that name. The runner
 * starts a JavaScript action's node as Runner.Worker's child; every later step of the job
 * is another child of it.
 */
function findWorker() {
  let pid = process.ppid;
  for (let hops = 0; pid > 1 && hops < 32; hops++) {
    const st = procStat(pid);
    if (!st) break;
    if (st.comm === 'Runner.Worker') return { pid, start: st.start };
    pid = st.ppid;
  }
  return null;
}

/** Runs argv; { status, stdout, stderr }. Never throws on a non-zero exit. */
function run(argv, opts = {}) {
  const r = spawnSync(argv[0], argv.slice(1), {
    encoding: 'utf8',
    maxBuffer: 256 * 1024 * 1024,
    ...opts,
  });
  if (r.error) return { status: 127, stdout: '', stderr: `${argv[0]}: ${r.error.message}` };
  return { status: r.status === null ? 128 : r.status, stdout: r.stdout || '', stderr: r.stderr || '' };
}

const isRoot = () => process.getuid && process.getuid() === 0;

/** argv as root: directly when we are, else through `sudo -n` (hosted runners' user has it). */
function asRoot(argv) {
  return isRoot() ? argv : ['sudo', '-n', '--', ...argv];
}

/** The job id, as the runner hooks derive it: gh-<run>.<attempt>-<job>-<runner>. */
function jobId(env = process.env) {
  const raw = `gh-${env.GITHUB_RUN_ID || '0'}.${env.GITHUB_RUN_ATTEMPT || '1'}-${env.GITHUB_JOB || 'job'}-${env.RUNNER_NAME || os.hostname()}`;
  return raw.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 128);
}

const DEFAULT_SOCKET = '/run/ringfence/control.sock';

/** Where the report and events go for upload as an artifact. */
function artifactDir(env = process.env) {
  const base = env.RUNNER_TEMP || os.tmpdir();
  return path.join(base, 'ringfence');
}

module.exports = {
  escapeData,
  escapeProperty,
  error,
  warning,
  notice,
  InputError,
  getInput,
  getBooleanInput,
  getChoiceInput,
  saveState,
  getState,
  procStat,
  findWorker,
  run,
  isRoot,
  asRoot,
  jobId,
  DEFAULT_SOCKET,
  artifactDir,
};
