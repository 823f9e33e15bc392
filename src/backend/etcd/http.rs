//! The gateway: etcd's v3 JSON gateway over HTTP/1.1, one blocking request at
//! a time per caller, every request bounded by its limit, failing over from a
//! member that does not answer to the next.
//!
//! Every request body is a JSON object; every answer is one (or, for
//! `/v3/watch`, a stream of them, one per line). 64-bit integers come as JSON
//! strings and fields at their zero value are left out, so the readers here
//! ([`int`], [`text`]) take both forms and read a missing field as zero.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use rustls::pki_types::PrivateKeyDer;
use rustls::{AlertDescription, CertificateError};
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};

use crate::backend::TlsMaterial;
use crate::error::{Error, Result};

/// The gRPC status the gateway reports when the member cannot serve the
/// request now (no leader, a request timed out in Raft, shutting down): worth
/// trying another member.
const UNAVAILABLE: i64 = 14;
/// The gRPC status of a deadline the member gave up on.
const DEADLINE_EXCEEDED: i64 = 4;

/// An error from etcd, or from reaching it: what `Error::Database` carries.
#[derive(Debug, Clone)]
pub(crate) struct EtcdError {
    /// What was asked (`/v3/kv/txn`, …).
    pub what: &'static str,
    /// Each member tried, with why it gave no answer; or the one that answered
    /// with an error, with the server's message.
    pub attempts: Vec<(String, String)>,
    /// The gRPC status code of a server's error answer, if there was one.
    pub code: Option<i64>,
}

/// The pause before another round over the members when one said it cannot
/// serve yet (no leader, or the leader changed).
const ELECTION_PAUSE: Duration = Duration::from_millis(50);

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd {}: ", self.what)?;
        for (i, (endpoint, why)) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{endpoint}: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for EtcdError {}

impl EtcdError {
    /// Whether the server answered that it does not know the lease.
    pub fn lease_not_found(&self) -> bool {
        self.code == Some(5)
            && self
                .attempts
                .last()
                .is_some_and(|(_, m)| m.contains("lease not found"))
    }
}

/// One etcd member's client URL, checked: `http://host:port` or
/// `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint(pub String);

impl Endpoint {
    /// Whether requests to it go over TLS.
    pub fn is_tls(&self) -> bool {
        self.0.starts_with("https://")
    }
}

/// Parses a comma-separated list of `http://host:port` or `https://host:port`
/// client URLs, all of one scheme: a list that mixes them is refused, as
/// requests fail over from one member to the next and a lock would otherwise
/// travel in plain text whenever a TLS member is down.
pub(crate) fn parse_endpoints(list: &str) -> Result<Vec<Endpoint>> {
    // Checked on the whole list, before it is split on commas: a password
    // may hold a comma, and a piece of it must not be echoed as an endpoint.
    if list.contains('@') {
        return Err(Error::InvalidConfig(
            "etcd endpoints take no user or password (etcd authentication is not \
             supported yet)"
                .to_owned(),
        ));
    }
    let mut out: Vec<Endpoint> = Vec::new();
    for raw in list.split(',') {
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let (scheme, rest) = if let Some(rest) = raw.strip_prefix("http://") {
            ("http", rest)
        } else if let Some(rest) = raw.strip_prefix("https://") {
            ("https", rest)
        } else {
            return Err(Error::InvalidConfig(format!(
                "etcd endpoint {:?} is not an http://host:port or https://host:port URL",
                describe_one(raw)
            )));
        };
        let host_port = rest.strip_suffix('/').unwrap_or(rest);
        let valid = match host_port.rsplit_once(':') {
            Some((host, port)) => {
                !host.is_empty()
                    && !host.contains(['/', '?', '#', ' '])
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            }
            None => false,
        };
        if !valid {
            return Err(Error::InvalidConfig(format!(
                "etcd endpoint {raw:?} is not an {scheme}://host:port URL (the port is required)"
            )));
        }
        let endpoint = Endpoint(format!("{scheme}://{host_port}"));
        if let Some(first) = out.first()
            && first.is_tls() != endpoint.is_tls()
        {
            return Err(Error::InvalidConfig(format!(
                "etcd endpoints {} and {} mix http:// and https://: give every member with \
                 the same scheme (a request failing over would otherwise leave TLS)",
                first.0, endpoint.0
            )));
        }
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidConfig(
            "no etcd endpoint given: pass http://host:port or https://host:port, several \
             separated by commas"
                .to_owned(),
        ));
    }
    Ok(out)
}

