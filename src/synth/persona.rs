//! Personas and persona mixes.
//!
//! A persona is the hidden "true segment" of a synthetic customer: segmentation quality can be
//! judged by how well the clusters recover it, and drift can be induced by changing the mix.
//! Each persona's behaviour is a [`Profile`] of population-level parameters; individual customers
//! draw noisy traits around it (see `behaviour::Traits`), so personas overlap the way real
//! segments do.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A customer archetype of the synthetic shop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Persona {
    /// Orders often from a few favourite categories, rarely on promotion, rarely returns.
    LoyalRegular,
    /// Buys mostly on promotion, cheap products, many categories, stocks up.
    BargainHunter,
    /// Few but expensive orders from premium products and pricey categories.
    BigSpender,
    /// Buys across many categories, seldom the same product twice, clicks a lot.
    Explorer,
    /// One or two orders a year.
    Occasional,
    /// Was active, orders less and less, complains, and churns.
    Lapsing,
    /// Acquired late in the period; onboarding-level messaging engagement.
    NewCustomer,
    /// Large baskets of which a large part goes back.
    SerialReturner,
    /// Contacts support often with product and technical questions; orders by phone or in store.
    HelpSeeker,
}

impl Persona {
    /// How many personas there are.
    pub const COUNT: usize = 9;

    /// Every persona, in index order.
    pub const ALL: [Persona; Persona::COUNT] = [
        Self::LoyalRegular,
        Self::BargainHunter,
        Self::BigSpender,
        Self::Explorer,
        Self::Occasional,
        Self::Lapsing,
        Self::NewCustomer,
        Self::SerialReturner,
        Self::HelpSeeker,
    ];

    /// The persona's name as used in mix strings and reports (snake case).
    pub fn name(self) -> &'static str {
        match self {
            Self::LoyalRegular => "loyal_regular",
            Self::BargainHunter => "bargain_hunter",
            Self::BigSpender => "big_spender",
            Self::Explorer => "explorer",
            Self::Occasional => "occasional",
            Self::Lapsing => "lapsing",
            Self::NewCustomer => "new_customer",
            Self::SerialReturner => "serial_returner",
            Self::HelpSeeker => "help_seeker",
        }
    }

    /// Position in [`Persona::ALL`], for per-persona arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn profile(self) -> &'static Profile {
        &PROFILES[self.index()]
    }
}

impl fmt::Display for Persona {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Persona {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|p| p.name() == wanted)
            .ok_or(MixError::UnknownPersona { name: wanted })
    }
}

/// When in the simulated period a persona's customers are acquired (place their first order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Acquisition {
    /// Skewed towards the start: mostly customers the shop already had.
    Early,
    /// Spread evenly.
    Uniform,
    /// In the last part of the period only.
    Late,
}

impl Acquisition {
    /// Day of acquisition in `0..days`.
    pub(crate) fn draw(self, days: u32, rng: &mut impl Rng) -> u32 {
        let u: f64 = rng.random();
        let at = match self {
            Self::Early => u * u,
            Self::Uniform => u,
            Self::Late => 0.75 + 0.25 * u,
        };
        ((at * f64::from(days)) as u32).min(days.saturating_sub(1))
    }
}

/// Support topics, in the order [`Profile::topics`] weights them.
pub(crate) const TOPICS: [&str; 8] = [
    "delivery",
    "billing",
    "order_status",
    "product_question",
    "how_to",
    "technical",
    "complaint",
    "account",
];

