//! Throwaway network-namespace hosts for the demo and the integration tests.
//!
//! A [`Testbed`] is two namespaces joined by a veth pair: a *client* where the job runs and a
//! *server* that plays every remote host (DNS resolvers, HTTP endpoints, a fake cloud
//! metadata service). All addresses are documentation ranges, so nothing here can reach or
//! impersonate a real host. Dropping the testbed (also while unwinding from a panic) kills
//! what it started and deletes both namespaces.
//!
//! iproute2 is driven as a command rather than through a netlink crate: it is what a reader
//! would type to reproduce a failure, and its error messages are already good.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Client address on the shared link.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Client IPv6 address on the shared link.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// Server address on the shared link; the client's default gateway.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Server IPv6 address on the shared link; the client's IPv6 default gateway.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The resolver the client's resolv.conf names.
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// The resolver's IPv6 address.
pub const DNS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x53);
/// A second resolver address, routed through the server: one the job is not told about.
pub const ALT_DNS_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// The cloud metadata address, present on the server so that reaching it is observable.
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Host numbers present on the server in each endpoint range: `198.51.100.N` (on the link),
/// `203.0.113.N` (routed), `2001:db8:2::N` (routed; N written in hex digits as decimal-looking
/// text, e.g. `2001:db8:2::15`).
pub const ENDPOINT_HOSTS: std::ops::RangeInclusive<u8> = 10..=30;

/// `198.51.100.n` — an endpoint on the client–server link (n in [`ENDPOINT_HOSTS`]).
pub fn link_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n)
}
/// `203.0.113.n` — an endpoint routed through the server (n in [`ENDPOINT_HOSTS`]).
pub fn routed_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, n)
}
/// `2001:db8:2::n` — an IPv6 endpoint routed through the server; `n` is read as hex digits
/// written in decimal, so `routed_v6(15)` is `2001:db8:2::15`, matching how tests spell it.
pub fn routed_v6(n: u8) -> Ipv6Addr {
    let hexish = u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits");
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, hexish)
}

/// Errors from building or driving a testbed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool the testbed drives is not installed.
    #[error("`{tool}` not found (searched PATH, /usr/sbin, /sbin); install the Debian package `{package}`")]
    MissingTool {
        /// Command name.
        tool: &'static str,
        /// Debian package that provides it.
        package: &'static str,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, as a reader would type it.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr (trimmed).
        stderr: String,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being attempted.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A service did not come up.
    #[error("{0}")]
    NotReady(String),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Tools the testbed may need, with the Debian package that ships each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("curl", "curl"),
];

