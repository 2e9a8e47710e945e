//! How probes, operators, zincati, EC2 and events reach the agent: the one HTTP server, the
//! health endpoint, socket activation, the control routes, FleetLock, the Spot watcher, and
//! the watchers that wake the loop.

pub mod control;
pub mod fleet_lock;
pub mod http;
pub mod listen;
pub mod serve;
pub mod spot;
pub mod watch;