/// An endpoint as shown in messages: anything before an `@` (credentials
/// typed into the URL) left out.
fn describe_one(raw: &str) -> String {
    match raw.rsplit_once('@') {
        Some((_, host)) => format!("(credentials hidden)@{host}"),
        None => raw.to_owned(),
    }
}

/// The endpoints as shown in messages and `Debug`, never with credentials:
/// before an `@`, everything back to the `://` before it is hidden — on the
/// whole list, since a password may hold a comma (a host before it may be
/// hidden with it).
pub(crate) fn describe_endpoints(list: &str) -> String {
    let mut hidden = String::with_capacity(list.len());
    let mut rest = list;
    while let Some(at) = rest.find('@') {
        let head = &rest[..at];
        let start = head.rfind("://").map_or(0, |i| i + 3);
        hidden.push_str(&head[..start]);
        hidden.push_str("(credentials hidden)@");
        rest = &rest[at + 1..];
    }
    hidden.push_str(rest);
    hidden
        .split(',')
        .map(|e| describe_one(e.trim()))
        .filter(|e| !e.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// The members' client URLs and one HTTP agent (its idle connections kept for
/// reuse), shared by the backend and its held locks.
#[derive(Clone)]
pub(crate) struct Gateway {
    agent: ureq::Agent,
    endpoints: Arc<[Endpoint]>,
    /// The member that answered last: tried first.
    current: Arc<AtomicUsize>,
    /// Whether the endpoints are https:// (for the messages).
    tls: bool,
    /// Whether a client certificate is presented (for the messages).
    client_cert: bool,
}

impl Gateway {
    /// Whether the endpoints are https://.
    pub fn over_tls(&self) -> bool {
        self.tls
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("endpoints", &self.describe())
            .finish_non_exhaustive()
    }
}

/// A body read from an answer is never longer than this (a listing of many
/// held locks included).
const MAX_BODY: u64 = 64 * 1024 * 1024;

impl Gateway {
    /// A gateway to `endpoints`; over TLS (`https://` endpoints) with `tls`:
    /// rustls with the `ring` provider (never the process default), the
    /// server's certificate verified against `tls.roots` and its host name
    /// checked, and the client certificate presented if there is one.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the client key cannot be handed to the
    /// HTTP client.
    pub fn new(endpoints: Vec<Endpoint>, tls: Option<TlsMaterial>) -> Result<Gateway> {
        let mut config = ureq::Agent::config_builder()
            // etcd's error answers carry its message in a JSON body: read it.
            .http_status_as_error(false)
            .max_idle_connections_per_host(16)
            .max_idle_age(Duration::from_secs(30))
            // etcd's gateway never redirects: an answer that does is not
            // followed (it could lead out of TLS, or to another host), and
            // fails as an answer that is not etcd's.
            .max_redirects(0)
            // Never through a proxy named by the environment (ALL_PROXY,
            // HTTP_PROXY, …): lock traffic goes to the members given, only.
            .proxy(None)
            .user_agent("lockbox");
        let client_cert = tls.as_ref().is_some_and(|t| t.client.is_some());
        let over_tls = tls.is_some();
        // Over plain HTTP too: ring and no trusted root, so that an https://
        // URL reaching ureq anyway fails its handshake instead of making ureq
        // look for a crypto provider or roots it was built without (a panic).
        let tls = tls.unwrap_or(TlsMaterial {
            roots: Vec::new(),
            client: None,
            client_pem: None,
        });
        config = config.https_only(over_tls).tls_config(tls_config(tls)?);
        Ok(Gateway {
            agent: ureq::Agent::new_with_config(config.build()),
            endpoints: endpoints.into(),
            current: Arc::new(AtomicUsize::new(0)),
            tls: over_tls,
            client_cert,
        })
    }

    pub fn describe(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.0.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The members in the order to try them: the last one that answered first.
    fn order(&self) -> Vec<usize> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        (0..n).map(|i| (first + i) % n).collect()
    }

    /// Sends `body` to `path`, within `limit` in all: to the member that
    /// answered last and, while time is left, to the next when one cannot
    /// answer (unreachable, no answer in its share of the time, or an
    /// `Unavailable` error such as "no leader"). Every request lockbox sends
    /// this way can be sent twice without harm (see the callers). Returns the
    /// answer and when the request that got it was sent.
    ///
    /// # Errors
    /// [`EtcdError`] (as [`Error::Database`]): the server's error answer, or
    /// every member's reason for giving none.
    pub fn call(
        &self,
        what: &'static str,
        body: &Value,
        limit: Duration,
    ) -> Result<(Value, Instant)> {
        self.call_where(what, body, limit)
            .map(|(v, sent, _)| (v, sent))
    }

    /// [`call`](Self::call), also saying which member answered.
    pub fn call_where(
        &self,
        what: &'static str,
        body: &Value,
        limit: Duration,
    ) -> Result<(Value, Instant, usize)> {
        let deadline = Instant::now() + limit;
        let order = self.order();
        let text = body.to_string();
        let mut attempts = Vec::new();
        // Rounds over the members while one of them answers that it cannot
        // serve yet (a leader election under way) and time is left: every
        // member failing in one round is then no reason to give up
        // (etcd_cluster.rs `leader_killed_while_held_and_waited` saw a
        // waiter's request fail on one member slow to answer, one saying
        // "leader changed" and the killed one, with half its time left).
        loop {
            let mut electing = false;
            for (k, &i) in order.iter().enumerate() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                // A share of what is left, so that a member that takes it all
                // (frozen, cut off from the others) leaves time for the next.
                let members_left = (order.len() - k) as u32;
                let share = if members_left > 1 { left / 2 } else { left };
                let endpoint = &self.endpoints[i];
                let sent = Instant::now();
                match self.send(endpoint, what, &text, share) {
                    Ok(answer) => match server_error(&answer) {
                        Some((code, message))
                            if code == UNAVAILABLE || code == DEADLINE_EXCEEDED =>
                        {
                            electing |= code == UNAVAILABLE;
                            attempts.push((endpoint.0.clone(), message));
                        }
                        Some((code, message)) => {
                            attempts.push((endpoint.0.clone(), message));
                            return Err(Error::database(EtcdError {
                                what,
                                attempts,
                                code: Some(code),
                            }));
                        }
                        None => {
                            self.current.store(i, Ordering::Relaxed);
                            return Ok((answer, sent, i));
                        }
                    },
                    Err(why) => attempts.push((endpoint.0.clone(), why)),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !electing || left <= ELECTION_PAUSE {
                break;
            }
            std::thread::sleep(ELECTION_PAUSE);
        }
        if attempts.is_empty() {
            attempts.push((self.describe(), format!("no time left (limit {limit:?})")));
        } else {
            // Start with another member next time.
            let failed = order[attempts.len().min(order.len()) - 1];
            self.current
                .store((failed + 1) % self.endpoints.len(), Ordering::Relaxed);
        }
        Err(Error::database(EtcdError {
            what,
            attempts,
            code: None,
        }))
    }

    /// One request to one member, within `limit`: the parsed answer, or why
    /// there was none.
    fn send(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: &str,
        limit: Duration,
    ) -> std::result::Result<Value, String> {
        let url = format!("{}{path}", endpoint.0);
        let response = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(limit))
            .build()
            .content_type("application/json")
            .send(body)
            .map_err(|e| describe_transport(&e, limit, self.tls, self.client_cert))?;
        let status = response.status();
        let text = response
            .into_body()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| describe_transport(&e, limit, self.tls, self.client_cert))?;
        serde_json::from_str::<Value>(&text).map_err(|e| {
            format!(
                "HTTP {status} with an answer that is not JSON ({e}): {}",
                excerpt(&text)
            )
        })
    }

    /// Opens a watch stream on the member tried first, within `limit` for the
    /// whole of it: the stream's lines are read by [`WatchStream::next`].
    pub fn watch(&self, body: &Value, limit: Duration) -> std::result::Result<WatchStream, String> {
        let i = self.order()[0];
        let endpoint = &self.endpoints[i];
        let url = format!("{}/v3/watch", endpoint.0);
        let result = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(limit))
            .build()
            .content_type("application/json")
            .send(body.to_string());
        match result {
            Ok(response) => Ok(WatchStream {
                lines: BufReader::new(Box::new(response.into_body().into_reader())),
            }),
            Err(e) => {
                self.skip(i);
                Err(format!(
                    "{}: {}",
                    endpoint.0,
                    describe_transport(&e, limit, self.tls, self.client_cert)
                ))
            }
        }
    }

    /// Starts with the member after `i` next time (it failed).
    pub fn skip(&self, i: usize) {
        let _ = self.current.compare_exchange(
            i,
            (i + 1) % self.endpoints.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The member tried first now.
    pub fn first(&self) -> usize {
        self.order()[0]
    }

    /// One request to the member at `url` only (health checks), within `limit`.
    pub fn call_at(
        &self,
        url: &str,
        path: &str,
        body: &Value,
        limit: Duration,
    ) -> std::result::Result<Value, String> {
        let endpoint = Endpoint(url.to_owned());
        // A member's advertised URL of the other scheme is not followed: out
        // of TLS, or over TLS with nothing to verify it by.
        if endpoint.is_tls() != self.tls {
            let scheme = if self.tls { "https://" } else { "http://" };
            return Err(format!(
                "the member advertises {url}, not the {scheme} the endpoints use: not contacted"
            ));
        }
        let answer = self.send(&endpoint, path, &body.to_string(), limit)?;
        match server_error(&answer) {
            Some((_, message)) => Err(message),
            None => Ok(answer),
        }
    }
}

/// A watch's answers, one JSON object a line.
pub(crate) struct WatchStream {
    lines: BufReader<Box<dyn std::io::Read + Send>>,
}

impl WatchStream {
    /// The next answer; `Err` when the stream ended, broke or ran out of time.
    pub fn next(&mut self) -> std::result::Result<Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            // A line is one answer: never longer than a body may be.
            let read = Read::take(&mut self.lines, MAX_BODY)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("the watch stream ended".to_owned());
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line)
                .map_err(|e| format!("a watch answer that is not JSON ({e}): {}", excerpt(&line)));
        }
    }
}

