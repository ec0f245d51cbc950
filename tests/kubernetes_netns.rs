//! `ringfence kubernetes`, the node agent for Actions Runner Controller, run for real against
//! a real daemon in a testbed's client namespace: a cgroup v2 tree laid out as kubelet lays
//! it out (the systemd driver's kubepods.slice/… and the cgroupfs driver's kubepods/…, three
//! QoS classes), processes placed in the pods' container cgroups making real requests to the
//! testbed's servers (what got through is read on the server side). The Kubernetes API is
//! a stand-in: a small HTTP server in this test (in the client namespace) that answers the
//! agent's pod list and watch the way the API server does (PodList JSON; a watch stream of
//! one JSON event per line), and records what the agent asked (selectors, bearer token).
//! Needs root; never skipped.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{in_job, Daemon};
use common::*;
use serde_json::{json, Value};
use testbed::link_v4;

const NODE: &str = "rf15-node";

/// TLS in front of the API stand-in, as the API server speaks it: terminates TLS with a
/// certificate for 127.0.0.1 signed by a test CA and pipes the bytes to the plain server.
const TLS_FRONT: &str = r#"
import socket, ssl, sys, threading
cert, key, listen_port, upstream_port, ready = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(listen_port)))
srv.listen(16)
open(ready, "w").close()
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
    except (ssl.SSLError, OSError):
        c.close()
        return
    u = socket.create_connection(("127.0.0.1", int(upstream_port)))
    threading.Thread(target=pump, args=(u, t), daemon=True).start()
    pump(t, u)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A test CA and a certificate for 127.0.0.1 signed by it: (ca.crt, cert, key).
fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("api.crt"),
        dir.join("api.key"),
        dir.join("api.csr"),
    );
    let ext = dir.join("api.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&std::ffi::OsStr]| {
        let st = Command::new("openssl")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    let o = std::ffi::OsStr::new;
    openssl(&[
        o("req"),
        o("-x509"),
        o("-newkey"),
        o("rsa:2048"),
        o("-nodes"),
        o("-days"),
        o("1"),
        o("-subj"),
        o("/CN=rf15 test cluster CA"),
        o("-keyout"),
        ca_key.as_os_str(),
        o("-out"),
        ca.as_os_str(),
    ]);
    openssl(&[
        o("req"),
        o("-newkey"),
        o("rsa:2048"),
        o("-nodes"),
        o("-subj"),
        o("/CN=127.0.0.1"),
        o("-keyout"),
        key.as_os_str(),
        o("-out"),
        csr.as_os_str(),
    ]);
    openssl(&[
        o("x509"),
        o("-req"),
        o("-in"),
        csr.as_os_str(),
        o("-CA"),
        ca.as_os_str(),
        o("-CAkey"),
        ca_key.as_os_str(),
        o("-CAcreateserial"),
        o("-days"),
        o("1"),
        o("-extfile"),
        ext.as_os_str(),
        o("-out"),
        cert.as_os_str(),
    ]);
    (ca, cert, key)
}
const TOKEN: &str = "rf15-service-account-token";

/// A kubelet-like cgroup tree under `<cgroup2>/rf15-kubelet-<pid>-<n>`; on drop, whatever is in
/// it is killed and the tree removed, deepest first.
struct KubeletTree {
    root: PathBuf,
}

impl KubeletTree {
    fn new() -> KubeletTree {
        let cg2 = ringfence::job::cgroup::find_cgroup2().expect("cgroup2");
        // One per test: the tests of this file run at once.
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = cg2.join(format!("rf15-kubelet-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        KubeletTree { root }
    }

    /// Makes `rel` (a pod's cgroup) and a container cgroup below it; returns the container's.
    fn pod(&self, rel: &str, container: &str) -> PathBuf {
        let c = self.root.join(rel).join(container);
        std::fs::create_dir_all(&c).unwrap();
        c
    }
}

fn dirs_deepest_first(p: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                dirs_deepest_first(&e.path(), out);
            }
        }
    }
    out.push(p.to_path_buf());
}

