// The root half of the action, started by main through sudo (hosted runners' user has it).
//
//   root.js watch CONFIG-JSON
//     Runs detached, outside the job, until the job's Runner.Worker exits; then ends the job
//     (`ringfence job end`: what the job left running is killed, the final report kept).
//     Meanwhile it serves report requests: post (inside the job, and without sudo after
//     disable-sudo) drops an empty file named req-<nonce> in the requests directory; the
//     watcher writes the report (markdown, html, json) and a copy of the events into
//     <out>/<nonce>/, readable by the runner's user, then <out>/<nonce>/done. A request
//     only ever yields the job's own report, so a step that asks gains nothing; ending the
//     job is never a request.
//   root.js disable-sudo USER
//     Removes the sudoers lines that name USER or one of its groups, then checks that
//     `sudo -l -U USER` grants nothing.
'use strict';

const fs = require('fs');
const path = require('path');
const lib = require('./lib');

const MAX_REQUESTS = 16;

function log(msg) {
  console.log(`${new Date().toISOString()} ringfence-action: ${msg}`);
}

function writeFile(p, data) {
  // Root writes only below its own directory; a fresh file each time (no following links).
  const tmp = `${p}.tmp`;
  fs.rmSync(tmp, { force: true });
  fs.writeFileSync(tmp, data, { mode: 0o644, flag: 'wx' });
  fs.renameSync(tmp, p);
}

function serve(cfg, nonce) {
  const dir = path.join(cfg.out, nonce);
  fs.mkdirSync(dir, { mode: 0o755 });
  const problems = [];
  for (const [format, file] of [
    ['markdown', 'report.md'],
    ['html', 'report.html'],
    ['json', 'report.json'],
  ]) {
    const r = lib.run([cfg.ringfence, 'report', cfg.id, '--format', format, '--socket', cfg.socket]);
    if (r.status === 0) writeFile(path.join(dir, file), r.stdout);
    else problems.push(`report --format ${format}: ${r.stderr.trim()}`);
  }
  if (cfg.events) {
    try {
      writeFile(path.join(dir, 'events.jsonl'), fs.readFileSync(cfg.events));
    } catch (e) {
      problems.push(`events ${cfg.events}: ${e.message}`);
    }
  }
  writeFile(path.join(dir, 'done'), problems.join('\n'));
  log(`served report ${nonce}${problems.length ? ` (${problems.join('; ')})` : ''}`);
}

function endJob(cfg) {
  let delay = 1000;
  const giveUp = Date.now() + 3600 * 1000;
  for (;;) {
    const r = lib.run([cfg.ringfence, 'job', 'end', '--id', cfg.id, '--format', 'markdown', '--socket', cfg.socket]);
    if (r.status === 0 || r.status === 3) {
      writeFile(path.join(cfg.out, 'final-report.md'), r.stdout);
      log(`job ${cfg.id} ended: its Runner.Worker (pid ${cfg.worker.pid}) exited`);
      return;
    }
    // While the daemon is down (a restart), try again; anything else is final.
    if (!/no ringfence daemon/.test(r.stderr) || Date.now() > giveUp) {
      log(`ending job ${cfg.id}: ${r.stderr.trim()}`);
      return;
    }
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, delay);
    delay = Math.min(delay * 2, 30000);
  }
}

function watch(cfg) {
  fs.mkdirSync(cfg.out, { recursive: true, mode: 0o755 });
  fs.chmodSync(cfg.out, 0o755);
  writeFile(path.join(cfg.out, 'watcher.pid'), `${process.pid}\n`);
  const served = new Set();
  writeFile(path.join(cfg.out, 'ready'), '');
  log(`watching Runner.Worker ${cfg.worker.pid} for job ${cfg.id}`);
  const tick = setInterval(() => {
    let names = [];
    try {
      names = fs.readdirSync(cfg.requests);
    } catch {
      // the job's user removed it: nothing to serve
    }
    for (const n of names) {
      const m = /^req-([0-9a-f]{8,64})$/.exec(n);
      if (!m || served.has(m[1])) continue;
      // Any step can ask (it only ever gets its own job's report); a step asking in a loop
      // must not keep root busy or fill the disk.
      if (served.size >= MAX_REQUESTS) {
        if (served.size === MAX_REQUESTS) log(`more than ${MAX_REQUESTS} report requests: no more are served`);
        served.add(m[1]);
        continue;
      }
      served.add(m[1]);
      try {
        serve(cfg, m[1]);
      } catch (e) {
        log(`serving ${n}: ${e.message}`);
      }
    }
    const st = lib.procStat(cfg.worker.pid);
    if (!st || st.start !== cfg.worker.start) {
      clearInterval(tick);
      endJob(cfg);
    }
  }, 200);
}

