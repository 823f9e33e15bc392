//! Throwaway etcd members for the tests, from the machine's `/usr/bin/etcd`
//! (Debian's `etcd-server`): one single-member cluster for the whole test
//! process ([`single`]), and three-member clusters ([`EtcdCluster`]) whose
//! members a test kills, freezes and restarts. Every member listens on free
//! loopback ports (client and peer), keeps its data in a temporary directory,
//! and runs under a shell watchdog that kills it (and removes nothing else)
//! when this process's end of a pipe closes: at the latest when the test
//! process exits, whatever way it ends.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use lockbox::{LockClient, LockClientBuilder};

pub const ETCD: &str = "/usr/bin/etcd";

/// `n` distinct free loopback ports. Their listeners are held until all are
/// chosen: one dropped at once could be handed out again by the next bind,
/// giving a member the same client and peer port.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("its address").port())
        .collect()
}

/// A directory of this process's, removed when the process exits.
fn process_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lockbox-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let watchdog = Command::new("sh")
        .args(["-c", "cat >/dev/null; rm -rf \"$0\""])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the directory's watchdog");
    std::mem::forget(watchdog);
    dir
}

/// How a TLS member serves its clients: the files etcd takes.
#[derive(Clone, Debug)]
pub struct MemberTls {
    /// `--cert-file` / `--key-file`: valid for `localhost` only (so that
    /// `https://127.0.0.1:…` is a host-name mismatch), for both server and
    /// client authentication (etcd 3.4's gateway presents it to its own gRPC
    /// server, which checks it under `--client-cert-auth`).
    pub cert: String,
    pub key: String,
    /// `--trusted-ca-file`: the CA client certificates must be issued by.
    pub ca: String,
    /// `--client-cert-auth`: a client certificate is required.
    pub client_cert_auth: bool,
}

/// One member: its name, ports and data directory, and (while it runs) its
/// watchdog and process id.
pub struct Member {
    pub name: String,
    /// The port clients are given (`https://localhost:…` for a TLS member).
    pub client_port: u16,
    /// A plain-text client port on loopback for the harness's own requests
    /// (the same as `client_port` for a member without TLS): never advertised.
    pub admin_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    cluster: String,
    tls: Option<MemberTls>,
    watchdog: Option<Child>,
    pid: Option<i32>,
}