impl Drop for KubeletTree {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.kill"), "1");
        let mut dirs = Vec::new();
        dirs_deepest_first(&self.root, &mut dirs);
        for d in dirs {
            for _ in 0..100 {
                if std::fs::remove_dir(&d).is_ok() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The API server stand-in. `GET /api/v1/pods?…` answers the PodList; with `watch=true` it
/// streams the events the test sends on `events` (one JSON object per line) until the test
/// is over.
struct FakeApi {
    port: u16,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    events: mpsc::Sender<Value>,
    /// What the next list answers.
    pods: Arc<Mutex<Vec<Value>>>,
}

impl FakeApi {
    fn start(netns: &str, pods: Vec<Value>) -> FakeApi {
        let pods = Arc::new(Mutex::new(pods));
        let listed = pods.clone();
        let (port_tx, port_rx) = mpsc::channel();
        let (ev_tx, ev_rx) = mpsc::channel::<Value>();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let ns = format!("/run/netns/{netns}");
        thread::spawn(move || {
            // This thread joins the client namespace: the agent (there too) reaches it on
            // its loopback.
            let f = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            port_tx.send(l.local_addr().unwrap().port()).unwrap();
            let ev_rx = Arc::new(Mutex::new(ev_rx));
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let reqs = reqs.clone();
                let pods = listed.clone();
                let ev_rx = ev_rx.clone();
                thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut first = String::new();
                    r.read_line(&mut first).unwrap();
                    let mut auth = String::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("Authorization: ") {
                            auth = v.trim().to_string();
                        }
                    }
                    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                    reqs.lock().unwrap().push((path.clone(), auth));
                    let mut s = s;
                    if !path.contains("watch=true") {
                        let body = json!({
                            "kind": "PodList", "apiVersion": "v1",
                            "metadata": {"resourceVersion": "100"},
                            "items": *pods.lock().unwrap(),
                        })
                        .to_string();
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        return;
                    }
                    // A watch: the body is the stream, until the connection closes.
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
                    );
                    let _ = s.flush();
                    loop {
                        let ev = ev_rx.lock().unwrap().recv();
                        let Ok(ev) = ev else { return };
                        if writeln!(s, "{ev}").and_then(|_| s.flush()).is_err() {
                            return;
                        }
                        // The API server ends a watch after an ERROR event.
                        if ev["type"] == "ERROR" {
                            return;
                        }
                    }
                });
            }
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the API stand-in listens");
        FakeApi {
            port,
            pods,
            requests,
            events: ev_tx,
        }
    }
}

fn pod(name: &str, uid: &str, annotations: Value) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": "arc-runners", "uid": uid, "resourceVersion": "100",
            "labels": {"actions-ephemeral-runner": "True", "actions.github.com/scale-set-name": "rf15-set"},
            "annotations": annotations,
        },
        "spec": {"nodeName": NODE, "hostNetwork": true},
        "status": {"phase": "Running"},
    })
}

/// A child process killed (by its own handle) when the test is over.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn job_ids(d: &Daemon) -> Vec<String> {
    d.status()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

