//! segmentd keeps every customer of a shop assigned to behavioural segments.
#![warn(missing_docs)]

pub mod domain;
