//! Test certificates: a CA and a server certificate it signed, made with Debian's `openssl`.
use parley_server::conn::TlsConfig;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A test CA and a certificate it signed for `host` and 127.0.0.1, made by `openssl` in `dir`:
/// the server's identity and the CA file a client trusts.
pub fn certificate(dir: &Path, host: &str) -> (TlsConfig, PathBuf) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs (scripts/setup-system installs it)");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &["-days", "2", "-subj", "/CN=Parley test CA", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[&["req"], &ec[..], &["-subj", &format!("/CN={host}"), "-keyout", "key.pem", "-out", "leaf.csr"]].concat(),
    );
    std::fs::write(
        dir.join("leaf.ext"),
        format!("subjectAltName=DNS:{host},IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    (TlsConfig { cert: dir.join("cert.pem"), key: dir.join("key.pem") }, dir.join("ca.pem"))
}
