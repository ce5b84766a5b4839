//! Certificates (rcgen) and tokens (`spool token create`) for the tests
//! of TLS and auth, on every listener.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and a server certificate it signed (for `localhost` and
/// 127.0.0.1), written as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_pki(dir: &Path, name: &str) -> Pki {
    make_pki_with(dir, name, |_| {})
}

/// [`make_pki`] whose server certificate expired on 2020-01-01.
#[allow(dead_code)] // not every test binary uses it
pub fn make_expired_pki(dir: &Path, name: &str) -> Pki {
    make_pki_with(dir, name, |params| {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    })
}

/// [`make_pki`] whose server certificate is itself a CA certificate
/// (basic constraints CA:TRUE), as a bare `openssl req -x509` makes one.
#[allow(dead_code)] // not every test binary uses it
pub fn make_ca_as_server_pki(dir: &Path, name: &str) -> Pki {
    make_pki_with(dir, name, |params| {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    })
}

/// [`make_pki`] whose server certificate is for TLS clients only (its
/// extended key usage is clientAuth).
#[allow(dead_code)] // not every test binary uses it
pub fn make_client_only_pki(dir: &Path, name: &str) -> Pki {
    make_pki_with(dir, name, |params| {
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    })
}

fn make_pki_with(
    dir: &Path,
    name: &str,
    server: impl FnOnce(&mut rcgen::CertificateParams),
) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    server(&mut params);
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).expect("write CA");
    std::fs::write(&pki.cert, cert.pem()).expect("write cert");
    std::fs::write(&pki.key, key.serialize_pem()).expect("write key");
    pki
}

/// The `spool` binary under test.
pub fn spool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spool"))
}

/// `spool token create NAME ARGS...`: (the secret, the TOML entry).
pub fn token_create(name: &str, args: &[&str]) -> (String, String) {
    let out = spool()
        .args(["token", "create", name])
        .args(args)
        .output()
        .expect("run spool token create");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    let secret = lines[1].to_owned();
    assert!(secret.starts_with("spool_"), "{text}");
    let at = text.find("[[token]]").expect("an entry");
    (secret, text[at..].to_owned())
}