/// Population-level behaviour of a persona. Rates are per week of activity; probabilities are
/// population medians that customers jitter around.
#[derive(Debug)]
pub(crate) struct Profile {
    /// Share in the default mix.
    pub default_weight: f64,
    /// Median orders per week before the shop-wide calibration scale.
    pub orders_per_week: f64,
    /// Log-normal sigma of the per-customer order rate.
    pub order_rate_sigma: f64,
    /// Mean of the Poisson number of lines beyond the first.
    pub extra_lines: f64,
    /// Mean of the Poisson number of units beyond the first on a line.
    pub extra_units: f64,
    /// Where in a category's price range the customer shops, 0 (cheapest) to 1 (dearest).
    pub price_tier: f64,
    /// Exponent on a category's price level when choosing favourite categories: > 0 favours
    /// expensive categories.
    pub price_tilt: f64,
    /// Median number of categories bought from.
    pub breadth: f64,
    /// Probability a line re-buys a favourite product.
    pub loyalty: f64,
    /// Probability a line is bought on promotion.
    pub discount: f64,
    /// Probability an order gets a return.
    pub returns: f64,
    /// Probability a return is of the whole order rather than one line.
    pub full_return: f64,
    /// Support contacts per week not tied to an order.
    pub support_per_week: f64,
    /// Probability an order leads to a contact (delivery, status, billing).
    pub order_contact: f64,
    /// Mean support complexity, 1..=5.
    pub complexity: f64,
    /// Weights over [`TOPICS`] for contacts not tied to an order.
    pub topics: [f64; 8],
    /// Opens per week per messaging channel (email, sms, push, in-app) while subscribed.
    pub opens_per_week: [f64; 4],
    /// Probability an open leads to a click.
    pub click: f64,
    /// Weekly hazard of unsubscribing from a channel.
    pub unsubscribe_per_week: f64,
    /// Weights over order channels (web, app, store, phone).
    pub channels: [f64; 4],
    /// When customers are acquired.
    pub acquisition: Acquisition,
    /// Probability a customer churns at some point.
    pub churn: f64,
    /// Mean days from acquisition to churn for those who churn.
    pub churn_after_days: f64,
    /// Time constant in days of the decline in activity, 0 for none.
    pub decay_days: f64,
}

