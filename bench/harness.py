#!/usr/bin/env python3
"""The throughput-regression harness behind bench/run (see bench/README.md).

Runs, in one go: the per-packet BPF_PROG_TEST_RUN costs, veth throughput between two
network namespaces under every filter configuration (paired against "no filter";
ringfence holding 1k / 100k addresses learned through DNS answers, the rivals' sets the
same addresses), the event pipeline, the userspace criterion benches, the memory
footprint, the host daemon (job start/end latency and leaks, memory per job, events under
load) and the verifier's cost per program against bench/verifier.json (warnings only). Prints one
table, writes bench/out/<stamp>/*.json and bench/out/latest.json, and with --check
compares the ratios to bench/baseline.json.

Only loopback and namespaces created here carry traffic, on 198.51.100.0/24. Everything
created is removed on exit, also on Ctrl-C. Every loop is bounded in count and time.
"""
import argparse
import ipaddress
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

C_ADDR, S_ADDR = "198.51.100.1", "198.51.100.2"
# The server namespace's resolver (dnsmasq), on an address of its own: a job's resolver is
# reachable for DNS only, so the measured server must not be it.
DNS_ADDR = "198.51.100.53"
# The client's address on the twin veth pair ringfence's runs leave through (RingfenceDaemon).
R_ADDR = "198.51.100.3"
IPERF_PORT, CONN_PORT = 5201, 5299

# Filler addresses for the allowlists: documentation space only, never the server. With
# 10k rules they repeat; an iptables rule costs the same whether or not its address
# repeats, and the server's rule always comes last (the worst case: every rule is tried).
FILLER = [f"203.0.113.{i}" for i in range(1, 255)] + [f"198.51.100.{i}" for i in range(10, 255)]

VERIFIER_FILE = BENCH / "verifier.json"

TARGETS = {
    "tcp1": 0.98, "tcp8": 0.98, "udp64": 0.95, "conn": 0.95,
}

# The zone ringfence learns its addresses from: h0..h{N-1}.bench.test, served by dnsmasq in
# the server namespace (198.51.100.2:53), TTL an hour (nothing expires during a run).
ZONE = "bench.test"
DNS_TTL = 3600
# Every address the zone serves: the server's first (h0), then the IPv4 documentation
# ranges, then IPv6 (2001:db8::/32, scattered: the trie is not one dense block). The
# ipset/nftables rivals of the same size hold the same list.
V4_POOL = ([S_ADDR] + [f"192.0.2.{i}" for i in range(1, 255)] + [f"203.0.113.{i}" for i in range(1, 255)]
           + [f"198.51.100.{i}" for i in range(10, 255) if i != 53])


def learned_addresses(n):
    """The n addresses of h0..h{n-1}.bench.test (distinct; the server's first)."""
    out = V4_POOL[:n]
    i = 0
    while len(out) < n:
        # An odd multiplier is a bijection modulo 2^96: distinct, well-spread host parts.
        low = ((i + 1) * 0x9E3779B97F4A7C15F39CC061) % (1 << 96)
        out.append(str(ipaddress.IPv6Address((0x20010DB8 << 96) | low)))
        i += 1
    return out


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, check=True, timeout=120, **kw):
    return subprocess.run(cmd, check=check, timeout=timeout, text=True,
                          capture_output=True, **kw)


def q(x):
    """Quantile helper on a sorted copy; x non-empty."""
    s = sorted(x)

    def at(p):
        if len(s) == 1:
            return s[0]
        k = p * (len(s) - 1)
        f = int(k)
        c = min(f + 1, len(s) - 1)
        return s[f] + (s[c] - s[f]) * (k - f)
    return at


# ------------------------------------------------------------------------------------
# Namespaces and filters
# ------------------------------------------------------------------------------------

