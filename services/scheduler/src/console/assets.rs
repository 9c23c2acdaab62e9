//! The console's stylesheet and script, compiled into the binary
//! (`include_str!`) and served from `/assets/`: no CDN, nothing fetched
//! from elsewhere, so the console works offline and under a CSP of
//! `default-src 'self'`.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

pub(crate) const STYLESHEET_PATH: &str = "/assets/console.css";
pub(crate) const SCRIPT_PATH: &str = "/assets/console.js";

const STYLESHEET: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");

/// `GET /assets/{file}`: open (a login page needs its stylesheet), cached
/// for an hour.
pub(crate) async fn serve(Path(file): Path<String>) -> Response {
    let (content_type, body) = match file.as_str() {
        "console.css" => ("text/css; charset=utf-8", STYLESHEET),
        "console.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], body).into_response()
}