impl Member {
    pub fn client_url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.client_port),
            None => format!("http://127.0.0.1:{}", self.client_port),
        }
    }

    /// What the member listens on for clients: its client URL and, for a
    /// TLS member, the plain-text admin port.
    fn listen_client_urls(&self) -> String {
        match self.tls {
            Some(_) => format!(
                "https://127.0.0.1:{},http://127.0.0.1:{}",
                self.client_port, self.admin_port
            ),
            None => self.client_url(),
        }
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Starts the member (again, on the same ports and data): the first
    /// start of a cluster's members is `new`, any later one rejoins.
    fn start(&mut self) {
        assert!(self.watchdog.is_none(), "{} is running", self.name);
        let mut args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={}", self.listen_client_urls()),
            format!("--advertise-client-urls={}", self.client_url()),
            format!("--listen-peer-urls={}", self.peer_url()),
            format!("--initial-advertise-peer-urls={}", self.peer_url()),
            format!("--initial-cluster={}", self.cluster),
            "--initial-cluster-state=new".to_owned(),
            "--initial-cluster-token=lockbox-test".to_owned(),
            "--logger=zap".to_owned(),
            "--log-outputs=stderr".to_owned(),
            "--log-level=error".to_owned(),
        ];
        if let Some(tls) = &self.tls {
            args.push(format!("--cert-file={}", tls.cert));
            args.push(format!("--key-file={}", tls.key));
            args.push(format!("--trusted-ca-file={}", tls.ca));
            if tls.client_cert_auth {
                args.push("--client-cert-auth".to_owned());
            }
        }
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        // The watchdog prints the member's pid, then waits for its stdin to
        // close and kills the member (thawing it first, were it frozen).
        let script = format!(
            "{ETCD} {} 2>>'{}/etcd.log' & p=$!; echo $p; cat >/dev/null; \
             kill -9 $p 2>/dev/null; kill -CONT $p 2>/dev/null; wait $p",
            quoted.join(" "),
            self.data_dir.parent().unwrap().display()
        );
        let mut watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd's watchdog");
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the member's pid");
        self.pid = Some(line.trim().parse().expect("a pid"));
        self.watchdog = Some(watchdog);
    }

    /// Kills the member (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
        self.pid = None;
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the member.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.pid.expect("the member runs");
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: a plain signal to a process this harness started.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Starts a killed member again, on its data.
    pub fn restart(&mut self) {
        self.start();
    }

    pub fn is_running(&self) -> bool {
        self.watchdog.is_some()
    }

    /// This member's status: (its id, the leader it follows: 0 for none).
    pub fn status(&self) -> Option<(u64, u64)> {
        let answer = post(self.admin_port, "/v3/maintenance/status", "{}", ms(500))?;
        Some((json_u64(&answer, "member_id"), json_u64(&answer, "leader")))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A cluster of members on loopback ports, killed when dropped.
pub struct EtcdCluster {
    pub members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until they agree on a leader.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_with(n, None)
    }

    /// Starts `n` members, serving their clients over TLS with `tls` if
    /// given, and waits until they agree on a leader.
    pub fn start_with(n: usize, tls: Option<MemberTls>) -> EtcdCluster {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = process_dir(&format!("etcd-{seq}"));
        // A port chosen free can still be taken before etcd binds it (by any
        // outgoing connection: they draw from the same range), and etcd then
        // exits at once. Seen once in CI as "no leader within 30 s"; such a
        // start is begun again on other ports.
        for attempt in 1.. {
            let cluster = EtcdCluster::start_on(n, tls.clone(), &dir);
            match cluster.wait_for_leader_or_exit(Duration::from_secs(30)) {
                Ok(_) => return cluster,
                Err(log) if attempt < 5 && log.contains("address already in use") => {
                    drop(cluster);
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).expect("temporary directory");
                }
                Err(log) => panic!(
                    "the etcd cluster elected no leader (a member exited, or 30 s passed); its log ends:\n{}",
                    log.lines()
                        .rev()
                        .take(20)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
        unreachable!()
    }

    /// Starts `n` members with their data in `dir`, on fresh ports.
    fn start_on(n: usize, tls: Option<MemberTls>, dir: &std::path::Path) -> EtcdCluster {
        let mut ports = free_ports(3 * n).into_iter();
        let mut members: Vec<Member> = (0..n)
            .map(|i| {
                let client_port = ports.next().unwrap();
                let admin_port = ports.next().unwrap();
                Member {
                    name: format!("m{i}"),
                    client_port,
                    admin_port: if tls.is_some() {
                        admin_port
                    } else {
                        client_port
                    },
                    peer_port: ports.next().unwrap(),
                    data_dir: dir.join(format!("m{i}")),
                    cluster: String::new(),
                    tls: tls.clone(),
                    watchdog: None,
                    pid: None,
                }
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.cluster = cluster.clone();
            m.start();
        }
        EtcdCluster { members }
    }

    /// Like [`EtcdCluster::wait_for_leader`], but gives up as soon as a
    /// member's process has exited; on failure, the members' log.
    fn wait_for_leader_or_exit(&self, limit: Duration) -> Result<usize, String> {
        let until = Instant::now() + limit;
        loop {
            if let Some(i) = self.leader() {
                return Ok(i);
            }
            // SAFETY: signal 0 only asks whether the process exists.
            let exited = self
                .members
                .iter()
                .any(|m| m.pid.is_some_and(|pid| unsafe { libc::kill(pid, 0) } != 0));
            if exited || Instant::now() >= until {
                let log = self.members[0].data_dir.parent().unwrap().join("etcd.log");
                return Err(std::fs::read_to_string(log).unwrap_or_default());
            }
            std::thread::sleep(ms(20));
        }
    }

    /// Every member's client URL, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn builder(&self) -> LockClientBuilder {
        LockClient::etcd(&self.endpoints())
    }

    /// The index of the member every running, answering member follows as
    /// leader, once they agree (polling their status until `limit`).
    pub fn wait_for_leader(&self, limit: Duration) -> Option<usize> {
        let until = Instant::now() + limit;
        loop {
            if let Some(i) = self.leader() {
                return Some(i);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(ms(20));
        }
    }

    /// The index of the leader, when every member that answers names the
    /// same one (a frozen or killed member does not answer).
    pub fn leader(&self) -> Option<usize> {
        let statuses: Vec<(usize, (u64, u64))> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_running())
            .filter_map(|(i, m)| Some((i, m.status()?)))
            .collect();
        let leader = statuses.first()?.1.1;
        if leader == 0 || statuses.iter().any(|(_, (_, l))| *l != leader) {
            return None;
        }
        statuses
            .iter()
            .find(|(_, (id, _))| *id == leader)
            .map(|(i, _)| *i)
    }

    /// The number of keys under `prefix`, read from any running member
    /// (linearizably).
    pub fn count_keys(&self, prefix: &str) -> Option<u64> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let body = format!(
            r#"{{"key":"{}","range_end":"{}","count_only":true}}"#,
            b64(prefix.as_bytes()),
            b64(&end)
        );
        self.members
            .iter()
            .filter(|m| m.is_running())
            .find_map(|m| post(m.admin_port, "/v3/kv/range", &body, ms(2000)))
            .map(|a| json_u64(&a, "count"))
    }
}

static SINGLE: OnceLock<EtcdCluster> = OnceLock::new();

/// One single-member cluster for the whole test process (its ports are its
/// own: other tests' servers are not touched).
pub fn single() -> &'static EtcdCluster {
    SINGLE.get_or_init(|| EtcdCluster::start(1))
}

