//! TLS with the echo pipeline on 127.0.0.1:0: a certificate for `localhost` from a test CA made
//! by `openssl`;
//! `https://` and `wss://` are served (the client library trusts it through `PARLEY_CA_FILE`),
//! plain text on the TLS port gets nothing and is counted, a bad certificate file is a clear
//! start-up error, and a non-loopback address needs TLS unless it is waived.
use parley_client::talk::{Clip, TalkOptions};
use parley_client::transport::TransportOptions;
use parley_server::config::{Config, EchoMode};
use parley_server::conn::TlsConfig;
use parley_server::conversation::echo::EchoPipeline;
use parley_tests::TestServer;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName, pki_types::pem::PemObject};

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parley-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_are_served_with_the_configured_certificate() {
    let (tls, ca) = parley_tests::tls::certificate(&scratch(), "localhost");
    // SAFETY: set before any thread of this test binary reads the environment (its only test
    // that does).
    unsafe { std::env::set_var("PARLEY_CA_FILE", &ca) };
    let mut config = Config { tls: Some(tls.clone()), ..Config::default() };
    config.echo.mode = EchoMode::Packet;
    let server = TestServer::start(config.clone(), Arc::new(EchoPipeline::new(config.echo.clone()))).await;
    let port = server.addr.port();

    // https: a TLS client that trusts only this certificate reads /healthz.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&ca).unwrap()).unwrap();
    let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK") && response.contains("\"status\":\"ok\""), "{response}");

    // wss: the client library's session, audio there and back.
    let tone: Vec<f32> =
        (0..48_000).map(|i| (i as f32 * 440.0 / 48_000.0 * std::f32::consts::TAU).sin() * 0.3).collect();
    let packets = parley_client::transport::encode_packets(&tone, 48_000).unwrap();
    let options = TalkOptions { server: format!("wss://localhost:{port}"), ..TalkOptions::default() };
    let result = parley_client::talk(&options, &[Clip { name: "tone".into(), samples: tone }]).await.unwrap();
    assert!(result.frames.len() >= 40, "{} frames back", result.frames.len());

    // The transport bench over wss: every frame echoed, and the server's own turnaround and CPU
    // read from its /metrics over https.
    let options = TransportOptions {
        server: format!("wss://localhost:{port}"),
        streams: 2,
        seconds: 1,
        ramp_ms: 2,
        sample_rate: 48_000,
    };
    let report = parley_client::transport::run(&options, &packets).await;
    assert_eq!((report.frames_sent, report.frames_lost, report.failed_sessions), (100, 0, 0), "{report:?}");
    assert!(report.server_turnaround_us_p99.is_some_and(|us| us > 0), "{report:?}");
    assert!(report.server_cpu_us_per_frame.is_some() && report.generator_cpu_us_per_frame.is_some(), "{report:?}");

    // Plain text on the TLS port: no answer, counted.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    let failures = server.metrics.tls_handshake_failures.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_is_a_clear_start_up_error_and_public_addresses_need_tls() {
    let dir = scratch().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    let tls = TlsConfig { cert: dir.join("cert.pem"), key: dir.join("missing.pem") };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config { tls: Some(tls), ..Config::default() };
    let pipeline = Arc::new(EchoPipeline::new(config.echo.clone()));
    let error =
        parley_server::run_with_pipeline(listener, config, pipeline, Default::default(), std::future::pending::<()>())
            .await
            .unwrap_err()
            .to_string();
    assert!(error.contains("cert.pem"), "{error}");

    let public = "listen = \"0.0.0.0:9000\"\n[auth]\nallow_anonymous = true\n";
    let error = Config::from_toml(public).unwrap_err().to_string();
    assert!(error.contains("TLS"), "{error}");
    assert!(Config::from_toml(&format!("allow_plaintext = true\n{public}")).is_ok());
}
