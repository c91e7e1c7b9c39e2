//! HTTP endpoints: metrics, health, readiness, customer lookups and audiences on one
//! listener; the token-protected admin API (snapshots, re-clustering) on another.

pub mod admin;
pub mod http;
