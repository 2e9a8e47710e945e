//! The instance's identity from Afterburn's metadata file, so a manager can match a probe
//! to a cloud instance.

use std::collections::BTreeMap;

use crate::paths::Root;

/// Written by `afterburn.service` on FCOS (`AFTERBURN_AWS_INSTANCE_ID=i-...` lines).
pub const AFTERBURN_METADATA: &str = "/run/metadata/afterburn";

/// Afterburn's attributes as `aws_instance_id` → value (prefix dropped, lower case); empty
/// when the file is missing (not a cloud instance, or Afterburn has not run yet).
pub fn read(root: &Root) -> BTreeMap<String, String> {
    parse(&std::fs::read_to_string(root.join(AFTERBURN_METADATA)).unwrap_or_default())
}

pub fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .filter_map(|(key, value)| {
            let key = key.trim().strip_prefix("AFTERBURN_")?.to_ascii_lowercase();
            Some((key, value.trim().trim_matches('"').to_string()))
        })
        .filter(|(key, _)| !key.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_afterburn_aws_attributes() {
        let text = "AFTERBURN_AWS_HOSTNAME=ip-10-0-1-5.eu-west-1.compute.internal\nAFTERBURN_AWS_INSTANCE_ID=i-0abc\n\
                    AFTERBURN_AWS_INSTANCE_TYPE=m7g.large\nAFTERBURN_AWS_AVAILABILITY_ZONE=eu-west-1a\n\
                    AFTERBURN_AWS_IPV4_LOCAL=10.0.1.5\nNOT_OURS=x\ngarbage\n";
        let m = parse(text);
        assert_eq!(m["aws_instance_id"], "i-0abc");
        assert_eq!(m["aws_instance_type"], "m7g.large");
        assert_eq!(m["aws_availability_zone"], "eu-west-1a");
        assert_eq!(m["aws_ipv4_local"], "10.0.1.5");
        assert_eq!(m.len(), 5);
    }
}
