//! The listener on a real socket: slow clients are cut off at the header and body deadlines, the
//! connection cap holds, and a graceful shutdown does not wait for requests that never arrived.

use std::time::Duration;

use keyward_server::settings::ServerLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::helpers::TestApp;

/// Bound on every wait: far above each deadline the tests set.
const BOUND: Duration = Duration::from_secs(10);

struct Server {
    address: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn server(app: &TestApp, limits: ServerLimits) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let state = app.state.clone();
    let task = tokio::spawn(async move {
        keyward_server::serve(listener, state, limits, async move {
            let _ = stopped.await;
        })
        .await
    });
    Server { address, stop: Some(stop), task }
}

/// Reads until the server closes the connection (or resets it); what it sent, within the bound.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, read).await.expect("the server kept the connection open");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn clients_that_never_finish_their_headers_are_closed_at_the_deadline() {
    let app = TestApp::sqlite().await;
    let limits = ServerLimits { header_read_timeout_ms: 200, ..Default::default() };
    let srv = server(&app, limits).await;
    let mut slow = Vec::new();
    for i in 0..60 {
        let mut stream = TcpStream::connect(srv.address).await.unwrap();
        match i % 3 {
            // Half a request line, most of the headers, or nothing at all.
            0 => stream.write_all(b"GET /heal").await.unwrap(),
            1 => stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n").await.unwrap(),
            _ => {}
        }
        slow.push(stream);
    }
    // One more that dribbles a header byte at a time, each well inside the deadline.
    let mut dribbler = TcpStream::connect(srv.address).await.unwrap();
    let dribbling = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nX-Padding: ".iter().chain([b'a'; 200].iter()) {
            if dribbler.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    });
    for stream in &mut slow {
        until_closed(stream).await;
    }
    assert!(tokio::time::timeout(BOUND, dribbling).await.unwrap().unwrap(), "a dribbling client was cut off");
    // The server still answers a client that sends its request whole.
    let mut fine = TcpStream::connect(srv.address).await.unwrap();
    fine.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    assert!(until_closed(&mut fine).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408() {
    let app = TestApp::sqlite().await;
    let limits = ServerLimits { body_read_timeout_ms: 200, ..Default::default() };
    let srv = server(&app, limits).await;
    for (path, content_type) in
        [("/v1/verify", "application/json"), ("/v1/keys", "application/json"), ("/v1/keys/import", "text/csv")]
    {
        let mut stream = TcpStream::connect(srv.address).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\n\
             Content-Length: 100\r\n\r\n{{\"key\":",
            app.admin_key
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let answer = until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{path}: {answer}");
    }
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_one() {
    let app = TestApp::sqlite().await;
    let limits = ServerLimits { max_connections: 2, ..Default::default() };
    let srv = server(&app, limits).await;
    let mut held = vec![TcpStream::connect(srv.address).await.unwrap(), TcpStream::connect(srv.address).await.unwrap()];
    for stream in &mut held {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(BOUND, stream.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
    }
    // Both stay open (keep-alive): a third is accepted by the kernel but not served...
    let mut third = TcpStream::connect(srv.address).await.unwrap();
    third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut buf)).await;
    assert!(early.is_err(), "served past the cap");
    // ...until one of the two goes.
    drop(held.pop());
    tokio::time::timeout(BOUND, third.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
}

#[tokio::test]
async fn shutdown_does_not_wait_for_requests_that_never_arrived() {
    let app = TestApp::sqlite().await;
    // Deadlines far past the test's bound: only the shutdown can end these connections in time.
    let limits = ServerLimits {
        header_read_timeout_ms: 600_000,
        body_read_timeout_ms: 600_000,
        shutdown_grace_ms: 500,
        ..Default::default()
    };
    let mut srv = server(&app, limits).await;
    let mut held = Vec::new();
    for i in 0..20 {
        let mut stream = TcpStream::connect(srv.address).await.unwrap();
        if i % 2 == 0 {
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        } else {
            // Headers whole, body never: a request in flight that will not finish by itself.
            let head = format!(
                "POST /v1/verify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{{",
                app.admin_key
            );
            stream.write_all(head.as_bytes()).await.unwrap();
        }
        held.push(stream);
    }
    // Let the server take them all in.
    let mut probe = TcpStream::connect(srv.address).await.unwrap();
    probe.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    until_closed(&mut probe).await;
    let _ = srv.stop.take().map(|stop| stop.send(()));
    let ended = tokio::time::timeout(BOUND, &mut srv.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "the shutdown waited: {ended:?}");
    for stream in &mut held {
        until_closed(stream).await;
    }
}
