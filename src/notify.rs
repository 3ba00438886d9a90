//! systemd notification protocol (READY, STATUS, WATCHDOG, STOPPING).
//! Being written; see the issue for the interface.
