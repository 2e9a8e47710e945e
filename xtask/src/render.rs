//! Rendering: Butane to Ignition as the upstream tools do it (YAML in, Go-style JSON and gzip out), and the `ignition` and `dist` commands.

pub mod butane;
pub mod gojson;
pub mod gzip;
pub mod ignition;
pub mod yaml;
