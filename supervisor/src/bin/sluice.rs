//! The `sluice` command: the daemon (`sluice run`) and the verbs that talk to it.

fn main() {
    std::process::exit(sluice::cli::main());
}
