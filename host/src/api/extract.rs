//! The API's extractors and fallbacks: axum's `Path`, `Query` and `Json`
//! whose rejections (a path or query value of the wrong type, a negative
//! number, a body that is not the route's JSON, a missing field, a body
//! without `content-type: application/json`) are answered as the API's
//! JSON error ([`ApiError`]) instead of axum's plain text, and the answers
//! to an unknown path (404 `not_found`) and to a method its path does not
//! serve (405 `method_not_allowed`, with `Allow`). host/API.md lists the
//! status and code of each.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

use super::ApiError;
use super::types::ApiErrorCode;

/// The API error for an extractor's rejection of status `status`: what it
/// was reading (`path`, `query`, `body`) and axum's text. A value that does
/// not deserialize is `bad_request` (400) whatever axum would answer (it
/// says 422 for JSON of the wrong shape; the API keeps 422 for
/// `agent_refused`); a body over the limit is `too_large` (413), one
/// without the JSON content type `unsupported_media_type` (415).
fn rejected(what: &str, status: StatusCode, text: &str) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiErrorCode::TooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiErrorCode::UnsupportedMediaType,
        s if s.is_server_error() => ApiErrorCode::Internal,
        _ => ApiErrorCode::BadRequest,
    };
    ApiError::new(code, format!("invalid {what}: {text}"))
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        rejected("path", e.status(), &e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        rejected("query", e.status(), &e.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        rejected("body", e.status(), &e.body_text())
    }
}

/// An extractor of the API: axum's `$inner` of a `T`, its rejection the
/// API's JSON error.
macro_rules! api_parts_extractor {
    ($(#[$doc:meta])* $name:ident, $inner:ident, $($bound:tt)+) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name<T>(pub T);

        impl<T, S> FromRequestParts<S> for $name<T>
        where
            T: $($bound)+,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
                let $inner(t) = $inner::<T>::from_request_parts(parts, state).await?;
                Ok($name(t))
            }
        }
    };
}

api_parts_extractor!(
    /// The path parameters, deserialized into `T` (a tuple in path order,
    /// or one value); a rejection is the API's JSON error.
    ApiPath,
    Path,
    DeserializeOwned + Send
);

api_parts_extractor!(
    /// The query string, deserialized into `T`; a rejection is the API's
    /// JSON error.
    ApiQuery,
    Query,
    DeserializeOwned
);

/// A JSON body (`content-type: application/json`): an object, deserialized
/// into `T`; a rejection is the API's JSON error. A number with a zero fraction
/// (`3.0`) is read as the integer it equals, as JSON Schema reads it (the
/// document's `integer` admits it); any other fraction stays a number and
/// an integer field refuses it.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(mut v) = axum::Json::<Value>::from_request(req, state).await?;
        // serde reads a struct from an array too; every body is an object.
        if !v.is_object() {
            return Err(ApiError::bad_request(
                "invalid body: expected a JSON object",
            ));
        }
        integral_numbers(&mut v);
        serde_json::from_value(v)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
    }
}

/// 2^64 and -2^63 as `f64` (both exact): the integers beyond them fit no
/// `u64` or `i64`.
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
const MINUS_TWO_POW_63: f64 = -9_223_372_036_854_775_808.0;

/// Rewrites every number of `v` with a zero fraction that fits a `u64` or
/// `i64` as that integer.
fn integral_numbers(v: &mut Value) {
    match v {
        Value::Number(n) => {
            let Some(f) = n.as_f64().filter(|_| n.is_f64()) else {
                return;
            };
            if f.fract() != 0.0 {
                return;
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // range checked
            if (0.0..TWO_POW_64).contains(&f) {
                *n = Number::from(f as u64);
            } else if (MINUS_TWO_POW_63..0.0).contains(&f) {
                *n = Number::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// The answer to a path no route serves: 404 `not_found`.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {method} {}", uri.path()))
}

/// The answer to a method the path does not serve: 405
/// `method_not_allowed` (axum adds the `Allow` header).
pub async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ApiErrorCode::MethodNotAllowed,
        format!("{} does not serve {method}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::integral_numbers;

    #[test]
    fn integral_numbers_become_integers_and_others_stay() {
        let mut v = json!({"a": 414.0, "b": [3.0, -2.0, 0.5], "c": {"d": 1e30}, "e": 7});
        integral_numbers(&mut v);
        assert_eq!(
            v,
            json!({"a": 414, "b": [3, -2, 0.5], "c": {"d": 1e30}, "e": 7})
        );
        assert!(v["a"].is_u64() && v["b"][1].is_i64() && v["c"]["d"].is_f64());
        let mut edge = json!([18_446_744_073_709_551_616.0_f64, -0.0]);
        integral_numbers(&mut edge);
        assert!(edge[0].is_f64(), "2^64 fits no u64: {edge}");
        assert_eq!(edge[1], json!(0));
        // Parsed from text exactly (serde_json's `float_roundtrip`): a
        // fast parse read this one as ...025.5 and refused a valid body.
        let mut text: serde_json::Value =
            serde_json::from_str(r#"{"q": 3727463563781026.0}"#).unwrap();
        integral_numbers(&mut text);
        assert_eq!(text, json!({"q": 3_727_463_563_781_026_u64}));
    }
}
