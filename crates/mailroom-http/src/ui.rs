//! The web UI: static files embedded in the binary (`crates/mailroom-http/ui/`), served at `/` and under
//! `/ui/` without credentials. The page logs in with basic auth and then talks only to the management
//! API under `/api`, like RabbitMQ's management UI; nothing is fetched from anywhere else.

use crate::Body;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};

/// The path prefix of the UI's assets (apart from `/` itself); it does not collide with `/api`.
pub const ASSET_PREFIX: &str = "/ui/";

/// Every embedded file: name under `/ui/`, content type, contents.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../ui/index.html")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../ui/style.css")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../ui/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../ui/api.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_bytes!("../ui/dom.js")),
    ("chart.js", "text/javascript; charset=utf-8", include_bytes!("../ui/chart.js")),
    ("pages.js", "text/javascript; charset=utf-8", include_bytes!("../ui/pages.js")),
    ("queue.js", "text/javascript; charset=utf-8", include_bytes!("../ui/queue.js")),
    ("admin.js", "text/javascript; charset=utf-8", include_bytes!("../ui/admin.js")),
    ("favicon.svg", "image/svg+xml", include_bytes!("../ui/favicon.svg")),
];

/// Only this origin's scripts, styles and API: a message body shown on a page can never load or run
/// anything (the pages also insert every value as text, never as HTML).
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The asset a request asks for, if the path belongs to the UI: `/`, `/index.html`, `/favicon.ico` or
/// `/ui/{name}`. `None` for every other path (the API's).
fn asset_for(path: &str) -> Option<Option<(&'static str, &'static [u8])>> {
    let name = match path {
        "/" | "/index.html" => "index.html",
        "/favicon.ico" => "favicon.svg",
        _ => path.strip_prefix(ASSET_PREFIX)?,
    };
    let name = if name.is_empty() { "index.html" } else { name };
    Some(ASSETS.iter().find(|(n, _, _)| *n == name).map(|(_, kind, body)| (*kind, *body)))
}

/// Answers a request for a UI path (`None`: not a UI path, the API handles it).
pub fn serve(method: &Method, path: &str) -> Option<Response<Body>> {
    let found = asset_for(path)?;
    let (status, kind, body): (StatusCode, &str, &'static [u8]) = match (method, found) {
        (&Method::GET | &Method::HEAD, Some((kind, body))) => (StatusCode::OK, kind, body),
        (&Method::GET | &Method::HEAD, None) => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", b"Not Found"),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", b"Method Not Allowed"),
    };
    let body = if method == Method::HEAD { Bytes::new() } else { Bytes::from_static(body) };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    // Small files embedded in this binary: revalidating costs little and a new broker's UI shows at once.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("content-security-policy", HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_page_and_its_assets() {
        let resp = serve(&Method::GET, "/").expect("/ is the UI");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(resp.headers()["content-security-policy"].to_str().unwrap().starts_with("default-src 'self'"));
        let css = serve(&Method::GET, "/ui/style.css").expect("a UI path");
        assert_eq!(css.headers()[CONTENT_TYPE], "text/css; charset=utf-8");
        assert_eq!(serve(&Method::GET, "/ui/nope.js").expect("a UI path").status(), StatusCode::NOT_FOUND);
        assert_eq!(serve(&Method::POST, "/").expect("a UI path").status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(serve(&Method::GET, "/api/overview").is_none());
        assert!(serve(&Method::GET, "/metrics").is_none());
    }

    #[test]
    fn every_referenced_asset_is_embedded_and_nothing_comes_from_elsewhere() {
        for (name, _, body) in ASSETS {
            let text = std::str::from_utf8(body).expect("UI assets are text");
            // Every `/ui/x` or `./x.js` a file names must be one of ours.
            for piece in text.split(['"', '\'']) {
                let referenced = piece.strip_prefix("/ui/").or_else(|| piece.strip_prefix("./"));
                if let Some(r) = referenced.filter(|r| r.ends_with(".js") || r.ends_with(".css") || r.ends_with(".svg"))
                {
                    assert!(ASSETS.iter().any(|(n, _, _)| n == &r), "{name} references missing asset {r}");
                }
                // The SVG namespace is a name, not a place anything is fetched from.
                let elsewhere = piece.starts_with("http://") && !piece.starts_with("http://www.w3.org/");
                assert!(!elsewhere && !piece.starts_with("https://"), "{name} refers to another origin: {piece}");
            }
        }
    }
}