class Testbed:
    """Two namespaces joined by a veth pair: client 198.51.100.1, server .2."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.c, self.s = f"rfb-c-{tag}", f"rfb-s-{tag}"
        self.cdev, self.sdev = f"rfbc{tag}", f"rfbs{tag}"
        # The twin pair between the same namespaces: ringfence's daemon is attached to
        # rdev only, so the other configurations' runs (rfbc) never pass its programs.
        self.rdev, self.rsdev = f"rfbr{tag}", f"rfbsr{tag}"
        self.tag = tag
        self.procs = []
        self.up = False
        self.work = Path(tempfile.mkdtemp(prefix="rfbench-veth-"))

    def __enter__(self):
        for ns in (self.c, self.s):
            sh(["ip", "netns", "add", ns])
        self.up = True
        sh(["ip", "link", "add", self.cdev, "netns", self.c, "type", "veth",
            "peer", "name", self.sdev, "netns", self.s])
        for ns, dev, addr in ((self.c, self.cdev, C_ADDR), (self.s, self.sdev, S_ADDR)):
            sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", self.s, "addr", "add", f"{DNS_ADDR}/24", "dev", self.sdev])
        sh(["ip", "link", "add", self.rdev, "netns", self.c, "type", "veth",
            "peer", "name", self.rsdev, "netns", self.s])
        sh(["ip", "-n", self.c, "addr", "add", f"{R_ADDR}/32", "dev", self.rdev])
        for ns, dev in ((self.c, self.rdev), (self.s, self.rsdev)):
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
        # Replies to the twin's address go back through the twin (both directions of a
        # ringfence run pass its programs, as on a single device).
        sh(["ip", "-n", self.s, "route", "add", f"{R_ADDR}/32", "dev", self.rsdev])
        # Many short connections: reuse TIME_WAIT ports (per-namespace sysctls only).
        self.ns_exec(self.c, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], check=False)
        self.ns_exec(self.c, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"], check=False)
        return self

    def __exit__(self, *exc):
        self.stop_servers()
        if self.up:
            for ns in (self.c, self.s):
                sh(["ip", "netns", "del", ns], check=False)
            self.up = False
        shutil.rmtree(self.work, ignore_errors=True)

    def start_dns(self, n, lifetime):
        """dnsmasq on the server's address serving h0..h{n-1}.bench.test (addn-hosts), and
        the names files `rfbench resolve` reads, one per size (names_file(k), k <= n)."""
        hosts = self.work / "hosts"
        with hosts.open("w") as f:
            for i, a in enumerate(learned_addresses(n)):
                f.write(f"{a} h{i}.{ZONE}\n")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.s, "timeout", str(int(lifetime)), "dnsmasq",
             "--conf-file=/dev/null", "--keep-in-foreground", "--pid-file", "--user=root", "--group=root",
             "--no-resolv", "--no-hosts", "--no-poll", "--bind-interfaces", "--port=53",
             f"--listen-address={DNS_ADDR}", f"--local=/{ZONE}/", f"--addn-hosts={hosts}",
             f"--local-ttl={DNS_TTL}", "--log-facility=/dev/null"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        # dnsmasq reads the hosts file before it answers: wait for the last name.
        last = learned_addresses(n)[-1]
        qtype = "AAAA" if ":" in last else "A"
        deadline = time.monotonic() + 60
        while True:
            r = self.ns_exec(self.c, ["dig", "+short", "+time=1", "+tries=1", f"@{DNS_ADDR}",
                                      f"h{n - 1}.{ZONE}", qtype], check=False)
            if r.returncode == 0 and r.stdout.strip() == last:
                break
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.procs[-1].stderr.read()[-400:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq does not answer h{n - 1}.{ZONE}: {r.stdout.strip()} {r.stderr.strip()}")
            time.sleep(0.2)

    def names_file(self, k):
        p = self.work / f"names-{k}"
        if not p.exists():
            p.write_text("".join(f"h{i}.{ZONE} {'AAAA' if ':' in a else 'A'}\n"
                                 for i, a in enumerate(learned_addresses(k))))
        return p

    def policy_file(self):
        p = self.work / "policy.toml"
        p.write_text(f'mode = "block"\nallowed-endpoints = "*.{ZONE}:*"\ndns-resolvers = ["{DNS_ADDR}"]\n')
        return p

    def ns_exec(self, ns, cmd, **kw):
        return sh(["ip", "netns", "exec", ns] + cmd, **kw)

    def start_servers(self, rfbench, lifetime):
        # Both servers end by themselves after `lifetime` seconds at the latest.
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.s, "timeout", str(int(lifetime)), "iperf3", "-s",
             "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.s, rfbench, "connect-server",
             f"{S_ADDR}:{CONN_PORT}", str(int(lifetime))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.3)

    def stop_servers(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.procs = []

    def tx_packets(self, dev=None):
        out = sh(["ip", "-n", self.c, "-s", "-j", "link", "show", "dev", dev or self.cdev]).stdout
        return json.loads(out)[0]["stats64"]["tx"]["packets"]


class RingfenceDaemon:
    """`ringfence run` in the client namespace, attached to the twin veth only, with one
    block-mode job per size (a cgroup of its own) that learned its N addresses through DNS
    answers once, at set-up; each ringfence run puts its client into that job's cgroup.
    The way a CI host runs it: the dataplane loaded once, jobs holding what they learned.
    hook/unhook route the server's address through the twin or the first pair."""

    def __init__(self, tb, ringfence, rfbench):
        self.tb, self.ringfence, self.rfbench = tb, ringfence, rfbench
        self.sock = tb.work / "control.sock"
        self.bpffs = Path(f"/sys/fs/bpf/rfbench-{tb.tag}")
        # The cgroup2 hierarchy (/sys/fs/cgroup, or .../unified on a hybrid host): job start
        # takes a job's cgroup as a path inside it.
        cg2 = next((l.split()[1] for l in open("/proc/mounts") if l.split()[2] == "cgroup2"), None)
        if cg2 is None:
            raise RuntimeError("no cgroup2 hierarchy mounted (ringfence jobs are cgroup2 cgroups)")
        self.cg2 = Path(cg2)
        self.cg_rel = f"rfbench-{tb.tag}"
        self.cg_root = self.cg2 / self.cg_rel
        self.cgroups = []
        self.proc = None
        self.jobs = []

    def cgroup(self, flt):
        return self.cg_root / flt.name

    def ctl(self, *a, check=True, timeout=120):
        r = sh([self.ringfence, *a, "--socket", str(self.sock)], check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"ringfence {' '.join(a[:2])}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
        return r

    def __enter__(self):
        tb = self.tb
        self.bpffs.mkdir(exist_ok=True)
        self.cg_root.mkdir(exist_ok=True)
        self.log = (tb.work / "daemon.log").open("w")
        # nsenter, not `ip netns exec`: that one mounts a fresh /sys (no cgroup2, no bpffs).
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{tb.c}", self.ringfence, "run", "--socket", str(self.sock),
             "--bpffs", str(self.bpffs), "--state-dir", str(tb.work / "state"),
             "--data-dir", str(tb.work / "data"), "--interface", tb.rdev],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while self.ctl("status", check=False).returncode != 0:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ringfence run exited {self.proc.returncode}: "
                                   f"{(tb.work / 'daemon.log').read_text()[-600:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("ringfence run: no control socket after 120 s")
            time.sleep(0.1)
        # DNS always through the twin: the jobs learn where their programs are attached.
        tb.ns_exec(tb.c, ["ip", "route", "replace", f"{DNS_ADDR}/32", "dev", tb.rdev, "src", R_ADDR])
        return self

    def start_job(self, flt):
        tb = self.tb
        cg = self.cgroup(flt)
        cg.mkdir(exist_ok=True)
        self.cgroups.append(cg)
        self.ctl("job", "start", "--id", flt.name, "--cgroup", f"{self.cg_rel}/{flt.name}",
                 "--policy", str(tb.policy_file()))
        self.jobs.append(flt)
        # Learn: resolve h0..h{N-1}.bench.test from inside the job (the kernel binds every
        # answer's address to the job), then check the allow trie grew by at least N (the
        # daemon's status has the trie's fill, not a job's share: the growth is this job's).
        before = self.allow_fill()
        # Twice at most: one name of 100k now and then gets no answer (bench/README.md,
        # "Known problem"); asking again is harmless (what was learned stays learned), and
        # a second failure breaks the configuration.
        for attempt in (1, 2):
            r = sh(["nsenter", f"--net=/run/netns/{tb.c}", "sh", "-c",
                    f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh",
                    self.rfbench, "resolve", f"{DNS_ADDR}:53", str(tb.names_file(flt.n))],
                   check=False, timeout=600)
            if r.returncode == 0:
                break
            log(f"!! {flt.name}: resolve attempt {attempt}: {r.stderr.strip()[-300:]}")
        if r.returncode != 0:
            raise RuntimeError(f"{flt.name}: resolve: exit {r.returncode}: {r.stderr.strip()[-400:]}")
        flt.learned = json.loads([l for l in r.stdout.splitlines() + r.stderr.splitlines() if l.startswith("{")][-1])
        flt.allow_entries = self.allow_fill() - before
        if flt.allow_entries < flt.n:
            raise RuntimeError(f"{flt.name}: the job learned {flt.allow_entries} addresses, fewer than {flt.n}")

    def allow_fill(self):
        st = json.loads(self.ctl("status", "--json").stdout)
        for m in st.get("maps", []):
            if m.get("map") == "allow":
                return int(m["entries"])
        raise RuntimeError(f"ringfence status --json: no allow map: {json.dumps(st.get('maps'))[:400]}")

    def route(self, on):
        tb = self.tb
        if on:
            tb.ns_exec(tb.c, ["ip", "route", "replace", f"{S_ADDR}/32", "dev", tb.rdev, "src", R_ADDR])
        else:
            tb.ns_exec(tb.c, ["ip", "route", "del", f"{S_ADDR}/32"], check=False)

    def __exit__(self, *exc):
        for f in self.jobs:
            self.ctl("job", "end", "--id", f.name, check=False)
        if self.proc:
            self.ctl("unload", "--force", check=False)
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        for d in self.cgroups + [self.cg_root, self.bpffs]:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass  # `unload` removed the pins' directory
            except OSError as e:
                log(f"!! {d}: {e}")


