//! Finds the TimescaleDB build the tests run a second PostgreSQL flavor on (the build
//! script of every crate whose tests run on PostgreSQL).
//!
//! `../shared/timescaledb` beside the project (or `SLUICE_TIMESCALEDB_DIR`) holds a
//! TimescaleDB build and its `install-tree` script. When it is there, the TimescaleDB
//! variants of the PostgreSQL tests are compiled as ordinary tests (cfg
//! `timescaledb_tests`, the folder in env `SLUICE_TIMESCALEDB_DIR`); when it is not, they
//! are compiled `#[ignore]`d, so they are reported as ignored, never as passed.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(timescaledb_tests)");
    println!("cargo::rerun-if-env-changed=SLUICE_TIMESCALEDB_DIR");
    println!("cargo::rerun-if-changed=build.rs");
    let dir = match std::env::var_os("SLUICE_TIMESCALEDB_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            // Beside the workspace root (the folder holding Cargo.lock): this script is
            // shared by the crates whose tests run on PostgreSQL, at different depths.
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            let root = manifest
                .ancestors()
                .find(|d| d.join("Cargo.lock").is_file())
                .unwrap_or(&manifest)
                .to_path_buf();
            root.join("../shared/timescaledb")
        }
    };
    if dir.join("install-tree").is_file() {
        let dir = dir.canonicalize().unwrap_or(dir);
        println!("cargo::rerun-if-changed={}", dir.display());
        println!("cargo::rustc-cfg=timescaledb_tests");
        println!("cargo::rustc-env=SLUICE_TIMESCALEDB_DIR={}", dir.display());
    }
}
