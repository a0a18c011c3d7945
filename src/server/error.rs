//! Every failure a client sees: one type that picks the status, the JSON body and whether to log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::hub::PublishFailure;
use crate::store;
use crate::upstream::PublishError;

/// Error codes clients can rely on (a closed list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidPayload,
    InvalidAddress,
    InvalidRequest,
    UpstreamUnavailable,
    UpstreamTimeout,
    NotReady,
    /// The resource exists with another definition.
    Conflict,
    /// The message log is reopening after an I/O failure: retry later.
    LogUnavailable,
    Internal,
    Unauthorized,
    Forbidden,
    RateLimited,
    TokenExpired,
    /// The request's body did not arrive within the body read timeout.
    RequestTimeout,
    /// A limit of the gateway's (connections, calls in flight) was met: retry later.
    LimitExceeded,
}

/// `{"error": {"code", "message", "details"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, what)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }

    /// The JSON body (also used for WebSocket error frames).
    pub fn body(&self) -> Value {
        let mut error = json!({
            "code": self.code,
            "message": self.message,
        });
        if !self.details.is_null() {
            error["details"] = self.details.clone();
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = ?self.code, message = %self.message, "request failed");
        }
        (self.status, Json(self.body())).into_response()
    }
}

impl From<PublishFailure> for ApiError {
    fn from(failure: PublishFailure) -> Self {
        let message = failure.to_string();
        match failure {
            PublishFailure::UnknownChannel(_) => ApiError::not_found(message),
            PublishFailure::NotWritable(_) => ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                message,
            ),
            PublishFailure::TooLarge { size, limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                message,
            )
            .with_details(json!({"size": size, "limit": limit})),
            PublishFailure::UnsupportedContentType { found, expected } => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                message,
            )
            .with_details(json!({"found": found, "expected": expected})),
            PublishFailure::InvalidPayload(e) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidPayload, message)
                    .with_details(json!({
                        "instancePath": e.instance_path,
                        "schemaPath": e.schema_path,
                        "reason": e.reason,
                    }))
            }
            PublishFailure::InvalidAddress(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidAddress, message)
            }
            PublishFailure::Upstream(PublishError::Timeout { .. }) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::UpstreamTimeout,
                message,
            ),
            PublishFailure::Upstream(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::UpstreamUnavailable,
                message,
            ),
            PublishFailure::Store(e) => e.into(),
        }
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        if let store::Error::Unavailable { .. } = e {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::LogUnavailable,
                "the message log is unavailable (see /readyz); retry later",
            );
        }
        // The detail goes to the log, not to the client.
        tracing::error!(error = %e, "message log failure");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "the message log failed; see the gateway's log",
        )
    }
}
