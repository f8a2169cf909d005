//! Certificate verification for remote backends (`https://`, `wss://`): the system's root
//! certificates (`rustls-native-certs`: `/etc/ssl/certs` and `SSL_CERT_FILE`/`SSL_CERT_DIR`)
//! plus the Mozilla roots bundled in `webpki-roots`, plus a server's own `caFile` (PEM) for
//! private CAs, read at each (re)connection so that a renewed CA file needs no relay restart.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use std::path::Path;
use std::sync::{Arc, LazyLock};

/// The system and bundled roots, loaded once (reading the system store takes milliseconds).
static BASE_ROOTS: LazyLock<rustls::RootCertStore> = LazyLock::new(|| {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "Some system root certificates could not be read.");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(system_roots = added, "Root certificates loaded.");
    roots
});

/// ALPN of the reqwest client (HTTP/2 or HTTP/1.1).
pub const HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of the WebSocket upgrade (HTTP/1.1 only).
pub const WEBSOCKET: &[&[u8]] = &[b"http/1.1"];

/// A client config trusting the system and bundled roots plus `ca_file`, offering `alpn`.
pub fn client_config(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, String> {
    let mut roots = BASE_ROOTS.clone();
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read caFile `{shown}`: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("caFile `{shown}` is not PEM: {e}"))?;
        if certs.is_empty() {
            return Err(format!("caFile `{shown}` holds no CERTIFICATE"));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("caFile `{shown}`: a certificate is not usable: {e}"))?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup failed: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