class Filter:
    """One configuration of the client namespace's egress filtering. Each is set up once
    for the whole veth part (setup), then only hooked in for its runs and unhooked after
    (hook / unhook: one jump rule, one base chain, or one route), so a round measures
    traffic, not the loading of 100k set elements or BPF programs."""

    def __init__(self, name, kind, n=0):
        self.name, self.kind, self.n = name, kind, n
        self.chain = f"RFB-{name}"[:28]
        self.setup_s = 0.0

    def addresses(self):
        if self.kind in ("ipset", "nft"):
            return learned_addresses(self.n)  # the very addresses ringfence-N learns
        k = max(self.n - 1, 0)
        return [FILLER[i % len(FILLER)] for i in range(k)] + [S_ADDR]

    def tables(self):
        """(restore tool, set name) per family this configuration's chain is in."""
        if self.kind == "ipset":
            tag = self.name.rsplit("-", 1)[-1]
            return [("iptables", f"rfbench4-{tag}"), ("ip6tables", f"rfbench6-{tag}")]
        return [("iptables", None)] if self.kind == "iptables" else []

    def setup(self, tb, rf=None):
        """Loads the rules (sets, chains, the ringfence job) without hooking them in."""
        t0 = time.monotonic()
        head = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                f":{self.chain} - [0:0]", f"-A {self.chain} -o lo -j ACCEPT"]
        if self.kind == "iptables":
            rules = head + [f"-A {self.chain} -d {a}/32 -j ACCEPT" for a in self.addresses()]
            rules += [f"-A {self.chain} -j DROP", "COMMIT", ""]
            tb.ns_exec(tb.c, ["iptables-restore", "--noflush"], input="\n".join(rules), timeout=600)
        elif self.kind == "ipset":
            # One set per family (ipset's hash:ip holds one), each with its table's chain.
            (_, s4), (_, s6) = self.tables()
            lines = [f"create {s4} hash:ip family inet hashsize 1024 maxelem {max(self.n, 65536)}",
                     f"create {s6} hash:ip family inet6 hashsize 1024 maxelem {max(self.n, 65536)}"]
            lines += [f"add {s6 if ':' in a else s4} {a} -exist" for a in self.addresses()]
            tb.ns_exec(tb.c, ["ipset", "restore"], input="\n".join(lines) + "\n", timeout=600)
            for tool, set_name in self.tables():
                rules = head + [f"-A {self.chain} -m set --match-set {set_name} dst -j ACCEPT",
                                f"-A {self.chain} -j DROP", "COMMIT", ""]
                tb.ns_exec(tb.c, [tool + "-restore", "--noflush"], input="\n".join(rules))
        elif self.kind == "nft":
            # Sets and a regular chain in a table of its own; hook() adds the base chain that
            # jumps to it, unhook() removes it (a table without a base chain costs no packet).
            addrs = sorted(set(self.addresses()))
            sets = []
            for name, typ, fam in (("allow4", "ipv4_addr", False), ("allow6", "ipv6_addr", True)):
                elems = ", ".join(a for a in addrs if (":" in a) == fam)
                sets.append(f"  set {name} {{ type {typ}; " + (f"elements = {{ {elems} }} " if elems else "") + "}")
            nl = "\n"
            conf = f"""table inet {self.nft_table()} {{
{nl.join(sets)}
  chain filter {{
    oif "lo" accept
    ip daddr @allow4 accept
    ip6 daddr @allow6 accept
    drop
  }}
}}
"""
            tb.ns_exec(tb.c, ["nft", "-f", "-"], input=conf, timeout=600)
        elif self.kind == "ringfence":
            rf.start_job(self)
        self.setup_s = time.monotonic() - t0

    def nft_table(self):
        return "rfb_" + self.name.replace("-", "_")

    def hook(self, tb, rf=None):
        if self.kind in ("iptables", "ipset"):
            for tool, _ in self.tables():
                tb.ns_exec(tb.c, [tool, "-w", "-A", "OUTPUT", "-j", self.chain])
        elif self.kind == "nft":
            t = self.nft_table()
            tb.ns_exec(tb.c, ["nft", "-f", "-"], input=(
                f"add chain inet {t} out {{ type filter hook output priority 0; policy accept; }}\n"
                f"add rule inet {t} out jump filter\n"))
        elif self.kind == "ringfence":
            rf.route(True)

    def unhook(self, tb, rf=None):
        if self.kind in ("iptables", "ipset"):
            for tool, _ in self.tables():
                tb.ns_exec(tb.c, [tool, "-w", "-D", "OUTPUT", "-j", self.chain], check=False)
        elif self.kind == "nft":
            t = self.nft_table()
            tb.ns_exec(tb.c, ["nft", "-f", "-"], input=f"flush chain inet {t} out\ndelete chain inet {t} out\n",
                       check=False)
        elif self.kind == "ringfence":
            rf.route(False)

    def wrap(self, rf, cmd):
        if self.kind == "ringfence":
            # The measured command joins the job's cgroup before it starts (the way a CI
            # runner's step runs inside its job), then runs by address.
            return ["sh", "-c", f'echo $$ > {rf.cgroup(self)}/cgroup.procs && exec "$@"', "sh"] + cmd
        return cmd

    def device(self, tb):
        return tb.rdev if self.kind == "ringfence" else tb.cdev


def filters(quick):
    """The configurations. ringfence-N: a block-mode job that learned N addresses through
    DNS answers; ipset-N / nft-set-N: the same N addresses in a set; iptables-N: N linear
    rules, the server's last. No iptables-100k: a 100k-rule linear chain takes minutes to
    load and passes next to nothing (10k already costs ~90 % of UDP packets/s)."""
    f = [Filter("none", "none"),
         Filter("ringfence-1k", "ringfence", 1000),
         Filter("ipset-1k", "ipset", 1000), Filter("nft-set-1k", "nft", 1000),
         Filter("iptables-10", "iptables", 10), Filter("iptables-1k", "iptables", 1000)]
    if not quick:
        # --quick (CI) stays at 1k: loading and resolving 100k names takes seconds a run.
        f += [Filter("ringfence-100k", "ringfence", 100_000),
              Filter("ipset-100k", "ipset", 100_000), Filter("nft-set-100k", "nft", 100_000),
              Filter("iptables-10k", "iptables", 10000)]
    return f


def size_of(name):
    """ringfence-100k -> 100000; iptables-10 -> 10; none -> 0."""
    tail = name.rsplit("-", 1)[-1]
    mult = 1000 if tail.endswith("k") else 1
    try:
        return int(tail.rstrip("k")) * mult
    except ValueError:
        return 0


# ------------------------------------------------------------------------------------
# One measurement
# ------------------------------------------------------------------------------------

