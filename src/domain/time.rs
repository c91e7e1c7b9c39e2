//! Event time: whole seconds since the Unix epoch, UTC, parsed from the formats real exports use.
//!
//! Accepted (a date without a time of day means midnight UTC):
//! - RFC 3339: `2024-03-01T10:00:00Z`, `2024-03-01T10:00:00.123+02:00`
//! - `YYYY-MM-DD HH:MM:SS` (optionally with fractional seconds), taken as UTC
//! - `YYYY-MM-DD`
//! - `YYYYMMDD`
//! - `M/D/YYYY` (US order, as in many retail exports)
//! - epoch seconds (an integer of 9 to 11 digits, optionally negative is refused)
//!
//! Times outside [`EventTime::MIN_YEAR`, `EventTime::MAX_YEAR`) are refused: such a value is a
//! unit mistake (milliseconds read as seconds) or a corrupt field, and letting it in would decay
//! a customer's whole history to nothing.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Seconds in a day.
pub const SECONDS_PER_DAY: f64 = 86_400.0;

/// Why a timestamp was refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TimeError {
    /// The text matched none of the accepted formats.
    #[error("unrecognised timestamp {0:?} (expected RFC 3339, YYYY-MM-DD[ HH:MM:SS], YYYYMMDD, M/D/YYYY or epoch seconds)")]
    Unrecognised(String),
    /// The timestamp parsed but lies outside the accepted years.
    #[error("timestamp {0:?} is outside {min}..{max}", min = EventTime::MIN_YEAR, max = EventTime::MAX_YEAR)]
    OutOfRange(String),
}

/// Event times further than this past the wall clock are refused wherever they are read: a
/// stray future date would otherwise become an as-of time, or outweigh every other score.
pub const FUTURE_SLACK_SECONDS: i64 = 86_400;

/// An event time in whole seconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventTime(i64);

impl EventTime {
    /// Earliest accepted year.
    pub const MIN_YEAR: i32 = 1990;
    /// First year no longer accepted.
    pub const MAX_YEAR: i32 = 2100;

    /// 1990-01-01T00:00:00Z: the first accepted second.
    const MIN_UNIX: i64 = 631_152_000;
    /// The earliest time accepted.
    pub const EARLIEST: EventTime = EventTime(Self::MIN_UNIX);
    /// 2100-01-01T00:00:00Z: the first refused second.
    const MAX_UNIX: i64 = 4_102_444_800;

    /// Wraps epoch seconds, checking the accepted range.
    pub fn from_unix(seconds: i64) -> Result<Self, TimeError> {
        if (Self::MIN_UNIX..Self::MAX_UNIX).contains(&seconds) {
            Ok(Self(seconds))
        } else {
            Err(TimeError::OutOfRange(seconds.to_string()))
        }
    }

    /// Epoch seconds.
    pub fn unix(self) -> i64 {
        self.0
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        Self(Utc::now().timestamp())
    }

    /// Days from `earlier` to `self`; negative when `earlier` is later.
    pub fn days_since(self, earlier: EventTime) -> f64 {
        (self.0 - earlier.0) as f64 / SECONDS_PER_DAY
    }

    /// Day of the week, 0 = Monday .. 6 = Sunday.
    pub fn weekday(self) -> u32 {
        // 1970-01-01 was a Thursday (index 3).
        ((self.0.div_euclid(86_400) + 3).rem_euclid(7)) as u32
    }

    /// Index of the 7-day week since the epoch that contains this time.
    pub fn week_index(self) -> i64 {
        self.0.div_euclid(7 * 86_400)
    }

    /// Parses any accepted format (see the module docs).
    pub fn parse(raw: &str) -> Result<Self, TimeError> {
        let text = raw.trim();
        let seconds =
            parse_seconds(text).ok_or_else(|| TimeError::Unrecognised(text.to_owned()))?;
        Self::from_unix(seconds).map_err(|_| TimeError::OutOfRange(text.to_owned()))
    }

    /// RFC 3339 text, `Z` suffix, whole seconds.
    pub fn to_rfc3339(self) -> String {
        DateTime::<Utc>::from_timestamp(self.0, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| self.0.to_string())
    }
}

impl std::fmt::Display for EventTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for EventTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

