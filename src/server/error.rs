//! Errors as each API's clients read them: A1111's `{"error", "detail", ...}` and OpenAI's
//! `{"error": {"message", "type", "param", "code"}}`, with the status a client acts on.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::queue::{Failed, Refused, Stop};
use crate::pipeline::Field;

/// Which API's error shape to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// AUTOMATIC1111's (`/sdapi/v1/...`), also used by the server's own routes.
    A1111,
    /// OpenAI's (`/v1/images/...`).
    OpenAi,
}

/// A refused or failed request.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// One line for the person who sent the request.
    pub message: String,
    /// The request field at fault, in the API's own spelling.
    pub param: Option<String>,
    /// Sent as `Retry-After` (429, 503).
    pub retry_after: Option<Duration>,
    /// The API whose shape the body takes.
    pub flavor: Flavor,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn bad_request(flavor: Flavor, param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(str::to_string),
            retry_after: None,
            flavor,
        }
    }

    /// Any status.
    pub fn new(flavor: Flavor, status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
            flavor,
        }
    }

    /// A library error; `name` spells the fields of a refusal as this API does.
    pub fn from_engine(flavor: Flavor, e: crate::Error, name: fn(Field) -> &'static str) -> Self {
        use crate::Error as E;
        match e {
            E::InvalidField { field, message } | E::OverLimit { field, message } => {
                let param = name(field);
                // One API field can stand for several of the library's (OpenAI's `size`).
                let label = if param == "size" {
                    format!("size ({})", field.name())
                } else {
                    param.to_string()
                };
                ApiError::bad_request(flavor, Some(param), format!("{label} {message}"))
            }
            E::InvalidInput(_) | E::Lora { .. } | E::Image { .. } | E::Tokenizer(_) => {
                ApiError::bad_request(flavor, None, e.to_string())
            }
            other => ApiError::new(flavor, StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }

    /// A job that did not give images.
    pub fn from_failed(flavor: Flavor, failed: Failed, name: fn(Field) -> &'static str) -> Self {
        match failed {
            Failed::Engine(e) => ApiError::from_engine(flavor, e, name),
            Failed::Stopped(Stop::Interrupted) => ApiError::new(
                flavor,
                StatusCode::CONFLICT,
                "the generation was interrupted (POST /sdapi/v1/interrupt)",
            ),
            Failed::Stopped(Stop::TimedOut) => ApiError::new(
                flavor,
                StatusCode::GATEWAY_TIMEOUT,
                "the request ran past the server's time limit (--timeout)",
            ),
            Failed::Stopped(Stop::Shutdown) => ApiError::new(
                flavor,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down; send the request again to another replica",
            ),
            Failed::Stopped(Stop::ClientGone) => {
                ApiError::new(flavor, StatusCode::BAD_REQUEST, "the client disconnected")
            }
        }
    }

    /// A job the queue did not take.
    pub fn from_refused(flavor: Flavor, refused: Refused) -> Self {
        match refused {
            Refused::Full(wait) => ApiError {
                retry_after: Some(wait),
                ..ApiError::new(
                    flavor,
                    StatusCode::TOO_MANY_REQUESTS,
                    "the generation queue is full; retry after the time in Retry-After",
                )
            },
            Refused::Closed => ApiError::new(
                flavor,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.flavor {
            Flavor::A1111 => json!({
                "error": self.status.canonical_reason().unwrap_or("Error").replace(' ', ""),
                "detail": self.message,
                "body": "",
                "errors": self.message,
            }),
            Flavor::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": if self.status.is_server_error() {
                        "server_error"
                    } else {
                        "invalid_request_error"
                    },
                    "param": self.param,
                    "code": match self.status.as_u16() {
                        401 => Some("invalid_api_key"),
                        429 => Some("rate_limit_exceeded"),
                        _ => None,
                    },
                }
            }),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        // Sending the same request again would meet the same end (the openai client retries
        // 408, 409 and 5xx unless told not to).
        if matches!(self.status.as_u16(), 409 | 500 | 504) {
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, Basic realm=\"tcd-ort\""),
            );
        }
        response
    }
}