def run_one(tb, flt, test, quick, rfbench, rf):
    """Returns {"value": rate, "pps": egress packets/s} for one run of `test` under `flt`."""
    tmp = tempfile.NamedTemporaryFile(prefix="rfbench-iperf-", suffix=".json", delete=False)
    tmp.close()
    try:
        if test == "conn":
            secs = 0.5 if quick else 1.0
            cmd = [rfbench, "connect-client", f"{S_ADDR}:{CONN_PORT}", str(secs), "2000000"]
        else:
            cmd = ["iperf3", "-c", S_ADDR, "-p", str(IPERF_PORT), "-J", "--logfile", tmp.name]
            if quick:
                # A fixed amount of data instead of a time: a fraction of a second.
                cmd += ["-n", "64M"] if test != "udp64" else ["-k", "40000"]
            else:
                cmd += ["-t", "1"]
            if test == "tcp8":
                cmd += ["-P", "8"]
            if test == "udp64":
                cmd += ["-u", "-l", "64", "-b", "0"]
        dev = flt.device(tb)
        tx0 = tb.tx_packets(dev)
        t0 = time.monotonic()
        # nsenter, not `ip netns exec`: that one mounts a fresh /sys without the cgroup2
        # hierarchy, and a ringfence run joins its job's cgroup there.
        r = sh(["nsenter", f"--net=/run/netns/{tb.c}"] + flt.wrap(rf, cmd),
               check=False, timeout=300)
        el = time.monotonic() - t0
        tx = tb.tx_packets(dev) - tx0
        if r.returncode != 0:
            # The cause, not the tail of ringfence's report: rfbench's "Error:" lines and
            # iperf3's own error (with -J it goes to the log file, not to stderr).
            why = [l for l in r.stderr.splitlines() if l.startswith(("Error", "iperf3:", "rfbench"))]
            try:
                why.append("iperf3: " + json.loads(Path(tmp.name).read_text()).get("error", ""))
            except (ValueError, OSError):
                pass
            raise RuntimeError(f"{flt.name}/{test}: exit {r.returncode}: {' | '.join(why)[-600:]} "
                               f"... {r.stderr.strip()[-300:]}")
        if test == "conn":
            line = [l for l in r.stdout.splitlines() if l.startswith("{")][-1]
            j = json.loads(line)
            value, secs = j["conns_per_s"], j["seconds"]
        else:
            text = Path(tmp.name).read_text()
            if not text.strip():
                raise RuntimeError(f"{flt.name}/{test}: iperf3 wrote nothing: {r.stderr.strip()[-400:]}")
            j = json.loads(text)
            if "error" in j:
                raise RuntimeError(f"{flt.name}/{test}: iperf3: {j['error']}")
            end = j["end"]
            if test == "udp64":
                # Packets/s the sender got out (the filter sits on the sender's path);
                # what arrived is kept beside it (the receiver drops some on a busy box).
                s = end["sum"]
                value = s["packets"] / max(s["seconds"], 1e-9)
                secs = s["seconds"]
                received = (s["packets"] - s["lost_packets"]) / max(s["seconds"], 1e-9)
            else:
                value = end["sum_received"]["bits_per_second"]
                secs = end["sum_received"]["seconds"]
        if value <= 0:
            raise RuntimeError(f"{flt.name}/{test}: nothing got through")
        # Egress packets (as the filter sees them: GSO super-packets for TCP) over the
        # test's own duration; the few packets of iperf3's control connection are noise.
        out = {"value": value, "pps": tx / max(secs, 1e-9), "tx": tx, "wall_s": el}
        if test == "udp64":
            out["received_pps"] = received
        return out
    finally:
        os.unlink(tmp.name)


def veth(args, rfbench, ringfence, dp):
    tests = ["tcp1", "tcp8", "udp64", "conn"]
    pairs = {t: 30 for t in tests}
    # The time budget's shares: TCP first (the issue's ≥ 30 pairs), what a test does not
    # use goes to the tests after it.
    weight = {"tcp1": 1.2, "tcp8": 1.2, "udp64": 0.8, "conn": 0.8}
    if args.quick:
        pairs = {t: 1 for t in tests}
    if args.pairs:
        pairs = {t: args.pairs for t in tests}
    fl = filters(args.quick)
    base, others = fl[0], fl[1:]
    results = {}
    broken = {}
    timing = {"setup_s": {}, "rounds": {}}
    # Upper bound on the servers' life: generous, they are stopped as soon as we are done.
    lifetime = 120 + min(sum(pairs.values()) * len(fl) * 15, args.max_minutes * 60 * 2)
    random.seed(42)
    budget_end = time.monotonic() + args.max_minutes * 60
    with Testbed() as tb:
        tb.start_servers(rfbench, lifetime)
        tb.start_dns(max(f.n for f in fl if f.kind == "ringfence"), lifetime)
        with RingfenceDaemon(tb, ringfence, rfbench) as rf:
            # Every configuration set up once, none of them hooked in; a configuration that
            # cannot be set up is broken (a functional failure), the others go on.
            for f in others:
                try:
                    f.setup(tb, rf)
                    timing["setup_s"][f.name] = round(f.setup_s, 3)
                    log(f"  set up {f.name}: {f.setup_s:.2f} s")
                except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as e:
                    broken[f.name] = f"set-up: {e}"
                    log(f"!! {f.name}: set-up: {e}")
            veth_tests(args, tb, rf, tests, pairs, weight, budget_end, base, others, broken,
                       results, timing, rfbench, dp)
    if broken:
        results["broken"] = broken
    results["timing"] = timing
    return results


def veth_tests(args, tb, rf, tests, pairs, weight, budget_end, base, others, broken, results,
               timing, rfbench, dp):
    for ti, test in enumerate(tests):
        raw = {f.name: [] for f in [base] + others}
        ratios = {f.name: [] for f in others}
        # Rounds: none, the others in a rotating order, and the next round's "none";
        # each run is paired with the mean of the "none" runs on either side of it.
        nones = []
        rounds = []
        t_start = time.monotonic()
        left = tests[ti:]
        share = max(budget_end - t_start, 0) * weight[test] / sum(weight[t] for t in left)
        hook_s = []
        for r in range(pairs[test]):
            order = others[r % len(others):] + others[:r % len(others)]
            nones.append(run_one(tb, base, test, args.quick, rfbench, rf))
            this = {}
            for f in order:
                if f.name in broken:
                    continue
                try:
                    h0 = time.monotonic()
                    f.hook(tb, rf)
                    h1 = time.monotonic()
                    this[f.name] = run_one(tb, f, test, args.quick, rfbench, rf)
                except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as e:
                    # A configuration that does not run is a functional failure: say
                    # so, skip it from now on, keep measuring the others.
                    broken[f.name] = str(e)
                    log(f"!! {f.name}: {e}")
                finally:
                    h2 = time.monotonic()
                    f.unhook(tb, rf)
                    hook_s.append((h1 - h0) + (time.monotonic() - h2))
            rounds.append(this)
            spent = time.monotonic() - t_start
            if r + 1 < pairs[test] and spent * (r + 2) / (r + 1) > share:
                log(f"  {test}: time budget ({share:.0f} s) spent after {r + 1} rounds")
                break
        timing["rounds"][test] = {
            "round_s": round((time.monotonic() - t_start) / max(len(rounds), 1), 2),
            "hook_unhook_s": round(statistics.median(hook_s), 4) if hook_s else None,
            "share_s": round(share)}
        nones.append(run_one(tb, base, test, args.quick, rfbench, rf))
        raw[base.name] = nones
        for i, this in enumerate(rounds):
            ref = (nones[i]["value"] + nones[i + 1]["value"]) / 2
            for name, m in this.items():
                raw[name].append(m)
                ratios[name].append(m["value"] / ref)
        res = {"pairs": len(rounds), "none": summarize([m["value"] for m in nones]),
               "none_pps": statistics.median(m["pps"] for m in nones), "configs": {}}
        none_v = res["none"]["median"]
        for f in others:
            rs = ratios[f.name]
            if not rs:
                continue
            vals = [m["value"] for m in raw[f.name]]
            pps = statistics.median(m["pps"] for m in raw[f.name])
            s = summarize(rs)
            # CPU cost of the filter, two ways:
            #  - inferred: extra time per egress packet on the bottleneck,
            #    1/pps(filter) - 1/pps(none), times the packets per second;
            #  - ringfence only: its BPF_PROG_TEST_RUN cost (established / new flow)
            #    times the packets per second.
            pps_none = res["none_pps"]
            inferred_ns = max(1e9 / pps - 1e9 / pps_none, 0.0) if pps > 0 and pps_none > 0 else None
            entry = {"ratio": s, "value": summarize(vals), "pps": pps,
                     "inferred_ns_per_pkt": inferred_ns,
                     "cpu_pct_inferred": inferred_ns * pps / 1e7 if inferred_ns is not None else None}
            if f.kind == "ringfence":
                # What the job learned at set-up (checked: at least f.n), and how long
                # resolving the names took.
                entry["allow_entries"] = f.allow_entries
                entry["resolve_s"] = f.learned.get("seconds")
            if f.kind == "ringfence" and dp:
                est = dp_diff(dp, "established", f.n)
                new = dp_diff(dp, "new-flow-allowed", f.n)
                if est is not None:
                    per = est if test != "conn" else None
                    if test == "conn" and new is not None:
                        # ~3 egress packets per connection: SYN (new flow), ACK, RST.
                        conns = statistics.median(vals)
                        entry["cpu_pct_testrun"] = (new + 2 * est) * conns / 1e7
                    elif per is not None:
                        entry["cpu_pct_testrun"] = per * pps / 1e7
                    entry["testrun_ns_per_pkt"] = est if test != "conn" else new
            res["configs"][f.name] = entry
        results[test] = res
        log(f"  {test}: {len(rounds)} pairs, none = {fmt_value(test, none_v)}")


