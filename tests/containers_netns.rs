//! Containers a job starts are still the job (issue 10), with a real Docker Engine
//! (Debian's docker.io): a private dockerd in the client namespace, its image imported
//! offline from a root filesystem (busybox, curl and the libraries curl needs), so nothing
//! is pulled. A job under `ringfence exec` runs containers on the default bridge (NAT) and
//! on a user-defined network (Docker's embedded DNS at 127.0.0.11, which forwards from the
//! container's namespace), builds an image whose `RUN` step calls out, reaches a service
//! container of its own, and sets up a plain `ip netns` + veth + NAT: in block mode the
//! allowed name works from all of them, the unlisted name and a direct IP are blocked
//! (proven at the servers: no hit) and named in the events with the container; in audit
//! mode all arrive and are named. Needs root and Docker; never skipped.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon;
use common::*;
use serde_json::Value;
use testbed::{link_v4, routed_v4};

const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "rf10-busybox:test";

/// A dockerd of the test's own inside the client namespace: its bridge, NAT rules and
/// containers live there, and go with it.
struct Dockerd {
    child: Child,
    sock: PathBuf,
    exec_root: PathBuf,
    data_root: PathBuf,
}

impl Dockerd {
    fn start(tb: &Testbed) -> Dockerd {
        let dir = tb.workdir().join("docker");
        let data_root = dir.join("data");
        // containerd's socket paths must stay short: not under the workdir.
        let exec_root =
            PathBuf::from(format!("/run/rf10-{}", std::process::id())).join(tb.client_ns());
        std::fs::create_dir_all(&data_root).unwrap();
        std::fs::create_dir_all(&exec_root).unwrap();
        let sock = exec_root.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", tb.client_ns()))
            .arg("dockerd")
            .arg(format!("--data-root={}", data_root.display()))
            .arg(format!("--exec-root={}", exec_root.join("x").display()))
            .arg(format!(
                "--pidfile={}",
                exec_root.join("dockerd.pid").display()
            ))
            .arg(format!("--host=unix://{}", sock.display()))
            .arg(format!("--dns={}", tb.dns_addr_v4()))
            .arg("--bip=172.29.0.1/24")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd (Debian package docker.io)");
        let d = Dockerd {
            child,
            sock,
            exec_root,
            data_root,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d
            .cmd(&["version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer: {}",
                std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d.import_image(tb);
        d
    }

    fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.env("DOCKER_HOST", self.host()).args(args);
        c
    }

    /// busybox (static) with curl and its libraries, imported from a tar stream.
    fn import_image(&self, tb: &Testbed) {
        let root = tb.workdir().join("rootfs");
        for d in ["bin", "etc", "www", "usr/bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("/bin/busybox (Debian package busybox-static)");
        for a in [
            "sh", "cat", "echo", "sleep", "httpd", "nslookup", "ip", "true",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        std::fs::copy("/usr/bin/curl", root.join("usr/bin/curl")).unwrap();
        let ldd = Command::new("ldd").arg("/usr/bin/curl").output().unwrap();
        let mut libs: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(str::to_string)
            .collect();
        for l in ["libnss_dns.so.2", "libnss_files.so.2"] {
            libs.push(format!("/lib/x86_64-linux-gnu/{l}"));
        }
        for l in libs {
            let to = root.join(l.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&l, &to).unwrap_or_else(|e| panic!("copying {l}: {e}"));
        }
        std::fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n").unwrap();
        std::fs::write(root.join("www/index.html"), "service ok\n").unwrap();
        let tarball = tb.workdir().join("rootfs.tar");
        let st = Command::new("tar")
            .args([
                "-C",
                root.to_str().unwrap(),
                "-cf",
                tarball.to_str().unwrap(),
                ".",
            ])
            .status()
            .unwrap();
        assert!(st.success(), "tar of the image's root");
        let out = self
            .cmd(&["import", tarball.to_str().unwrap(), IMAGE])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(o) = self.cmd(&["ps", "-aq"]).output() {
            let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.cmd(&args).output();
            }
        }
        // SIGTERM: dockerd unmounts its layers and stops its containerd.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.exec_root);
        let _ = std::fs::remove_dir_all(&self.data_root);
        // The `--cgroup-parent` the job chose: left empty in every hierarchy by dockerd.
        let mut roots: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        roots.push(PathBuf::from("/sys/fs/cgroup"));
        for d in roots {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("rf10esc-") {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        if let Ok(root) = ringfence::job::cgroup::find_cgroup2() {
            for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("rf10esc-") {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// The job: containers on the default bridge and on a user-defined network, a build, a
/// service container, and a namespace of its own behind NAT. Every call is made, allowed
/// or not; what arrived is counted at the servers. `KEY=value` lines on stdout say what
/// each container saw.
fn job_script(direct: &str) -> String {
    format!(
        r#"set -u
D="{DOCKER}"
get() {{ curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' "$@"; }}
run() {{ "$D" run --rm "$@"; }}
echo "bridge_allowed=$(run {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://allowed.test/bridge)"
echo "bridge_other=$(run {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://other.test/bridge)"
echo "bridge_direct=$(run {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://{direct}/bridge)"
echo "host_direct=$(run --network host {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://{direct}/host)"
echo "parent_direct=$(run --network host --cgroup-parent /rf10esc-$PPID {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://{direct}/parent)"
ip link add rf10br$$ type bridge && ip addr add 203.0.0.1/8 dev rf10br$$ noprefixroute && ip link set rf10br$$ up
echo "bridge_trick=$(get http://{routed}/trick)"
ip link del rf10br$$
"$D" network create rf10net >/dev/null
"$D" run -d --name svc --network rf10net {IMAGE} httpd -f -p 8080 -h /www >/dev/null
svc=$("$D" inspect -f '{{{{range .NetworkSettings.Networks}}}}{{{{.IPAddress}}}}{{{{end}}}}' svc)
echo "net_allowed=$(run --network rf10net {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://allowed.test/net)"
echo "net_other=$(run --network rf10net {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://other.test/net)"
echo "svc_from_job=$(get http://$svc:8080/)"
echo "svc_from_sibling=$(run --network rf10net {IMAGE} curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://svc:8080/)"
mkdir -p build && printf 'FROM {IMAGE}\nRUN curl -sS --connect-timeout 3 --max-time 6 -o /dev/null http://other.test/build || true\nRUN curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w "BUILD%%{{http_code}}\\n" http://allowed.test/build\n' > build/Dockerfile
b=$(DOCKER_BUILDKIT=0 "$D" build --no-cache -t rf10-built build 2>&1 | grep -o 'BUILD[0-9][0-9][0-9]')
echo "build_allowed=${{b#BUILD}}"
b=$(DOCKER_BUILDKIT=1 "$D" build --progress=plain --no-cache -t rf10-bk build 2>&1 | grep -o 'BUILD[0-9][0-9][0-9]' | tail -1)
echo "buildkit_allowed=${{b#BUILD}}"
ns=rf10job$$
ip netns add $ns
# The namespace end takes an index no device here has: the backstop must know it as
# the far end of the job's link, not by a coincidence of indexes.
ip -n $ns link add ${{ns}}c index 77 type veth peer name ${{ns}}h netns $$
ip addr add 10.77.0.1/24 dev ${{ns}}h && ip link set ${{ns}}h up
ip -n $ns addr add 10.77.0.2/24 dev ${{ns}}c && ip -n $ns link set ${{ns}}c up && ip -n $ns link set lo up
ip -n $ns route add default via 10.77.0.1
iptables -t nat -A POSTROUTING -s 10.77.0.0/24 ! -o ${{ns}}h -j MASQUERADE
sleep 1
echo "netns_allowed=$(ip netns exec $ns curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://allowed.test/netns)"
echo "netns_direct=$(ip netns exec $ns curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://{direct}/netns)"
echo "netns_routed=$(ip netns exec $ns curl -sS --connect-timeout 3 --max-time 6 -o /dev/null -w '%{{http_code}}' http://{routed}/netns)"
iptables -t nat -D POSTROUTING -s 10.77.0.0/24 ! -o ${{ns}}h -j MASQUERADE
ip netns del $ns
"$D" rm -f svc >/dev/null
"$D" network rm rf10net >/dev/null
exit 0
"#,
        routed = routed_v4(21),
    )
}

struct Run {
    stdout: String,
    stderr: String,
    events: Vec<Value>,
}

impl Run {
    fn value(&self, key: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= line\n{}\n{}", self.stdout, self.stderr))
            .to_string()
    }

    fn expect(&self, key: &str, want: &str) {
        assert_eq!(
            self.value(key),
            want,
            "{key}\n{}\n{}",
            self.stdout,
            self.stderr
        );
    }

    fn flows(&self) -> impl Iterator<Item = &Value> {
        self.events.iter().filter(|e| e.get("type").is_none())
    }
}

fn run_job(tb: &Testbed, docker: &Dockerd, tag: &str, opts: &[&str], direct: &str) -> Run {
    let script = scratch(tb, &format!("job-{tag}.sh"), &job_script(direct));
    let events_file = tb.workdir().join(format!("events-{tag}.jsonl"));
    let args = exec_sh_args(&format!("containers-{tag}"), &events_file, opts, &script);
    let mut cmd = tb.client_cmd(RINGFENCE, &args);
    cmd.env("DOCKER_HOST", docker.host())
        .current_dir(tb.workdir());
    let (status, stdout, stderr) = run_timeout(cmd, Duration::from_secs(300));
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    let events = read_events(&events_file);
    Run {
        stdout,
        stderr,
        events,
    }
}

fn setup() -> (Testbed, [std::net::Ipv4Addr; 3]) {
    let allowed = link_v4(11);
    let other = link_v4(12);
    let direct = link_v4(13);
    let routed = routed_v4(21);
    let tb = testbed(
        &[
            DnsRecord::a("allowed.test", allowed),
            DnsRecord::a("other.test", other),
        ],
        &[
            sa(allowed, 80),
            sa(other, 80),
            sa(direct, 80),
            sa(routed, 80),
        ],
    );
    (tb, [allowed, other, direct])
}

#[test]
fn block_mode_holds_for_containers_builds_and_namespaces() {
    let (tb, [allowed, other, direct]) = setup();
    let docker = Dockerd::start(&tb);
    let routed = routed_v4(21);
    let r = run_job(
        &tb,
        &docker,
        "block",
        &["--mode", "block", "--allow", "allowed.test:80"],
        &direct.to_string(),
    );
    // What the containers saw.
    r.expect("bridge_allowed", "200");
    r.expect("net_allowed", "200");
    r.expect("build_allowed", "200");
    r.expect("buildkit_allowed", "200");
    r.expect("svc_from_job", "200");
    r.expect("svc_from_sibling", "200");
    r.expect("netns_allowed", "200");
    for k in [
        "bridge_other",
        "bridge_direct",
        "host_direct",
        "parent_direct",
        "bridge_trick",
        "net_other",
        "netns_direct",
        "netns_routed",
    ] {
        assert_ne!(r.value(k), "200", "{k}: {}", r.stderr);
    }
    // What arrived: the allowed server got the bridge, network and builds' calls; nothing
    // reached the others.
    assert!(tb.http_hits(sa(allowed, 80)) >= 3);
    assert_eq!(tb.http_hits(sa(other, 80)), 0, "other.test was reached");
    assert_eq!(tb.http_hits(sa(direct, 80)), 0, "the direct IP was reached");
    assert_eq!(tb.http_hits(sa(routed, 80)), 0, "the namespace got out");
    // The events name the blocked calls and who made them.
    let blocked: Vec<&Value> = r.flows().filter(|f| f["verdict"] == "blocked").collect();
    let to = |ip: std::net::Ipv4Addr| {
        blocked
            .iter()
            .filter(|f| f["dst"] == ip.to_string() && f["port"] == 80)
            .collect::<Vec<_>>()
    };
    assert!(!to(direct).is_empty(), "{blocked:#?}");
    assert!(!to(routed).is_empty(), "{blocked:#?}");
    // The unlisted name is refused at its query (block mode filters DNS), from the bridge,
    // the network (through Docker's embedded DNS) and the build alike.
    let refused: Vec<&&Value> = blocked
        .iter()
        .filter(|f| f["domain"] == "other.test")
        .collect();
    assert!(refused.len() >= 3, "{blocked:#?}");
    for f in &refused {
        assert!(f["container"].is_string(), "{f:#?}");
    }
    // The direct call from the bridge is named after its container; the namespace's own
    // process is the job's (its socket is in the job's cgroup), named as a process.
    assert!(
        to(direct).iter().any(|f| f["container"]
            .as_str()
            .is_some_and(|c| c.starts_with("docker:"))),
        "a container on the bridge is named by Docker: {blocked:#?}"
    );
    // The host-network container sent from a socket of its own cgroup, claimed for the
    // job: a process flow, not the job's cgroup.
    let job_cgroup = r
        .flows()
        .find(|f| f["domain"] == "allowed.test" && f["container"].is_null());
    assert!(
        to(direct).iter().any(|f| f["container"].is_null()
            && f["comm"] == "curl"
            && job_cgroup.is_none_or(|j| j["cgroup"] != f["cgroup"])),
        "{blocked:#?}"
    );
    // No flow to the service container or the bridge is reported as blocked.
    assert!(
        blocked
            .iter()
            .all(|f| !f["dst"].as_str().unwrap().starts_with("172.")),
        "{blocked:#?}"
    );
}

#[test]
fn audit_mode_names_every_container_call() {
    let (tb, [allowed, other, direct]) = setup();
    let docker = Dockerd::start(&tb);
    let r = run_job(
        &tb,
        &docker,
        "audit",
        &["--mode", "audit", "--allow", "allowed.test:80"],
        &direct.to_string(),
    );
    r.expect("bridge_other", "200");
    r.expect("net_other", "200");
    // Direct IPs are blocked in audit mode too: the host-network container's call is, now
    // that its cgroup is the job's (unclaimed, no policy would judge it in exec).
    assert_ne!(r.value("host_direct"), "200", "{}", r.stderr);
    assert!(tb.http_hits(sa(allowed, 80)) >= 3);
    assert!(
        tb.http_hits(sa(other, 80)) >= 3,
        "bridge, network and build"
    );
    let audited: Vec<&Value> = r
        .flows()
        .filter(|f| f["verdict"] == "audited" && f["domain"] == "other.test")
        .collect();
    assert!(audited.len() >= 2, "{:#?}", r.events);
    assert!(
        audited.iter().all(|f| f["container"].is_string()),
        "{audited:#?}"
    );
}

/// A curl that prints only the HTTP code it got from `url` (000: no answer).
fn curl_code(url: &str) -> [&str; 11] {
    [
        "curl",
        "-sS",
        "--connect-timeout",
        "3",
        "--max-time",
        "6",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ]
}

/// `docker run --rm IMAGE curl … URL` from inside job cgroup `cg`: the HTTP code it got.
fn container_get(tb: &Testbed, docker: &Dockerd, cg: &std::path::Path, url: &str) -> String {
    let mut argv: Vec<String> = [DOCKER, "run", "--rm", IMAGE]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(curl_code(url).iter().map(|s| s.to_string()));
    let mut c = daemon::in_job(tb, cg, &argv);
    c.env("DOCKER_HOST", docker.host());
    let (_, out, _) = run_timeout(c, Duration::from_secs(60));
    out.trim().to_string()
}

/// The daemon: a container link that appears while one job runs is that job's; one that
/// appears while two run is neither's, and its traffic falls under the host default policy
/// (here: block everything), judged at the uplink.
#[test]
fn daemon_sole_job_claims_containers_and_the_rest_is_host_default() {
    let (tb, [allowed, other, _]) = setup();
    let docker = Dockerd::start(&tb);
    let host_policy = scratch(
        &tb,
        "host-policy.toml",
        "mode = \"block\"\nallowed-endpoints = \"\"\ndirect-ip = \"block\"\n",
    );
    let mut d = daemon::Daemon::start(&tb, &["--host-policy", host_policy.to_str().unwrap()]);
    let cg_a = d.cgroup("rf10a");
    let resolver = tb.dns_addr_v4().to_string();
    let job_policy = [
        "--mode",
        "block",
        "--allow",
        "allowed.test:80",
        "--dns-resolver",
        resolver.as_str(),
    ];
    d.start_job("a", &cg_a, &job_policy);
    assert_eq!(
        container_get(&tb, &docker, &cg_a, "http://allowed.test/a"),
        "200",
        "{}\n{:#?}",
        d.log(),
        d.events("a")
    );
    assert_ne!(
        container_get(&tb, &docker, &cg_a, "http://other.test/a"),
        "200"
    );
    let hits = tb.http_hits(sa(allowed, 80));
    assert_eq!(hits, 1);

    // A second job: containers started now are no one's; the host default blocks them.
    let cg_b = d.cgroup("rf10b");
    d.start_job("b", &cg_b, &job_policy);
    assert_ne!(
        container_get(&tb, &docker, &cg_a, "http://allowed.test/two"),
        "200"
    );
    assert_eq!(
        tb.http_hits(sa(allowed, 80)),
        hits,
        "an unclaimed container got out"
    );
    d.ok(&["job", "end", "--id", "b"]);
    d.ok(&["job", "end", "--id", "a"]);

    // Read after its end: the trail is flushed then.
    let events = d.events("a");
    let from_container = |name: &str, verdict: &str| {
        events.iter().any(|e| {
            e.get("type").is_none()
                && e["domain"] == name
                && e["verdict"] == verdict
                && e["container"].is_string()
        })
    };
    assert!(from_container("allowed.test", "allowed"), "{events:#?}");
    assert!(from_container("other.test", "blocked"), "{events:#?}");
    // Job a's trail holds nothing of the container started while b ran.
    assert!(
        !events
            .iter()
            .any(|e| e["verdict"] == "blocked" && e["domain"] == "allowed.test"),
        "{events:#?}"
    );
    assert_eq!(tb.http_hits(sa(other, 80)), 0);
}

/// `job start --claim-running-containers` (the Action's: a runner starts service containers
/// before the first step): a container already running when the job starts is the job's,
/// judged by its policy rather than the host default (here: block everything).
#[test]
fn daemon_claims_running_containers_when_asked() {
    let (tb, [allowed, other, _]) = setup();
    let docker = Dockerd::start(&tb);
    // runc now and then fails a start on a loaded machine ("read init-p: connection reset
    // by peer"): a start is tried three times.
    let mut failed = String::new();
    for _ in 0..3 {
        let st = docker
            .cmd(&["run", "-d", "--name", "service", IMAGE, "sleep", "600"])
            .output()
            .unwrap();
        if st.status.success() {
            failed.clear();
            break;
        }
        failed = String::from_utf8_lossy(&st.stderr).into_owned();
        let _ = docker.cmd(&["rm", "-f", "service"]).output();
    }
    assert!(failed.is_empty(), "{failed}");
    let host_policy = scratch(
        &tb,
        "host-policy.toml",
        "mode = \"block\"\nallowed-endpoints = \"\"\ndirect-ip = \"block\"\n",
    );
    let mut d = daemon::Daemon::start(&tb, &["--host-policy", host_policy.to_str().unwrap()]);
    let cg = d.cgroup("rf10svc");
    let resolver = tb.dns_addr_v4().to_string();
    let get = |url: &str| {
        let mut args = vec!["exec", "service"];
        args.extend(curl_code(url));
        let o = docker.cmd(&args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // Before any job: the host default holds it.
    assert_ne!(get("http://allowed.test/before"), "200");
    assert_eq!(tb.http_hits(sa(allowed, 80)), 0);
    d.start_job(
        "svc",
        &cg,
        &[
            "--mode",
            "block",
            "--allow",
            "allowed.test:80",
            "--dns-resolver",
            resolver.as_str(),
            "--claim-running-containers",
        ],
    );
    assert_eq!(get("http://allowed.test/job"), "200", "{}", d.log());
    assert_ne!(get("http://other.test/job"), "200");
    assert_eq!(tb.http_hits(sa(allowed, 80)), 1);
    assert_eq!(tb.http_hits(sa(other, 80)), 0);
    // --keep-processes: the container goes on, no longer the job's (without it, it would
    // end with the job).
    d.ok(&["job", "end", "--id", "svc", "--keep-processes"]);
    // Read after its end: the trail is flushed then.
    let events = d.events("svc");
    assert!(
        events
            .iter()
            .any(|e| e["domain"] == "other.test" && e["verdict"] == "blocked"),
        "{events:#?}"
    );
    // Its job over, the container is no one's again.
    assert_ne!(get("http://allowed.test/after"), "200");
    assert_eq!(tb.http_hits(sa(allowed, 80)), 1);
}

/// `kill -9` of ringfence while the job's container sends: its guard kills the job and the
/// job's containers with it (they live in their engine's cgroups, not the job's), so nothing
/// gets out once the programs go. A normal end takes its containers with it too.
#[test]
fn the_jobs_containers_end_with_it() {
    let (tb, [_, _, direct]) = setup();
    let docker = Dockerd::start(&tb);
    let ready = tb.workdir().join("ready");
    let script = scratch(
        &tb,
        "loop.sh",
        &format!(
            "\"{DOCKER}\" run -d --name looper {IMAGE} sh -c 'while true; do curl -s -o /dev/null \
             --connect-timeout 1 --max-time 2 http://{direct}/loop; sleep 0.3; done' >/dev/null\n\
             \"{DOCKER}\" run -d --name sleeper {IMAGE} sleep 600 >/dev/null\n\
             touch {ready}\nsleep 600\n",
            ready = ready.display()
        ),
    );
    let events = tb.workdir().join("events-kill.jsonl");
    let args = exec_sh_args("containers-kill", &events, &["--mode", "block"], &script);
    let mut cmd = tb.client_cmd(RINGFENCE, &args);
    cmd.env("DOCKER_HOST", docker.host())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut rf = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "the job never started its containers"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tb.http_hits(sa(direct, 80)),
        0,
        "blocked while ringfence lives"
    );
    // `ip netns exec` execs ringfence in its place: this is ringfence.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rf.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = rf.wait();
    // The guard takes the job and its containers down; then the programs go.
    let deadline = Instant::now() + Duration::from_secs(30);
    let running = || {
        let o = docker.cmd(&["ps", "-q"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    while !running().is_empty() {
        assert!(
            Instant::now() < deadline,
            "containers outlived the job: {}",
            running()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tb.http_hits(sa(direct, 80)),
        0,
        "a container got out after the kill"
    );
}
