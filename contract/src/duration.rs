//! The duration syntax of `pooler.toml` and the CRD: integer+unit pairs (`500ms`, `30s`,
//! `1m30s`, `2h`), one parser for the operator and the pooler so that what one accepts
//! the other does too.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Longest duration accepted (a year): longer ones are almost surely typos, and every
/// deadline computed from one stays far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration like 500ms, 30s, 1m30s")]
    Syntax(String),
    #[error("{0:?} is longer than the maximum of 365 days")]
    TooLong(String),
}

/// A duration with the text it was written as, so a config renders back byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDuration {
    text: String,
    value: Duration,
}

impl ConfigDuration {
    /// The duration.
    pub fn get(&self) -> Duration {
        self.value
    }

    /// The text it was written as.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for ConfigDuration {
    type Err = DurationError;

    /// # Errors
    /// [`DurationError::Syntax`] unless `s` is `([0-9]+(ms|s|m|h))+`;
    /// [`DurationError::TooLong`] above [`MAX_DURATION`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || DurationError::Syntax(s.to_string());
        let too_long = || DurationError::TooLong(s.to_string());
        if s.is_empty() {
            return Err(syntax());
        }
        let mut rest = s;
        let mut total_ms: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(syntax());
            }
            // More digits than u64 holds is too long, not malformed.
            let n: u64 = rest[..digits].parse().map_err(|_| too_long())?;
            rest = &rest[digits..];
            let (unit_ms, len) = if rest.starts_with("ms") {
                (1, 2)
            } else if rest.starts_with('s') {
                (1_000, 1)
            } else if rest.starts_with('m') {
                (60_000, 1)
            } else if rest.starts_with('h') {
                (3_600_000, 1)
            } else {
                return Err(syntax());
            };
            rest = &rest[len..];
            total_ms = n
                .checked_mul(unit_ms)
                .and_then(|v| total_ms.checked_add(v))
                .ok_or_else(too_long)?;
        }
        let value = Duration::from_millis(total_ms);
        if value > MAX_DURATION {
            return Err(too_long());
        }
        Ok(Self {
            text: s.to_string(),
            value,
        })
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> Result<u128, DurationError> {
        s.parse::<ConfigDuration>().map(|d| d.get().as_millis())
    }

    #[test]
    fn parses_unit_pairs() {
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("30s"), Ok(30_000));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("2h"), Ok(7_200_000));
        assert_eq!(ms("1h1m1s1ms"), Ok(3_661_001));
        assert_eq!(ms("0s"), Ok(0));
        assert_eq!(
            "1m30s".parse::<ConfigDuration>().unwrap().to_string(),
            "1m30s"
        );
    }

    #[test]
    fn refuses_what_neither_side_can_use() {
        for bad in [
            "", "5", "s", "5x", "1.5s", " 5s", "5s ", "-5s", "5S", "soon",
        ] {
            assert!(matches!(ms(bad), Err(DurationError::Syntax(_))), "{bad:?}");
        }
        // Counts beyond u32 were accepted by the operator and refused by the pooler.
        assert_eq!(ms("4294967296ms"), Ok(4_294_967_296));
        for long in [
            "366d",
            "8761h",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            assert!(ms(long).is_err(), "{long:?}");
        }
        assert!(matches!(ms("8761h"), Err(DurationError::TooLong(_))));
        assert_eq!(ms("8760h"), Ok(MAX_DURATION.as_millis()));
    }

    #[test]
    fn serde_round_trip_keeps_the_text() {
        let d: ConfigDuration = serde_json::from_str("\"90s\"").unwrap();
        assert_eq!(d.get(), Duration::from_secs(90));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"90s\"");
        assert!(serde_json::from_str::<ConfigDuration>("\"90 s\"").is_err());
    }
}
