//! What the binary's process tests share.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
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
