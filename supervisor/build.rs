//! Link options of the daemon's own binary.
//!
//! `sluiced` is linked with packed relative relocations (DT_RELR, `-z pack-relative-relocs`): a
//! position-independent binary of this size carries ~0.4 MiB of `R_X86_64_RELATIVE` entries that
//! the loader reads at every start and that then stay resident in the brain (issue 7's footprint:
//! the brain under 10 MiB RSS); packed, they take a few KiB. The binary then needs glibc 2.36 or
//! later (Debian 12) to start; an older glibc refuses it at load time, naming the missing
//! `GLIBC_ABI_DT_RELR` version.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=sluiced=-Wl,-z,pack-relative-relocs");
    }
}
