//! Prints N fresh Keyward keys, one per line: `bench-keys 1000000 > keys.txt`.

use std::io::{BufWriter, Write};

use keyward_core::{Environment, KeyPrefix, PlainKey};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).unwrap_or_else(|| "1000".to_owned()).parse()?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let prefix = KeyPrefix::default();
    for _ in 0..n {
        writeln!(out, "{}", PlainKey::generate(&prefix, Environment::Live)?.expose_secret())?;
    }
    out.flush()?;
    Ok(())
}