/// The variable in which a test process hands its single member's endpoint
/// to its child processes, so that they use that member, not one of their own.
pub const URL_VAR: &str = "LOCKBOX_TEST_ETCD_URL";

/// The environment a child process needs to reach this process's single
/// member: empty while none was started (and none inherited).
pub fn child_env() -> Vec<(&'static str, String)> {
    match SINGLE.get() {
        Some(cluster) => vec![(URL_VAR, cluster.endpoints())],
        None => std::env::var(URL_VAR)
            .map(|url| vec![(URL_VAR, url)])
            .unwrap_or_default(),
    }
}

/// This process's certificates for TLS members (made on first use): those of
/// [`make_certs`](super::tls::make_certs), plus a member certificate for
/// `localhost` that etcd's gateway can also present as a client.
pub struct EtcdCerts {
    pub certs: super::tls::Certs,
    pub member_cert: String,
    pub member_key: String,
}

pub fn etcd_certs() -> &'static EtcdCerts {
    static CERTS: OnceLock<EtcdCerts> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir = process_dir("etcd-certs");
        let certs = super::tls::make_certs(&dir).unwrap_or_else(|e| panic!("certificates: {e}"));
        let base = dir.join("member").display().to_string();
        super::tls::issue(
            &dir.join("ca").display().to_string(),
            &base,
            "localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth",
        )
        .unwrap_or_else(|e| panic!("member certificate: {e}"));
        EtcdCerts {
            certs,
            member_cert: format!("{base}.crt"),
            member_key: format!("{base}.key"),
        }
    })
}

/// One single-member cluster serving its clients over TLS only (on
/// `https://localhost:…`), requiring a client certificate issued by
/// [`etcd_certs`]' CA; started on first use, for the whole test process.
pub fn single_tls() -> &'static EtcdCluster {
    static SINGLE: OnceLock<EtcdCluster> = OnceLock::new();
    SINGLE.get_or_init(|| {
        let c = etcd_certs();
        EtcdCluster::start_with(
            1,
            Some(MemberTls {
                cert: c.member_cert.clone(),
                key: c.member_key.clone(),
                ca: c.certs.ca.clone(),
                client_cert_auth: true,
            }),
        )
    })
}

/// The single member's endpoint: in a child process, its parent's (see
/// [`child_env`]).
pub fn etcd_url() -> String {
    match std::env::var(URL_VAR) {
        Ok(url) if SINGLE.get().is_none() => url,
        _ => single().endpoints(),
    }
}

/// A POST of `body` to `path` on 127.0.0.1:`port`, answered within `limit`:
/// the answer's body, or `None`.
pub fn post(port: u16, path: &str, body: &str, limit: Duration) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.set_write_timeout(Some(limit)).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(body.to_owned())
}

