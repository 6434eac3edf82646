//! The demo page at `GET /demo` (with `--demo true`): a stadium scoreboard and a chat in one room,
//! built from the JS client in `clients/js` and bundled into one HTML file with its script inline,
//! embedded here at build time so the node serves it with no files beside it.

use axum::{
    http::{header, HeaderValue},
    response::{Html, IntoResponse},
};

/// `clients/js/dist/demo.html`, which `npm run build` in `clients/js` writes (a test checks the
/// committed file against a fresh build of its source).
const PAGE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/dist/demo.html"));

/// The page; it loads nothing else, so the policy allows no other origin.
pub async fn page() -> impl IntoResponse {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; img-src data:",
            ),
        )],
        Html(PAGE),
    )
}
