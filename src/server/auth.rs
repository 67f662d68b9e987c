//! `--api-key`: a bearer token, also accepted as the password of HTTP Basic auth (what A1111's
//! `--api-auth` clients send). `GET /healthz` stays open for load balancers' probes.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::error::{ApiError, Flavor};
use super::AppState;

/// Routes anyone may call.
fn open_route(path: &str) -> bool {
    path == "/healthz"
}

/// Whether `authorization` carries `key`.
fn authorized(authorization: Option<&str>, key: &str) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    if let Some(token) = value.strip_prefix("Bearer ") {
        return constant_time_eq(token.trim().as_bytes(), key.as_bytes());
    }
    if let Some(encoded) = value.strip_prefix("Basic ") {
        let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        let password = text.split_once(':').map_or("", |(_, p)| p);
        return constant_time_eq(password.as_bytes(), key.as_bytes());
    }
    false
}

/// Compares without stopping at the first difference, so timing says nothing of the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware: 401 in the API's error shape without the key.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = state.api_key.as_deref() else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if open_route(path) || authorized(header, key) {
        return next.run(request).await;
    }
    let flavor = if path.starts_with("/v1/") {
        Flavor::OpenAi
    } else {
        Flavor::A1111
    };
    ApiError::new(
        flavor,
        StatusCode::UNAUTHORIZED,
        "missing or wrong API key: send `Authorization: Bearer KEY` (or HTTP Basic auth with \
         the key as password)",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_carry_the_key() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), "s3cret"));
        let basic = format!("Basic {}", STANDARD.encode("user:s3cret"));
        assert!(authorized(Some(&basic), "s3cret"));
        let wrong = format!("Basic {}", STANDARD.encode("s3cret:x"));
        assert!(!authorized(Some(&wrong), "s3cret"));
        assert!(!authorized(None, "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
    }
}