/// A server's error answer: `{"error": …, "code": N, "message": …}` (the
/// watch's too, inside `result` or not).
pub(crate) fn server_error(answer: &Value) -> Option<(i64, String)> {
    let code = int(answer, "code");
    let message = text(answer, "message")
        .or_else(|| text(answer, "error"))
        .filter(|m| !m.is_empty());
    if code == 0 && message.is_none() && answer.get("error").is_none() {
        return None;
    }
    let message = match answer.get("error") {
        Some(Value::Object(inner)) => inner
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or(message),
        _ => message,
    };
    Some((
        code,
        format!(
            "{} (code {code})",
            message.unwrap_or_else(|| "error without a message".to_owned())
        ),
    ))
}

/// ureq's TLS settings from lockbox's: the roots given (never ureq's own
/// webpki roots), the client identity if any, and the `ring` provider.
fn tls_config(tls: TlsMaterial) -> Result<TlsConfig> {
    let roots: Vec<Certificate<'static>> = tls
        .roots
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let client = match tls.client {
        Some((chain, key)) => {
            let chain: Vec<Certificate<'static>> = chain
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            let key = ureq_key(&key)
                .map_err(|why| Error::InvalidConfig(format!("etcd_tls_client_cert: {why}")))?;
            Some(ClientCert::new_with_certs(&chain, key))
        }
        None => None,
    };
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(crate::backend::ring_provider())
        .root_certs(RootCerts::new_with_certs(&roots))
        .client_cert(client)
        .build())
}

