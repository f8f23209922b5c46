//! The Redis sink (in progress).
