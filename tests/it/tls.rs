//! TLS to PostgreSQL (`sslmode`) and RabbitMQ (`amqps://`), and passwords
//! from files. The verifying cases go through a TLS-terminating proxy of the
//! test's own with certificates made on the fly, so the shared services need
//! no TLS configuration.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

use crate::{helpers::*, proxy::via};

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1.
struct Pki {
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            server_cert: server_cert.der().clone(),
            server_key: server_key.serialize_der(),
        }
    }

    fn write_ca(&self, dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    fn acceptor(&self) -> TlsAcceptor {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let config = ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![self.server_cert.clone()], key)
        .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// Terminates TLS in front of a plain service. For PostgreSQL it first
/// answers the client's SSLRequest with `S`, as a TLS-enabled server does.
async fn tls_proxy(
    target: SocketAddr,
    acceptor: TlsAcceptor,
    postgres: bool,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if postgres {
                    let mut request = [0u8; 8];
                    if client.read_exact(&mut request).await.is_err() {
                        return;
                    }
                    // Length 8, code 80877103: SSLRequest.
                    assert_eq!(
                        request,
                        [0, 0, 0, 8, 4, 210, 22, 47],
                        "the client asks for TLS first"
                    );
                    client.write_all(b"S").await.unwrap();
                }
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            });
        }
    });
    (addr, task)
}

fn local(port_of: &str, default: u16) -> SocketAddr {
    let url = url::Url::parse(port_of).unwrap();
    format!("127.0.0.1:{}", url.port().unwrap_or(default))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn postgresql_with_sslmode_require_encrypts_every_connection() {
    let mut app =
        spawn_app_with(|s| s.postgres.url = format!("{}?sslmode=require", s.postgres.url)).await;
    app.save("person", "p1", r#"{"name":"A"}"#).await;
    assert_eq!(app.next_event().await.op(), "created");
    let row = app
        .db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = $1 AND a.application_name = 'scramjet'",
            &[&app.names.database],
        )
        .await
        .unwrap();
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all > 0, "the daemon's connections are visible");
    assert_eq!(
        encrypted, all,
        "every connection of the daemon is encrypted"
    );
}

#[tokio::test]
async fn postgresql_with_verify_full_accepts_a_server_signed_by_the_configured_ca() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(&dir);
    let (addr, _proxy) = tls_proxy(local(&postgres_base(), 5432), pki.acceptor(), true).await;
    let mut app = spawn_app_with(|s| {
        s.postgres.url = format!("{}?sslmode=verify-full", via(&s.postgres.url, addr));
        s.postgres.tls_ca_file = Some(ca.clone());
    })
    .await;
    app.save("person", "p1", r#"{"name":"A"}"#).await;
    assert_eq!(app.next_event().await.op(), "created");
}

#[tokio::test]
async fn postgresql_with_verify_full_refuses_a_server_the_ca_did_not_sign() {
    let pki = Pki::new();
    let other = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let wrong_ca = other.write_ca(&dir);
    let (addr, _proxy) = tls_proxy(local(&postgres_base(), 5432), pki.acceptor(), true).await;
    let names = Names::new();
    let mut settings = test_settings(&names, "config/schemas".into());
    settings.postgres.url = format!("{}?sslmode=verify-full", via(&settings.postgres.url, addr));
    settings.postgres.tls_ca_file = Some(wrong_ca);
    settings.startup.connect_attempts = 1;
    let error = match scramjet::daemon::App::build(settings).await {
        Ok(_) => panic!("connected to a server with an untrusted certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("PostgreSQL"), "{error}");
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[tokio::test]
async fn amqps_with_a_ca_file_works_and_an_untrusted_broker_is_refused() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.write_ca(&dir);
    let (addr, _proxy) = tls_proxy(local(&amqp_url(), 5672), pki.acceptor(), false).await;
    let amqps = via(&amqp_url(), addr).replacen("amqp://", "amqps://", 1);
    let mut app = spawn_app_with(|s| {
        s.amqp.url = amqps.clone();
        s.amqp.tls_ca_file = Some(ca.clone());
    })
    .await;
    app.save("person", "p1", r#"{"name":"A"}"#).await;
    assert_eq!(app.next_event().await.op(), "created");

    let other = Pki::new();
    let wrong_ca = other.write_ca(&tempfile::tempdir().unwrap());
    let mut settings = app.settings.clone();
    settings.amqp.tls_ca_file = Some(wrong_ca);
    settings.startup.connect_attempts = 1;
    let error = match scramjet::daemon::App::build(settings).await {
        Ok(_) => panic!("connected to a broker with an untrusted certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("RabbitMQ"), "{error}");
}

#[tokio::test]
async fn the_broker_password_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("amqp-password");
    std::fs::write(&file, "guest\n").unwrap();
    let without_password = amqp_url().replacen("guest:guest@", "guest@", 1);
    let mut app = spawn_app_with(|s| {
        s.amqp.url = without_password.clone();
        s.amqp.password_file = Some(file.clone());
    })
    .await;
    app.save("person", "p1", r#"{"name":"A"}"#).await;
    assert_eq!(app.next_event().await.op(), "created");

    std::fs::write(&file, "not-the-password\n").unwrap();
    let mut settings = app.settings.clone();
    settings.startup.connect_attempts = 1;
    let error = match scramjet::daemon::App::build(settings).await {
        Ok(_) => panic!("connected with a wrong password"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("RabbitMQ"), "{error}");
    assert!(!error.contains("not-the-password"), "{error}");
}
