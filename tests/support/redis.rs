//! A private Redis server for fleet-mode tests: Debian's `redis-server`, installed when missing
//! (as root, through apt-get), started on a free loopback port with its own directory and the
//! append-only file on, so a restart keeps what was written.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// The `redis-server` binary, installed first if the machine has none.
fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let found = || {
            ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].into_iter().map(PathBuf::from).find(|p| p.exists())
        };
        if let Some(path) = found() {
            return path;
        }
        // Test binaries run in parallel: one install at a time, the others wait on the lock.
        let script = "command -v redis-server >/dev/null || { apt-get update -qq && \
                      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }";
        let status = Command::new("flock")
            .args(["/tmp/rollout-proxy-redis-install.lock", "sh", "-c", script])
            .status();
        match (status, found()) {
            (_, Some(path)) => path,
            (status, None) => panic!(
                "fleet-mode tests need redis-server (Debian package redis-server) and installing it failed ({status:?}); \
                 install it, or run the tests as root so they can"
            ),
        }
    })
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer { child: None, addr: free_port(), dir };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the server on its port and directory; another port if that one was taken.
    fn launch(&mut self) {
        for _ in 0..5 {
            let child = Command::new(binary())
                .args(["--bind", "127.0.0.1", "--port", &self.addr.port().to_string()])
                .arg("--dir")
                .arg(self.dir.path())
                .args(["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"])
                .args(["--protected-mode", "no", "--loglevel", "warning"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            self.child = Some(child);
            if self.wait_ready() {
                return;
            }
            self.kill();
            self.addr = free_port();
        }
        panic!("redis-server did not start on a free port in five tries");
    }

    fn wait_ready(&mut self) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false; // exited: the port was taken
            }
            if self.command("PING").is_some_and(|answer| answer.starts_with("+PONG")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends one inline command and returns the raw first reply, if the server answers.
    pub fn command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Stops the server at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (the append-only file is read back).
    pub fn restart(&mut self) {
        self.kill();
        let port = self.addr;
        self.launch();
        assert_eq!(self.addr, port, "redis-server came back on another port");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
