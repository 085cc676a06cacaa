//! The `sluice-shim` binary: see the library's docs for what a shim does and how it is called.

fn main() {
    sluice_shim::startup::main()
}
