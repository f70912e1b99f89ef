//! What the binary's process tests share.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `keyward` binary run as an operator would, in a temporary directory, on one database.
pub struct Cli {
    pub dir: tempfile::TempDir,
    pub url: String,
}

impl Default for Cli {
    fn default() -> Self {
        Self::new()
    }
}

impl Cli {
    /// A fresh SQLite file in the directory.
    pub fn new() -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        Self { dir, url }
    }

    /// Another database (e.g. a PostgreSQL schema of the test's own).
    pub fn at(url: &str) -> Self {
        Self { dir: tempfile::TempDir::new().unwrap(), url: url.to_owned() }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(args)
            .env("KEYWARD_DATABASE_URL", &self.url)
            .env_remove("KEYWARD_PEPPER")
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// Its standard output, once it succeeded.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Like `ok`, and nothing on standard error (no progress bar off a terminal).
    pub fn quiet(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{args:?} wrote to stderr: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// A file in the directory; its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

/// One HTTP/1.1 request, `Connection: close`; status, JSON body, and how long it took.
pub fn http(address: &str, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value, Duration) {
    let started = Instant::now();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let bearer = format!("Bearer {key}");
    let response =
        request(address, method, path, &[("Authorization", &bearer), ("Content-Type", "application/json")], &body);
    let json = serde_json::from_str(&response.body).unwrap_or(Value::Null);
    (response.status, json, started.elapsed())
}

/// A response as read off the socket: status, headers (names in lower case, in order), body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// The first value of a header (`name` in lower case).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// One HTTP/1.1 request with exactly these headers (and `Host`, `Content-Length`, `Connection: close`);
/// the whole response, read within 20 s.
pub fn request(address: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    write!(stream, "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let (status_line, headers) = parse_head(head);
    let status = status_line.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Response { status, headers, body: body.to_owned() }
}

/// A request's or response's head: its first line, and its headers with names in lower case.
pub fn parse_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (first, headers)
}

/// The address of a `keyward serve` child started with JSON logs on stderr (piped), from its
/// "keyward is listening" line, within 30 s of `started`; its stderr is drained from then on so the
/// node never blocks on a full pipe.
pub fn listening_address(child: &mut Child, started: Instant) -> String {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let address = loop {
        assert!(started.elapsed() < Duration::from_secs(30), "node did not start");
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "node exited during start");
        if line.contains("keyward is listening") {
            let v: Value = serde_json::from_str(&line).unwrap();
            break v["fields"]["address"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    address
}

/// `keyward serve` on `cli`'s database and a free loopback port, with JSON logs and Keyward's own
/// per-address protection lifted (every request of a test comes from 127.0.0.1, and its deliberate
/// refusals would soon answer 429), plus `env`: the node, and its address.
pub fn serve(cli: &Cli, env: &[(&str, &str)]) -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(cli.dir.path())
        .env("KEYWARD_DATABASE_URL", &cli.url)
        .env("KEYWARD_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("KEYWARD_PROTECTION__FAILED_AUTH_PER_MINUTE", "1000000")
        .env("KEYWARD_PROTECTION__MANAGEMENT_PER_MINUTE", "1000000")
        .envs(env.iter().copied())
        .env_remove("KEYWARD_PEPPER")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let address = listening_address(&mut child, Instant::now());
    (Killed(child), address)
}

/// A program a test of `suite` runs (a proxy, a browser): `$KEYWARD_TEST_<NAME>` or Debian's path.
/// None (a loud skip) when it is missing or `KEYWARD_TEST_SKIP_<NAME>=1`, unless `CI=true`.
pub fn tool(suite: &str, name: &str, default: &str) -> Option<PathBuf> {
    let var = format!("KEYWARD_TEST_{}", name.to_ascii_uppercase());
    let skipped = std::env::var(format!("KEYWARD_TEST_SKIP_{}", name.to_ascii_uppercase())).is_ok_and(|v| v == "1");
    let path = PathBuf::from(std::env::var(&var).unwrap_or_else(|_| default.to_owned()));
    if !skipped && path.exists() {
        return Some(path);
    }
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{name} is not at {} and CI=true", path.display());
    eprintln!("!!!!! SKIPPED {suite}: {name} is not installed (set {var}, or run scripts/test.sh) !!!!!");
    None
}

/// A child process killed (and reaped) when the test lets go of it, also when it panics.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits (at most 20 s) until `address` accepts connections; a child that exits meanwhile fails the
/// test with its log.
pub fn wait_for_port(address: &str, child: &mut Child, log: &Path) {
    let started = Instant::now();
    while TcpStream::connect(address).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{address}: exited with {status}: {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{address} did not answer within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}