/// Personas in [`Persona::ALL`] order. The numbers are chosen so each persona stands out on at
/// least two of the axes a segmentation looks at (frequency, spend, discount share, breadth,
/// returns, support, engagement, recency) while overlapping on the rest.
const PROFILES: [Profile; Persona::COUNT] = [
    // loyal_regular
    Profile {
        default_weight: 0.16,
        orders_per_week: 0.55,
        order_rate_sigma: 0.35,
        extra_lines: 1.6,
        extra_units: 0.35,
        price_tier: 0.5,
        price_tilt: 0.0,
        breadth: 6.0,
        loyalty: 0.65,
        discount: 0.08,
        returns: 0.04,
        full_return: 0.3,
        support_per_week: 0.015,
        order_contact: 0.03,
        complexity: 1.8,
        topics: [0.2, 0.1, 0.15, 0.2, 0.1, 0.05, 0.05, 0.15],
        opens_per_week: [0.4, 0.06, 0.3, 0.2],
        click: 0.35,
        unsubscribe_per_week: 0.002,
        channels: [0.35, 0.45, 0.15, 0.05],
        acquisition: Acquisition::Early,
        churn: 0.05,
        churn_after_days: 200.0,
        decay_days: 0.0,
    },
    // bargain_hunter
    Profile {
        default_weight: 0.15,
        orders_per_week: 0.35,
        order_rate_sigma: 0.4,
        extra_lines: 2.6,
        extra_units: 0.8,
        price_tier: 0.18,
        price_tilt: -0.5,
        breadth: 16.0,
        loyalty: 0.12,
        discount: 0.72,
        returns: 0.07,
        full_return: 0.35,
        support_per_week: 0.015,
        order_contact: 0.04,
        complexity: 2.0,
        topics: [0.25, 0.2, 0.2, 0.1, 0.05, 0.03, 0.12, 0.05],
        opens_per_week: [0.6, 0.15, 0.35, 0.12],
        click: 0.5,
        unsubscribe_per_week: 0.004,
        channels: [0.55, 0.4, 0.04, 0.01],
        acquisition: Acquisition::Uniform,
        churn: 0.2,
        churn_after_days: 150.0,
        decay_days: 0.0,
    },
    // big_spender
    Profile {
        default_weight: 0.06,
        orders_per_week: 0.22,
        order_rate_sigma: 0.35,
        extra_lines: 2.2,
        extra_units: 0.6,
        price_tier: 0.88,
        price_tilt: 0.9,
        breadth: 9.0,
        loyalty: 0.35,
        discount: 0.04,
        returns: 0.09,
        full_return: 0.4,
        support_per_week: 0.03,
        order_contact: 0.06,
        complexity: 3.0,
        topics: [0.3, 0.1, 0.15, 0.2, 0.05, 0.05, 0.05, 0.1],
        opens_per_week: [0.15, 0.02, 0.08, 0.06],
        click: 0.2,
        unsubscribe_per_week: 0.003,
        channels: [0.4, 0.2, 0.33, 0.07],
        acquisition: Acquisition::Early,
        churn: 0.08,
        churn_after_days: 250.0,
        decay_days: 0.0,
    },
    // explorer
    Profile {
        default_weight: 0.10,
        orders_per_week: 0.3,
        order_rate_sigma: 0.4,
        extra_lines: 3.0,
        extra_units: 0.25,
        price_tier: 0.5,
        price_tilt: 0.1,
        breadth: 45.0,
        loyalty: 0.04,
        discount: 0.25,
        returns: 0.1,
        full_return: 0.3,
        support_per_week: 0.035,
        order_contact: 0.04,
        complexity: 2.4,
        topics: [0.1, 0.05, 0.1, 0.35, 0.2, 0.1, 0.03, 0.07],
        opens_per_week: [0.3, 0.02, 0.2, 0.3],
        click: 0.55,
        unsubscribe_per_week: 0.005,
        channels: [0.6, 0.35, 0.04, 0.01],
        acquisition: Acquisition::Uniform,
        churn: 0.15,
        churn_after_days: 180.0,
        decay_days: 0.0,
    },
    // occasional
    Profile {
        default_weight: 0.22,
        orders_per_week: 0.045,
        order_rate_sigma: 0.5,
        extra_lines: 0.7,
        extra_units: 0.2,
        price_tier: 0.42,
        price_tilt: 0.0,
        breadth: 3.0,
        loyalty: 0.3,
        discount: 0.2,
        returns: 0.05,
        full_return: 0.5,
        support_per_week: 0.004,
        order_contact: 0.03,
        complexity: 2.0,
        topics: [0.3, 0.15, 0.2, 0.1, 0.05, 0.05, 0.05, 0.1],
        opens_per_week: [0.05, 0.01, 0.02, 0.01],
        click: 0.12,
        unsubscribe_per_week: 0.012,
        channels: [0.45, 0.1, 0.35, 0.1],
        acquisition: Acquisition::Uniform,
        churn: 0.3,
        churn_after_days: 120.0,
        decay_days: 0.0,
    },
    // lapsing
    Profile {
        default_weight: 0.10,
        orders_per_week: 0.4,
        order_rate_sigma: 0.35,
        extra_lines: 1.5,
        extra_units: 0.3,
        price_tier: 0.45,
        price_tilt: 0.0,
        breadth: 6.0,
        loyalty: 0.4,
        discount: 0.2,
        returns: 0.08,
        full_return: 0.3,
        support_per_week: 0.03,
        order_contact: 0.08,
        complexity: 3.4,
        topics: [0.25, 0.15, 0.15, 0.05, 0.05, 0.05, 0.25, 0.05],
        opens_per_week: [0.18, 0.02, 0.08, 0.04],
        click: 0.15,
        unsubscribe_per_week: 0.03,
        channels: [0.5, 0.3, 0.15, 0.05],
        acquisition: Acquisition::Early,
        churn: 0.9,
        churn_after_days: 75.0,
        decay_days: 45.0,
    },
    // new_customer
    Profile {
        default_weight: 0.08,
        orders_per_week: 0.25,
        order_rate_sigma: 0.4,
        extra_lines: 1.2,
        extra_units: 0.25,
        price_tier: 0.4,
        price_tilt: -0.1,
        breadth: 4.0,
        loyalty: 0.2,
        discount: 0.35,
        returns: 0.06,
        full_return: 0.3,
        support_per_week: 0.05,
        order_contact: 0.1,
        complexity: 1.6,
        topics: [0.15, 0.1, 0.2, 0.1, 0.15, 0.05, 0.02, 0.23],
        opens_per_week: [0.5, 0.04, 0.25, 0.35],
        click: 0.4,
        unsubscribe_per_week: 0.01,
        channels: [0.5, 0.42, 0.06, 0.02],
        acquisition: Acquisition::Late,
        churn: 0.0,
        churn_after_days: 1.0,
        decay_days: 0.0,
    },
    // serial_returner
    Profile {
        default_weight: 0.06,
        orders_per_week: 0.32,
        order_rate_sigma: 0.35,
        extra_lines: 3.2,
        extra_units: 0.5,
        price_tier: 0.6,
        price_tilt: 0.3,
        breadth: 12.0,
        loyalty: 0.08,
        discount: 0.3,
        returns: 0.55,
        full_return: 0.55,
        support_per_week: 0.09,
        order_contact: 0.15,
        complexity: 3.0,
        topics: [0.3, 0.25, 0.1, 0.05, 0.02, 0.03, 0.2, 0.05],
        opens_per_week: [0.25, 0.04, 0.15, 0.12],
        click: 0.35,
        unsubscribe_per_week: 0.006,
        channels: [0.62, 0.34, 0.03, 0.01],
        acquisition: Acquisition::Uniform,
        churn: 0.15,
        churn_after_days: 200.0,
        decay_days: 0.0,
    },
    // help_seeker
    Profile {
        default_weight: 0.07,
        orders_per_week: 0.15,
        order_rate_sigma: 0.4,
        extra_lines: 1.0,
        extra_units: 0.15,
        price_tier: 0.55,
        price_tilt: 0.4,
        breadth: 5.0,
        loyalty: 0.5,
        discount: 0.1,
        returns: 0.12,
        full_return: 0.4,
        support_per_week: 0.28,
        order_contact: 0.2,
        complexity: 3.8,
        topics: [0.05, 0.05, 0.05, 0.3, 0.25, 0.25, 0.03, 0.02],
        opens_per_week: [0.12, 0.04, 0.02, 0.02],
        click: 0.15,
        unsubscribe_per_week: 0.008,
        channels: [0.3, 0.08, 0.27, 0.35],
        acquisition: Acquisition::Uniform,
        churn: 0.1,
        churn_after_days: 200.0,
        decay_days: 0.0,
    },
];

