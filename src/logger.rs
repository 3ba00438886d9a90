//! The `log` backend. Being written; see the issue for the interface.
