//! `sluiced`: the sluice daemon alone, which `sluice run` executes in its place (a smaller
//! binary, so fewer resident text pages: `sluice::cli::daemon_main`).

fn main() {
    std::process::exit(sluice::cli::daemon_main());
}