/// A numeric field anywhere in a JSON answer (etcd writes 64-bit numbers as
/// strings): the first `"field":"N"` or `"field":N`.
pub fn json_u64(answer: &str, field: &str) -> u64 {
    let pat = format!("\"{field}\":");
    let Some(at) = answer.find(&pat) else {
        return 0;
    };
    answer[at + pat.len()..]
        .trim_start_matches('"')
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One change in etcd's history of a key.
#[derive(Debug, Clone)]
pub struct Change {
    pub deleted: bool,
    pub key: String,
    pub create_revision: u64,
    pub mod_revision: u64,
}

/// etcd's whole history of the keys under `prefix` (the test clusters never
/// compact): a watch from revision 1, read until a marker key written after
/// everything else (outside `prefix`, under `lockbox-test/`) shows up, so the
/// read ends on a signal, not a timeout.
pub fn history(port: u16, prefix: &str) -> Vec<Change> {
    use serde_json::Value;
    let marker = format!("lockbox-test/history-end-{}", std::process::id());
    // Watched together with `prefix`: from the common start of both keys.
    let watched = "lockbox";
    let mut end = watched.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let body = format!(
        r#"{{"create_request":{{"key":"{}","range_end":"{}","start_revision":"1"}}}}"#,
        b64(watched.as_bytes()),
        b64(&end)
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, ms(2000)).expect("connect to etcd");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let put = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        b64(marker.as_bytes()),
        b64(b"end")
    );
    assert!(
        post(port, "/v3/kv/put", &put, ms(5000)).is_some(),
        "marker put"
    );
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    // The head.
    loop {
        line.clear();
        reader.read_line(&mut line).expect("watch head");
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    // The chunked body: lines of JSON, one per answer.
    let mut buf = Vec::new();
    let mut changes = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("chunk size");
        let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
        assert!(size > 0, "the watch ended before the marker");
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).expect("chunk");
        buf.extend_from_slice(&chunk[..size]);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let text: Vec<u8> = buf.drain(..=nl).collect();
            let v: Value = serde_json::from_slice(&text).expect("a watch answer");
            let events = v["result"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for e in events {
                let key = unb64(e["kv"]["key"].as_str().unwrap_or(""));
                if key == marker {
                    return changes;
                }
                if !key.starts_with(prefix) {
                    continue;
                }
                let num = |f: &str| {
                    e["kv"][f]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                };
                changes.push(Change {
                    deleted: e["type"].as_str() == Some("DELETE"),
                    key,
                    create_revision: num("create_revision"),
                    mod_revision: num("mod_revision"),
                });
            }
        }
    }
}

fn unb64(s: &str) -> String {
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

/// The holders of the keys in `changes`, as etcd made them, in order: the
/// create revision of the oldest live key after each change, whenever it
/// changed (a holder is the oldest key under its name).
pub fn holders(changes: &[Change]) -> Vec<u64> {
    let mut live: std::collections::BTreeMap<String, u64> = Default::default();
    let mut out: Vec<u64> = Vec::new();
    for c in changes {
        if c.deleted {
            live.remove(&c.key);
        } else {
            live.insert(c.key.clone(), c.create_revision);
        }
        if let Some(&first) = live.values().min()
            && out.last() != Some(&first)
        {
            out.push(first);
        }
    }
    out
}

/// The keys under `prefix` now, oldest first: each one's create revision
/// and its value (lockbox's record, JSON). `None` if the member did not
/// answer.
pub fn queue(port: u16, prefix: &str) -> Option<Vec<(u64, serde_json::Value)>> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let body = format!(
        r#"{{"key":"{}","range_end":"{}","sort_order":"ASCEND","sort_target":"CREATE"}}"#,
        b64(prefix.as_bytes()),
        b64(&end)
    );
    let answer = post(port, "/v3/kv/range", &body, Duration::from_secs(2))?;
    let v: serde_json::Value = serde_json::from_str(&answer)
        .ok()
        .or_else(|| serde_json::from_str(&dechunk(&answer)?).ok())?;
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    Some(
        kvs.iter()
            .map(|kv| {
                let rev = kv["create_revision"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                let value = kv["value"]
                    .as_str()
                    .map(unb64)
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or(serde_json::Value::Null);
                (rev, value)
            })
            .collect(),
    )
}

/// The body of a chunked HTTP/1.1 answer (`Transfer-Encoding: chunked`, as
/// the gateway sends answers of unknown length), joined.
fn dechunk(raw: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = raw;
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// A fake etcd member for hostile-answer tests: serves each POST with
/// `answer(path)`, one request per connection, until the test process ends.
/// An answer `TRICKLE:<text>` sends the headers, then `<text>` one byte
/// every 100 ms, for ever.
pub fn fake_member(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = std::sync::Arc::new(answer);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = answer.clone();
            thread::spawn(move || serve_fake(stream, &*answer));
        }
    });
    port
}

fn serve_fake(stream: TcpStream, answer: &dyn Fn(&str) -> String) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let mut length = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let out = answer(&path);
    let mut stream = stream;
    if let Some(trickle) = out.strip_prefix("TRICKLE:") {
        // Headers, then one byte every 100 ms, for ever (a member that answers
        // slowly byte by byte): only the client's bound ends it.
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
        );
        for b in trickle.bytes().cycle() {
            if stream.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        return;
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{out}",
        out.len()
    );
}
