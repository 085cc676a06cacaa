//! Lifecycle hooks of sluice deploys (being written).
