//! `outpost-bridge`: the store-and-forward uplink of Outpost.

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod rules;
pub mod spool;
pub mod stats;
