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