fn wait_jobs(d: &Daemon, want: &[&str], log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut have = job_ids(d);
        have.sort();
        let mut w: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        w.sort();
        if have == w {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "jobs {have:?}, want {w:?}\nagent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `curl url` from a process placed in `cg` before its exec; true if it succeeded.
fn curl_in(tb: &Testbed, cg: &Path, url: &str) -> bool {
    let (st, _, _) = run_timeout(in_job(tb, cg, &curl(&[], url)), JOB_TIMEOUT);
    st.success()
}

#[test]
fn agent_jobs_follow_runner_pods_on_kubelet_cgroups() {
    let allowed = link_v4(25);
    let other = link_v4(26);
    let direct = link_v4(27);
    let tb = testbed(
        &[
            DnsRecord::a("allowed.test", allowed),
            DnsRecord::a("other.test", other),
        ],
        &[sa(allowed, 80), sa(other, 80), sa(direct, 80)],
    );
    let daemon = Daemon::start(&tb, &[]);
    let tree = KubeletTree::new();
    let dir = tb.workdir().join("rf15-k8s");
    std::fs::create_dir_all(dir.join("policies")).unwrap();

    // Three runner pods: Burstable under the systemd driver with an inline policy,
    // Guaranteed under the cgroupfs driver naming a ConfigMap policy, BestEffort (systemd)
    // with none: the cluster default.
    let (ua, ub, uc) = (
        "aaaa0001-0000-4000-8000-00000000000a",
        "bbbb0002-0000-4000-8000-00000000000b",
        "cccc0003-0000-4000-8000-00000000000c",
    );
    let ca = tree.pod(
        &format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            ua.replace('-', "_")
        ),
        "cri-containerd-a1.scope",
    );
    let cb = tree.pod(&format!("kubepods/pod{ub}"), "b2c0ffee");
    let cc = tree.pod(
        &format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uc.replace('-', "_")
        ),
        "cri-containerd-c3.scope",
    );
    let dns = testbed::DNS_V4;
    std::fs::write(
        dir.join("policies/only-other.toml"),
        format!("mode = \"block\"\nallowed-endpoints = \"other.test:80\"\ndns-resolvers = [\"{dns}\"]\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("policies/default.toml"),
        format!("mode = \"audit\"\ndirect-ip = \"block\"\ndns-resolvers = [\"{dns}\"]\n"),
    )
    .unwrap();
    let inline = format!(
        "mode = \"block\"\nallowed-endpoints = \"allowed.test:80\"\ndns-resolvers = [\"{dns}\"]\n"
    );
    // A fourth runner pod on its own network namespace: a job on its cgroup too (its veth
    // is linked once it has a process: see the next test).
    let ud = "dddd0004-0000-4000-8000-00000000000d";
    tree.pod(&format!("kubepods/besteffort/pod{ud}"), "d4");
    let mut own_netns = pod("runner-d", ud, json!({}));
    own_netns["spec"]["hostNetwork"] = json!(false);
    let pods = vec![
        own_netns,
        pod("runner-a", ua, json!({"ringfence.dev/policy": inline})),
        pod(
            "runner-b",
            ub,
            json!({"ringfence.dev/policy-name": "only-other"}),
        ),
        pod("runner-c", uc, json!({})),
    ];
    let api = FakeApi::start(tb.client_ns(), pods.clone());
    // In front of it, TLS as in a cluster: the agent finds the API the in-cluster way
    // (KUBERNETES_SERVICE_HOST/PORT, https) and trusts it through SSL_CERT_FILE, the
    // service account's CA in the DaemonSet.
    let (ca_crt, cert, key) = test_ca(&dir);
    let tls_port = 16443u16;
    let ready = dir.join("tls-ready");
    let front = dir.join("tls_front.py");
    std::fs::write(&front, TLS_FRONT).unwrap();
    let _tls = Agent(
        tb.client_cmd(
            "/usr/bin/python3",
            [
                front.display().to_string(),
                cert.display().to_string(),
                key.display().to_string(),
                tls_port.to_string(),
                api.port.to_string(),
                ready.display().to_string(),
            ],
        )
        .stdin(Stdio::null())
        .spawn()
        .expect("the TLS front"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the TLS front did not start");
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let cfg = dir.join("kubernetes.toml");
    // No api and no node-name: the in-cluster defaults, from the environment.
    std::fs::write(
        &cfg,
        format!(
            "token-file = \"{}\"\npolicies-dir = \"{}\"\ncgroup-root = \"{}\"\n",
            dir.join("token").display(),
            dir.join("policies").display(),
            tree.root.display()
        ),
    )
    .unwrap();
    let agent = |log: &Path, ca: &Path| {
        let logf = std::fs::File::create(log).unwrap();
        Agent(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", tb.client_ns()))
                .args([RINGFENCE, "kubernetes", "--config"])
                .arg(&cfg)
                .arg("--socket")
                .arg(&daemon.socket)
                .env("RUST_LOG", "info")
                .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
                .env("KUBERNETES_SERVICE_PORT", tls_port.to_string())
                .env("NODE_NAME", NODE)
                .env("SSL_CERT_FILE", ca)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .expect("ringfence kubernetes"),
        )
    };
    // An API whose certificate the agent cannot verify is not spoken to.
    let untrusting = dir.join("agent-untrusting.log");
    {
        let _a = agent(&untrusting, Path::new("/dev/null"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&untrusting)
            .unwrap_or_default()
            .contains("listing pods")
        {
            assert!(Instant::now() < deadline, "no TLS failure logged");
            thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        api.requests.lock().unwrap().is_empty(),
        "a request passed an unverified TLS connection"
    );
    assert!(job_ids(&daemon).is_empty());
    let log = dir.join("agent.log");
    let _agent = agent(&log, &ca_crt);
    let id = |name: &str, uid: &str| format!("k8s-arc-runners.{name}-{}", &uid[..8]);
    let (ja, jb, jc) = (id("runner-a", ua), id("runner-b", ub), id("runner-c", uc));
    let jd = id("runner-d", ud);
    wait_jobs(&daemon, &[&ja, &jb, &jc, &jd], &log);

    // What the agent asked the API: this node's pods with the runner label, as the service
    // account.
    let reqs = api.requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(|(p, a)| p.starts_with("/api/v1/pods?")
            && p.contains("fieldSelector=spec.nodeName%3Drf15-node")
            && p.contains("labelSelector=actions-ephemeral-runner%3DTrue")
            && !p.contains("watch=true")
            && a == &format!("Bearer {TOKEN}")),
        "{reqs:?}"
    );
    let modes: Vec<(String, String)> = daemon.status()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().to_string(),
                j["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(modes.contains(&(ja.clone(), "block".into())), "{modes:?}");
    assert!(modes.contains(&(jb.clone(), "block".into())), "{modes:?}");
    assert!(modes.contains(&(jc.clone(), "audit".into())), "{modes:?}");

    // Real traffic from the pods' containers: each pod under its own policy.
    assert!(
        curl_in(&tb, &ca, "http://allowed.test/"),
        "A's inline policy allows it"
    );
    assert!(!curl_in(&tb, &ca, "http://other.test/"), "A: not listed");
    assert!(
        curl_in(&tb, &cb, "http://other.test/"),
        "B's named policy allows it"
    );
    assert!(!curl_in(&tb, &cb, "http://allowed.test/"), "B: not listed");
    assert!(
        !curl_in(&tb, &cc, &format!("http://{direct}/")),
        "C: the default blocks direct IPs"
    );
    assert!(
        curl_in(&tb, &cc, "http://allowed.test/"),
        "C: audit mode lets names pass"
    );
    assert_eq!(tb.http_hits(sa(allowed, 80)), 2, "A's and C's");
    assert_eq!(tb.http_hits(sa(other, 80)), 1, "B's only");
    assert_eq!(tb.http_hits(sa(direct, 80)), 0);
    let events = daemon.events(&jb);
    assert!(
        events
            .iter()
            .any(|e| e["domain"] == "allowed.test" && e["verdict"] == "blocked"),
        "B's block is in B's trail: {events:?}"
    );

    // The pods go: A is deleted, B finishes. Their jobs end; C's stays.
    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        agent_log.contains("waiting for the pod's network namespace")
            && agent_log.contains("arc-runners/runner-d"),
        "{agent_log}"
    );
    let mut gone = pods[1].clone();
    gone["metadata"]["resourceVersion"] = json!("101");
    api.events
        .send(json!({"type": "DELETED", "object": gone}))
        .unwrap();
    let mut done = pods[2].clone();
    done["metadata"]["resourceVersion"] = json!("102");
    done["status"]["phase"] = json!("Succeeded");
    api.events
        .send(json!({"type": "MODIFIED", "object": done.clone()}))
        .unwrap();
    wait_jobs(&daemon, &[&jc, &jd], &log);

    // The watch's resourceVersion expires (410 Gone): the agent lists again.
    let lists = |a: &FakeApi| {
        a.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| !p.contains("watch=true"))
            .count()
    };
    let before = lists(&api);
    // What a list says now: A gone, B finished, C and D as they were.
    *api.pods.lock().unwrap() = vec![pods[0].clone(), done.clone(), pods[3].clone()];
    api.events
        .send(json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410}}))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lists(&api) == before {
        assert!(Instant::now() < deadline, "no list after a 410");
        thread::sleep(Duration::from_millis(50));
    }
    let mut kept = job_ids(&daemon);
    kept.sort();
    assert_eq!(
        kept,
        vec![jc.clone(), jd.clone()],
        "the relist keeps C's and D's jobs"
    );

    // The agent is replaced (a DaemonSet update) while C's pod goes: the new agent finds
    // the job by its k8s- id and ends it.
    drop(_agent);
    *api.pods.lock().unwrap() = Vec::new();
    let log2 = dir.join("agent-2.log");
    let _agent2 = agent(&log2, &ca_crt);
    wait_jobs(&daemon, &[], &log2);
    let reqs = api.requests.lock().unwrap().clone();
    assert!(
        reqs.iter()
            .any(|(p, _)| p.contains("watch=true") && p.contains("resourceVersion=100")),
        "the agent watches from the list's resourceVersion: {reqs:?}"
    );
    // The ended jobs' final reports are kept by the daemon.
    for j in [&ja, &jb] {
        let page = daemon.dir.join("data/jobs").join(j).join("report.html");
        assert!(page.exists(), "no final report for {j}");
    }
}