/// Finds `tool` on PATH or in the sbin directories (a non-login root shell may lack them),
/// or says which Debian package to install.
pub fn require_tool(tool: &'static str) -> Result<PathBuf> {
    let package = TOOLS
        .iter()
        .find(|(t, _)| *t == tool)
        .map(|(_, p)| *p)
        .unwrap_or(tool);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(Error::MissingTool { tool, package })
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; an unsuccessful exit becomes an error naming the command and
/// quoting its stderr. Returns stdout.
fn run(cmd: &mut Command) -> Result<String> {
    run_with_input(cmd, None)
}

fn run_with_input(cmd: &mut Command, input: Option<&str>) -> Result<String> {
    let command = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("starting `{command}`")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(io_err(format!("writing to `{command}`")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for `{command}`")))?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One DNS record served by [`Testbed::start_dns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsRecord {
    /// `name IN A addr`
    A(String, Ipv4Addr),
    /// `name IN AAAA addr`
    Aaaa(String, Ipv6Addr),
    /// `name IN CNAME target` (the target should have its own A/AAAA record).
    Cname(String, String),
}

impl DnsRecord {
    /// An A record.
    pub fn a(name: &str, addr: Ipv4Addr) -> Self {
        Self::A(name.into(), addr)
    }
    /// An AAAA record.
    pub fn aaaa(name: &str, addr: Ipv6Addr) -> Self {
        Self::Aaaa(name.into(), addr)
    }
    /// A CNAME record.
    pub fn cname(name: &str, target: &str) -> Self {
        Self::Cname(name.into(), target.into())
    }
}

/// How [`Testbed::start_dns`] runs its server.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// TTL of every answer, in seconds.
    pub ttl: u32,
    /// Addresses to listen on (UDP and TCP port 53). Empty means [`DNS_V4`] and [`DNS_V6`].
    /// Any other address must already exist in the server namespace (see
    /// [`Testbed::add_server_addr`]); [`ALT_DNS_V4`] always does.
    pub listen: Vec<IpAddr>,
}

impl Default for DnsOptions {
    fn default() -> Self {
        Self {
            ttl: 60,
            listen: Vec::new(),
        }
    }
}

struct DnsInstance {
    child: Child,
    log: PathBuf,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A client and a server network namespace joined by a veth pair. See the module docs.
pub struct Testbed {
    client_ns: String,
    server_ns: String,
    client_if: String,
    server_if: String,
    ip: PathBuf,
    workdir: PathBuf,
    resolv_dir: PathBuf,
    dns: Mutex<Vec<DnsInstance>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    hits: Mutex<HashMap<(char, SocketAddr), Arc<AtomicUsize>>>,
}

impl Testbed {
    /// Creates both namespaces, the link, addresses and routes, and the client's resolv.conf.
    /// Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `ip netns`).
    pub fn new() -> Result<Self> {
        let ip = require_tool("ip")?;
        let pid = std::process::id();
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let base = format!("rf-{pid}-{n}");
        // Interface names are limited to 15 bytes; hex keeps "rf<pid>x<n>c" short enough.
        let if_base = format!("rf{pid:x}x{n:x}");
        let client_ns = format!("{base}-c");
        let tb = Testbed {
            resolv_dir: Path::new("/etc/netns").join(&client_ns),
            client_ns,
            server_ns: format!("{base}-s"),
            client_if: format!("{if_base}c"),
            server_if: format!("{if_base}s"),
            ip,
            workdir: std::env::temp_dir().join(&base),
            dns: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            hits: Mutex::new(HashMap::new()),
        };
        // If setup fails half-way, dropping `tb` removes whatever was created.
        tb.setup()?;
        Ok(tb)
    }

    fn setup(&self) -> Result<()> {
        remove_stale_testbeds(&self.ip);
        // Names carry our pid; any namespace already bearing them was left by an earlier,
        // killed process that had the same pid.
        for ns in [&self.client_ns, &self.server_ns] {
            if Path::new("/run/netns").join(ns).exists() {
                let _ = run(Command::new(&self.ip).args(["netns", "del", ns]));
            }
        }
        fs::create_dir_all(&self.workdir)
            .map_err(io_err(format!("creating {}", self.workdir.display())))?;
        run(Command::new(&self.ip).args(["netns", "add", &self.client_ns]))?;
        run(Command::new(&self.ip).args(["netns", "add", &self.server_ns]))?;
        // Creating both ends directly inside their namespaces keeps the host's own
        // interface list untouched, even for a moment.
        run(Command::new(&self.ip).args([
            "link",
            "add",
            "name",
            &self.client_if,
            "netns",
            &self.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            &self.server_if,
            "netns",
            &self.server_ns,
        ]))?;

        let c = &self.client_if;
        // `nodad`: without it, IPv6 addresses stay tentative for a second or two and the
        // first test packets would fail for reasons that have nothing to do with ringfence.
        let client = format!(
            "link set lo up\n\
             link set {c} up\n\
             addr add {CLIENT_V4}/24 dev {c}\n\
             addr add {CLIENT_V6}/64 dev {c} nodad\n\
             route add default via {SERVER_V4}\n\
             route add default via {SERVER_V6}\n"
        );
        self.batch(&self.client_ns, &client)?;

        let s = &self.server_if;
        let mut server = format!(
            "link set lo up\n\
             link set {s} up\n\
             addr add {SERVER_V4}/24 dev {s}\n\
             addr add {SERVER_V6}/64 dev {s} nodad\n\
             addr add {DNS_V4}/24 dev {s}\n\
             addr add {DNS_V6}/64 dev {s} nodad\n\
             addr add {ALT_DNS_V4}/32 dev lo\n\
             addr add {METADATA_V4}/32 dev lo\n"
        );
        // On-link endpoints live on the veth (answered by ARP/ND); routed ones on lo, so the
        // client reaches them only through its default routes.
        for n in ENDPOINT_HOSTS {
            let _ = writeln!(server, "addr add {}/24 dev {s}", link_v4(n));
            let _ = writeln!(server, "addr add {}/32 dev lo", routed_v4(n));
            let _ = writeln!(server, "addr add {}/128 dev lo nodad", routed_v6(n));
        }
        self.batch(&self.server_ns, &server)?;

        fs::create_dir_all(&self.resolv_dir)
            .map_err(io_err(format!("creating {}", self.resolv_dir.display())))?;
        // `ip netns exec` bind-mounts this file over /etc/resolv.conf for processes it starts.
        fs::write(
            self.resolv_dir.join("resolv.conf"),
            format!("nameserver {DNS_V4}\n"),
        )
        .map_err(io_err(format!(
            "writing {}/resolv.conf",
            self.resolv_dir.display()
        )))?;
        Ok(())
    }

    fn batch(&self, ns: &str, commands: &str) -> Result<()> {
        run_with_input(
            Command::new(&self.ip).args(["-n", ns, "-batch", "-"]),
            Some(commands),
        )
        .map(drop)
    }

    /// Name of the client namespace (`ip netns exec` it, or pass to `ip -n`).
    pub fn client_ns(&self) -> &str {
        &self.client_ns
    }
    /// Name of the server namespace.
    pub fn server_ns(&self) -> &str {
        &self.server_ns
    }
    /// The client's end of the veth pair (inside the client namespace).
    pub fn client_if(&self) -> &str {
        &self.client_if
    }
    /// The server's end of the veth pair (inside the server namespace).
    pub fn server_if(&self) -> &str {
        &self.server_if
    }
    /// The resolver named in the client's resolv.conf.
    pub fn dns_addr_v4(&self) -> Ipv4Addr {
        DNS_V4
    }
    /// The resolver's IPv6 address.
    pub fn dns_addr_v6(&self) -> Ipv6Addr {
        DNS_V6
    }
    /// A scratch directory removed with the testbed.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Adds one more address to the server's loopback (reached by the client via its default
    /// routes), for endpoints outside the preset ranges.
    pub fn add_server_addr(&self, addr: IpAddr) -> Result<()> {
        let prefix = if addr.is_ipv4() { "32" } else { "128" };
        let mut cmd = Command::new(&self.ip);
        cmd.args(["-n", &self.server_ns, "addr", "add"])
            .arg(format!("{addr}/{prefix}"))
            .args(["dev", "lo"]);
        if addr.is_ipv6() {
            cmd.arg("nodad");
        }
        run(&mut cmd).map(drop)
    }

    /// A command that runs `program args…` inside the client namespace, with the testbed's
    /// resolv.conf in place of /etc/resolv.conf.
    pub fn client_cmd<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ns_cmd(&self.client_ns, program, args)
    }

    /// A command that runs inside the server namespace.
    pub fn server_cmd<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ns_cmd(&self.server_ns, program, args)
    }

    fn ns_cmd<I, S>(&self, ns: &str, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        cmd
    }

    /// Starts dnsmasq in the server namespace serving exactly `records` (UDP and TCP), and
    /// returns once it answers a query sent from the client namespace on every listen
    /// address. Names under `.test` that have no record get NXDOMAIN. May be called more than
    /// once with different listen addresses (e.g. a second, unannounced resolver).
    pub fn start_dns(&self, records: &[DnsRecord], opts: &DnsOptions) -> Result<()> {
        let dnsmasq = require_tool("dnsmasq")?;
        let dig = require_tool("dig")?;
        let listen: Vec<IpAddr> = if opts.listen.is_empty() {
            vec![DNS_V4.into(), DNS_V6.into()]
        } else {
            opts.listen.clone()
        };
        let mut dns = self.dns.lock().unwrap_or_else(|e| e.into_inner());
        let log = self.workdir.join(format!("dnsmasq-{}.log", dns.len()));
        let ttl = opts.ttl;
        let mut args: Vec<String> = vec![
            // Never read the host's /etc/dnsmasq.conf or /etc/dnsmasq.d.
            "--conf-file=/dev/null".into(),
            "--keep-in-foreground".into(),
            "--pid-file".into(),
            // Stay root: the log file lives in a root-owned scratch directory.
            "--user=root".into(),
            "--group=root".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--no-poll".into(),
            "--bind-interfaces".into(),
            "--port=53".into(),
            // Answer NXDOMAIN for unknown .test names instead of REFUSED, like a real zone.
            "--local=/test/".into(),
            "--log-queries".into(),
            format!("--log-facility={}", log.display()),
            format!("--local-ttl={ttl}"),
            format!("--auth-ttl={ttl}"),
        ];
        for addr in &listen {
            args.push(format!("--listen-address={addr}"));
        }
        for r in records {
            args.push(match r {
                DnsRecord::A(name, a) => format!("--host-record={name},{a},{ttl}"),
                DnsRecord::Aaaa(name, a) => format!("--host-record={name},{a},{ttl}"),
                DnsRecord::Cname(name, target) => format!("--cname={name},{target},{ttl}"),
            });
        }
        let mut cmd = self.server_cmd(&dnsmasq, &args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("starting `{}`", describe(&cmd))))?;

        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in &listen {
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut stderr);
                    }
                    return Err(Error::Command {
                        command: describe(&cmd),
                        status: status.to_string(),
                        stderr: stderr.trim().to_string(),
                    });
                }
                // dig exits 0 on any reply (NXDOMAIN included) and 9 on none.
                let probe = self
                    .client_cmd(
                        &dig,
                        [
                            format!("@{addr}"),
                            "+time=1".into(),
                            "+tries=1".into(),
                            "ready.probe.test".into(),
                        ],
                    )
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if matches!(probe, Ok(s) if s.success()) {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::NotReady(format!(
                        "dnsmasq on {addr} in {} did not answer within 10 s",
                        self.server_ns
                    )));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        dns.push(DnsInstance { child, log });
        Ok(())
    }

    /// Everything the DNS servers logged so far (one `query[A] name from …` line per query
    /// that reached them), all instances concatenated.
    pub fn dns_log(&self) -> String {
        let dns = self.dns.lock().unwrap_or_else(|e| e.into_inner());
        dns.iter()
            .map(|d| fs::read_to_string(&d.log).unwrap_or_default())
            .collect()
    }

    /// How many queries for exactly `name` reached the DNS servers (probes excluded).
    pub fn dns_queries_for(&self, name: &str) -> usize {
        let needle = format!(" {name} from ");
        self.dns_log()
            .lines()
            .filter(|l| l.contains("query[") && l.contains(&needle))
            .count()
    }

    /// Serves HTTP/1.1 on each address in the server namespace: every request gets `200 OK`
    /// with the body `hello from <addr>\n`. Stops when the testbed is dropped.
    pub fn start_http(&self, addrs: &[SocketAddr]) -> Result<()> {
        let addrs = addrs.to_vec();
        let listeners = in_netns(&self.server_ns, move || {
            addrs
                .iter()
                .map(|a| TcpListener::bind(a).map_err(io_err(format!("binding HTTP on {a}"))))
                .collect::<Result<Vec<_>>>()
        })??;
        for listener in listeners {
            let addr = listener.local_addr().map_err(io_err("local_addr"))?;
            listener
                .set_nonblocking(true)
                .map_err(io_err(format!("nonblocking {addr}")))?;
            let hits = self.counter('t', addr);
            let stop = self.stop.clone();
            let handle = thread::spawn(move || serve_http(listener, addr, hits, stop));
            self.threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(handle);
        }
        Ok(())
    }

    /// Echoes every UDP datagram back to its sender, on each address in the server namespace.
    pub fn start_udp_echo(&self, addrs: &[SocketAddr]) -> Result<()> {
        let addrs = addrs.to_vec();
        let sockets = in_netns(&self.server_ns, move || {
            addrs
                .iter()
                .map(|a| UdpSocket::bind(a).map_err(io_err(format!("binding UDP on {a}"))))
                .collect::<Result<Vec<_>>>()
        })??;
        for sock in sockets {
            let addr = sock.local_addr().map_err(io_err("local_addr"))?;
            // A short timeout lets the thread notice `stop` without a wake-up mechanism.
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(io_err(format!("timeout on {addr}")))?;
            let hits = self.counter('u', addr);
            let stop = self.stop.clone();
            let handle = thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                        hits.fetch_add(1, Ordering::Relaxed);
                        let _ = sock.send_to(&buf[..n], peer);
                    }
                }
            });
            self.threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(handle);
        }
        Ok(())
    }

    fn counter(&self, proto: char, addr: SocketAddr) -> Arc<AtomicUsize> {
        self.hits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((proto, addr))
            .or_default()
            .clone()
    }

    /// Connections accepted so far by the HTTP responder on `addr` (0 if none runs there).
    /// A blocked connection must leave this unchanged: it is the server-side proof.
    pub fn http_hits(&self, addr: SocketAddr) -> usize {
        self.counter('t', addr).load(Ordering::Relaxed)
    }

    /// Datagrams received so far by the UDP echo responder on `addr`.
    pub fn udp_hits(&self, addr: SocketAddr) -> usize {
        self.counter('u', addr).load(Ordering::Relaxed)
    }

    /// Kills every process still running in `ns`; they would otherwise keep the namespace
    /// (and its veth) alive after `ip netns del`.
    fn kill_ns_processes(&self, ns: &str) {
        if let Ok(out) = run(Command::new(&self.ip).args(["netns", "pids", ns])) {
            for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self
            .threads
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        for d in self
            .dns
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        for ns in [self.client_ns.clone(), self.server_ns.clone()] {
            self.kill_ns_processes(&ns);
            if Path::new("/run/netns").join(&ns).exists() {
                // Deleting the namespace destroys its end of the veth, and with it the pair.
                let _ = run(Command::new(&self.ip).args(["netns", "del", &ns]));
            }
        }
        let _ = fs::remove_dir_all(&self.resolv_dir);
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// Deletes testbeds left behind by processes that were killed before their Drop ran
/// (namespaces named `rf-<pid>-<n>-c|s` whose pid is gone).
fn remove_stale_testbeds(ip: &Path) {
    let Ok(list) = run(Command::new(ip).args(["netns", "list"])) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let mut parts = name.split('-');
        if parts.next() != Some("rf") {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = run(Command::new(ip).args(["netns", "del", name]));
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
        let _ = fs::remove_dir_all(std::env::temp_dir().join(name.trim_end_matches(['c', 's'])));
    }
}

/// Runs `f` on a fresh thread that has entered network namespace `ns`. Sockets created there
/// stay in `ns` for their whole life, so they can then be served from any thread; the calling
/// thread's own namespace is never changed.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = Path::new("/run/netns").join(ns);
    let file = fs::File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    let what = format!("entering network namespace {ns}");
    thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::Io {
                what,
                source: e.into(),
            })
            .map(|()| f())
    })
    .join()
    .unwrap_or_else(|_| Err(Error::NotReady(format!("thread in {ns} panicked"))))
}

fn serve_http(
    listener: TcpListener,
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                hits.fetch_add(1, Ordering::Relaxed);
                // One thread per connection so a stalled client cannot hold up the others.
                thread::spawn(move || {
                    let _ = answer_http(stream, addr);
                });
            }
            // Nonblocking accept polled every few ms: cheap, and stops promptly on Drop.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn answer_http(mut stream: TcpStream, addr: SocketAddr) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if req.len() > 64 * 1024 {
            return Ok(());
        }
    };
    // Read a POST body before answering: closing with unread data makes the kernel send a
    // RST, which curl reports as a failure even though the request was served.
    let head = String::from_utf8_lossy(&req[..header_end]).to_ascii_lowercase();
    let body_len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut have = req.len() - header_end;
    while have < body_len {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        have += n;
    }
    let body = format!("hello from {addr}\n");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