/// Why a persona mix could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MixError {
    /// The text had no entries.
    #[error("persona mix is empty (expected e.g. \"big_spender=0.3,bargain_hunter=0.2\")")]
    Empty,
    /// An entry is not of the form `persona=weight`.
    #[error("persona mix entry {entry:?} is not of the form persona=weight")]
    MissingWeight {
        /// The entry as written.
        entry: String,
    },
    /// A name that is not a persona.
    #[error("unknown persona {name:?} (known: {})", known_personas())]
    UnknownPersona {
        /// The name as written, lower-cased.
        name: String,
    },
    /// A weight that is not a number.
    #[error("weight {text:?} for {persona} is not a number")]
    BadWeight {
        /// Whose weight it is.
        persona: Persona,
        /// The weight as written.
        text: String,
    },
    /// A weight that is negative, NaN or infinite.
    #[error("weight {weight} for {persona} must be finite and >= 0")]
    InvalidWeight {
        /// Whose weight it is.
        persona: Persona,
        /// The weight.
        weight: f64,
    },
    /// A persona named twice.
    #[error("persona {persona} appears more than once in the mix")]
    Duplicate {
        /// The persona.
        persona: Persona,
    },
    /// Every weight is zero, so no persona could ever be drawn.
    #[error("persona mix weights add up to zero")]
    ZeroTotal,
}

fn known_personas() -> String {
    Persona::ALL.map(Persona::name).join(", ")
}

/// Relative weights of the personas, normalised to shares that add up to 1.
///
/// Written and parsed as `persona=weight` pairs separated by commas, e.g.
/// `"big_spender=0.3,bargain_hunter=0.2,occasional=0.5"`. Personas left out get weight 0, and
/// the weights need not add up to 1 (they are normalised).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PersonaMix {
    shares: [f64; Persona::COUNT],
}

impl PersonaMix {
    /// Smallest total-variation distance between a mix and its [`PersonaMix::shifted`] mix.
    pub const MIN_SHIFT: f64 = 0.25;

    /// Builds a mix from (persona, weight) pairs; personas not listed get weight 0.
    pub fn new(weights: &[(Persona, f64)]) -> Result<Self, MixError> {
        let mut raw = [0.0; Persona::COUNT];
        let mut seen = [false; Persona::COUNT];
        for &(persona, weight) in weights {
            if !weight.is_finite() || weight < 0.0 {
                return Err(MixError::InvalidWeight { persona, weight });
            }
            if std::mem::replace(&mut seen[persona.index()], true) {
                return Err(MixError::Duplicate { persona });
            }
            raw[persona.index()] = weight;
        }
        Self::from_raw(raw)
    }

    /// A mix of one persona only.
    pub fn only(persona: Persona) -> Self {
        let mut shares = [0.0; Persona::COUNT];
        shares[persona.index()] = 1.0;
        Self { shares }
    }