def summarize(x):
    at = q(x)
    return {"median": statistics.median(x), "p25": at(0.25), "p75": at(0.75),
            "min": min(x), "max": max(x), "n": len(x)}


def dp_diff(dp, case, entries):
    for r in dp.get("rows", []):
        if r["case"] == case and r["entries"] == entries:
            return r["diff_ns"]
    return None


def fmt_value(test, v):
    if test in ("tcp1", "tcp8"):
        return f"{v / 1e9:.2f} Gbit/s"
    if test == "udp64":
        return f"{v / 1e3:.0f} kpps"
    return f"{v:.0f} conn/s"


# ------------------------------------------------------------------------------------
# The other parts
# ------------------------------------------------------------------------------------

class PartFailed(RuntimeError):
    """A part that ran but failed its own checks: its numbers are kept beside the failure."""

    def __init__(self, msg, result=None):
        super().__init__(msg)
        self.result = result


def run_rfbench(rfbench, what, out, quick, extra=()):
    cmd = [rfbench, what, "--json", str(out)] + (["--quick"] if quick else []) + list(extra)
    log(f"== {what}: {' '.join(cmd)}")
    p = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE)
    try:
        stdout, _ = p.communicate(timeout=3600)
    except BaseException:
        # Ctrl-C / SIGTERM / timeout: let rfbench take down what it created (the daemon
        # part has a daemon, namespaces, pins and cgroups), then kill it if it does not.
        p.terminate()
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
        raise
    print(stdout, end="")
    result = json.loads(Path(out).read_text()) if Path(out).exists() else None
    if p.returncode != 0:
        raise PartFailed(f"rfbench {what} failed (exit {p.returncode})", result)
    return result


