//! What runs beside the workers: the configuration, start-up, the reload
//! transaction, and watching the underlay and its neighbours.

pub mod config;
pub mod neighbour;
pub mod run;
