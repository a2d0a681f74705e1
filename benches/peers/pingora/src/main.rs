//! The Pingora peer of `benches/compare.sh`: `/api/v2/` to the v2 upstream, everything else to
//! v1, upstream keep-alive (Pingora's pool), `X-Forwarded-For` added as the other peers add it,
//! one thread, plain HTTP (no TLS feature).
//!
//! Usage: pingora-peer LISTEN V1_ADDR V2_ADDR

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};

struct Route {
    v1: String,
    v2: String,
}

#[async_trait]
impl ProxyHttp for Route {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let v2 = session.req_header().uri.path().starts_with("/api/v2/");
        let addr = if v2 { &self.v2 } else { &self.v1 };
        Ok(Box::new(HttpPeer::new(addr.as_str(), false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
            upstream_request.insert_header("X-Forwarded-For", client.ip().to_string())?;
        }
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, v1, v2] = args.as_slice() else {
        eprintln!("usage: pingora-peer LISTEN V1_ADDR V2_ADDR");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        upstream_keepalive_pool_size: 128,
        // The bench stops it with SIGTERM: exit then, without the default graceful period (it
        // would keep the port, and the next run would share it).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let route = Route { v1: v1.clone(), v2: v2.clone() };
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, route);
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
