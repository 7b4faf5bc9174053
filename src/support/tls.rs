//! TLS for PostgreSQL (rustls, libpq's `sslmode` semantics) and the CA file
//! for RabbitMQ's `amqps://`.
//!
//! tokio-postgres knows `sslmode` = `disable`, `prefer` and `require`; the
//! verifying modes of libpq (`verify-ca`, `verify-full`) are read here and
//! handed to tokio-postgres as `require` with a verifying connector:
//!
//! | `sslmode` | encrypted | certificate checked | host name checked |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `prefer` (the default) | if the server offers it, except over loopback | no | no |
//! | `require` | yes | only if `postgres.tls_ca_file` is set (as libpq does) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! Certificates are checked against `postgres.tls_ca_file` when set, else
//! against the system's trusted roots.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`, as far as it concerns certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// `disable`, `allow`, `prefer` or `require`: whatever tokio-postgres does.
    Plain,
    /// `verify-ca`: the chain must lead to a trusted root.
    VerifyCa,
    /// `verify-full`: the chain and the host name.
    VerifyFull,
}

/// Splits the verifying `sslmode`s out of a connection string (URL or
/// key=value), replacing them with `require`, which tokio-postgres understands.
pub(crate) fn split_sslmode(url: &str) -> (String, SslMode) {
    for (text, mode) in [
        ("sslmode=verify-full", SslMode::VerifyFull),
        ("sslmode=verify-ca", SslMode::VerifyCa),
    ] {
        if url.contains(text) {
            return (url.replace(text, "sslmode=require"), mode);
        }
    }
    (url.to_owned(), SslMode::Plain)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// PEM certificates from `path`.
pub(crate) fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read CA file {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("CA file {} is not PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "CA file {} holds no certificate",
        path.display()
    );
    Ok(certs)
}

fn roots(ca_file: Option<&Path>) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certificates(path)? {
                store.add(cert).with_context(|| {
                    format!("CA file {} holds an unusable certificate", path.display())
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!("no trusted root certificates found on this system");
            }
        }
    }
    Ok(store)
}

/// The TLS connector for PostgreSQL connections.
pub(crate) fn postgres_connector(
    mode: SslMode,
    ca_file: Option<&Path>,
) -> anyhow::Result<MakeRustlsConnect> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?;
    let config = match (mode, ca_file) {
        (SslMode::VerifyFull, ca) => builder
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth(),
        (SslMode::VerifyCa, ca) | (SslMode::Plain, ca @ Some(_)) => {
            let chain =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .context("cannot set up certificate verification")?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyName::new(Some(chain))))
                .with_no_client_auth()
        }
        (SslMode::Plain, None) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName::new(None)))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The verifier of the modes that do not check the host name: `verify-ca`
/// (the chain is checked) and `require` without a CA file (libpq's
/// behaviour: encrypted, certificate not checked). The handshake signatures
/// are verified either way, with the provider's algorithms — the same ones,
/// the same way, as [`WebPkiServerVerifier`] does.
#[derive(Debug)]
struct AnyName {
    /// Checks the chain (the name too, whose failure is then ignored);
    /// `None`: the certificate is not checked.
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// Verifies the handshake signatures.
    provider: Arc<CryptoProvider>,
}

impl AnyName {
    /// Checks the chain with `chain`, or no certificate at all with `None`.
    fn new(chain: Option<Arc<WebPkiServerVerifier>>) -> AnyName {
        AnyName {
            chain,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_modes_are_split_out_of_urls_and_key_value_strings() {
        assert_eq!(
            split_sslmode("postgres://u@db/x?sslmode=verify-full"),
            (
                "postgres://u@db/x?sslmode=require".into(),
                SslMode::VerifyFull
            )
        );
        assert_eq!(
            split_sslmode("host=db sslmode=verify-ca dbname=x"),
            ("host=db sslmode=require dbname=x".into(), SslMode::VerifyCa)
        );
        assert_eq!(
            split_sslmode("postgres://u@db/x?sslmode=require"),
            ("postgres://u@db/x?sslmode=require".into(), SslMode::Plain)
        );
    }

    #[test]
    fn connectors_build_for_every_mode() {
        for mode in [SslMode::Plain, SslMode::VerifyCa, SslMode::VerifyFull] {
            postgres_connector(mode, None).unwrap();
        }
        match postgres_connector(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem"))) {
            Ok(_) => panic!("a missing CA file is an error"),
            Err(e) => assert!(format!("{e:#}").contains("/nonexistent/ca.pem")),
        }
    }
}
