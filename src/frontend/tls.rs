//! HTTPS for the front: rustls with TLS 1.2 and 1.3 only (rustls offers only AEAD cipher
//! suites with forward secrecy), and a certificate that follows its files: they are checked
//! every second and re-read when they change, so renewing a certificate needs no restart.
//! A pair that fails to load (half-written, key not matching) is reported and the previous
//! certificate keeps serving.

use crate::config::auth::Tls;
use crate::router::Relay;
use crate::sync::{read, write};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for changes.
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate `{path}`: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read the TLS key `{path}`: {reason}")]
    Key { path: String, reason: String },
    #[error("the TLS certificate and key do not form a usable pair: {0}")]
    Pair(String),
}

/// The certificate in force, swapped whole when the files change.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(read(&self.current).clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain and its key from PEM files.
pub fn load(tls: &Tls) -> Result<CertifiedKey, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: tls.cert.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no CERTIFICATE block in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsError::Key {
        path: tls.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let ck = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(ck)
}

/// The server config: TLS 1.3 and 1.2, `http/1.1`, certificates from `resolver`.
pub fn server_config(resolver: Arc<Resolver>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What identifies one version of the files (modification time and size of each).
type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

fn stamp(tls: &Tls) -> Stamp {
    let m = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    let (c, k) = (m(&tls.cert)?, m(&tls.key)?);
    Some((c.0, c.1, k.0, k.1))
}

/// Builds the acceptor from `tls` and keeps its certificate in step with the files (and with
/// `relay.tls` of the config in force) until `stop`.
pub fn acceptor(
    relay: Arc<Relay>,
    tls: &Tls,
    stop: CancellationToken,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let first = load(tls)?;
    let resolver = Arc::new(Resolver {
        current: RwLock::new(Arc::new(first)),
    });
    let cfg = server_config(resolver.clone())?;
    let mut files = tls.clone();
    let mut seen = stamp(&files);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            if let Some(now) = relay.config().relay.tls.clone()
                && now != files
            {
                files = now;
                seen = None;
            }
            let now = stamp(&files);
            if now == seen || now.is_none() {
                continue;
            }
            match load(&files) {
                Ok(ck) => {
                    *write(&resolver.current) = Arc::new(ck);
                    seen = now;
                    tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded.");
                }
                Err(e) => {
                    // Possibly caught between two writes; tried again at the next change.
                    seen = now;
                    tracing::warn!(error = %e, "TLS certificate files changed but do not load; the previous certificate stays in use.");
                }
            }
        }
    });
    Ok(tokio_rustls::TlsAcceptor::from(cfg))
}