/// Accepts text in any format [`EventTime::parse`] reads, or integer epoch seconds. A
/// visitor rather than an untagged enum: the daemon decodes one per event, and an untagged
/// enum buffers the value and allocates the text.
impl<'de> Deserialize<'de> for EventTime {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = EventTime;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a timestamp string or integer epoch seconds")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<EventTime, E> {
                EventTime::parse(text).map_err(E::custom)
            }

            fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<EventTime, E> {
                EventTime::from_unix(seconds).map_err(E::custom)
            }

            fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<EventTime, E> {
                let seconds = i64::try_from(seconds)
                    .map_err(|_| E::custom(format!("{seconds} seconds is out of range")))?;
                self.visit_i64(seconds)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn parse_seconds(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    if bytes.iter().all(u8::is_ascii_digit) {
        return match bytes.len() {
            8 => ymd_to_seconds(
                digits(&bytes[0..4])? as i32,
                digits(&bytes[4..6])?,
                digits(&bytes[6..8])?,
            ),
            9..=11 => text.parse().ok(),
            _ => None,
        };
    }
    if text.contains('/') {
        let mut parts = text.split('/');
        let month = parts.next()?.trim().parse().ok()?;
        let day = parts.next()?.trim().parse().ok()?;
        let year_part = parts.next()?.trim();
        // Some exports append a time after the date: "3/1/2024 10:00:00".
        let (year_text, time_text) = match year_part.split_once(' ') {
            Some((y, t)) => (y, Some(t.trim())),
            None => (year_part, None),
        };
        if parts.next().is_some() || year_text.len() != 4 {
            return None;
        }
        let date = ymd_to_seconds(year_text.parse().ok()?, month, day)?;
        return match time_text {
            None => Some(date),
            Some(t) => Some(date + hms_to_seconds(t)?),
        };
    }
    if bytes.len() == 10 && bytes[4] == b'-' && bytes[7] == b'-' {
        return ymd_to_seconds(
            digits(&bytes[0..4])? as i32,
            digits(&bytes[5..7])?,
            digits(&bytes[8..10])?,
        );
    }
    if let Some(seconds) = naive_date_time(bytes) {
        return Some(seconds);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp());
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp());
        }
    }
    None
}

/// The common export shapes `YYYY-MM-DD HH:MM:SS` (or `T` between), with an optional
/// fraction of 1 to 9 digits, and `YYYY-MM-DD HH:MM`, read without chrono's format
/// interpreter (batch files hold millions of them). Anything else, or a field out of range,
/// is left to the general path, which gives the same answer for these shapes.
fn naive_date_time(bytes: &[u8]) -> Option<i64> {
    let shape = |at: usize, byte: u8| bytes.get(at) == Some(&byte);
    if bytes.len() < 16 || !shape(4, b'-') || !shape(7, b'-') || !shape(13, b':') {
        return None;
    }
    let hms = match bytes.len() {
        16 if shape(10, b' ') => (digits(&bytes[11..13])?, digits(&bytes[14..16])?, 0),
        19.. if (shape(10, b' ') || shape(10, b'T')) && shape(16, b':') => {
            let fraction = &bytes[19..];
            if !(fraction.is_empty()
                || (fraction[0] == b'.'
                    && (2..=10).contains(&fraction.len())
                    && fraction[1..].iter().all(u8::is_ascii_digit)))
            {
                return None;
            }
            (
                digits(&bytes[11..13])?,
                digits(&bytes[14..16])?,
                digits(&bytes[17..19])?,
            )
        }
        _ => return None,
    };
    let (h, m, s) = hms;
    if h > 23 || m > 59 || s > 59 {
        return None;
    }
    let date = ymd_to_seconds(
        digits(&bytes[0..4])? as i32,
        digits(&bytes[5..7])?,
        digits(&bytes[8..10])?,
    )?;
    Some(date + i64::from(h * 3600 + m * 60 + s))
}

