//! What a pod gets: the cache (single flight, refresh policy, the size bound, its slots),
//! the upstream `Backend` with EKS Auth and STS, the STS backend's associations file, and
//! the record of which pods a key was delivered to.
//!
//! May import identity (the cache is keyed by an `Identity`) and the bottom modules; never
//! the edge or lifecycle.

pub mod associations;
pub mod cache;
pub mod deliveries;
pub mod upstream;
