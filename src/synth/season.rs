//! Calendar effects: weekly and yearly seasonality of ordering, and times of day per activity.
//!
//! Seasonality makes recency and frequency features behave as in a real shop (a December cohort,
//! a quiet summer), which matters for drift detection: a seasonal swing must not look like a
//! change of mix.

use chrono::{DateTime, Datelike};
use rand::Rng;

/// Order-rate multiplier per weekday, Monday first: the weekend peak of online retail.
const WEEKDAY: [f64; 7] = [0.88, 0.86, 0.9, 0.94, 1.04, 1.24, 1.14];

/// Multiplier on the order rate of the day starting at `day_start` (epoch seconds, midnight).
pub(crate) fn day_factor(day_start: i64) -> f64 {
    let weekday = (day_start.div_euclid(86_400) + 3).rem_euclid(7) as usize;
    WEEKDAY[weekday] * yearly_factor(day_start)
}

/// December peak (with a Black Friday spike) and a summer dip, as smooth bumps over the day of
/// the year so adjacent days never jump.
fn yearly_factor(day_start: i64) -> f64 {
    let Some(date) = DateTime::from_timestamp(day_start, 0) else {
        return 1.0;
    };
    let day = f64::from(date.ordinal0());
    let bump = |centre: f64, width: f64| {
        let d = (day - centre).abs();
        let d = d.min(365.0 - d);
        (-(d * d) / (2.0 * width * width)).exp()
    };
    1.0 + 0.65 * bump(350.0, 11.0) + 0.4 * bump(332.0, 2.5) - 0.25 * bump(208.0, 26.0)
}

/// Relative activity per hour of the day, for sampling the time of an event.
pub(crate) type Hours = [f64; 24];

/// Web and app orders: a lunch bump and an evening peak.
pub(crate) const ONLINE_HOURS: Hours = [
    0.3, 0.15, 0.1, 0.08, 0.08, 0.15, 0.4, 0.8, 1.1, 1.2, 1.3, 1.4, 1.7, 1.5, 1.3, 1.3, 1.4, 1.6,
    1.9, 2.3, 2.5, 2.2, 1.4, 0.7,
];

/// Store orders: opening hours only, busiest at lunch and after work.
pub(crate) const STORE_HOURS: Hours = [
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 1.0, 1.3, 1.7, 1.5, 1.2, 1.2, 1.5, 1.8, 1.6,
    1.0, 0.0, 0.0, 0.0, 0.0,
];

/// Phone orders and support contacts: office hours with an evening tail.
pub(crate) const OFFICE_HOURS: Hours = [
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, 1.5, 1.6, 1.5, 1.2, 1.3, 1.5, 1.4, 1.2, 1.0, 0.7,
    0.5, 0.4, 0.2, 0.0, 0.0,
];

/// Message opens: commute, lunch and evening.
pub(crate) const MESSAGE_HOURS: Hours = [
    0.2, 0.1, 0.05, 0.05, 0.05, 0.2, 0.7, 1.5, 1.6, 1.2, 1.0, 1.0, 1.5, 1.3, 1.0, 0.9, 1.0, 1.3,
    1.6, 1.8, 1.9, 1.6, 1.0, 0.5,
];

/// Seconds since midnight, drawn from an hour profile and uniform within the hour.
pub(crate) fn time_of_day(hours: &Hours, rng: &mut impl Rng) -> u32 {
    let total: f64 = hours.iter().sum();
    let mut u = rng.random::<f64>() * total;
    let mut hour = 23;
    for (h, w) in hours.iter().enumerate() {
        if u < *w {
            hour = h;
            break;
        }
        u -= w;
    }
    // Rounding can run past the last non-zero hour: fall back to it, never to a closed hour.
    while hours[hour] == 0.0 && hour > 0 {
        hour -= 1;
    }
    hour as u32 * 3600 + rng.random_range(0..3600)
}