fn digits(bytes: &[u8]) -> Option<u32> {
    bytes.iter().try_fold(0u32, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

fn ymd_to_seconds(year: i32, month: u32, day: u32) -> Option<i64> {
    NaiveDate::from_ymd_opt(year, month, day)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp())
}

fn hms_to_seconds(text: &str) -> Option<i64> {
    let mut parts = text.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let s: i64 = parts.next().map_or(Some(0), |s| s.parse().ok())?;
    ((0..24).contains(&h) && (0..60).contains(&m) && (0..61).contains(&s))
        .then_some(h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-03-01T00:00:00Z, worked out as 19783 days * 86400.
    const MARCH_1_2024: i64 = 1_709_251_200;

    /// The fast path for `YYYY-MM-DD HH:MM[:SS[.f]]` answers exactly as chrono's formats do,
    /// including for the texts it leaves to them.
    #[test]
    fn the_date_time_fast_path_agrees_with_chrono() {
        let chrono_reading = |text: &str| {
            [
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M",
            ]
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
            .map(|t| t.and_utc().timestamp())
        };
        let mut texts = Vec::new();
        for date in [
            "2024-02-29",
            "2023-02-29",
            "1999-12-31",
            "2024-13-01",
            "2024-00-10",
        ] {
            for time in [
                "00:00:00", "23:59:59", "24:00:00", "12:60:00", "12:00:60", "07:05:09", "7:05:09",
                "07:05",
            ] {
                for sep in [" ", "T"] {
                    for fraction in ["", ".5", ".123456789", ".", ".1234567890", ".x", "Z"] {
                        texts.push(format!("{date}{sep}{time}{fraction}"));
                    }
                }
            }
        }
        for text in &texts {
            let fast = naive_date_time(text.as_bytes());
            if let Some(seconds) = fast {
                assert_eq!(Some(seconds), chrono_reading(text), "{text}");
            }
            // Whatever the fast path declines, the full parse still reads as before.
            let full = parse_seconds(text);
            let expected = DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.timestamp())
                .or_else(|| chrono_reading(text));
            assert_eq!(full, expected, "{text}");
        }
        assert!(naive_date_time(b"2024-01-01 00:08:24").is_some());
        assert!(naive_date_time(b"2024-01-01T00:08:24.250").is_some());
        assert!(naive_date_time(b"2024-01-01 00:08").is_some());
    }

    #[test]
    fn every_documented_format_parses_to_the_same_day() {
        for text in [
            "2024-03-01",
            "20240301",
            "3/1/2024",
            "2024-03-01T00:00:00Z",
            "2024-03-01 00:00:00",
            "2024-03-01T01:00:00+01:00",
            "1709251200",
        ] {
            assert_eq!(
                EventTime::parse(text).unwrap().unix(),
                MARCH_1_2024,
                "{text}"
            );
        }
    }

    #[test]
    fn times_of_day_are_kept() {
        assert_eq!(
            EventTime::parse("2024-03-01 10:30:15").unwrap().unix(),
            MARCH_1_2024 + 10 * 3600 + 30 * 60 + 15
        );
        assert_eq!(
            EventTime::parse("3/1/2024 10:30").unwrap().unix(),
            MARCH_1_2024 + 10 * 3600 + 30 * 60
        );
        assert_eq!(
            EventTime::parse("2024-03-01T10:30:15.250Z").unwrap().unix(),
            MARCH_1_2024 + 10 * 3600 + 30 * 60 + 15
        );
    }

    #[test]
    fn nonsense_and_far_away_times_are_refused() {
        assert!(matches!(
            EventTime::parse("yesterday"),
            Err(TimeError::Unrecognised(_))
        ));
        assert!(matches!(
            EventTime::parse("2/30/2024"),
            Err(TimeError::Unrecognised(_))
        ));
        assert!(matches!(
            EventTime::parse("1709251200000"),
            Err(TimeError::Unrecognised(_))
        ));
        assert!(matches!(
            EventTime::parse("2999-01-01"),
            Err(TimeError::OutOfRange(_))
        ));
        assert!(matches!(
            EventTime::parse("1850-01-01"),
            Err(TimeError::OutOfRange(_))
        ));
    }

    #[test]
    fn range_constants_match_the_calendar() {
        use chrono::TimeZone;
        let at = |y| Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).unwrap().timestamp();
        assert_eq!(EventTime::MIN_UNIX, at(EventTime::MIN_YEAR));
        assert_eq!(EventTime::MAX_UNIX, at(EventTime::MAX_YEAR));
        assert!(EventTime::from_unix(EventTime::MAX_UNIX - 1).is_ok());
        assert!(EventTime::from_unix(EventTime::MAX_UNIX).is_err());
    }

    #[test]
    fn weekday_and_week_index() {
        let friday = EventTime::parse("2024-03-01").unwrap();
        assert_eq!(friday.weekday(), 4);
        let sunday = EventTime::parse("2024-03-03").unwrap();
        assert_eq!(sunday.weekday(), 6);
        assert_eq!(
            EventTime::parse("2024-03-08").unwrap().week_index(),
            friday.week_index() + 1
        );
    }

    #[test]
    fn serde_accepts_text_and_seconds() {
        let t: EventTime = serde_json::from_str("\"2024-03-01\"").unwrap();
        assert_eq!(t.unix(), MARCH_1_2024);
        let t: EventTime = serde_json::from_str("1709251200").unwrap();
        assert_eq!(t.unix(), MARCH_1_2024);
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2024-03-01T00:00:00Z\""
        );
        assert!(serde_json::from_str::<EventTime>("\"3024-03-01\"").is_err());
    }
}
