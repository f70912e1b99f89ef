//! `bench-warm <host:port> <keys-file> <service-key> [connections]`: verifies every key of the file once
//! (`POST /v1/verify`, keep-alive, `connections` at a time), so a benchmark can measure a warm cache with
//! any number of keys. Prints how many answers came back and how long it took; fails on any non-200.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, file, service_key, rest @ ..] = args.as_slice() else {
        return Err("usage: bench-warm <host:port> <keys-file> <service-key> [connections]".into());
    };
    let connections: usize = rest.first().map(|c| c.parse()).transpose()?.unwrap_or(64).max(1);
    let keys: Vec<String> = std::fs::read_to_string(file)?.lines().map(str::to_owned).collect();
    let keys = std::sync::Arc::new(keys);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let (keys, addr, service_key) = (keys.clone(), addr.clone(), service_key.clone());
        tasks.push(tokio::spawn(async move { warm(&addr, &service_key, &keys, worker, connections).await }));
    }
    let mut answered = 0;
    for task in tasks {
        answered += task.await??;
    }
    println!("verified {answered} keys in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Verifies keys `worker`, `worker + stride`, ... over one connection; returns how many.
async fn warm(addr: &str, service_key: &str, keys: &[String], worker: usize, stride: usize) -> Result<usize, Error> {
    let mut conn = BufReader::new(TcpStream::connect(addr).await?);
    let mut answered = 0;
    for key in keys.iter().skip(worker).step_by(stride) {
        let body = format!("{{\"key\":\"{key}\"}}");
        let request = format!(
            "POST /v1/verify HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {service_key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.get_mut().write_all(request.as_bytes()).await?;
        let status = read_response(&mut conn).await?;
        if status != 200 {
            return Err(format!("verify answered {status}").into());
        }
        answered += 1;
    }
    Ok(answered)
}

/// Reads one response with a `Content-Length` body; returns its status.
async fn read_response(conn: &mut BufReader<TcpStream>) -> Result<u16, Error> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = conn.read_u8().await?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no status line")?;
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or("no content-length")?;
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await?;
    Ok(status)
}