// --- disable-sudo ---

function groupsOf(user) {
  const r = lib.run(['id', '-Gn', user]);
  if (r.status !== 0) throw new Error(`id -Gn ${user}: ${r.stderr.trim()}`);
  return r.stdout.trim().split(/\s+/);
}

/** Whether a sudoers line grants something to `user` (by name or one of `groups`). */
function namesUser(line, user, groups) {
  const t = line.trim();
  if (!t || t.startsWith('#') || /^(Defaults|@include|User_Alias|Runas_Alias|Host_Alias|Cmnd_Alias)/.test(t)) {
    return false;
  }
  const who = t.split(/\s+/)[0].split(',');
  return who.some((w) => w === user || w === 'ALL' || (w.startsWith('%') && groups.includes(w.slice(1))));
}

function disableSudo(user) {
  if (!/^[a-z_][a-z0-9_.-]*\$?$/i.test(user)) throw new Error(`user ${JSON.stringify(user)}`);
  const groups = groupsOf(user);
  const dir = '/etc/sudoers.d';
  const files = ['/etc/sudoers'];
  try {
    for (const f of fs.readdirSync(dir).sort()) files.push(path.join(dir, f));
  } catch {
    // no sudoers.d
  }
  for (const f of files) {
    let text;
    try {
      if (!fs.lstatSync(f).isFile()) continue;
      text = fs.readFileSync(f, 'utf8');
    } catch {
      continue;
    }
    const lines = text.split('\n');
    // Continuation lines belong to the line before: judge whole logical lines.
    const logical = [];
    for (const l of lines) {
      if (logical.length && logical[logical.length - 1].endsWith('\\')) logical[logical.length - 1] += `\n${l}`;
      else logical.push(l);
    }
    const keep = logical.filter((l) => !namesUser(l, user, groups));
    if (keep.length === logical.length) continue;
    if (f !== '/etc/sudoers' && keep.every((l) => !l.trim() || l.trim().startsWith('#'))) {
      fs.unlinkSync(f);
      console.log(`disable-sudo: removed ${f}`);
      continue;
    }
    const tmp = `${f}.ringfence-tmp`;
    fs.writeFileSync(tmp, keep.join('\n'), { mode: 0o440 });
    const check = lib.run(['visudo', '-cf', tmp]);
    if (check.status !== 0) {
      fs.rmSync(tmp, { force: true });
      throw new Error(`${f} without ${user}'s lines does not pass visudo: ${check.stderr.trim() || check.stdout.trim()}`);
    }
    fs.renameSync(tmp, f);
    console.log(`disable-sudo: removed ${logical.length - keep.length} line(s) for ${user} from ${f}`);
  }
  const left = lib.run(['sudo', '-n', '-l', '-U', user]);
  if (!/is not allowed to run sudo/.test(left.stdout + left.stderr)) {
    throw new Error(`after removing its lines, sudo still grants ${user}:\n${left.stdout.trim()}`);
  }
}

function mainRoot() {
  const [cmd, arg] = process.argv.slice(2);
  // What the watcher writes is for the runner's user to read (sudo may pass a umask that
  // would keep it root's).
  process.umask(0o022);
  if (!lib.isRoot()) throw new Error('root.js runs as root (main starts it through sudo)');
  if (cmd === 'watch') return watch(JSON.parse(arg));
  if (cmd === 'disable-sudo') return disableSudo(arg);
  throw new Error(`unknown command ${JSON.stringify(cmd)}`);
}

try {
  mainRoot();
} catch (e) {
  console.error(`ringfence-action: ${e.message}`);
  process.exitCode = 1;
}
