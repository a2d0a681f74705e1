//! The admin console in a real browser (headless Chromium through chromedriver): the page
//! loads from the admin listener with its strict Content-Security-Policy, shows the numbers
//! `/status` and `/metrics` give, and moves the percentage with the token typed into it. A
//! screenshot is saved as `target/console.png`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::browser::Browser;
use support::{eventually, get, pools_of, ConfigBuilder, ProxyBuilder, Upstream};

const TOKEN: &str = "console-test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_rollout_and_moves_the_percentage_with_the_token() {
    let (v1, v2) = (Upstream::new("v1-a").spawn().await, Upstream::new("v2-a").spawn().await);
    let token = tempfile::NamedTempFile::new().unwrap().into_temp_path().keep().unwrap();
    std::fs::write(&token, TOKEN).unwrap();
    let config = ConfigBuilder::one_each(v1, v2).legacy_v1_percent(70.0).admin_token_file(&token);
    let proxy = ProxyBuilder::new(&config).spawn().await;
    pools_of((0..30).map(|i| proxy.url(&format!("/api/studies/{i}"))).collect()).await;
    for _ in 0..5 {
        get(&proxy.url("/api/v2/items/__status/500")).await;
    }

    let page = get(&proxy.admin_url("/")).await;
    let policy = page.header("content-security-policy").unwrap_or_default().to_owned();
    assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"), "{policy}");

    let browser = Browser::start(1280, 1700).await;
    browser.goto(&proxy.admin_url("/")).await;
    let status: Value = get(&proxy.admin_url("/status")).await.json();
    let (v1_pins, v2_pins) =
        (status["sessions"]["active"]["v1"].to_string(), status["sessions"]["active"]["v2"].to_string());
    eventually(Duration::from_secs(10), "the page shows /status's numbers", || async {
        browser.text("#legacy-percent").await == "70"
            && browser.text("#pins-v1").await == v1_pins
            && browser.text("#pins-v2").await == v2_pins
    })
    .await;
    assert_eq!(browser.count("#upstream-rows tr").await, 2);
    assert_eq!(browser.text("#drain-state").await, "not drained");
    let v2_row = browser.text("#traffic-v2").await;
    assert!(v2_row.contains(" 5 "), "v2's 5xx from /metrics: {v2_row}");
    assert_eq!(browser.eval("return document.body.dataset.revision").await, "0");

    // Without the token a change is refused in the page; with it, it is applied.
    browser.type_into("#percent-input", "40").await;
    browser.click("#percent-apply").await;
    eventually(Duration::from_secs(5), "the page asks for the token", || async {
        browser.text("#message").await.contains("Type the admin token first")
    })
    .await;
    browser.type_into("#token", TOKEN).await;
    browser.click("#percent-apply").await;
    eventually(Duration::from_secs(10), "the change is applied and shown", || async {
        let status: Value = get(&proxy.admin_url("/status")).await.json();
        status["routes"]["legacy_v1_percent"] == 40.0 && browser.text("#legacy-percent").await == "40"
    })
    .await;
    eventually(Duration::from_secs(5), "the change is in the page's journal", || async {
        browser.text("#audit-rows").await.contains("legacy_percent")
    })
    .await;
    assert_eq!(browser.eval("return document.cookie").await, "", "no cookies");

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from);
    std::fs::create_dir_all(&target).unwrap();
    browser.screenshot(&target.join("console.png")).await;
    assert!(std::fs::metadata(target.join("console.png")).unwrap().len() > 10_000);
    proxy.shutdown().await;
}
