//! The browser page (`web/` at the top of the repository), compiled into the binary and served at
//! `/`: its files, their content types, and the headers that keep the page to its own origin.

/// One file of the page.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $type:literal) => {
        Asset { path: $path, content_type: $type, body: include_bytes!(concat!("../../web/", $file)) }
    };
}

/// Every file of the page, by the path it is served at.
pub const ASSETS: &[Asset] = &[
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/style.css", "style.css", "text/css; charset=utf-8"),
    asset!("/app.js", "app.js", "text/javascript; charset=utf-8"),
    asset!("/link.js", "link.js", "text/javascript; charset=utf-8"),
    asset!("/audio.js", "audio.js", "text/javascript; charset=utf-8"),
    asset!("/worklets.js", "worklets.js", "text/javascript; charset=utf-8"),
    asset!("/icon.svg", "icon.svg", "image/svg+xml"),
];

/// Headers sent with every file: scripts, styles, workers and sockets only from this origin, never
/// framed; revalidated on each load, so a new server version is picked up at once.
pub const HEADERS: &[(&str, &str)] = &[
    (
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
    ("Permissions-Policy", "microphone=(self)"),
];

/// The file served at `path` (`/index.html` is `/`).
pub fn find(path: &str) -> Option<&'static Asset> {
    let path = if path == "/index.html" { "/" } else { path };
    ASSETS.iter().find(|a| a.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_loads_is_served() {
        let html = std::str::from_utf8(find("/").unwrap().body).unwrap();
        for asset in ASSETS {
            let name = asset.path.trim_start_matches('/');
            assert!(asset.path == "/" || html.contains(name) || mentioned(name), "{name} is never loaded");
        }
        assert!(find("/index.html").is_some() && find("/nope.js").is_none());
    }

    /// Whether a script of the page refers to `name`.
    fn mentioned(name: &str) -> bool {
        ASSETS.iter().filter(|a| a.path.ends_with(".js")).any(|a| std::str::from_utf8(a.body).unwrap().contains(name))
    }
}
