//! Helpers for the benchmark scripts in `scripts/`; not part of the product.
