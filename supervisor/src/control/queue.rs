//! The requests the control server sends the daemon loop, each with the channel for its answer.
//! The daemon owns the loop that answers them; the server only sends and waits.

use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use super::Error;
use super::protocol::{LocalVerb, Order, StatusDocument};

/// Where the daemon loop sends one answer.
pub type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request from the control API to the daemon loop.
pub enum Request {
    Status {
        service: Option<String>,
        reply: Reply<StatusDocument>,
    },
    Control {
        service: String,
        index: Option<u32>,
        order: Order,
        reply: Reply<String>,
    },
    Reload {
        reply: Reply<String>,
    },
    Shutdown {
        reply: Reply<String>,
    },
    /// `sluice deploy`, `promote`, `rollback` on the local backend.
    Local {
        service: String,
        verb: LocalVerb,
        reply: Reply<String>,
    },
    /// The log file of an instance, for `sluice logs`.
    LogPath {
        service: String,
        index: u32,
        stderr: bool,
        reply: Reply<PathBuf>,
    },
    /// The Prometheus exposition of the daemon's metrics (`GET /v1/metrics`, the metrics
    /// listener), in OpenMetrics' format when `openmetrics`, else the classic text format.
    Metrics {
        openmetrics: bool,
        reply: Reply<String>,
    },
}

/// The sending side of the daemon loop's queue, given to the control server.
pub type Requests = mpsc::Sender<Request>;
