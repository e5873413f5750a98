//! Authenticated `/metrics` (`--metrics-secure`): served over HTTPS, and only to a caller
//! whose bearer token the API server authenticates (TokenReview) and authorises for `get`
//! on the non-resource URL `/metrics` (SubjectAccessReview), as kube-rbac-proxy and
//! controller-runtime's secure metrics do. `/healthz` and `/readyz` stay open (probes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;

/// How long a review's answer is reused for the same token: an allowed caller's, and a
/// refused one's (shorter, so a new RoleBinding takes effect soon).
const CACHE_TTL: Duration = Duration::from_secs(60);
const REFUSED_TTL: Duration = Duration::from_secs(5);
/// Tokens remembered at most (the cache is emptied when full).
const CACHE_MAX: usize = 1024;
/// Bound on a connection's TLS handshake and request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// What the API server said about a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No bearer token, or one the API server did not authenticate.
    Unauthenticated,
    /// Authenticated, not allowed `get` on `/metrics`.
    Forbidden,
}

impl Verdict {
    pub fn status(self) -> StatusCode {
        match self {
            Self::Allowed => StatusCode::OK,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
        }
    }
}

/// The bearer token of a request's `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The SubjectAccessReview asking whether the user a TokenReview authenticated may
/// `get` `/metrics`; `None` when the review did not authenticate it.
pub fn access_review(review: &TokenReview) -> Option<SubjectAccessReview> {
    let status = review.status.as_ref()?;
    if status.authenticated != Some(true) {
        return None;
    }
    let user = status.user.as_ref()?;
    Some(SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some("/metrics".into()),
                verb: Some("get".into()),
            }),
            ..Default::default()
        },
        ..Default::default()
    })
}

/// Reviews callers with the API server, remembering answers for [`CACHE_TTL`].
pub struct Authorizer {
    client: kube::Client,
    cache: Mutex<HashMap<[u8; 32], (Instant, Verdict)>>,
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the bearer `token` may read `/metrics`.
    ///
    /// # Errors
    /// The API server could not be asked (the caller is then refused with 500).
    pub async fn check(&self, token: &str) -> Result<Verdict, kube::Error> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let ttl = |v| {
            if v == Verdict::Allowed {
                CACHE_TTL
            } else {
                REFUSED_TTL
            }
        };
        if let Some(&(at, v)) = self.lock().get(&key)
            && at.elapsed() < ttl(v)
        {
            return Ok(v);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let pp = PostParams::default();
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&pp, &review)
            .await?;
        let verdict = match access_review(&reviewed) {
            None => Verdict::Unauthenticated,
            Some(sar) => {
                let answer = Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&pp, &sar)
                    .await?;
                if answer.status.is_some_and(|s| s.allowed) {
                    Verdict::Allowed
                } else {
                    Verdict::Forbidden
                }
            }
        };
        let mut cache = self.lock();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), verdict));
        Ok(verdict)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Instant, Verdict)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn guard(State(auth): State<Arc<Authorizer>>, req: Request, next: Next) -> Response {
    let verdict = match bearer(req.headers()) {
        None => Ok(Verdict::Unauthenticated),
        Some(token) => auth.check(token).await,
    };
    match verdict {
        Ok(Verdict::Allowed) => next.run(req).await,
        Ok(v) => (v.status(), format!("{}\n", v.status())).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "could not review a /metrics caller");
            (StatusCode::INTERNAL_SERVER_ERROR, "review failed\n").into_response()
        }
    }
}

/// [`crate::metrics::router`] with `/metrics` behind `auth`.
pub fn router(metrics: Arc<Metrics>, auth: Arc<Authorizer>) -> Router {
    let scrape = Router::new()
        .route("/metrics", get(crate::metrics::render))
        .with_state(metrics.clone())
        .layer(axum::middleware::from_fn_with_state(auth, guard));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(crate::metrics::readyz))
        .with_state(metrics)
        .merge(scrape)
}

/// The serving certificate: `tls.crt` and `tls.key` in `dir` (a mounted
/// `kubernetes.io/tls` Secret, e.g. from cert-manager), else a self-signed one made now.
///
/// # Errors
/// Unreadable or invalid files.
pub fn tls_config(dir: Option<&Path>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    let (certs, key) = match dir {
        Some(d) => {
            let certs = CertificateDer::pem_file_iter(d.join("tls.crt"))
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading {}", d.join("tls.crt").display()))?;
            let key = PrivateKeyDer::from_pem_file(d.join("tls.key"))
                .with_context(|| format!("reading {}", d.join("tls.key").display()))?;
            (certs, key)
        }
        None => {
            let c = rcgen::generate_simple_self_signed(vec!["sluice-operator".to_string()])?;
            let key = PrivateKeyDer::try_from(c.signing_key.serialize_der())
                .map_err(anyhow::Error::msg)?;
            (vec![c.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// Serves `router` over HTTPS on `addr` until the process ends.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics (authenticated), /healthz, /readyz over HTTPS");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            if let Err(e) = http.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    #[test]
    fn only_a_bearer_token_is_taken() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc.def"));
        h.insert(header::AUTHORIZATION, "bearer  xyz ".parse().unwrap());
        assert_eq!(bearer(&h), Some("xyz"));
        h.insert(header::AUTHORIZATION, "Basic dXNlcjpwdw==".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn the_access_review_asks_for_the_authenticated_user() {
        let mut review = TokenReview::default();
        assert!(
            access_review(&review).is_none(),
            "no status: not authenticated"
        );
        review.status = Some(TokenReviewStatus {
            authenticated: Some(false),
            ..Default::default()
        });
        assert!(access_review(&review).is_none());
        review.status = Some(TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:mon:prometheus".into()),
                uid: Some("u1".into()),
                groups: Some(vec!["system:serviceaccounts".into()]),
                extra: None,
            }),
            ..Default::default()
        });
        let sar = access_review(&review).expect("authenticated");
        assert_eq!(
            sar.spec.user.as_deref(),
            Some("system:serviceaccount:mon:prometheus")
        );
        assert_eq!(sar.spec.groups.as_ref().map(Vec::len), Some(1));
        let attrs = sar.spec.non_resource_attributes.expect("non-resource");
        assert_eq!(attrs.path.as_deref(), Some("/metrics"));
        assert_eq!(attrs.verb.as_deref(), Some("get"));
        assert!(sar.spec.resource_attributes.is_none());
    }

    #[test]
    fn verdicts_map_to_http_statuses() {
        assert_eq!(Verdict::Allowed.status(), StatusCode::OK);
        assert_eq!(Verdict::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Verdict::Forbidden.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_self_signed_certificate_is_made_without_a_directory() {
        assert!(tls_config(None).is_ok());
        let missing = tls_config(Some(Path::new("/nonexistent")));
        assert!(missing.unwrap_err().to_string().contains("tls.crt"));
    }
}