/// The key in ureq's type, which is built from PEM only (its key kinds are
/// not public): the DER, already checked against the certificate, put back
/// into the PEM section of its kind. The error says so without the key.
fn ureq_key(key: &PrivateKeyDer<'_>) -> std::result::Result<PrivateKey<'static>, String> {
    use base64::Engine as _;
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.secret_der());
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    PrivateKey::from_pem(pem.as_bytes())
        .map(|k| k.to_owned())
        .map_err(|_| format!("the client key ({label}) could not be handed to the HTTP client"))
}

/// The rustls error behind a transport error, if there is one.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(tls) => Some(tls),
        ureq::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

/// A TLS failure, said in etcd's and lockbox's terms: which certificate was
/// refused, by whom, and the setting that fixes it.
fn explain_tls(err: &rustls::Error, client_cert: bool) -> String {
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "TLS handshake failed: host name mismatch: the member's certificate is not \
                     valid for the host in the endpoint URL ({cert})"
                )
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "TLS handshake failed: the member's certificate is not trusted: it was not \
                 issued by a CA in etcd_tls_ca_file (or, without one, in the platform's trust \
                 store) ({cert})"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("TLS handshake failed: the member's certificate has expired ({cert})")
            }
            other => {
                format!("TLS handshake failed: the member's certificate was refused: {other}")
            }
        },
        rustls::Error::AlertReceived(
            // (Not `HandshakeFailure`: etcd, in Go, refuses a missing
            // certificate with one of these two; a failed negotiation of
            // version or cipher suite is something else.)
            alert @ (AlertDescription::CertificateRequired | AlertDescription::BadCertificate),
        ) if !client_cert => format!(
            "TLS handshake failed: the member requires a client certificate \
             (--client-cert-auth) and none was given ({alert:?}): set etcd_tls_client_cert"
        ),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied),
        ) => format!(
            "TLS handshake failed: the member refused the client certificate \
             (etcd_tls_client_cert) ({alert:?}): it must be issued by a CA in the member's \
             --trusted-ca-file, and valid"
        ),
        rustls::Error::InvalidMessage(_) => {
            "TLS handshake failed: the port does not serve TLS (the answer to the TLS hello is \
             not TLS); an https:// endpoint never falls back to plain text"
                .to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

fn describe_transport(e: &ureq::Error, limit: Duration, tls: bool, client_cert: bool) -> String {
    if let Some(tls) = rustls_error(e) {
        return explain_tls(tls, client_cert);
    }
    if tls
        && let ureq::Error::Io(io) = e
        && matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        )
    {
        // Over TLS 1.3 a member refuses a client certificate (or its
        // absence) after the client's side of the handshake is done: the
        // request is sent, and whether its alert or the closed connection is
        // seen first is a matter of timing. A plain-text port answers the
        // TLS hello by closing the connection too.
        let certificate = if client_cert {
            "a member started with --client-cert-auth does so when it does not trust the \
             client certificate (etcd_tls_client_cert: issued by a CA not in the member's \
             --trusted-ca-file, or invalid)"
        } else {
            "a member started with --client-cert-auth does so when no client certificate is \
             given: set etcd_tls_client_cert"
        };
        return format!(
            "the member closed the connection ({io}); when it does so at every connection, \
             during or right after the TLS handshake: {certificate}; or the port does not serve \
             TLS (an https:// endpoint never falls back to plain text)"
        );
    }
    match e {
        ureq::Error::Timeout(_) => format!("no answer within {limit:?}"),
        ureq::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

fn excerpt(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_owned()
}

/// A 64-bit integer field (given as a JSON string or number); 0 when missing
/// or not a number.
pub(crate) fn int(v: &Value, field: &str) -> i64 {
    match v.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// An unsigned 64-bit field (member ids use the whole range); 0 when
/// missing or not a number.
pub(crate) fn uint(v: &Value, field: &str) -> u64 {
    match v.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// A string field.
pub(crate) fn text(v: &Value, field: &str) -> Option<String> {
    v.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// An array field; empty when missing.
pub(crate) fn list<'a>(v: &'a Value, field: &str) -> &'a [Value] {
    v.get(field)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = parse_endpoints(" http://127.0.0.1:2379, http://[::1]:2380/ ,").unwrap();
        assert_eq!(
            e,
            vec![
                Endpoint("http://127.0.0.1:2379".into()),
                Endpoint("http://[::1]:2380".into())
            ]
        );
        assert!(matches!(parse_endpoints(""), Err(Error::InvalidConfig(_))));
        assert!(matches!(
            parse_endpoints("127.0.0.1:2379"),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            parse_endpoints("http://host"),
            Err(Error::InvalidConfig(_))
        ));
        assert!(
            parse_endpoints("https://host:2379,https://h2:1")
                .unwrap()
                .iter()
                .all(Endpoint::is_tls)
        );
        // A list that mixes the schemes is refused, whichever comes first.
        for mixed in ["https://a:1,http://b:2", "http://a:1,https://b:2"] {
            assert!(
                matches!(parse_endpoints(mixed), Err(Error::InvalidConfig(_))),
                "{mixed}"
            );
        }
        let e = parse_endpoints("http://bob:hunter2@host:2379").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = parse_endpoints("ftp://bob:hunter2@host:2379").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(!describe_endpoints("http://bob:hunter2@host:1,http://h:2").contains("hunter2"));
    }

    /// A plain-HTTP gateway asked for an https:// URL (a member advertising
    /// one) refuses it: no panic from a TLS stack set up for nothing.
    #[test]
    fn a_url_of_the_other_scheme_is_not_contacted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let gateway = Gateway::new(parse_endpoints("http://127.0.0.1:1").unwrap(), None).unwrap();
        let err = gateway
            .call_at(
                &format!("https://127.0.0.1:{port}"),
                "/v3/maintenance/status",
                &Value::Null,
                Duration::from_millis(300),
            )
            .unwrap_err();
        assert!(err.contains("not contacted"), "{err}");
        // And sent anyway (as a redirect could), it fails without a panic.
        let err = gateway
            .send(
                &Endpoint(format!("https://127.0.0.1:{port}")),
                "/v3/maintenance/status",
                "{}",
                Duration::from_millis(300),
            )
            .unwrap_err();
        assert!(!err.is_empty());
    }

    #[test]
    fn numbers_come_as_strings_or_not_at_all() {
        let v: Value = serde_json::from_str(r#"{"a":"12","b":7,"c":"x"}"#).unwrap();
        assert_eq!(int(&v, "a"), 12);
        assert_eq!(int(&v, "b"), 7);
        assert_eq!(int(&v, "c"), 0);
        assert_eq!(int(&v, "d"), 0);
        let id: Value = serde_json::from_str(r#"{"ID":"13668033151171901709"}"#).unwrap();
        assert_eq!(uint(&id, "ID"), 13668033151171901709);
        let err: Value = serde_json::from_str(
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        )
        .unwrap();
        assert_eq!(server_error(&err).unwrap().0, 5);
        assert!(server_error(&v).is_none());
    }
}
