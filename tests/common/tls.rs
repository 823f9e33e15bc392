//! A throwaway PostgreSQL cluster that accepts TCP connections over TLS only,
//! with a CA, server and client certificates made here with the `openssl` CLI.
//! Started once per test process and kept for its life (its watchdog stops it
//! and deletes its directory, certificates included, at exit).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::server::Cluster;

/// The TLS cluster and the files a client needs.
pub struct TlsServer {
    pub cluster: Cluster,
    /// The CA that issued the server's and the client's certificates.
    pub ca: String,
    /// A CA that issued nothing this server shows.
    pub other_ca: String,
    /// A client certificate and key for the role `certuser` (which logs in by
    /// certificate only: the `cert` method in `pg_hba.conf`).
    pub client_cert: String,
    pub client_key: String,
}

impl TlsServer {
    pub fn port(&self) -> u16 {
        self.cluster.port
    }

    /// `postgres://postgres@{host}:{port}/postgres?{query}`; `host` may carry
    /// its own credentials (`user:password@host`).
    pub fn url(&self, host: &str, query: &str) -> String {
        let user = if host.contains('@') { "" } else { "postgres@" };
        format!(
            "postgres://{user}{host}:{}/postgres?{query}",
            self.cluster.port
        )
    }

    /// `verify-full` against the CA, by the certificate's host name.
    pub fn verified_url(&self) -> String {
        self.url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", self.ca),
        )
    }

    /// The cluster over its Unix-domain socket (`local … trust`).
    pub fn socket_url(&self) -> String {
        format!(
            "postgres:///postgres?host={}&port={}&user=postgres",
            self.cluster.socket_dir(),
            self.cluster.port
        )
    }

    /// An administrative connection over the socket.
    pub fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.socket_url(), postgres::NoTls).expect("admin over socket")
    }
}

/// The process's TLS cluster, started on first use.
pub fn tls_server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| start().unwrap_or_else(|why| panic!("starting the TLS cluster: {why}")))
}

fn start() -> Result<TlsServer, String> {
    let mut paths = None;
    let cluster = Cluster::start_with(|cluster| {
        let data = cluster.data();
        let certs = Path::new(&data).parent().unwrap().join("certs");
        std::fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
        let made = make_certs(&certs)?;
        for (file, mode) in [
            ("server.crt", "644"),
            ("server.key", "600"),
            ("ca.crt", "644"),
        ] {
            let to = format!("{data}/{file}");
            let from = certs.join(file);
            std::fs::copy(&from, &to).map_err(|e| format!("copying {file}: {e}"))?;
            cluster.give_to_server(&to, mode)?;
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{data}/postgresql.conf"))
            .map_err(|e| e.to_string())?;
        use std::io::Write;
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'ca.crt'"
        )
        .map_err(|e| e.to_string())?;
        // TCP over TLS only; the socket stays open for administration.
        std::fs::write(
            format!("{data}/pg_hba.conf"),
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 trust\n",
        )
        .map_err(|e| e.to_string())?;
        paths = Some((made.ca, made.other_ca, made.client_cert, made.client_key));
        Ok(())
    })?;
    let (ca, other_ca, client_cert, client_key) = paths.ok_or("no certificates")?;
    let server = TlsServer {
        cluster,
        ca,
        other_ca,
        client_cert,
        client_key,
    };
    server
        .admin()
        .batch_execute("CREATE ROLE certuser LOGIN SUPERUSER")
        .map_err(|e| e.to_string())?;
    Ok(server)
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A self-signed CA: `{base}.crt`, `{base}.key`.
fn make_ca(base: &str, cn: &str) -> Result<(), String> {
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-keyout",
        &format!("{base}.key"),
        "-out",
        &format!("{base}.crt"),
        "-days",
        "2",
        "-subj",
        &format!("/CN={cn}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])
}

/// A leaf certificate for `cn` issued by the CA at `ca`: `{base}.crt`, `{base}.key`.
pub fn issue(ca: &str, base: &str, cn: &str, extensions: &str) -> Result<(), String> {
    let ext = format!("{base}.ext");
    std::fs::write(
        &ext,
        format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}\n"),
    )
    .map_err(|e| e.to_string())?;
    openssl(&[
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-keyout",
        &format!("{base}.key"),
        "-out",
        &format!("{base}.csr"),
        "-subj",
        &format!("/CN={cn}"),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &format!("{base}.csr"),
        "-CA",
        &format!("{ca}.crt"),
        "-CAkey",
        &format!("{ca}.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        &format!("{base}.crt"),
        "-extfile",
        &ext,
    ])
}

/// A set of certificate files made by [`make_certs`] (for servers other than
/// the TLS cluster above, e.g. a TLS-only redis-server).
#[derive(Clone, Debug)]
pub struct Certs {
    /// The CA that issued the server's and the client's certificates.
    pub ca: String,
    /// A CA that issued nothing the server shows (and `other_client`).
    pub other_ca: String,
    /// For host name `localhost` only (so 127.0.0.1 is a mismatch).
    pub server_cert: String,
    pub server_key: String,
    /// A client certificate and key issued by `ca`.
    pub client_cert: String,
    pub client_key: String,
    /// A client certificate (key: `other_client_key`) issued by `other_ca`.
    pub other_client_cert: String,
    pub other_client_key: String,
}

/// Makes a CA, another CA, a server certificate for `localhost` (so
/// `127.0.0.1` is a host name it is not valid for) and client certificates
/// from each CA for the user `certuser` (PostgreSQL's `cert` method matches the
/// name; Redis ignores it), all in `dir` (which must exist).
pub fn make_certs(dir: &Path) -> Result<Certs, String> {
    let c = |name: &str| dir.join(name).display().to_string();
    make_ca(&c("ca"), "lockbox test CA")?;
    make_ca(&c("other-ca"), "another CA")?;
    issue(
        &c("ca"),
        &c("server"),
        "localhost",
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
    )?;
    issue(
        &c("ca"),
        &c("client"),
        "certuser",
        "extendedKeyUsage=clientAuth",
    )?;
    issue(
        &c("other-ca"),
        &c("other-client"),
        "certuser",
        "extendedKeyUsage=clientAuth",
    )?;
    Ok(Certs {
        ca: c("ca.crt"),
        other_ca: c("other-ca.crt"),
        server_cert: c("server.crt"),
        server_key: c("server.key"),
        client_cert: c("client.crt"),
        client_key: c("client.key"),
        other_client_cert: c("other-client.crt"),
        other_client_key: c("other-client.key"),
    })
}