    fn from_raw(raw: [f64; Persona::COUNT]) -> Result<Self, MixError> {
        let total: f64 = raw.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(MixError::ZeroTotal);
        }
        Ok(Self {
            shares: raw.map(|w| w / total),
        })
    }

    /// The persona's share, in [0, 1].
    pub fn share(&self, persona: Persona) -> f64 {
        self.shares[persona.index()]
    }

    /// Total-variation distance to another mix: the share of customers that would have to
    /// change persona to turn one mix into the other, in [0, 1].
    pub fn distance(&self, other: &PersonaMix) -> f64 {
        0.5 * self
            .shares
            .iter()
            .zip(&other.shares)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
    }

    /// A clearly different mix, used to induce drift: deal-seeking, returning and lapsing
    /// customers gain share at the expense of loyal and high-value ones. Always at least
    /// [`PersonaMix::MIN_SHIFT`] away from `self`.
    pub fn shifted(&self) -> PersonaMix {
        // Multiplying keeps personas the caller left out at zero, so a hand-made mix drifts in
        // the caller's own terms whenever that moves it far enough.
        const FACTORS: [f64; Persona::COUNT] = [0.35, 2.6, 0.35, 0.8, 0.8, 2.2, 1.3, 3.0, 1.0];
        let mut raw = self.shares;
        for (w, f) in raw.iter_mut().zip(FACTORS) {
            *w *= f;
        }
        if let Ok(candidate) = Self::from_raw(raw) {
            if candidate.distance(self) >= Self::MIN_SHIFT {
                return candidate;
            }
        }
        // The two fall-backs have disjoint support (distance 1), so by the triangle inequality
        // one of them is at least 0.5 away from any mix.
        let troubled = Self::fixed(&[
            (Persona::BargainHunter, 0.4),
            (Persona::SerialReturner, 0.3),
            (Persona::Lapsing, 0.3),
        ]);
        let valuable = Self::fixed(&[
            (Persona::LoyalRegular, 0.4),
            (Persona::BigSpender, 0.3),
            (Persona::Explorer, 0.3),
        ]);
        if troubled.distance(self) >= valuable.distance(self) {
            troubled
        } else {
            valuable
        }
    }

    /// A mix from constant, known-good weights (no validation needed).
    fn fixed(weights: &[(Persona, f64)]) -> Self {
        let mut shares = [0.0; Persona::COUNT];
        for &(p, w) in weights {
            shares[p.index()] = w;
        }
        Self { shares }
    }

    /// Draws a persona with probability equal to its share.
    pub(crate) fn sample(&self, rng: &mut impl Rng) -> Persona {
        let mut u: f64 = rng.random();
        for (persona, share) in Persona::ALL.into_iter().zip(self.shares) {
            if u < share {
                return persona;
            }
            u -= share;
        }
        // Rounding can leave u a hair above the last share: give it to the last persona with
        // any weight so a zero-weight persona is never drawn.
        Persona::ALL
            .into_iter()
            .rev()
            .find(|p| self.share(*p) > 0.0)
            .unwrap_or(Persona::Occasional)
    }
}

impl Default for PersonaMix {
    fn default() -> Self {
        Self {
            shares: PROFILES.map(|p| p.default_weight),
        }
    }
}

impl FromStr for PersonaMix {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pairs = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, weight) = entry
                .split_once('=')
                .ok_or_else(|| MixError::MissingWeight {
                    entry: entry.to_owned(),
                })?;
            let persona: Persona = name.parse()?;
            let text = weight.trim();
            let weight: f64 = text.parse().map_err(|_| MixError::BadWeight {
                persona,
                text: text.to_owned(),
            })?;
            pairs.push((persona, weight));
        }
        if pairs.is_empty() {
            return Err(MixError::Empty);
        }
        Self::new(&pairs)
    }
}

impl fmt::Display for PersonaMix {
    /// Writes the non-zero shares as `persona=share` pairs, 6 decimals at most.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for persona in Persona::ALL {
            let share = self.share(persona);
            if share == 0.0 {
                continue;
            }
            let text = format!("{share:.6}");
            let text = text.trim_end_matches('0').trim_end_matches('.');
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{persona}={text}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for PersonaMix {
    type Error = MixError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<PersonaMix> for String {
    fn from(mix: PersonaMix) -> Self {
        mix.to_string()
    }
}