/// A runner pod on a network namespace of its own, as kubelet and a CNI plugin lay it out:
/// its cgroup under kubepods, a network namespace with a veth whose host end is in the
/// daemon's namespace (routed out through it to the servers), a process of the pod in both.
/// The agent finds the host end from that process's namespace and links it to the pod's
/// job: the pod's real requests are judged there by its policy. Nothing else would judge
/// them (no host default policy: forwarded traffic of no job passes), and the veth was there
/// before the job, so no container claim takes it.
#[test]
fn agent_links_the_veth_of_a_pod_on_its_own_network() {
    let allowed = link_v4(25);
    let other = link_v4(26);
    let direct = link_v4(27);
    let tb = testbed(
        &[
            DnsRecord::a("allowed.test", allowed),
            DnsRecord::a("other.test", other),
        ],
        &[sa(allowed, 80), sa(other, 80), sa(direct, 80)],
    );
    let mut daemon = Daemon::start(&tb, &[]);
    let tree = KubeletTree::new();
    let dir = tb.workdir().join("rf15-k8s-netns");
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let uid = "eeee0005-0000-4000-8000-00000000000e";
    let ctr = tree.pod(&format!("kubepods/besteffort/pod{uid}"), "e5");
    let net = common::vethjob::VethJob::new(&tb, 15);
    let dns = testbed::DNS_V4;
    std::fs::write(
        dir.join("policies/default.toml"),
        format!("mode = \"block\"\ndirect-ip = \"block\"\ndns-resolvers = [\"{dns}\"]\n"),
    )
    .unwrap();
    let inline = format!(
        "mode = \"block\"\ndirect-ip = \"block\"\nallowed-endpoints = \"allowed.test:80\"\ndns-resolvers = [\"{dns}\"]\n"
    );
    let mut p = pod("runner-e", uid, json!({"ringfence.dev/policy": inline}));
    p["spec"]["hostNetwork"] = json!(false);
    let api = FakeApi::start(tb.client_ns(), vec![p]);
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let cfg = dir.join("kubernetes.toml");
    std::fs::write(
        &cfg,
        format!(
            "api = \"http://127.0.0.1:{}\"\nnode-name = \"{NODE}\"\ntoken-file = \"{}\"\npolicies-dir = \"{}\"\ncgroup-root = \"{}\"\n",
            api.port,
            dir.join("token").display(),
            dir.join("policies").display(),
            tree.root.display()
        ),
    )
    .unwrap();
    // The pod's sandbox: a process in its cgroup and its network namespace.
    let in_pod = |argv: &[String]| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$@\"")
            .arg(&ctr)
            .arg(&net.ns)
            .args(argv);
        c
    };
    let _pause = Agent(
        in_pod(&["sleep".into(), "120".into()])
            .stdin(Stdio::null())
            .spawn()
            .expect("the pod's process"),
    );
    let log = dir.join("agent.log");
    let logf = std::fs::File::create(&log).unwrap();
    let _agent = Agent(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", tb.client_ns()))
            .args([RINGFENCE, "kubernetes", "--config"])
            .arg(&cfg)
            .arg("--socket")
            .arg(&daemon.socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("ringfence kubernetes"),
    );
    let job = format!("k8s-arc-runners.runner-e-{}", &uid[..8]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = daemon.status();
        let linked = st["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == job.as_str() && j["links"] == json!([net.host_if.clone()]));
        if linked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod's veth {} is not linked to {job}: {st}\nagent log:\n{}",
            net.host_if,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let curl_pod = |url: &str| {
        let (st, _, _) = run_timeout(in_pod(&curl(&[], url)), JOB_TIMEOUT);
        st.success()
    };
    assert!(
        curl_pod("http://allowed.test/"),
        "the pod's policy allows it"
    );
    assert!(!curl_pod("http://other.test/"), "not listed");
    assert!(!curl_pod(&format!("http://{direct}/")), "a direct IP");
    assert_eq!(tb.http_hits(sa(allowed, 80)), 1);
    assert_eq!(tb.http_hits(sa(other, 80)), 0);
    assert_eq!(tb.http_hits(sa(direct, 80)), 0);
    let events = daemon.events(&job);
    // Judged at the pod's link (the flows name it), not by its sockets' cgroup.
    let via = format!("via {}", net.host_if);
    for (what, verdict) in [("allowed.test", "allowed"), ("other.test", "blocked")] {
        assert!(
            events.iter().any(|e| e["domain"] == what
                && e["verdict"] == verdict
                && e["container"] == via.as_str()),
            "{what} {verdict} in the pod's trail: {events:?}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e["dst"] == direct.to_string() && e["verdict"] == "blocked"),
        "the direct IP blocked in the pod's trail: {events:?}"
    );
    // A restarted daemon takes the link over with the job (state.json): still judged there.
    daemon.kill9();
    daemon.spawn();
    let st = daemon.status();
    assert!(
        st["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == job.as_str() && j["links"] == json!([net.host_if.clone()])),
        "{st}"
    );
    assert!(
        !curl_pod("http://other.test/"),
        "not listed, after the restart"
    );
    assert!(
        curl_pod("http://allowed.test/"),
        "allowed, after the restart"
    );
    assert_eq!(tb.http_hits(sa(other, 80)), 0);
    assert_eq!(tb.http_hits(sa(allowed, 80)), 2);
    // The link is the job's and goes with it: a second `job link` of it to another job is
    // refused, naming the owner.
    let (ok, _, err) = daemon.cli(&["job", "link", "--id", &job, "--interface", "rf15-none"]);
    assert!(!ok && err.contains("\"rf15-none\" does not exist"), "{err}");
    let (ok, _, err) = daemon.cli(&[
        "job",
        "link",
        "--id",
        "rf15-nojob",
        "--interface",
        &net.host_if,
    ]);
    assert!(!ok && err.contains("no job \"rf15-nojob\""), "{err}");
    let cg = daemon.cgroup("rf15-other");
    daemon.start_job("rf15-other", &cg, &["--mode", "audit"]);
    let (ok, _, err) = daemon.cli(&[
        "job",
        "link",
        "--id",
        "rf15-other",
        "--interface",
        &net.host_if,
    ]);
    assert!(
        !ok && err.contains(&format!("already job {job:?}'s")),
        "{err}"
    );
}

/// The ConfigMaps' files, as the containers read them: each `<key>: |` block of
/// deploy/kubernetes/configmap.yaml, unindented.
fn configmap_files() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/configmap.yaml"
    ))
    .unwrap();
    let mut files = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for l in text.lines() {
        if let Some(key) = l.strip_prefix("  ").and_then(|k| k.strip_suffix(": |")) {
            files.extend(cur.take());
            cur = Some((key.to_string(), String::new()));
        } else if let Some((_, body)) = cur.as_mut() {
            match l.strip_prefix("    ") {
                Some(b) => {
                    body.push_str(b);
                    body.push('\n');
                }
                None if l.trim().is_empty() => body.push('\n'),
                None => files.extend(cur.take()),
            }
        }
    }
    files.extend(cur);
    files
}

/// What the DaemonSet mounts parses as what reads it: the daemon's config, the agent's
/// settings (unknown keys refused), and every cluster policy (the default blocks direct IPs).
#[test]
fn configmap_files_parse() {
    let files = configmap_files();
    let names: Vec<&str> = files.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "ringfence.toml",
            "kubernetes.toml",
            "default.toml",
            "npm.toml"
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in &files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        match name.as_str() {
            "ringfence.toml" => {
                ringfence::daemon::config::Config::from_file(&path)
                    .unwrap_or_else(|e| panic!("{name}: {e:#}\n{text}"));
            }
            "kubernetes.toml" => {
                let c = ringfence::kubernetes::KubeConfig::load(Some(&path))
                    .unwrap_or_else(|e| panic!("{name}: {e:#}\n{text}"));
                assert_eq!(c.cgroup_root, Some(PathBuf::from("/host/sys/fs/cgroup")));
            }
            _ => {
                let spec = ringfence::job::spec::PolicySpec {
                    file: Some(ringfence::job::spec::PolicyText {
                        source: name.clone(),
                        text: text.clone(),
                    }),
                    ..Default::default()
                };
                let policy = spec
                    .build()
                    .unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
                policy.compile().unwrap();
                if name == "default.toml" {
                    assert!(
                        text.contains("mode = \"block\"") && text.contains("direct-ip = \"block\"")
                    );
                }
            }
        }
    }
}
