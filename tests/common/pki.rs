//! Certificates made for a test: a CA, a server certificate for `localhost`
//! and `127.0.0.1`, and a client certificate, as PEM files.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

pub struct Pki {
    dir: tempfile::TempDir,
    /// The CA's certificate.
    pub ca: String,
    /// A client certificate the CA signed, and its key.
    pub client: (String, String),
}

impl Pki {
    /// Writes `ca.pem`, `server.pem`, `server.key` and `client.pem` (the
    /// client's certificate and key together) to a temporary directory.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &ca);
        let client = leaf(&["client"], &ca);
        let write = |name: &str, content: &str| std::fs::write(dir.path().join(name), content);
        write("server.pem", &server_cert).unwrap();
        write("server.key", &server_key).unwrap();
        write("ca.pem", &ca.pem()).unwrap();
        write("client.pem", &format!("{}{}", client.0, client.1)).unwrap();
        Pki {
            dir,
            ca: ca.pem(),
            client,
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// The server flags for TLS with this PKI's server certificate.
    pub fn server_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server.key"),
        ]
    }
}

/// A new self-signed CA.
pub fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names` (DNS names or IP addresses) signed by `ca`,
/// and its key.
pub fn leaf(names: &[&str], ca: &CertifiedIssuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, ca)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}
