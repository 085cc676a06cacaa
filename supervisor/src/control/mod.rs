//! The control API between the daemon and its clients: one protocol ([`protocol`]), one error type
//! that decides the HTTP status and the command's exit code ([`Error`]), the server on the control
//! socket ([`server`]), the client the command line uses ([`client`]), and the queue through which
//! the server asks the daemon loop ([`queue`]).
//!
//! Nothing here knows the daemon or the service tasks: the daemon feeds [`queue`]'s requests and
//! answers them in this module's terms, so the dependency points one way (`daemon` → `control`).

pub mod client;
pub mod error;
pub mod protocol;
pub mod queue;
pub mod server;

pub use error::{Error, ErrorKind};

#[cfg(test)]
mod tests {
    /// The files of this module, read as text.
    const FILES: [(&str, &str); 6] = [
        ("mod.rs", include_str!("mod.rs")),
        ("client.rs", include_str!("client.rs")),
        ("error.rs", include_str!("error.rs")),
        ("protocol.rs", include_str!("protocol.rs")),
        ("queue.rs", include_str!("queue.rs")),
        ("server.rs", include_str!("server.rs")),
    ];

    #[test]
    fn control_names_neither_the_daemon_nor_the_service_tasks_nor_the_command_line() {
        // Split so that this test does not find itself.
        let layers = ["daemon", "service", "cli", "coord", "build"].map(|m| format!("crate::{m}"));
        for (file, text) in FILES {
            for layer in &layers {
                let named = text.match_indices(layer.as_str()).any(|(at, _)| {
                    // A longer name (`clip` after `cli`) is another module.
                    let next = text[at + layer.len()..].chars().next();
                    !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                assert!(
                    !named,
                    "control/{file} names {layer}: the dependency must point one way"
                );
            }
        }
    }
}
