//! The OIDC verifier: the IdP's keys (a JWKS file or URL, refreshed) and
//! the check of a bearer token's signature, issuer, audience, expiry and
//! role claim.

use super::*;

/// The OIDC verifier: the options and the IdP's current keys.
pub struct Oidc {
    options: OidcOptions,
    keys: RwLock<Arc<JwkSet>>,
    last_load: std::sync::Mutex<Instant>,
    http: reqwest::Client,
}

/// Why the JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("scheduler.auth.oidc.jwks_file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("scheduler.auth.oidc.jwks_url {url}: {reason}")]
    Url { url: String, reason: String },
}

impl Oidc {
    /// Loads the JWKS once. A file that cannot be read or parsed is an
    /// error; a URL that does not answer is not (the IdP may be starting):
    /// it is tried again at every refresh and on every unknown `kid`.
    pub async fn start(options: OidcOptions) -> Result<Arc<Self>, JwksError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| JwksError::Url {
                url: options.jwks_url.clone().unwrap_or_default(),
                reason: error.to_string(),
            })?;
        let oidc = Arc::new(Self {
            options,
            keys: RwLock::new(Arc::new(JwkSet { keys: vec![] })),
            last_load: std::sync::Mutex::new(Instant::now()),
            http,
        });
        match oidc.load().await {
            Ok(keys) => *oidc.keys.write().await = Arc::new(keys),
            Err(error @ JwksError::File { .. }) => return Err(error),
            Err(error) => {
                tracing::warn!(error = %error, "the JWKS is unavailable; OIDC tokens are refused until it loads")
            }
        }
        Ok(oidc)
    }

    async fn load(&self) -> Result<JwkSet, JwksError> {
        if let Some(path) = &self.options.jwks_file {
            let file = |reason: String| JwksError::File { path: path.display().to_string(), reason };
            let text = tokio::fs::read(path).await.map_err(|e| file(format!("cannot read it: {e}")))?;
            if text.len() > MAX_JWKS_BYTES {
                return Err(file(format!("larger than {MAX_JWKS_BYTES} bytes")));
            }
            return serde_json::from_slice(&text).map_err(|e| file(format!("not a JWKS document: {e}")));
        }
        let url = self.options.jwks_url.clone().unwrap_or_default();
        let fail = |reason: String| JwksError::Url { url: url.clone(), reason };
        let mut response = self.http.get(&url).send().await.map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("answered {}", response.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fail(e.to_string()))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(fail(format!("larger than {MAX_JWKS_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| fail(format!("not a JWKS document: {e}")))
    }

    /// Loads the JWKS again; keeps the keys it had when that fails.
    pub async fn reload(&self) {
        if let Ok(mut last) = self.last_load.lock() {
            *last = Instant::now();
        }
        match self.load().await {
            Ok(keys) => {
                tracing::debug!(keys = keys.keys.len(), "jwks loaded");
                *self.keys.write().await = Arc::new(keys);
            }
            Err(error) => {
                metrics::counter!("fleetpatch_api_jwks_load_failures_total").increment(1);
                tracing::warn!(error = %error, "reloading the JWKS failed; keeping the keys loaded before");
            }
        }
    }

    /// Reloads the JWKS every `refresh_seconds` until `shutdown`.
    pub fn spawn_refresh(self: &Arc<Self>, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        let oidc = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(oidc.options.refresh_seconds);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => oidc.reload().await,
                    _ = shutdown.wait() => return,
                }
            }
        })
    }

    async fn find_key(&self, kid: Option<&str>) -> Option<jsonwebtoken::jwk::Jwk> {
        let keys = self.keys.read().await.clone();
        match kid {
            Some(kid) => keys.find(kid).cloned(),
            None if keys.keys.len() == 1 => keys.keys.first().cloned(),
            None => None,
        }
    }

    /// The identity a token proves, or why it proves none.
    pub async fn verify(&self, token: &str) -> Result<Result<Identity, NoRole>, Unauthenticated> {
        let invalid = |reason: &'static str, detail: String| Unauthenticated::InvalidToken { reason, detail };
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| invalid("invalid_token", format!("its header cannot be read ({e})")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid("invalid_token", format!("algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.as_deref();
        let mut jwk = self.find_key(kid).await;
        if jwk.is_none() {
            let due = self.last_load.lock().map(|last| last.elapsed() >= MIN_RELOAD_GAP).unwrap_or(false);
            if due {
                self.reload().await;
                jwk = self.find_key(kid).await;
            }
        }
        let jwk = jwk.ok_or_else(|| {
            invalid("unknown_signing_key", format!("no key of the IdP's JWKS has kid {:?}", kid.unwrap_or("")))
        })?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| invalid("invalid_token", format!("the JWKS key {:?} is unusable ({e})", kid.unwrap_or(""))))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.options.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_issuer(&[self.options.issuer.as_str()]);
        validation.set_audience(&[self.options.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            let (reason, detail) = match error.kind() {
                ErrorKind::InvalidSignature => ("bad_signature", "its signature does not verify".to_owned()),
                ErrorKind::ExpiredSignature => ("expired_token", "it has expired".to_owned()),
                ErrorKind::ImmatureSignature => ("invalid_token", "it is not valid yet (nbf)".to_owned()),
                ErrorKind::InvalidIssuer => ("wrong_issuer", "its issuer (iss) is not the configured one".to_owned()),
                ErrorKind::InvalidAudience => {
                    ("wrong_audience", "its audience (aud) is not the configured one".to_owned())
                }
                ErrorKind::MissingRequiredClaim(claim) => ("invalid_token", format!("it has no {claim} claim")),
                ErrorKind::InvalidAlgorithm => {
                    ("invalid_token", "its algorithm does not match the signing key".to_owned())
                }
                other => ("invalid_token", format!("{other:?}")),
            };
            invalid(reason, detail)
        })?;
        let subject = data.claims.get("sub").and_then(|s| s.as_str()).unwrap_or_default().to_owned();
        if subject.is_empty() {
            return Err(invalid("invalid_token", "its sub claim is empty".into()));
        }
        Ok(match role_from_claims(&data.claims, &self.options.role_claim, &self.options.roles) {
            Some(role) => Ok(Identity { subject, kind: ActorKind::Jwt, role }),
            None => Err(NoRole { subject }),
        })
    }
}
