//! Device ids of a simulated fleet: how they are formed and whether they are valid.
//!
//! The naming rule (`{prefix}-{index:05}`) is needed both by the option validation in
//! `config` and `bench`, which must reject a bad `--prefix` before anything connects, and
//! by `device`, which builds the fleet. It sits in its own module below all of them so
//! that validating options does not mean importing the device and message code (which
//! itself depends on `config`).

use anyhow::anyhow;

/// The id of device `index` with `prefix`.
pub fn device_id(prefix: &str, index: u64) -> String {
    format!("{prefix}-{index:05}")
}

/// Checks that every id of a fleet of `devices` devices is valid, by checking the first
/// and the last one: all ids share the prefix and the last one is the longest.
pub fn validate_fleet(prefix: &str, devices: usize) -> anyhow::Result<()> {
    let last = devices.saturating_sub(1) as u64;
    for index in [0, last] {
        let id = device_id(prefix, index);
        fluxgate_proto::validate_device_id(&id)
            .map_err(|e| anyhow!("device id {id:?} (prefix {prefix:?}) is invalid: {e:?}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_validation_uses_proto_rules() {
        assert!(validate_fleet("sim", 1_000).is_ok());
        assert!(validate_fleet("with space", 1).is_err());
        assert!(validate_fleet("slash/inside", 1).is_err());
        // 58 + "-" + 5 digits = 64 characters is the longest valid id.
        assert!(validate_fleet(&"a".repeat(58), 10).is_ok());
        assert!(validate_fleet(&"a".repeat(59), 10).is_err());
    }
}
