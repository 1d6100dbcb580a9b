//! `http(s)://`: a plain GET, resumed with a `Range` header. User info in
//! the URL becomes basic auth; the query string (a presigned URL's
//! signature) is sent as it is.

use std::time::Duration;

use futures::stream::{StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use url::Url;

use super::Opened;
use crate::failure::{error_chain, Failure};

pub(super) fn client() -> Result<reqwest::Client, Failure> {
    // The user agent names the server: `fetch` runs as `ferrite-server fetch`.
    reqwest::Client::builder()
        .user_agent(concat!("ferrite-server/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Failure::permanent(format!("cannot build the HTTP client: {}", error_chain(&e))))
}

pub(super) async fn size(client: &reqwest::Client, url: &Url) -> Result<Option<u64>, Failure> {
    let response = client.head(url.clone()).send().await.map_err(http_failure)?;
    if !response.status().is_success() {
        return Ok(None);
    }
    Ok(response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()))
}

pub(super) async fn open(client: &reqwest::Client, url: &Url, offset: u64) -> Result<Opened, Failure> {
    let mut request = client.get(url.clone());
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let response = request.send().await.map_err(http_failure)?;
    let status = response.status();
    let header = |name| response.headers().get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok());
    let (start, total) = match status {
        StatusCode::OK => (0, header(CONTENT_LENGTH).and_then(|v| v.parse().ok())),
        StatusCode::PARTIAL_CONTENT => {
            // Content-Range: bytes START-END/TOTAL
            let range = header(CONTENT_RANGE).and_then(|v| v.strip_prefix("bytes "));
            let parsed = range.and_then(|r| {
                let (span, total) = r.split_once('/')?;
                let start: u64 = span.split_once('-')?.0.parse().ok()?;
                Some((start, total.parse().ok()))
            });
            match parsed {
                Some((start, total)) if start == offset => (start, total),
                _ => return Err(Failure::transient("the server answered a range request with an unexpected range")),
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(Failure::transient("the server refused to resume (HTTP 416); the object may have changed"))
        }
        StatusCode::NOT_FOUND | StatusCode::GONE => {
            return Err(Failure::permanent(format!("not found (HTTP {})", status.as_u16())))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(Failure::permanent(format!("access denied (HTTP {})", status.as_u16())))
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT => {
            return Err(Failure::transient(format!("server error (HTTP {})", s.as_u16())))
        }
        s => return Err(Failure::permanent(format!("unexpected response (HTTP {s})"))),
    };
    let body = response.bytes_stream().map_err(http_failure).boxed();
    Ok(Opened { start, total, body })
}

fn http_failure(error: reqwest::Error) -> Failure {
    let error = error.without_url();
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "download interrupted"
    } else {
        "request failed"
    };
    // Network errors are worth another try; a bad request or a redirect
    // loop is not.
    let transient = !(error.is_builder() || error.is_redirect());
    Failure { message: format!("{what}: {}", error_chain(&error)), transient, over_limit: false }
}
