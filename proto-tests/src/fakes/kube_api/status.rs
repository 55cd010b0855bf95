//! Failures, answered as kube-apiserver answers them: a `Status` object.

use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::{response, Body};

pub(super) fn too_large_resource_version(requested: u64, current: u64) -> ApiError {
    ApiError::new(
        504,
        "Timeout",
        &format!("Too large resource version: {requested}, current: {current}"),
    )
    .details(json!({
        "causes": [{
            "reason": "ResourceVersionTooLarge",
            "message": "Too large resource version",
        }],
        "retryAfterSeconds": 1,
    }))
}

/// A failure, answered as kube-apiserver answers: a `Status` object.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) code: u16,
    reason: &'static str,
    pub(super) message: String,
    details: Option<Value>,
    continue_token: Option<String>,
}

impl ApiError {
    pub(super) fn new(code: u16, reason: &'static str, message: &str) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.to_owned(),
            details: None,
            continue_token: None,
        }
    }

    pub(super) fn details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    pub(super) fn continue_token(mut self, token: &str) -> ApiError {
        self.continue_token = Some(token.to_owned());
        self
    }

    pub(super) fn bad_request(message: &str) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub(super) fn not_found(kind: &str, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", &format!("{kind} \"{name}\" not found"))
            .details(json!({ "name": name, "kind": kind }))
    }

    pub(super) fn expired(message: &str) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    /// `422 Invalid` for bad list options; `message` starts with the error type
    /// ("Forbidden: ...").
    pub(super) fn invalid(field: &str, message: &str) -> ApiError {
        let cause = match message.split_once(": ").map_or("", |(kind, _)| kind) {
            "Forbidden" => "FieldValueForbidden",
            "Unsupported value" => "FieldValueNotSupported",
            _ => "FieldValueInvalid",
        };
        ApiError::new(
            422,
            "Invalid",
            &format!("ListOptions.meta.k8s.io \"\" is invalid: {field}: {message}"),
        )
        .details(json!({
            "group": "meta.k8s.io",
            "kind": "ListOptions",
            "causes": [{ "reason": cause, "message": message, "field": field }],
        }))
    }

    pub(super) fn body(&self) -> Value {
        let mut metadata = json!({});
        if let Some(token) = &self.continue_token {
            metadata["continue"] = Value::from(token.clone());
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": metadata,
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    pub(super) fn into_response(self) -> Response<Body> {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        response(status, "application/json", self.body().to_string())
    }
}
