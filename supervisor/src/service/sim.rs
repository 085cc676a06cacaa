//! The seeded simulation of the service core.
