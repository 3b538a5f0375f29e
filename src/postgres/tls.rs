//! TLS to the database, as libpq's `sslmode` asks for it, with rustls.
//!
//! - `disable`: never.
//! - `prefer` (the default): TLS when the server offers it, without checking its
//!   certificate (libpq's `prefer`); plain otherwise.
//! - `require`: TLS or no connection; the certificate is checked against
//!   `sslrootcert` when one is given (as libpq does), not otherwise.
//! - `verify-ca`: TLS, and a certificate signed by a root of `sslrootcert`.
//! - `verify-full`: as `verify-ca`, and issued to the host connected to.
//!
//! `sslrootcert` is a PEM file of root certificates (or `PGSSLROOTCERT`); the
//! verifying modes refuse to connect without one.

use std::{fmt, path::PathBuf, sync::Arc};

use postgres::config::SslMode;
use rustls::{
    ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    /// The mode an `sslmode` value names.
    pub(crate) fn parse(value: &str) -> Result<Mode, String> {
        Ok(match value {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is none of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    /// What the client is told: the verifying modes are `require` to it (the
    /// connector does the verifying).
    pub(crate) fn client_mode(self) -> SslMode {
        match self {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        })
    }
}

/// The connector for `mode`, trusting the roots in the PEM file `root_cert`.
pub(crate) fn connector(
    mode: Mode,
    root_cert: Option<&PathBuf>,
) -> Result<MakeRustlsConnect, String> {
    // rustls deprecates ring's provider for its lack of post-quantum key
    // exchange; aws-lc-rs, which has it, needs a C build this crate avoids.
    #[expect(deprecated, reason = "ring: no C build; see above")]
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS cannot be set up: {err}"))?;
    let roots = match root_cert {
        Some(path) => Some(Arc::new(roots(path)?)),
        None if matches!(mode, Mode::VerifyCa | Mode::VerifyFull) => {
            return Err(format!(
                "sslmode={mode} needs the root certificates to trust: add sslrootcert=<PEM file> to the URL, or set PGSSLROOTCERT"
            ));
        }
        None => None,
    };
    let config = match roots {
        Some(roots) if mode == Mode::VerifyFull => {
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        roots => {
            let chain = roots
                .map(|roots| {
                    WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                        .build()
                        .map_err(|err| format!("TLS cannot be set up: {err}"))
                })
                .transpose()?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { provider, chain }))
                .with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The certificates of the PEM file at `path`.
fn roots(path: &PathBuf) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("sslrootcert {} cannot be read: {err}", path.display()))?;
    for cert in certs {
        let cert =
            cert.map_err(|err| format!("sslrootcert {} is not PEM: {err}", path.display()))?;
        roots.add(cert).map_err(|err| {
            format!("sslrootcert {} holds a bad certificate: {err}", path.display())
        })?;
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert {} holds no certificate", path.display()));
    }
    Ok(roots)
}

/// The verifier of the modes that do not check the host name: with no chain
/// verifier, it accepts any certificate (TLS against eavesdropping only, as
/// `prefer` and `require` without roots give it); with one, it checks the chain
/// against the roots, not the name (`verify-ca`). The handshake's signatures are
/// checked either way.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(TlsError::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, TlsError> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        Error, Result,
        postgres::{Location, failed, test_server},
    };

    /// A location on the test server, by `host`, with `query` added.
    fn at(host: &str, query: &str) -> Result<Location> {
        let url = test_server::url().replacen("127.0.0.1", host, 1);
        Location::parse(&format!("{url}?namespace={}&{query}", test_server::unique("tls")))
    }

    /// Whether the connection `location` makes is encrypted, as the server sees it.
    fn encrypted(location: &Location) -> Result<bool> {
        let mut client = location.connect()?;
        let row = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .map_err(failed(location, "test"))?;
        Ok(row.get(0))
    }

    #[test]
    fn each_sslmode_encrypts_and_checks_as_libpq_does() -> Result<()> {
        let (ca, other) = test_server::tls_roots(&at("127.0.0.1", "sslmode=disable")?)?;
        let (ca, other) = (ca.display(), other.display());
        assert!(!encrypted(&at("127.0.0.1", "sslmode=disable")?)?);
        assert!(encrypted(&at("127.0.0.1", "sslmode=prefer")?)?);
        assert!(encrypted(&at("127.0.0.1", "sslmode=require")?)?);
        // The certificate is for the name localhost: verify-ca takes it at
        // 127.0.0.1, verify-full only at localhost.
        assert!(encrypted(&at("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))?)?);
        assert!(encrypted(&at("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))?)?);
        let refused = [
            at("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))?,
            at("localhost", &format!("sslmode=verify-full&sslrootcert={other}"))?,
            at("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={other}"))?,
            // `require` with roots checks them, as libpq does.
            at("127.0.0.1", &format!("sslmode=require&sslrootcert={other}"))?,
        ];
        for location in refused {
            let res = location.connect().map(drop);
            assert!(
                matches!(&res, Err(Error::Database { source, .. }) if format!("{source:?}").contains("ertificate")),
                "{location}: {res:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_verifying_mode_without_roots_or_with_bad_ones_is_refused_before_connecting() {
        for (query, says) in [
            ("sslmode=verify-full", "sslrootcert"),
            ("sslmode=verify-ca", "sslrootcert"),
            ("sslmode=verify-full&sslrootcert=/nonexistent/ca.crt", "cannot be read"),
            ("sslmode=verify-full&sslrootcert=/dev/null", "no certificate"),
            ("sslmode=sometimes", "none of"),
        ] {
            let url = format!("postgres://app@127.0.0.1:1/db?namespace=n&{query}");
            match Location::parse(&url) {
                Err(Error::InvalidLocation { reason, .. }) => {
                    assert!(reason.contains(says), "{query}: {reason}");
                }
                other => panic!("{query}: {other:?}"),
            }
        }
    }
}