def criterion(args):
    env = dict(os.environ, RFBENCH_CRITERION_SECS="0.3" if args.quick else "2")
    log("== criterion: cargo bench --bench userspace")
    profile = os.environ.get("RF_BENCH_PROFILE", "bench")
    r = subprocess.run(["cargo", "bench", "--profile", profile, "--bench", "userspace", "--",
                        "--noplot"], cwd=ROOT, env=env, text=True, timeout=3600,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(r.stdout[-3000:])
        raise RuntimeError("criterion benches failed")
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    out = {}
    for est in sorted((target / "criterion").glob("**/new/estimates.json")):
        bench = est.parent.parent.relative_to(target / "criterion").as_posix()
        j = json.loads(est.read_text())
        out[bench] = {"ns": j["mean"]["point_estimate"],
                      "ci95": [j["mean"]["confidence_interval"]["lower_bound"],
                               j["mean"]["confidence_interval"]["upper_bound"]]}
    return out


# ------------------------------------------------------------------------------------
# Table, targets, baseline
# ------------------------------------------------------------------------------------

def targets_report(res):
    """[(target, measured, met?)]: the issue's targets against this run."""
    out = []
    dp = res.get("dataplane", {})

    def worst(case, pred):
        rows = [r for r in dp.get("rows", []) if r["case"] == case and pred(r["entries"])]
        return max(rows, key=lambda r: r["diff_ns"]) if rows else None

    for label, case, pred, lim in [
        ("new allowed flow, <=1k entries: added <= 60 ns", "new-flow-allowed", lambda n: n <= 1000, 60),
        ("new allowed flow, 100k entries: added <= 150 ns", "new-flow-allowed", lambda n: n == 100_000, 150),
        ("established flow, any size: added <= 20 ns", "established", lambda n: True, 20),
    ]:
        w = worst(case, pred)
        if w:
            out.append((label, f"{w['diff_ns']:.0f} ns (worst, at {w['entries']})", w["diff_ns"] <= lim))
    vt = res.get("veth", {})
    for test, lim in TARGETS.items():
        for name, c in vt.get(test, {}).get("configs", {}).items():
            if not name.startswith("ringfence"):
                continue
            r = c["ratio"]
            out.append((f"veth {test}: {name} >= {lim} of no filter",
                        f"{r['median']:.3f} [{r['p25']:.3f}..{r['p75']:.3f}] n={r['n']}",
                        r["median"] >= lim))
    for test, t in vt.items():
        c = t.get("configs", {}) if test != "timing" else {}
        for name, rf in c.items():
            if not name.startswith("ringfence"):
                continue
            # Rivals holding as many addresses (iptables-10k stands in at 100k: no linear 100k).
            n = size_of(name)
            rivals = {k: v for k, v in c.items() if not k.startswith("ringfence")
                      and (size_of(k) == n or (n > 10_000 and size_of(k) == 10_000))}
            if not rivals:
                continue
            best = max(rivals.items(), key=lambda kv: kv[1]["ratio"]["median"])
            out.append((f"veth {test}: {name} ahead of every iptables/ipset/nft rival of its size",
                        f"{rf['ratio']['median']:.3f} vs best rival {best[0]} {best[1]['ratio']['median']:.3f}",
                        rf["ratio"]["median"] >= best[1]["ratio"]["median"]))
    vf = res.get("verifier")
    if vf:
        c = vf["comparison"]
        grown = max((r["growth"] for r in c["rows"] if r["growth"] is not None), default=None)
        out.append((f"verifier cost on {c['kernel']}: no program grows > {c['warn_growth'] * 100:.0f}% (warning only)",
                    "no figures for this kernel" if grown is None else
                    f"largest change {grown * 100:+.1f}%; rf_egress {vf['measured']['programs'].get('rf_egress')} insns",
                    None if grown is None else not c["warnings"]))
    pl = res.get("pipeline")
    if pl and "held" in pl:
        h, alone = pl["held"], pl["producer_alone"]
        lost = pl["agent_decode_errors"] + pl["agent_suppressed"] + pl["agent_dropped"]
        out.append((f">= 1M events/s through the agent to the JSON Lines file, zero drops, {pl.get('jobs', 1)} jobs busy",
                    f"{h['consumed_per_s'] / 1e6:.3f} M/s written for {h['seconds']} s (offered 1M/s, produced "
                    f"{h['produced_per_s'] / 1e6:.3f} M/s; the producer alone {alone['produced_per_s'] / 1e6:.3f} M/s), "
                    f"ring buffer drops {h['drops']}, agent lost {lost}, consumer {h['consumer_cpu_ns_per_event']:.0f} ns CPU/event; "
                    f"Agent::handle {pl.get('handle_cpu_ns_per_event', 0):.0f} ns CPU/event (target <= 500)",
                    bool(pl["held_met"])))
    elif pl:
        s = pl["sustained_events_per_s"]
        out.append((f">= 1M events/s through the agent, zero drops, {pl.get('jobs', 1)} jobs busy",
                    f"{s / 1e6:.3f} M/s sustained (falls behind at {fmt_rate(pl.get('falls_behind_events_per_s'))}, "
                    f"drops from {fmt_rate(pl.get('drop_point_events_per_s'))}); agent.handle alone "
                    f"{pl['handle_events_per_s'] / 1e6:.3f} M/s, {pl.get('handle_nocheck_events_per_s', 0) / 1e6:.3f} M/s without the pid check",
                    s >= 1e6))
    pol = res.get("policy")
    if pol:
        big = [r for r in pol["policy"] if r["entries"] == 100_000]
        if big:
            out.append(("a 100k-entry policy parsed and compiled in well under a second",
                        f"{big[0]['parse_compile_ms']:.0f} ms ({'release' if not res.get('quick') else 'debug build, --quick'})",
                        big[0]["parse_compile_ms"] < 1000 if not res.get("quick") else None))
    dm = res.get("daemon")
    if dm:
        e = dm["enforcement"]
        leaks = e["triggered_leaks"] + e["stream_leaks"] + e.get("enforced_late", 0)
        out.append(("daemon: nothing sent after `job start` returned gets through (server side)",
                    f"{leaks} leaks over {e['tries']} job starts", leaks == 0))
    mem = res.get("memory")
    if mem and mem["learned_addresses"] < 1_000_000:
        out.append(("agent RSS <= 96 MiB at 1M learned addresses",
                    f"not measured (--quick: {mem['learned_addresses']} addresses, {mem['rss_agent_state_mib']:.1f} MiB)", None))
    elif mem:
        out.append((f"agent RSS <= 96 MiB at {mem['learned_addresses']} learned addresses, {mem['jobs']} jobs",
                    f"{mem['rss_agent_state_mib']:.1f} MiB (agent state), {mem['rss_with_dataplane_mib']:.1f} MiB with the dataplane loaded; "
                    f"BPF maps {mem['maps_memlock_mib']:.1f} MiB memlock",
                    mem["rss_agent_state_mib"] <= 96))
    ch = (mem or {}).get("churn")
    if ch:
        out.append((f"agent RSS flat under churn: {ch['names']} names, end within 10% of after {ch['first']}",
                    f"{ch['rss_first_mib']:.1f} MiB after {ch['first']}, {ch['rss_end_mib']:.1f} MiB at the end: "
                    f"x{ch['end_over_first']:.3f} (peak {ch['rss_peak_mib']:.1f} MiB)",
                    ch["flat"] if not ch.get("quick") else None))
    return out


def fmt_ms(v):
    if not v or not v.get("n"):
        return "-"
    return f"{v['p50']:8.2f} {v['p99']:8.2f} {v['max']:8.2f}  n={v['n']}"


def print_daemon(dm):
    p = print
    e = dm["enforcement"]
    p("\n## Daemon (`ringfence run` in a namespace, driven over its control socket)")
    p(f"  enforcement: {e['tries']} job starts ({e['tries_cgroup']} --cgroup, {e['tries_pid']} --pid, "
      f"{e['tries_cli']} through the CLI): leaks {e['triggered_leaks']} triggered + {e['stream_leaks']} stream "
      f"(server side; control with no job {e['control_received']}/{e['control_sent']} arrived); "
      f"{e['stream_refused_in_jobs']} stream sends refused in jobs; "
      f"enforcing before the answer in {e['enforced_before_return']}/{e['enforced_measured']}, "
      f"after it in {e.get('enforced_late')}, undetermined {e.get('enforced_undetermined')}")
    p(f"  pid jobs: {e['premove_socket_passed']} datagrams of a socket opened before the move got through (not the job's)")
    p(f"  {'latency, ms':<34}{'p50':>8} {'p99':>8} {'max':>8}")
    rows = [("ping (refused at once): baseline", e["ping_ms"]),
            ("job start --cgroup", e["start_ms"]["cgroup"]), ("job start --pid", e["start_ms"]["pid"]),
            ("job end --cgroup", e["end_ms"]["cgroup"]), ("job end --pid", e["end_ms"]["pid"]),
            ("request -> first refused send", e["enforced_after_request_ms"]),
            ("CLI: ringfence --version: baseline", e["cli_version_ms"]),
            ("CLI: job start --cgroup", e["start_ms"]["cli_cgroup"]),
            ("CLI: job start --pid", e["start_ms"]["cli_pid"]),
            ("CLI: job end --cgroup", e["end_ms"]["cli_cgroup"]),
            ("CLI: job end --pid", e["end_ms"]["cli_pid"])]
    for k, s in dm["memory"]["start_ms"].items():
        rows.append((f"job start, jobs {k}", s))
    rows.append(("job end, 256 jobs running", dm["memory"]["end_ms_256"]))
    for label, v in rows:
        p(f"  {label:<34}{fmt_ms(v)}")
    p(f"  {'memory':<22}{'RSS MiB':>9}{'HWM MiB':>9}{'maps MiB':>10}{'allow':>8}{'names':>8}")
    for r in dm["memory"]["rows"]:
        label = f"{r['jobs']} jobs" + (" (all ended)" if r.get("after_end") else "")
        p(f"  {label:<22}{r['rss_mib']:>9.1f}{r['hwm_mib']:>9.1f}{r['maps_memlock_mib']:>10.1f}"
          f"{r['map_entries'].get('allow', 0):>8}{r['map_entries'].get('names', 0):>8}")
    f = dm["flood"]
    p(f"  events under load, {f['jobs']} jobs; with no job {f['baseline_sends_per_s']:.0f} sends/s, "
      f"daemon {f['baseline_daemon_cpu_pct']}% CPU")
    p(f"  {'nice':>6}{'sends/s':>10}{'kernel/s':>10}{'written':>10}{'in flood/s':>11}{'drain/s':>9}{'drops':>9}"
      f"{'cpu %':>7}{'us/ev':>7}{'HWM MiB':>9}{'end p50 ms':>11}")
    for r in f["runs"]:
        p(f"  {r['nice']:>6}{r['sends_per_s']:>10.0f}{r['kernel_events_per_s']:>10.0f}{r['written']:>10}"
          f"{r['written_per_s_in_window']:>11.0f}{r['written_per_s_drain']:>9.0f}{r['ringbuf_drops']:>9}"
          f"{r['daemon_cpu_pct_window']:>7.1f}{r['daemon_us_per_event']:>7.1f}{r['hwm_mib']:>9.1f}"
          f"{r['end_ms'].get('p50', 0):>11.1f}")


def fmt_rate(x):
    return "not reached" if x is None else f"{x / 1e6:.3f} M/s"


def print_table(res):
    p = print
    dp = res.get("dataplane")
    if dp:
        p("\n## Per-packet cost (BPF_PROG_TEST_RUN, beside the empty TC program in the same run)")
        p(f"{'case':<24}{'entries':>9}{'ns':>9}{'empty':>8}{'diff':>9}{'ratio':>8}")
        for r in dp["rows"]:
            p(f"{r['case']:<24}{r['entries']:>9}{r['ns']:>9.1f}{r['empty_ns']:>8.1f}{r['diff_ns']:>9.1f}{r['ratio']:>8.2f}")
    vt = res.get("veth")
    if vt:
        p("\n## veth throughput, ratio to no filter (median [p25..p75] of paired runs)")
        p(f"{'test':<7}{'config':<16}{'ratio':>7}  {'[p25..p75]':<15}{'n':>3}  {'rate':>14}{'pps':>11}  {'cpu (inferred / testrun)':<24}")
        for test, t in vt.items():
            if test == "timing":
                continue
            p(f"{test:<7}{'none':<16}{1:>7.3f}  {'':<15}{t['none']['n']:>3}  {fmt_value(test, t['none']['median']):>14}{t['none_pps']:>11.0f}")
            for name, c in t["configs"].items():
                r = c["ratio"]
                cpu = "-" if c["cpu_pct_inferred"] is None else f"{c['cpu_pct_inferred']:.1f}%"
                if "cpu_pct_testrun" in c:
                    cpu += f" / {c['cpu_pct_testrun']:.1f}%"
                if "allow_entries" in c:
                    cpu += f"  (trie {c['allow_entries']}, resolved in {c['resolve_s']:.1f} s)"
                p(f"{'':<7}{name:<16}{r['median']:>7.3f}  [{r['p25']:.3f}..{r['p75']:.3f}] {r['n']:>3}  "
                  f"{fmt_value(test, c['value']['median']):>14}{c['pps']:>11.0f}  {cpu:<24}")
    pl = res.get("pipeline")
    if pl:
        p(f"\n## Event pipeline (ring buffer -> Agent::handle -> JSON Lines writer, {pl.get('jobs', 1)} jobs)")
        p(f"agent.handle alone: {pl['handle_events_per_s']:.0f} events/s ({pl['handle_ns_per_event']:.0f} ns/event, "
          f"{pl.get('handle_cpu_ns_per_event', 0):.0f} ns CPU/event) with the "
          f"pid check against the job cgroup, {pl.get('handle_nocheck_events_per_s', 0):.0f} events/s without")
        rows = []
        if "producer_alone" in pl:
            rows.append(("max, no agent", pl["producer_alone"]))
            rows.append((f"1M held, file", pl["held"]))
        rows += [("max" if s["offered"] == 0 else str(s["offered"]), s) for s in pl["steps"]]
        for label, s in rows:
            p(f"  offered {label:>14}  produced {s['produced_per_s']:>10.0f}/s  "
              f"consumed {s['consumed_per_s']:>10.0f}/s  drops {s['drops']:>8}  kept up {str(s.get('kept_up')):<5}  "
              f"consumer {s.get('consumer_cpu_ns_per_event', 0):>6.0f} ns CPU/event")
        if "held" in pl:
            p(f"  held 1M/s: {pl['file_lines']} lines in the file for {pl['held']['consumed']} records; agent lost "
              f"{pl['agent_decode_errors']} (decode) + {pl['agent_suppressed']} (suppressed) + {pl['agent_dropped']} (dropped)")
        p(f"  sustained {pl['sustained_events_per_s']:.0f}/s, falls behind at {fmt_rate(pl.get('falls_behind_events_per_s'))}, "
          f"drops from {fmt_rate(pl.get('drop_point_events_per_s'))}")
    cr = res.get("criterion")
    if cr:
        p("\n## Userspace (criterion, mean ns per call [95% CI])")
        for k, v in cr.items():
            p(f"  {k:<40}{v['ns']:>10.1f}  [{v['ci95'][0]:.1f}..{v['ci95'][1]:.1f}]")
    mem = res.get("memory")
    if mem:
        p("\n## Memory")
        p(f"  agent RSS: idle {mem['rss_idle_mib']:.1f} MiB, with {mem['learned_addresses']} learned addresses over "
          f"{mem['jobs']} jobs {mem['rss_agent_state_mib']:.1f} MiB, plus dataplane {mem['rss_with_dataplane_mib']:.1f} MiB")
        for m in mem["maps"]:
            p(f"  map {m['name']:<18}{m['memlock'] / 1048576:>8.1f} MiB")
        p(f"  maps total {mem['maps_memlock_mib']:.1f} MiB (memlock, as bpftool map show reports it)")
        ch = mem.get("churn")
        if ch:
            p(f"  churn: {ch['names']} names at 10k/h over {ch['jobs']} jobs, {ch['addresses_per_name']} addresses each: "
              f"RSS {ch['rss_first_mib']:.1f} MiB after {ch['first']}, {ch['rss_end_mib']:.1f} MiB at the end "
              f"(x{ch['end_over_first']:.3f}, peak {ch['rss_peak_mib']:.1f} MiB)")
    pol = res.get("policy")
    if pol:
        p("\n## Policy size (parse+compile, then load into the maps; x1k: per-entry time / the 1k row's)")
        p(f"  {'entries':>9}{'static':>9}{'names':>8}{'parse+compile':>15}{'x1k':>7}{'load':>10}{'allow B/entry':>15}")
        for r in pol["policy"]:
            load = f"{r['load_ms']:.0f} ms" if r.get("load_ms") is not None else "-"
            p(f"  {r['entries']:>9}{r['static']:>9}{r['names']:>8}{r['parse_compile_ms']:>12.1f} ms{r['ratio_to_1k']:>7.2f}"
              f"{load:>10}{r['allow_bytes_per_static_entry']:>15.0f}")
    dm = res.get("daemon")
    if dm:
        print_daemon(dm)
    xd = res.get("xdp")
    if xd:
        p("\n## Interface jobs: XDP pre-judge against TC (rfbench xdp; 64-byte UDP, CPU ns per packet on the sending CPU)")
        for dev, rows in xd["xdp"].items():
            p(f"  {dev:<5}" + "".join(f"{k} {v['ns_per_packet']:.0f}  " for k, v in rows.items() if isinstance(v, dict)))
            p("       " + "".join(f"{k} x{v:.3f}  " for k, v in rows.items() if not isinstance(v, dict)))
    vf = res.get("verifier")
    if vf:
        c = vf["comparison"]
        p(f"\n## Verifier cost on {c['kernel']} ({vf['measured']['release']}): instructions processed, "
          f"beside {VERIFIER_FILE.name}")
        p(f"  {'program':<24}{'now':>10}{'baseline':>10}{'change':>9}")
        for r in c["rows"]:
            g = "-" if r["growth"] is None else f"{r['growth'] * 100:+.1f}%"
            p(f"  {r['program']:<24}{r['now'] if r['now'] is not None else '-':>10}"
              f"{r['baseline'] if r['baseline'] is not None else '-':>10}{g:>9}")
        for w in c["warnings"]:
            p(f"  WARNING: {w}")
        for n in c["notes"]:
            p(f"  note: {n}")
    p("\n## Targets" + (" (--quick: indicative only, one pair, few packets)" if res.get("quick") else ""))
    for label, got, ok in targets_report(res):
        p(f"  [{'n/a ' if ok is None else 'met ' if ok else 'MISS'}] {label}: {got}")


def verifier_warnings(res):
    """The verifier part's warnings (growth past bench/verifier.json's warn_growth)."""
    return (res.get("verifier") or {}).get("comparison", {}).get("warnings", [])


def check(res, baseline_path, quick):
    """Regressions against the baseline. Returns a list of messages (empty = fine)."""
    if not baseline_path.exists():
        return [f"no baseline at {baseline_path}"]
    base = json.loads(baseline_path.read_text())
    tol = base.get("tolerance", {})
    ratio_tol = tol.get("ratio_abs", 0.05)
    ns_rel, ns_abs = tol.get("ns_rel", 0.5), tol.get("ns_abs", 20)
    bad = []
    for test, t in base.get("veth", {}).items():
        for name, c in t.get("configs", {}).items():
            if not name.startswith("ringfence"):
                continue  # only our own regressions gate; the rivals are context
            cur = res.get("veth", {}).get(test, {}).get("configs", {}).get(name)
            if cur is None:
                continue
            b, n = c["ratio"]["median"], cur["ratio"]["median"]
            # The band both runs' spreads allow, never less than ratio_abs: on a noisy
            # machine a 0.05 gate alone would flap.
            iqr = lambda r: r["p75"] - r["p25"]
            t = max(ratio_tol, (iqr(c["ratio"]) + iqr(cur["ratio"])) / 2)
            if n < b - t:
                bad.append(f"veth {test} {name}: ratio {n:.3f} < baseline {b:.3f} - {t:.3f}")
    brow = {(r["case"], r["entries"]): r for r in base.get("dataplane", {}).get("rows", [])}
    for r in res.get("dataplane", {}).get("rows", []):
        b = brow.get((r["case"], r["entries"]))
        if b and r["diff_ns"] > b["diff_ns"] * (1 + ns_rel) + ns_abs:
            bad.append(f"dataplane {r['case']}@{r['entries']}: +{r['diff_ns']:.0f} ns over empty, "
                       f"baseline +{b['diff_ns']:.0f} ns (tolerance x{1 + ns_rel} + {ns_abs} ns)")
    bp, cp = base.get("pipeline"), res.get("pipeline")
    # CPU time per event where both runs have it (wall time counts other processes' turns).
    if bp and cp and bp.get("handle_cpu_ns_per_event") and cp.get("handle_cpu_ns_per_event"):
        if cp["handle_cpu_ns_per_event"] > bp["handle_cpu_ns_per_event"] * (1 + tol.get("rate_rel", 0.3)):
            bad.append(f"agent.handle: {cp['handle_cpu_ns_per_event']:.0f} ns CPU/event > baseline "
                       f"{bp['handle_cpu_ns_per_event']:.0f} + 30%")
    elif bp and cp and cp["handle_events_per_s"] < bp["handle_events_per_s"] * (1 - tol.get("rate_rel", 0.3)):
        bad.append(f"agent.handle: {cp['handle_events_per_s']:.0f}/s < baseline {bp['handle_events_per_s']:.0f}/s - 30%")
    return bad


def memory(args, outdir):
    """The agent at 1M learned addresses, then (a process of its own: RSS does not go back
    down after the first) under churn."""
    mem = run_rfbench(args.rfbench, "memory", outdir / "memory.json", args.quick)
    mem["churn"] = run_rfbench(args.rfbench, "churn", outdir / "churn.json", args.quick)
    return mem


# ------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds, for CI: few packets, 1 pair, short runs")
    ap.add_argument("--check", action="store_true", help="compare to bench/baseline.json; exit 1 on a regression (never with --quick)")
    ap.add_argument("--only", default="dataplane,veth,pipeline,criterion,memory,daemon,policy,verifier,xdp",
                    help="comma-separated parts to run")
    ap.add_argument("--pairs", type=int, default=0, help="override the number of pairs per veth test")
    ap.add_argument("--max-minutes", type=float, default=40, help="time budget of the veth part")
    ap.add_argument("--rfbench", required=True)
    ap.add_argument("--ringfence", required=True)
    ap.add_argument("--baseline", default=str(BENCH / "baseline.json"))
    ap.add_argument("--write-baseline", action="store_true", help="write this run as bench/baseline.json")
    args = ap.parse_args()
    parts = set(args.only.split(","))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = BENCH / "out" / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    res = {"stamp": stamp, "quick": args.quick,
           "machine": {"host": platform.node(), "kernel": platform.release(),
                       "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
           "git": sh(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT).stdout.strip()}
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        res["machine"]["cpu"] = cpu[0] if cpu else ""
    except OSError:
        pass
    res["machine"]["iptables"] = sh(["iptables", "-V"], check=False).stdout.strip()

    failures = []

    def part(name, fn):
        if name not in parts:
            return
        try:
            res[name] = fn()
        except Exception as e:  # one broken part must not hide the others' numbers
            if getattr(e, "result", None):
                res[name] = e.result
            failures.append(f"{name}: {e}")
            log(f"!! {name} failed: {e}")
            if os.environ.get("RFBENCH_DEBUG"):
                import traceback
                traceback.print_exc()

    part("dataplane", lambda: run_rfbench(args.rfbench, "dataplane", outdir / "dataplane.json", args.quick))
    part("pipeline", lambda: run_rfbench(args.rfbench, "pipeline", outdir / "pipeline.json", args.quick))
    part("memory", lambda: memory(args, outdir))
    part("policy", lambda: run_rfbench(args.rfbench, "policy", outdir / "policy.json", args.quick))
    part("daemon", lambda: run_rfbench(args.rfbench, "daemon", outdir / "daemon.json", args.quick,
                                       ["--ringfence", args.ringfence]))
    part("criterion", lambda: criterion(args))
    part("xdp", lambda: run_rfbench(args.rfbench, "xdp", outdir / "xdp.json", args.quick))
    part("verifier", lambda: run_rfbench(args.rfbench, "verifier", outdir / "verifier.json", False,
                                         ["--baseline", str(VERIFIER_FILE)] + (["--record"] if args.write_baseline else [])))
    if "veth" in parts:
        log("== veth throughput")
    part("veth", lambda: veth(args, args.rfbench, args.ringfence, res.get("dataplane")))
    for name, err in res.get("veth", {}).pop("broken", {}).items():
        failures.append(f"veth {name}: {err}")
    res["machine"]["loadavg_end"] = os.getloadavg()

    (outdir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    latest = BENCH / "out" / "latest.json"
    latest.write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    print(f"\nload average at start {res['machine']['loadavg_start']}, at end {res['machine']['loadavg_end']} "
          f"({res['machine']['cpus']} CPUs): above ~0.5 the numbers are noisy.")
    print(f"results: {outdir / 'results.json'}")
    # The verifier figures live in bench/verifier.json, per kernel (`rfbench verifier --record`
    # wrote this kernel's above); a run of that part alone leaves baseline.json as it is.
    if args.write_baseline and parts == {"verifier"}:
        print(f"verifier figures written: {VERIFIER_FILE} (baseline.json unchanged)")
    elif args.write_baseline:
        res = {k: v for k, v in res.items() if k != "verifier"}
        res["tolerance"] = {"ratio_abs": 0.05, "ns_rel": 0.5, "ns_abs": 20, "rate_rel": 0.3,
                            "note": "a regression is a ringfence veth ratio below baseline - max(ratio_abs, mean of both runs' p75-p25), "
                                    "a per-packet diff above baseline * (1 + ns_rel) + ns_abs, or "
                                    "agent.handle below baseline * (1 - rate_rel)"}
        Path(args.baseline).write_text(json.dumps(res, indent=1) + "\n")
        print(f"baseline written: {args.baseline}")
    rc = 0
    if failures:
        print("\nFAILED parts (functional, not timing):\n  " + "\n  ".join(failures))
        rc = 1
    if args.check:
        vw = verifier_warnings(res)
        if vw:
            print(f"\nverifier cost warnings (growth over {VERIFIER_FILE.name}; not a failure):")
            for w in vw:
                print("  " + w)
        bad = check(res, Path(args.baseline), args.quick)
        if bad:
            print("\nregressions against the baseline" + (" (--quick: reported, not enforced)" if args.quick else "") + ":")
            for b in bad:
                print("  " + b)
            if not args.quick:
                rc = rc or 3
        else:
            print("\nno regression against the baseline")
    return rc


if __name__ == "__main__":
    # Ctrl-C / TERM: raise, so every `with Testbed()` removes what it created.
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
