//! Fuzz target: the build archive reader (gzip, zstd or plain tar) extracting into a temp dir
//! with small caps. It must refuse or extract, never panic, and never write outside the dir.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::build::{Limits, extract_bytes_for_fuzzing};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_archive_bytes: 1 << 20,
        max_unpacked_bytes: 1 << 20,
        max_entries: 64,
        ..Limits::default()
    };
    let base = tempfile::tempdir().expect("a temp dir");
    let dest = base.path().join("release");
    std::fs::create_dir(&dest).expect("the release dir");
    let _ = extract_bytes_for_fuzzing(data, &dest, &limits);
    // Only the release directory may have been written to.
    let names: Vec<_> = std::fs::read_dir(base.path())
        .expect("reading the temp dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        names,
        ["release"],
        "an entry was written outside the release"
    );
});
