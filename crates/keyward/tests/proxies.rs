//! Real nginx (`auth_request`) and real Caddy (`forward_auth`) on loopback, in front of a small upstream
//! that records what reaches it, asking a real `keyward serve` at `/v1/authz`. Each proxy runs the recipe
//! of its page in `docs/proxies/` as written, with only the addresses and ports replaced. Checked for
//! each: allow (identity headers at the upstream), 401, 403, 429 with `Retry-After` at the client, the key
//! and forged identity headers never at the upstream, a forged original URI or method changing nothing,
//! and (nginx, whose recipe passes it on) the signed identity checking at the upstream.
//!
//! nginx and Caddy come from Debian's packages (`scripts/test.sh` installs them and exports
//! `KEYWARD_TEST_NGINX`/`KEYWARD_TEST_CADDY`). Without them the tests are skipped with a loud line, and
//! fail under `CI=true`. Real processes, real sockets, every wait bounded, every process killed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{Cli, Killed, Response, free_port, header, parse_head, request, wait_for_port};

/// The first ```` ```<fence> ```` block of `docs/proxies/<page>`, with each `(from, to)` replaced; every
/// `from` must be in it, so a recipe that changes its addresses breaks this test rather than escaping it.
fn recipe(page: &str, fence: &str, replacements: &[(&str, &str)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/proxies").join(page);
    let doc = std::fs::read_to_string(&path).unwrap();
    let start =
        doc.find(&format!("```{fence}\n")).unwrap_or_else(|| panic!("no {fence} block in {page}")) + fence.len() + 4;
    let mut block = doc[start..].split("\n```").next().unwrap().to_owned();
    for (from, to) in replacements {
        assert!(block.contains(from), "{page}'s recipe no longer has {from}");
        block = block.replace(from, to);
    }
    block
}

/// What the upstream answers to everything.
const UPSTREAM_BODY: &str = r#"{"upstream":true}"#;

/// One request as the upstream received it.
struct Seen {
    request_line: String,
    headers: Vec<(String, String)>,
}

/// An HTTP upstream on 127.0.0.1 that answers 200 [`UPSTREAM_BODY`] to everything and records what it got.
struct Upstream {
    address: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let log = log.clone();
                        std::thread::spawn(move || Self::answer(stream, &log));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { address, seen, stop }
    }

    /// Reads one request (head and `Content-Length` body), records it, answers and closes.
    fn answer(stream: TcpStream, log: &Mutex<Vec<Seen>>) {
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let (request_line, headers) = parse_head(head.trim_end());
        let length = header(&headers, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0usize);
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        log.lock().unwrap().push(Seen { request_line, headers });
        let body = UPSTREAM_BODY;
        let _ = write!(
            reader.get_mut(),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The last request's request line and headers.
    fn last(&self) -> (String, Vec<(String, String)>) {
        let seen = self.seen.lock().unwrap();
        let last = seen.last().expect("the upstream got no request");
        (last.request_line.clone(), last.headers.clone())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Keyward's side of the recipes: their routes, the proxies on loopback trusted, a plan of 2 a minute,
/// and the signed identity on (with [`IDENTITY_SECRET`]).
const KEYWARD_TOML: &str = r#"
trusted_proxies = ["127.0.0.1/32"]

[authz]
identity_secret = "proxies-test-identity-secret-of-32-bytes"

[plans.tiny]
per_minute = 2

[[gateway.routes]]
prefix = "/v1/projects"
methods = ["POST", "PATCH", "DELETE"]
scopes = ["write:projects"]

[[gateway.routes]]
prefix = "/v1/projects"
scopes = ["read:projects"]

[[gateway.routes]]
prefix = "/health"
public = true
"#;

const IDENTITY_SECRET: &[u8] = b"proxies-test-identity-secret-of-32-bytes";

/// A key as `keys create --json` printed it.
struct Key {
    id: String,
    secret: String,
    organization_id: String,
}

/// A `keyward serve` on SQLite in a temporary directory, with the keys the checks use.
struct Keyward {
    _cli: Cli,
    _node: Killed,
    address: String,
    /// `read:projects write:projects`, owner `customer-7`.
    owner: Key,
    /// `read:projects`, no owner.
    reader: Key,
    /// `read:projects` on the 2-a-minute plan.
    tiny: Key,
    /// `read:projects`, usable from 198.51.100.7 only.
    walled: Key,
    /// `read:projects`, usable from 127.0.0.1 (where the test's client is) only.
    local: Key,
}

impl Keyward {
    fn start() -> Self {
        let cli = Cli::new();
        cli.write("keyward.toml", KEYWARD_TOML);
        cli.ok(&["seed"]);
        let key = |args: &[&str]| {
            let v = cli.json(&[&["keys", "create", "--json"][..], args].concat());
            Key {
                id: v["api_key"]["id"].as_str().unwrap().to_owned(),
                secret: v["key"].as_str().unwrap().to_owned(),
                organization_id: v["api_key"]["organization_id"].as_str().unwrap().to_owned(),
            }
        };
        let owner = key(&["--name", "owner", "--owner-id", "customer-7", "--scopes", "read:projects,write:projects"]);
        let reader = key(&["--name", "reader", "--scopes", "read:projects"]);
        let tiny = key(&["--name", "tiny", "--scopes", "read:projects", "--plan", "tiny"]);
        let walled = key(&["--name", "walled", "--scopes", "read:projects", "--allowed-ips", "198.51.100.7"]);
        let local = key(&["--name", "local", "--scopes", "read:projects", "--allowed-ips", "127.0.0.1"]);
        let (node, address) = common::serve(&cli, &[]);
        Self { _cli: cli, _node: node, address, owner, reader, tiny, walled, local }
    }
}

/// A proxy started from its recipe, listening on `address`.
struct Proxy {
    _process: Killed,
    _dir: tempfile::TempDir,
    address: String,
}

/// nginx in the foreground, one process (so it never switches to another user, as root or not), with
/// its pid, logs and temporary files in a directory of its own; the recipe's `server` block inside.
fn nginx(binary: &Path, keyward: &str, upstream: &str) -> Proxy {
    let listen: (_, fn(u16) -> String) = ("listen 8000;", |port| format!("listen 127.0.0.1:{port};"));
    start_proxy("nginx.md", "nginx", listen, keyward, upstream, |dir, server| {
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\naccess_log {d}/access.log;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n{server}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut command = Command::new(binary);
        command.args(["-p", &d.to_string(), "-c", "nginx.conf", "-e", &format!("{d}/error.log")]);
        command
    })
}

/// Caddy with its admin endpoint and automatic HTTPS off, bound to loopback, its data in a directory of
/// its own, the recipe's site block (any host name) after those global options.
fn caddy(binary: &Path, keyward: &str, upstream: &str) -> Proxy {
    let listen: (_, fn(u16) -> String) = (":8000 {", |port| format!(":{port} {{"));
    start_proxy("caddy.md", "caddyfile", listen, keyward, upstream, |dir, site| {
        std::fs::write(
            dir.join("Caddyfile"),
            format!("{{\n\tadmin off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n}}\n{site}\n"),
        )
        .unwrap();
        let mut command = Command::new(binary);
        command
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(dir.join("Caddyfile"))
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config"));
        command
    })
}

/// Starts a proxy on a free port from the recipe of `docs/proxies/<page>`, whose listening text
/// `listen.0` becomes `listen.1(port)` and whose Keyward and upstream addresses become the test's;
/// `command` writes its configuration around the recipe in the proxy's own directory. Its standard
/// error goes to `stderr.log` there; returns once it answers.
fn start_proxy(
    page: &str,
    fence: &str,
    listen: (&str, fn(u16) -> String),
    keyward: &str,
    upstream: &str,
    command: impl FnOnce(&Path, &str) -> Command,
) -> Proxy {
    let dir = tempfile::TempDir::new().unwrap();
    let port = free_port();
    let block =
        recipe(page, fence, &[(listen.0, &listen.1(port)), ("127.0.0.1:8080", keyward), ("127.0.0.1:9000", upstream)]);
    let log = dir.path().join("stderr.log");
    let mut child = command(dir.path(), &block)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let address = format!("127.0.0.1:{port}");
    wait_for_port(&address, &mut child, &log);
    Proxy { _process: Killed(child), _dir: dir, address }
}

/// What a client forges in every request: an identity (in every spelling CGI, WSGI and Rack read as
/// `X-Keyward-*`: `_` for `-` anywhere, any case), and an original method and URI for each style,
/// naming a public route.
const FORGED: [(&str, &str); 11] = [
    ("X-Keyward-Key-Id", "forged-key"),
    ("X-Keyward-Identity", "forged-identity"),
    ("X-Keyward-Owner-Id", "forged-owner"),
    ("X_Keyward_Owner_Id", "forged-owner"),
    ("X-Keyward_Owner-Id", "forged-owner"),
    ("X_Keyward-Key-Id", "forged-key"),
    ("x-KEYWARD-scopes", "forged-scopes"),
    ("X-Original-URI", "/health"),
    ("X-Original-Method", "GET"),
    ("X-Forwarded-Uri", "/health"),
    ("X-Forwarded-Method", "GET"),
];

fn send(proxy: &Proxy, method: &str, path: &str, credentials: Option<(&str, String)>) -> Response {
    let mut headers: Vec<(&str, &str)> = FORGED.to_vec();
    if let Some((name, value)) = &credentials {
        headers.push((name, value));
    }
    request(&proxy.address, method, path, &headers, "")
}

fn bearer(key: &Key) -> Option<(&'static str, String)> {
    Some(("Authorization", format!("Bearer {}", key.secret)))
}

/// The upstream got this request with exactly this identity (an owner of `None`: no value), no
/// credentials, nothing forged, and the key nowhere.
fn assert_reached(upstream: &Upstream, request: &str, key: &Key, owner: Option<&str>, scopes: &str) {
    let (line, headers) = upstream.last();
    // Without the version: nginx speaks HTTP/1.0 to the upstream (the recipe sets no
    // `proxy_http_version`), Caddy HTTP/1.1.
    assert_eq!(line.rsplit_once(' ').map(|(r, _)| r), Some(request));
    let get = |name| header(&headers, name);
    assert_eq!(get("x-keyward-key-id"), Some(key.id.as_str()), "{headers:?}");
    assert_eq!(get("x-keyward-organization-id"), Some(key.organization_id.as_str()));
    assert_eq!(get("x-keyward-owner-id").filter(|v| !v.is_empty()), owner, "{headers:?}");
    assert_eq!(get("x-keyward-environment"), Some("live"));
    assert_eq!(get("x-keyward-scopes"), Some(scopes));
    for (name, value) in &headers {
        assert!(name != "authorization" && name != "x-api-key", "{name} reached the upstream");
        assert!(!value.contains(&key.secret), "the key reached the upstream in {name}");
        assert!(!value.starts_with("forged"), "forged {name} reached the upstream");
        assert!(!name.starts_with("x_keyward"), "{name} reached the upstream");
    }
}

/// The upstream's last request carries a signed identity that checks with the shared secret and names
/// this key and this request.
fn assert_signed(upstream: &Upstream, key: &Key, method: &str, path: &str) {
    let (_, headers) = upstream.last();
    let token = header(&headers, "x-keyward-identity").expect("no x-keyward-identity at the upstream");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = keyward_core::identity::verify(IDENTITY_SECRET, token, i64::try_from(now).unwrap()).unwrap();
    assert_eq!((claims.key_id.as_str(), claims.method.as_str(), claims.path.as_str()), (key.id.as_str(), method, path));
}

/// A refusal: the status, and the upstream never asked.
fn assert_refused(upstream: &Upstream, response: &Response, status: u16) {
    let before = upstream.count();
    assert_eq!(response.status, status, "{}", response.body);
    assert!(!response.body.contains(UPSTREAM_BODY), "{}", response.body);
    assert_eq!(upstream.count(), before);
}

/// Every check, through one proxy started by `start` against a fresh Keyward and upstream.
/// `copies_identity`: the recipe passes the signed identity on (otherwise it must not reach the upstream).
fn check(start: impl FnOnce(&str, &str) -> Proxy, copies_identity: bool) {
    let keyward = Keyward::start();
    let upstream = Upstream::start();
    let proxy = start(&keyward.address, &upstream.address);

    // Allow: Bearer, with an owner; the forged identity and original URI are gone.
    let response = send(&proxy, "GET", "/v1/projects/7?page=2", bearer(&keyward.owner));
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(response.body.contains(UPSTREAM_BODY), "{}", response.body);
    let scopes = "read:projects write:projects";
    assert_reached(&upstream, "GET /v1/projects/7?page=2", &keyward.owner, Some("customer-7"), scopes);
    if copies_identity {
        assert_signed(&upstream, &keyward.owner, "GET", "/v1/projects/7");
    } else {
        assert_eq!(header(&upstream.last().1, "x-keyward-identity"), None);
    }

    // Allow: X-API-Key, a key without an owner: no owner reaches the upstream, forged or not.
    let response = send(&proxy, "GET", "/v1/projects", Some(("X-API-Key", keyward.reader.secret.clone())));
    assert_eq!(response.status, 200, "{}", response.body);
    assert_reached(&upstream, "GET /v1/projects", &keyward.reader, None, "read:projects");

    // A public route needs no key (and still gets no forged identity).
    let response = send(&proxy, "GET", "/health", None);
    assert_eq!(response.status, 200, "{}", response.body);
    let (_, headers) = upstream.last();
    assert!(headers.iter().all(|(n, v)| !n.starts_with("x_keyward") && !v.starts_with("forged")), "{headers:?}");

    // The proxy forwards the path as sent: one that only its canonical form makes public (an upstream
    // may leave `..` unresolved, or read `//health` as a host) is refused, without a key and with one.
    for sent in ["/v1/projects/../../health", "/v1/projects/%2e%2e/.%2E/health?x=1", "//health/v1/projects"] {
        for credentials in [None, bearer(&keyward.reader)] {
            let before = upstream.count();
            let response = send(&proxy, "GET", sent, credentials);
            assert!([400, 403].contains(&response.status), "{sent}: {} {}", response.status, response.body);
            assert_eq!(upstream.count(), before, "{sent} reached the upstream");
        }
    }

    // The client address is the one the proxy saw: an X-Forwarded-For of the client's own choosing
    // neither opens a key walled to that address nor closes one walled to the real client.
    let spoofed = |key: &Key| {
        let bearer = format!("Bearer {}", key.secret);
        let headers = [("X-Forwarded-For", "198.51.100.7"), ("X-Real-IP", "198.51.100.7"), ("Authorization", &bearer)];
        request(&proxy.address, "GET", "/v1/projects", &headers, "")
    };
    assert_refused(&upstream, &spoofed(&keyward.walled), 403);
    assert_eq!(spoofed(&keyward.local).status, 200);

    // 401: no key, a malformed key; the forged original URI (`/health`, public) is not what is judged.
    assert_refused(&upstream, &send(&proxy, "GET", "/v1/projects", None), 401);
    assert_refused(
        &upstream,
        &send(&proxy, "GET", "/v1/projects", Some(("Authorization", "Bearer sk_live_nope".into()))),
        401,
    );

    // 403: the route needs write:projects; the forged original method (GET) is not what is judged.
    assert_refused(&upstream, &send(&proxy, "POST", "/v1/projects", bearer(&keyward.reader)), 403);

    // 429 after the plan's 2 a minute, with Retry-After reaching the client.
    for _ in 0..2 {
        assert_eq!(send(&proxy, "GET", "/v1/projects", bearer(&keyward.tiny)).status, 200);
    }
    let limited = send(&proxy, "GET", "/v1/projects", bearer(&keyward.tiny));
    assert_refused(&upstream, &limited, 429);
    let retry_after: u64 = limited.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!((1..=60).contains(&retry_after), "Retry-After {:?}", limited.header("retry-after"));
}

#[test]
fn nginx_auth_request_recipe() {
    let Some(binary) = common::tool("proxies", "nginx", "/usr/sbin/nginx") else { return };
    check(|keyward, upstream| nginx(&binary, keyward, upstream), true);
}

#[test]
fn caddy_forward_auth_recipe() {
    let Some(binary) = common::tool("proxies", "caddy", "/usr/bin/caddy") else { return };
    check(|keyward, upstream| caddy(&binary, keyward, upstream), false);
}
