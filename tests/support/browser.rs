//! A real browser for console tests: Debian's `chromium`, headless, driven through
//! `chromedriver` (W3C WebDriver over HTTP), both installed when missing (as root, through
//! apt-get) and chromedriver started on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

/// The key under which WebDriver answers an element's id.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `chromium` and `chromedriver`, installed first if the machine lacks them.
fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINARIES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let found = || {
            let (browser, driver) = (Path::new("/usr/bin/chromium"), Path::new("/usr/bin/chromedriver"));
            (browser.exists() && driver.exists()).then(|| (browser.to_owned(), driver.to_owned()))
        };
        if let Some(found) = found() {
            return found;
        }
        let script = "command -v chromedriver >/dev/null || { apt-get update -qq && \
                      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }";
        let status =
            Command::new("flock").args(["/tmp/rollout-proxy-chromium-install.lock", "sh", "-c", script]).status();
        found().unwrap_or_else(|| {
            panic!(
                "the console test needs chromium and chromedriver (Debian packages chromium, chromium-driver) \
                 and installing them failed ({status:?}); install them, or run the tests as root so they can"
            )
        })
    })
}

/// A headless browser session; the driver stops when this is dropped.
pub struct Browser {
    driver: Child,
    base: String,
    client:
        hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> Browser {
        let (chromium, chromedriver) = binaries();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let mut browser = Browser { driver, base: format!("http://127.0.0.1:{port}"), client };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if browser.call(Method::GET, "/status", None).await.is_some_and(|s| s["value"]["ready"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--window-size={width},{height}")],
            },
        }}});
        let session = browser.call(Method::POST, "/session", Some(capabilities)).await.expect("a session");
        let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}"));
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Option<Value> {
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let response = self.client.request(request).await.ok()?;
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&bytes).ok()
    }

    async fn command(&self, method: Method, path: &str, body: Value) -> Value {
        let body = (!body.is_null()).then_some(body);
        let answer = self.call(method, path, body).await.expect("chromedriver answers");
        if answer["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.command(Method::POST, "/url", json!({ "url": url })).await;
    }

    async fn element(&self, css: &str) -> String {
        let found =
            self.command(Method::POST, "/element", json!({ "using": "css selector", "value": css })).await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    /// The visible text of the element `css` selects.
    pub async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        self.command(Method::GET, &format!("/element/{id}/text"), Value::Null)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// How many elements `css` selects.
    pub async fn count(&self, css: &str) -> usize {
        let found =
            self.command(Method::POST, "/elements", json!({ "using": "css selector", "value": css })).await;
        found.as_array().map_or(0, Vec::len)
    }

    /// Types `keys` into the element `css` selects, replacing what it held.
    pub async fn type_into(&self, css: &str, keys: &str) {
        let id = self.element(css).await;
        self.command(Method::POST, &format!("/element/{id}/clear"), json!({})).await;
        self.command(Method::POST, &format!("/element/{id}/value"), json!({ "text": keys })).await;
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(Method::POST, &format!("/element/{id}/click"), json!({})).await;
    }

    /// Evaluates `script` in the page; its return value.
    pub async fn eval(&self, script: &str) -> Value {
        self.command(Method::POST, "/execute/sync", json!({ "script": script, "args": [] })).await
    }

    /// Saves a PNG of the window to `file`.
    pub async fn screenshot(&self, file: &Path) {
        let encoded = self.command(Method::GET, "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap()).unwrap();
        std::fs::write(file, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
