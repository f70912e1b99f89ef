//! `bench-warm <host:port> <keys-file> <service-key> [connections]`: verifies every key of the file once
//! (`POST /v1/verify` through `keyward_tower::Remote`, `connections` at a time), so a benchmark can measure
//! a warm cache with any number of keys. Prints how many answers came back and how long it took; fails on
//! any answer that is not a 200.

use std::sync::Arc;
use std::time::Instant;

use keyward_server::ErrorCode;
use keyward_tower::{Remote, Verify};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, file, service_key, rest @ ..] = args.as_slice() else {
        return Err("usage: bench-warm <host:port> <keys-file> <service-key> [connections]".into());
    };
    let connections: usize = rest.first().map(|c| c.parse()).transpose()?.unwrap_or(64).max(1);
    let keys: Arc<Vec<String>> = Arc::new(std::fs::read_to_string(file)?.lines().map(str::to_owned).collect());
    let remote = Remote::new(&format!("http://{addr}"), service_key)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let (keys, remote) = (keys.clone(), remote.clone());
        tasks.push(tokio::spawn(async move {
            // Keys `worker`, `worker + connections`, ...; any outcome is an answer, a failed call is not.
            let mut answered = 0;
            for key in keys.iter().skip(worker).step_by(connections) {
                if let Err(e) = remote.verify(key, None, &[]).await
                    && e.code == ErrorCode::VerificationUnavailable
                {
                    return Err(e.to_string());
                }
                answered += 1;
            }
            Ok::<usize, String>(answered)
        }));
    }
    let mut answered = 0;
    for task in tasks {
        answered += task.await??;
    }
    println!("verified {answered} keys in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
