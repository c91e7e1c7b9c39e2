//! The 13 behavioural axes and their features: the single definition both the batch commands
//! and the daemon use, read from [`CustomerState`] at an "as of" time.
//!
//! Position in the pipeline: `CustomerState` → [`FeatureVector::compute`] → (per axis, through a
//! snapshot's scaler) → assignment. [`FEATURES`] is the catalogue; the README's feature table is
//! generated from it (`segmentd schema --markdown`) and a test keeps the two identical.
//!
//! Conventions:
//! - skewed money and count figures are `ln(1 + x)`;
//! - rates and shares are kept in 0–1;
//! - "monthly" rates come from decayed sums: a customer ordering `r` times a day has a decayed
//!   order count of `r·h/ln 2` at equilibrium, so `D·ln 2/h·30.44` is orders per month;
//! - a feature that cannot be computed for a customer (a cadence with one order, a complexity
//!   with no contacts) is *absent*, never zero, and the customer has no segment on that axis.

use serde::{Deserialize, Serialize};

use super::state::{decay, CustomerState, StateParams};
use super::time::{EventTime, SECONDS_PER_DAY};

/// Version of the feature definitions. Bumped whenever a formula changes meaning, so a snapshot
/// built on other definitions is refused.
pub const FEATURE_SCHEMA_VERSION: u32 = 1;

const DAYS_PER_MONTH: f64 = 30.44;
const MAX_OVERDUE_RATIO: f64 = 20.0;

/// The behavioural axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// How often the customer buys.
    PurchaseFrequency,
    /// How much the customer spends.
    PurchaseValue,
    /// How widely the customer roams across categories.
    CategoryExploration,
    /// How much discounts drive purchases.
    PriceSensitivity,
    /// The rhythm of purchases.
    PurchaseCadence,
    /// How long and how valuable the relationship has been.
    CustomerMaturity,
    /// How often the same products are bought again.
    RepurchaseBehavior,
    /// How much is sent back.
    ReturnBehavior,
    /// How the customer prefers to be reached and to order.
    CommunicationPreference,
    /// What support the customer needs.
    ProblemComplexityProfile,
    /// Whether the relationship is growing or fading.
    LoyaltyTrajectory,
    /// How well the customer knows the products.
    ProductKnowledge,
    /// How premium the customer's choices are.
    ValueSophistication,
}

impl Axis {
    /// All axes in catalogue order.
    pub const ALL: [Axis; 13] = [
        Self::PurchaseFrequency,
        Self::PurchaseValue,
        Self::CategoryExploration,
        Self::PriceSensitivity,
        Self::PurchaseCadence,
        Self::CustomerMaturity,
        Self::RepurchaseBehavior,
        Self::ReturnBehavior,
        Self::CommunicationPreference,
        Self::ProblemComplexityProfile,
        Self::LoyaltyTrajectory,
        Self::ProductKnowledge,
        Self::ValueSophistication,
    ];

    /// The axis name as used in snapshots, outputs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PurchaseFrequency => "purchase_frequency",
            Self::PurchaseValue => "purchase_value",
            Self::CategoryExploration => "category_exploration",
            Self::PriceSensitivity => "price_sensitivity",
            Self::PurchaseCadence => "purchase_cadence",
            Self::CustomerMaturity => "customer_maturity",
            Self::RepurchaseBehavior => "repurchase_behavior",
            Self::ReturnBehavior => "return_behavior",
            Self::CommunicationPreference => "communication_preference",
            Self::ProblemComplexityProfile => "problem_complexity_profile",
            Self::LoyaltyTrajectory => "loyalty_trajectory",
            Self::ProductKnowledge => "product_knowledge",
            Self::ValueSophistication => "value_sophistication",
        }
    }

    /// Parses an axis name.
    pub fn parse(name: &str) -> Option<Axis> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// The catalogue's features for this axis.
    pub fn features(self) -> impl Iterator<Item = (FeatureId, &'static FeatureDef)> {
        FEATURES
            .iter()
            .enumerate()
            .filter(move |(_, def)| def.axis == self)
            .map(|(i, def)| (FeatureId(i as u16), def))
    }
}

impl std::fmt::Display for Axis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kinds of source data a feature needs. An input that lacks one cannot compute the features
/// that need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Sources(u16);

impl Sources {
    /// No sources.
    pub const NONE: Sources = Sources(0);
    /// Order events with amounts.
    pub const ORDERS: Sources = Sources(1);
    /// Product ids on order lines.
    pub const PRODUCT: Sources = Sources(1 << 1);
    /// Categories on order lines.
    pub const CATEGORY: Sources = Sources(1 << 2);
    /// List prices (or discounts) on order lines.
    pub const LIST_PRICE: Sources = Sources(1 << 3);
    /// The channel of orders.
    pub const CHANNEL: Sources = Sources(1 << 4);
    /// Return events.
    pub const RETURNS: Sources = Sources(1 << 5);
    /// Support contact events.
    pub const SUPPORT: Sources = Sources(1 << 6);
    /// Messaging engagement events.
    pub const ENGAGEMENT: Sources = Sources(1 << 7);
    /// Everything.
    pub const ALL: Sources = Sources(0xff);

    const NAMES: [(Sources, &'static str, &'static str); 8] = [
        (Self::ORDERS, "orders", "an orders file"),
        (Self::PRODUCT, "product", "a product_id column"),
        (Self::CATEGORY, "category", "a category column"),
        (
            Self::LIST_PRICE,
            "list_price",
            "a list_price or discount column",
        ),
        (Self::CHANNEL, "channel", "an order channel column"),
        (
            Self::RETURNS,
            "returns",
            "return events (--returns or a type column)",
        ),
        (Self::SUPPORT, "support", "support contacts (--support)"),
        (
            Self::ENGAGEMENT,
            "engagement",
            "engagement events (--engagement)",
        ),
    ];

    /// Union.
    pub const fn union(self, other: Sources) -> Sources {
        Sources(self.0 | other.0)
    }

    /// Whether every source in `other` is in `self`.
    pub fn contains(self, other: Sources) -> bool {
        self.0 & other.0 == other.0
    }

    /// Adds sources.
    pub fn insert(&mut self, other: Sources) {
        self.0 |= other.0;
    }

    /// Short names of the sources in `self`.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(s, _, _)| self.contains(*s))
            .map(|(_, name, _)| *name)
            .collect()
    }

    /// What a user must provide to get the sources in `self`, for messages.
    pub fn describe_missing(self) -> String {
        let parts: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(s, _, _)| self.contains(*s))
            .map(|(_, _, how)| *how)
            .collect();
        parts.join(", ")
    }

    /// Sources in `self` that are not in `available`.
    pub fn missing_from(self, available: Sources) -> Sources {
        Sources(self.0 & !available.0)
    }
}

/// Index of a feature in [`FEATURES`] and in a [`FeatureVector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FeatureId(pub u16);

impl FeatureId {
    /// The feature's definition.
    pub fn def(self) -> &'static FeatureDef {
        &FEATURES[usize::from(self.0)]
    }

    /// Looks a feature up by name.
    pub fn by_name(name: &str) -> Option<FeatureId> {
        FEATURES
            .iter()
            .position(|d| d.name == name)
            .map(|i| FeatureId(i as u16))
    }
}

/// Everything the feature formulas read, computed once per customer and read time.
pub struct FeatureContext<'a> {
    state: &'a CustomerState,
    /// Read time, never earlier than the latest event applied.
    now: i64,
    /// Decay from the state's reference time to `now`, long and short.
    long: f64,
    short: f64,
    /// `ln 2 / h · 30.44`: turns a decayed count into a monthly rate.
    monthly_long: f64,
    monthly_short: f64,
}

impl<'a> FeatureContext<'a> {
    /// Prepares to read `state` as of `as_of`.
    pub fn new(state: &'a CustomerState, as_of: EventTime, params: &StateParams) -> Self {
        let reference = state.decay_ref.unwrap_or(as_of.unix());
        let now = as_of.unix().max(reference);
        let dt = (now - reference) as f64;
        let h = params.half_life_seconds();
        let hs = params.short_half_life_seconds();
        let ln2 = std::f64::consts::LN_2;
        Self {
            state,
            now,
            long: decay(dt, h),
            short: decay(dt, hs),
            monthly_long: ln2 / (h / SECONDS_PER_DAY) * DAYS_PER_MONTH,
            monthly_short: ln2 / (hs / SECONDS_PER_DAY) * DAYS_PER_MONTH,
        }
    }

    fn days_since(&self, t: i64) -> f64 {
        ((self.now - t) as f64 / SECONDS_PER_DAY).max(0.0)
    }

    fn has_orders(&self) -> Option<&CustomerState> {
        (self.state.orders > 0).then_some(self.state)
    }

    /// Mean days between orders, when there are two orders at different times.
    fn mean_interval_days(&self) -> Option<f64> {
        let s = self.state;
        let (first, last) = (s.first_order?, s.last_order?);
        (s.orders >= 2 && last > first)
            .then(|| (last - first) as f64 / SECONDS_PER_DAY / f64::from(s.orders - 1))
    }
}

/// One feature: its place, meaning and formula.
pub struct FeatureDef {
    /// Stable name, used in snapshots.
    pub name: &'static str,
    /// The axis it belongs to.
    pub axis: Axis,
    /// Source data it needs.
    pub requires: Sources,
    /// The formula, for the README.
    pub formula: &'static str,
    /// The range, for the README.
    pub range: &'static str,
    /// Words for a low and a high value, used to name segments.
    pub words: (&'static str, &'static str),
    /// The same for an extreme value (beyond 1.5 standard deviations), written out as plain
    /// English rather than made by a prefix: "never returns", not "very rarely returns".
    pub strong_words: (&'static str, &'static str),
    /// The computation; `None` when the customer lacks the data.
    pub compute: fn(&FeatureContext<'_>) -> Option<f64>,
}

fn ln1p(x: f64) -> f64 {
    x.max(0.0).ln_1p()
}

fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0).then(|| (num / den).clamp(0.0, 1.0))
}

/// The feature catalogue, grouped by axis in [`Axis::ALL`] order.
pub static FEATURES: [FeatureDef; 39] = [
    // purchase_frequency
    FeatureDef {
        name: "monthly_orders_log",
        axis: Axis::PurchaseFrequency,
        requires: Sources::ORDERS,
        formula: "ln(1 + decayed orders · ln2/h · 30.44)",
        range: "≥ 0",
        words: ("infrequent", "frequent"),
        strong_words: ("very infrequent", "very frequent"),
        compute: |c| {
            c.has_orders()
                .map(|s| ln1p(s.decayed.orders * c.long * c.monthly_long))
        },
    },
    FeatureDef {
        name: "lifetime_orders_log",
        axis: Axis::PurchaseFrequency,
        requires: Sources::ORDERS,
        formula: "ln(1 + orders)",
        range: "≥ 0",
        words: ("few orders", "many orders"),
        strong_words: ("very few orders", "very many orders"),
        compute: |c| c.has_orders().map(|s| ln1p(f64::from(s.orders))),
    },
    FeatureDef {
        name: "active_week_share",
        axis: Axis::PurchaseFrequency,
        requires: Sources::ORDERS,
        formula: "weeks with an order / weeks since the first order (last 64 weeks)",
        range: "0–1",
        words: ("sporadic", "steady"),
        strong_words: ("very sporadic", "very steady"),
        compute: |c| {
            let s = c.has_orders()?;
            let now_week = EventTime::from_unix(c.now).ok()?.week_index();
            let first_week = EventTime::from_unix(s.first_order?).ok()?.week_index();
            let window = (now_week - first_week + 1).clamp(1, 64);
            let bits = s.weeks_as_of(now_week);
            let mask = if window >= 64 {
                u64::MAX
            } else {
                (1u64 << window) - 1
            };
            Some(f64::from((bits & mask).count_ones()) / window as f64)
        },
    },
    // purchase_value
    FeatureDef {
        name: "avg_order_value_log",
        axis: Axis::PurchaseValue,
        requires: Sources::ORDERS,
        formula: "ln(1 + revenue / orders)",
        range: "≥ 0",
        words: ("low basket", "high basket"),
        strong_words: ("very low basket", "very high basket"),
        compute: |c| {
            c.has_orders()
                .map(|s| ln1p(s.revenue / f64::from(s.orders)))
        },
    },
    FeatureDef {
        name: "monthly_spend_log",
        axis: Axis::PurchaseValue,
        requires: Sources::ORDERS,
        formula: "ln(1 + decayed revenue · ln2/h · 30.44)",
        range: "≥ 0",
        words: ("low spend", "high spend"),
        strong_words: ("very low spend", "very high spend"),
        compute: |c| {
            c.has_orders()
                .map(|s| ln1p(s.decayed.revenue * c.long * c.monthly_long))
        },
    },
    FeatureDef {
        name: "units_per_order_log",
        axis: Axis::PurchaseValue,
        requires: Sources::ORDERS,
        formula: "ln(1 + units / orders)",
        range: "≥ 0",
        words: ("few items", "many items"),
        strong_words: ("very few items", "very many items"),
        compute: |c| c.has_orders().map(|s| ln1p(s.units / f64::from(s.orders))),
    },
    // category_exploration
    FeatureDef {
        name: "distinct_categories_log",
        axis: Axis::CategoryExploration,
        requires: Sources::CATEGORY,
        formula: "ln(1 + distinct categories), linear-counting sketch",
        range: "≥ 0",
        words: ("narrow range", "wide range"),
        strong_words: ("very narrow range", "very wide range"),
        compute: |c| (c.state.categorised_orders > 0).then(|| ln1p(c.state.categories.estimate())),
    },
    FeatureDef {
        name: "category_novelty",
        axis: Axis::CategoryExploration,
        requires: Sources::CATEGORY,
        formula: "distinct categories / Σ per-order distinct categories",
        range: "0–1",
        words: ("habitual", "exploring"),
        strong_words: ("very habitual", "always exploring"),
        compute: |c| {
            let s = c.state;
            (s.categorised_orders > 0)
                .then(|| ratio(s.categories.estimate(), f64::from(s.category_picks)))
                .flatten()
        },
    },
    FeatureDef {
        name: "categories_per_order_log",
        axis: Axis::CategoryExploration,
        requires: Sources::CATEGORY,
        formula: "ln(1 + Σ per-order distinct categories / categorised orders)",
        range: "≥ 0",
        words: ("single-aisle", "multi-aisle"),
        strong_words: ("strictly single-aisle", "whole-store baskets"),
        compute: |c| {
            let s = c.state;
            (s.categorised_orders > 0)
                .then(|| ln1p(f64::from(s.category_picks) / f64::from(s.categorised_orders)))
        },
    },
    // price_sensitivity
    FeatureDef {
        name: "discounted_line_share",
        axis: Axis::PriceSensitivity,
        requires: Sources::LIST_PRICE,
        formula: "lines bought below list price / lines with a list price",
        range: "0–1",
        words: ("rarely on promo", "promo-driven"),
        strong_words: ("never on promo", "strongly promo-driven"),
        compute: |c| {
            ratio(
                f64::from(c.state.discounted_lines),
                f64::from(c.state.priced_lines),
            )
        },
    },
    FeatureDef {
        name: "discount_depth",
        axis: Axis::PriceSensitivity,
        requires: Sources::LIST_PRICE,
        formula: "1 − paid / list value, over lines with a list price",
        range: "0–1",
        words: ("shallow discounts", "deep discounts"),
        strong_words: ("very shallow discounts", "very deep discounts"),
        compute: |c| {
            let s = c.state;
            if s.priced_lines == 0 {
                None
            } else if s.priced_list > 0.0 {
                Some((1.0 - s.priced_paid / s.priced_list).clamp(0.0, 1.0))
            } else {
                Some(0.0)
            }
        },
    },
    FeatureDef {
        name: "promo_order_share",
        axis: Axis::PriceSensitivity,
        requires: Sources::LIST_PRICE,
        formula: "orders with every priced line discounted / orders with a priced line",
        range: "0–1",
        words: ("mixed baskets", "promo-only baskets"),
        strong_words: ("mostly mixed baskets", "mostly promo-only baskets"),
        compute: |c| {
            ratio(
                f64::from(c.state.promo_orders),
                f64::from(c.state.priced_orders),
            )
        },
    },
    // purchase_cadence
    FeatureDef {
        name: "interorder_days_log",
        axis: Axis::PurchaseCadence,
        requires: Sources::ORDERS,
        formula: "ln(1 + (last − first order) / (orders − 1), in days); needs 2 orders",
        range: "≥ 0",
        words: ("short cycle", "long cycle"),
        strong_words: ("very short cycle", "very long cycle"),
        compute: |c| c.mean_interval_days().map(ln1p),
    },
    FeatureDef {
        name: "overdue_ratio_log",
        axis: Axis::PurchaseCadence,
        requires: Sources::ORDERS,
        formula: "ln(1 + min(20, days since last order / mean days between orders))",
        range: "0–ln 21",
        words: ("on schedule", "overdue"),
        strong_words: ("ahead of schedule", "long overdue"),
        compute: |c| {
            let interval = c.mean_interval_days()?;
            let since = c.days_since(c.state.last_order?);
            Some(ln1p((since / interval).min(MAX_OVERDUE_RATIO)))
        },
    },
    FeatureDef {
        name: "weekend_order_share",
        axis: Axis::PurchaseCadence,
        requires: Sources::ORDERS,
        formula: "orders on Saturday or Sunday (UTC) / orders; needs 2 orders",
        range: "0–1",
        words: ("weekday shopper", "weekend shopper"),
        strong_words: ("weekday-only shopper", "weekend-only shopper"),
        compute: |c| {
            c.mean_interval_days()?;
            ratio(f64::from(c.state.weekend_orders), f64::from(c.state.orders))
        },
    },
    // customer_maturity
    FeatureDef {
        name: "tenure_days_log",
        axis: Axis::CustomerMaturity,
        requires: Sources::ORDERS,
        formula: "ln(1 + days since the first event of any kind)",
        range: "≥ 0",
        words: ("new", "established"),
        strong_words: ("brand new", "long-standing"),
        compute: |c| {
            c.has_orders()?;
            Some(ln1p(c.days_since(c.state.first_seen?)))
        },
    },
    FeatureDef {
        name: "recency_days_log",
        axis: Axis::CustomerMaturity,
        requires: Sources::ORDERS,
        formula: "ln(1 + days since the last order)",
        range: "≥ 0",
        words: ("recent", "lapsed"),
        strong_words: ("very recent", "long lapsed"),
        compute: |c| Some(ln1p(c.days_since(c.has_orders()?.last_order?))),
    },
    FeatureDef {
        name: "net_value_log",
        axis: Axis::CustomerMaturity,
        requires: Sources::ORDERS,
        formula: "ln(1 + max(0, revenue − refunds))",
        range: "≥ 0",
        words: ("low value", "high value"),
        strong_words: ("very low value", "very high value"),
        compute: |c| c.has_orders().map(|s| ln1p(s.lifetime_value())),
    },
    // repurchase_behavior
    FeatureDef {
        name: "repeat_line_share",
        axis: Axis::RepurchaseBehavior,
        requires: Sources::PRODUCT,
        formula: "1 − distinct products / lines with a product",
        range: "0–1",
        words: ("novelty seeker", "repeat buyer"),
        strong_words: ("pure novelty seeker", "strong repeat buyer"),
        compute: |c| {
            let s = c.state;
            (s.product_lines > 0)
                .then(|| (1.0 - s.products.estimate() / f64::from(s.product_lines)).clamp(0.0, 1.0))
        },
    },
    FeatureDef {
        name: "distinct_products_log",
        axis: Axis::RepurchaseBehavior,
        requires: Sources::PRODUCT,
        formula: "ln(1 + distinct products), linear-counting sketch",
        range: "≥ 0",
        words: ("few products", "many products"),
        strong_words: ("very few products", "very many products"),
        compute: |c| (c.state.product_lines > 0).then(|| ln1p(c.state.products.estimate())),
    },
    // return_behavior
    FeatureDef {
        name: "return_order_rate",
        axis: Axis::ReturnBehavior,
        requires: Sources::RETURNS,
        formula: "min(1, returns / orders)",
        range: "0–1",
        words: ("rarely returns", "often returns"),
        strong_words: ("never returns", "returns very often"),
        compute: |c| {
            let s = c.has_orders()?;
            ratio(f64::from(s.returns), f64::from(s.orders))
        },
    },
    FeatureDef {
        name: "return_value_share",
        axis: Axis::ReturnBehavior,
        requires: Sources::RETURNS,
        formula: "refunds / revenue",
        range: "0–1",
        words: ("keeps purchases", "returns value"),
        strong_words: ("keeps all purchases", "returns most value"),
        compute: |c| {
            let s = c.has_orders()?;
            Some(ratio(s.returned_value, s.revenue).unwrap_or(0.0))
        },
    },
    FeatureDef {
        name: "recent_return_share",
        axis: Axis::ReturnBehavior,
        requires: Sources::RETURNS,
        formula: "decayed refunds / decayed revenue",
        range: "0–1",
        words: ("no recent returns", "recent returns"),
        strong_words: ("no recent returns", "many recent returns"),
        compute: |c| {
            let s = c.has_orders()?;
            // Both sums decay by the same factor to the read time, so their ratio needs none.
            Some(ratio(s.decayed.returned, s.decayed.revenue).unwrap_or(0.0))
        },
    },
    // communication_preference
    FeatureDef {
        name: "monthly_engagements_log",
        axis: Axis::CommunicationPreference,
        requires: Sources::ENGAGEMENT,
        formula: "ln(1 + decayed opens and clicks · ln2/h · 30.44)",
        range: "≥ 0",
        words: ("quiet", "responsive"),
        strong_words: ("very quiet", "very responsive"),
        compute: |c| {
            (c.state.engagements > 0)
                .then(|| ln1p(c.state.decayed.engagements * c.long * c.monthly_long))
        },
    },
    FeatureDef {
        name: "mobile_share",
        axis: Axis::CommunicationPreference,
        requires: Sources::ENGAGEMENT,
        formula: "engagements on SMS, push or in-app / engagements",
        range: "0–1",
        words: ("email-first", "mobile-first"),
        strong_words: ("email-only", "mobile-only"),
        compute: |c| {
            ratio(
                f64::from(c.state.mobile_engagements),
                f64::from(c.state.engagements),
            )
        },
    },
    FeatureDef {
        name: "optout_share",
        axis: Axis::CommunicationPreference,
        requires: Sources::ENGAGEMENT,
        formula: "channels currently unsubscribed / 4",
        range: "0–1",
        words: ("reachable", "opted out"),
        strong_words: ("fully reachable", "fully opted out"),
        compute: |c| (c.state.engagements > 0).then(|| c.state.opted_out_channels() as f64 / 4.0),
    },
    FeatureDef {
        name: "digital_order_share",
        axis: Axis::CommunicationPreference,
        requires: Sources::CHANNEL,
        formula: "orders on web or app / orders with a known channel",
        range: "0–1",
        words: ("in-store", "digital"),
        strong_words: ("in-store only", "digital only"),
        compute: |c| {
            ratio(
                f64::from(c.state.digital_orders),
                f64::from(c.state.channel_orders),
            )
        },
    },
    // problem_complexity_profile
    FeatureDef {
        name: "monthly_contacts_log",
        axis: Axis::ProblemComplexityProfile,
        requires: Sources::SUPPORT,
        formula: "ln(1 + decayed contacts · ln2/h · 30.44); needs a contact",
        range: "≥ 0",
        words: ("rarely contacts", "contacts often"),
        strong_words: ("never contacts", "contacts very often"),
        compute: |c| {
            (c.state.contacts > 0).then(|| ln1p(c.state.decayed.contacts * c.long * c.monthly_long))
        },
    },
    FeatureDef {
        name: "mean_complexity",
        axis: Axis::ProblemComplexityProfile,
        requires: Sources::SUPPORT,
        formula: "(mean complexity − 1) / 4",
        range: "0–1",
        words: ("simple issues", "complex issues"),
        strong_words: ("very simple issues", "very complex issues"),
        compute: |c| {
            let s = c.state;
            (s.contacts > 0)
                .then(|| ((s.complexity_sum / f64::from(s.contacts) - 1.0) / 4.0).clamp(0.0, 1.0))
        },
    },
    FeatureDef {
        name: "topic_diversity",
        axis: Axis::ProblemComplexityProfile,
        requires: Sources::SUPPORT,
        formula: "distinct topics / contacts",
        range: "0–1",
        words: ("one issue type", "varied issues"),
        strong_words: ("one issue type", "very varied issues"),
        compute: |c| {
            (c.state.contacts > 0)
                .then(|| ratio(c.state.distinct_topics(), f64::from(c.state.contacts)))
                .flatten()
        },
    },
    FeatureDef {
        name: "contacts_per_order_log",
        axis: Axis::ProblemComplexityProfile,
        requires: Sources::SUPPORT,
        formula: "ln(1 + contacts / max(1, orders))",
        range: "≥ 0",
        words: ("self-sufficient", "support-heavy"),
        strong_words: ("fully self-sufficient", "very support-heavy"),
        compute: |c| {
            let s = c.state;
            (s.contacts > 0).then(|| ln1p(f64::from(s.contacts) / f64::from(s.orders.max(1))))
        },
    },
    // loyalty_trajectory
    FeatureDef {
        name: "order_momentum",
        axis: Axis::LoyaltyTrajectory,
        requires: Sources::ORDERS,
        formula: "ln((1 + monthly orders, short half-life) / (1 + monthly orders, long half-life))",
        range: "any; > 0 growing",
        words: ("slowing", "accelerating"),
        strong_words: ("slowing sharply", "accelerating sharply"),
        compute: |c| {
            let s = c.has_orders()?;
            let short = s.decayed.orders_short * c.short * c.monthly_short;
            let long = s.decayed.orders * c.long * c.monthly_long;
            Some((1.0 + short).ln() - (1.0 + long).ln())
        },
    },
    FeatureDef {
        name: "spend_momentum",
        axis: Axis::LoyaltyTrajectory,
        requires: Sources::ORDERS,
        formula: "ln((1 + monthly spend, short half-life) / (1 + monthly spend, long half-life))",
        range: "any; > 0 growing",
        words: ("spending less", "spending more"),
        strong_words: ("spending much less", "spending much more"),
        compute: |c| {
            let s = c.has_orders()?;
            let short = s.decayed.revenue_short * c.short * c.monthly_short;
            let long = s.decayed.revenue * c.long * c.monthly_long;
            Some((1.0 + short).ln() - (1.0 + long).ln())
        },
    },
    FeatureDef {
        name: "dormancy_share",
        axis: Axis::LoyaltyTrajectory,
        requires: Sources::ORDERS,
        formula: "days since last order / (days since first order + 1)",
        range: "0–1",
        words: ("active", "dormant"),
        strong_words: ("very active", "long dormant"),
        compute: |c| {
            let s = c.has_orders()?;
            let since_last = c.days_since(s.last_order?);
            let since_first = c.days_since(s.first_order?);
            ratio(since_last, since_first + 1.0)
        },
    },
    // product_knowledge
    FeatureDef {
        name: "products_per_category_log",
        axis: Axis::ProductKnowledge,
        requires: Sources::PRODUCT.union(Sources::CATEGORY),
        formula: "ln(1 + distinct products / distinct categories)",
        range: "≥ 0",
        words: ("surface", "deep"),
        strong_words: ("surface only", "very deep"),
        compute: |c| {
            let s = c.state;
            (s.product_lines > 0 && s.categorised_orders > 0)
                .then(|| ln1p(s.products.estimate() / s.categories.estimate().max(1.0)))
        },
    },
    FeatureDef {
        name: "product_help_rate",
        axis: Axis::ProductKnowledge,
        requires: Sources::SUPPORT,
        formula: "product-help contacts / (product-help contacts + orders)",
        range: "0–1",
        words: ("self-reliant", "needs guidance"),
        strong_words: ("fully self-reliant", "needs much guidance"),
        compute: |c| {
            let s = c.has_orders()?;
            ratio(
                f64::from(s.help_contacts),
                f64::from(s.help_contacts + s.orders),
            )
        },
    },
    // value_sophistication
    FeatureDef {
        name: "avg_unit_price_log",
        axis: Axis::ValueSophistication,
        requires: Sources::ORDERS,
        formula: "ln(1 + revenue / units)",
        range: "≥ 0",
        words: ("budget items", "premium items"),
        strong_words: ("mostly budget items", "mostly premium items"),
        compute: |c| {
            let s = c.has_orders()?;
            (s.units > 0.0).then(|| ln1p(s.revenue / s.units))
        },
    },
    FeatureDef {
        name: "max_unit_price_log",
        axis: Axis::ValueSophistication,
        requires: Sources::ORDERS,
        formula: "ln(1 + highest unit price paid)",
        range: "≥ 0",
        words: ("no big-ticket", "big-ticket"),
        strong_words: ("no big-ticket", "luxury big-ticket"),
        compute: |c| c.has_orders().map(|s| ln1p(s.max_unit_price)),
    },
    FeatureDef {
        name: "full_price_value_share",
        axis: Axis::ValueSophistication,
        requires: Sources::LIST_PRICE,
        formula: "paid at full price / paid, over lines with a list price",
        range: "0–1",
        words: ("bargain-led", "pays full price"),
        strong_words: ("strongly bargain-led", "always pays full price"),
        compute: |c| {
            let s = c.state;
            (s.priced_lines > 0).then(|| ratio(s.full_price_paid, s.priced_paid).unwrap_or(0.0))
        },
    },
];

/// Number of features in the catalogue.
pub const FEATURE_COUNT: usize = 39;

/// All features of one customer at one time. Absent features are stored as NaN internally and
/// surface as `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureVector {
    values: [f64; FEATURE_COUNT],
}

impl FeatureVector {
    /// Computes every feature of `state` as of `as_of`.
    pub fn compute(state: &CustomerState, as_of: EventTime, params: &StateParams) -> Self {
        let ctx = FeatureContext::new(state, as_of, params);
        let mut values = [f64::NAN; FEATURE_COUNT];
        for (slot, def) in values.iter_mut().zip(FEATURES.iter()) {
            if let Some(v) = (def.compute)(&ctx) {
                if v.is_finite() {
                    *slot = v;
                }
            }
        }
        Self { values }
    }

    /// One feature, `None` when absent for this customer.
    pub fn get(&self, id: FeatureId) -> Option<f64> {
        let v = self.values[usize::from(id.0)];
        (!v.is_nan()).then_some(v)
    }

    /// Writes the selected features into `out`; `false` (and `out` unspecified) when any of
    /// them is absent. This is the per-axis gather on the assignment hot path, so it does not
    /// allocate.
    pub fn gather(&self, ids: &[FeatureId], out: &mut [f64]) -> bool {
        for (slot, id) in out.iter_mut().zip(ids) {
            let v = self.values[usize::from(id.0)];
            if v.is_nan() {
                return false;
            }
            *slot = v;
        }
        true
    }
}

/// The README feature table, one row per feature.
pub fn markdown_table() -> String {
    let mut out =
        String::from("| axis | feature | formula | range | needs |\n|---|---|---|---|---|\n");
    for def in &FEATURES {
        out.push_str(&format!(
            "| {} | `{}` | {} | {} | {} |\n",
            def.axis,
            def.name,
            def.formula,
            def.range,
            def.requires.names().join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{
        CustomerId, Engagement, EngagementAction, Event, EventBody, MessageChannel, Order,
        OrderChannel, OrderLine, Return, SupportContact,
    };

    const DAY: i64 = 86_400;
    // 2024-01-01T00:00:00Z, a Monday.
    const T0: i64 = 1_704_067_200;
    const LN2: f64 = std::f64::consts::LN_2;

    fn params() -> StateParams {
        StateParams {
            half_life_days: 10.0,
            short_half_life_ratio: 0.5,
        }
    }

    fn at(t: i64) -> EventTime {
        EventTime::from_unix(t).unwrap()
    }

    fn event(id: &str, t: i64, body: EventBody) -> Event {
        Event {
            event_id: id.into(),
            customer_id: CustomerId::parse("c").unwrap(),
            event_time: at(t),
            body,
        }
    }

    fn order(id: &str, t: i64, amount: f64, list: f64, cat: &str, prod: &str) -> Event {
        event(
            id,
            t,
            EventBody::Order(Order {
                order_id: None,
                channel: Some(OrderChannel::Web),
                lines: vec![OrderLine {
                    product_id: Some(prod.into()),
                    category: Some(cat.into()),
                    quantity: 2.0,
                    unit_price: amount / 2.0,
                    list_price: Some(list / 2.0),
                }],
            }),
        )
    }

    fn feature(v: &FeatureVector, name: &str) -> Option<f64> {
        v.get(FeatureId::by_name(name).unwrap())
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn catalogue_is_consistent() {
        assert_eq!(FEATURES.len(), FEATURE_COUNT);
        let mut names: Vec<_> = FEATURES.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FEATURE_COUNT, "feature names must be unique");
        for axis in Axis::ALL {
            let n = axis.features().count();
            assert!((2..=4).contains(&n), "{axis} has {n} features");
            assert_eq!(Axis::parse(axis.as_str()), Some(axis));
        }
    }

    #[test]
    fn a_customer_without_events_has_no_features() {
        let v = FeatureVector::compute(&CustomerState::default(), at(T0), &params());
        assert!(FEATURES
            .iter()
            .enumerate()
            .all(|(i, _)| v.get(FeatureId(i as u16)).is_none()));
    }

    #[test]
    fn order_features_by_hand() {
        let p = params();
        let mut s = CustomerState::default();
        // Day 0: 40 paid of 50 list (discounted), category a, product p1.
        s.apply(&order("1", T0, 40.0, 50.0, "a", "p1"), &p);
        // Day 10 (a Thursday): 20 paid at full list, category b, product p1 again.
        s.apply(&order("2", T0 + 10 * DAY, 20.0, 20.0, "b", "p1"), &p);
        // Read on day 20: one long half-life after the last order.
        let v = FeatureVector::compute(&s, at(T0 + 20 * DAY), &p);
        let monthly = LN2 / 10.0 * DAYS_PER_MONTH;
        // Decayed orders as of day 20: 2^-2 + 2^-1 = 0.75.
        assert!(close(
            feature(&v, "monthly_orders_log"),
            (0.75 * monthly).ln_1p()
        ));
        assert!(close(feature(&v, "lifetime_orders_log"), 3f64.ln()));
        assert!(close(feature(&v, "avg_order_value_log"), 31f64.ln()));
        // Decayed revenue: 40/4 + 20/2 = 20.
        assert!(close(
            feature(&v, "monthly_spend_log"),
            (20.0 * monthly).ln_1p()
        ));
        assert!(close(feature(&v, "units_per_order_log"), 3f64.ln()));
        assert!(close(feature(&v, "discounted_line_share"), 0.5));
        assert!(close(feature(&v, "discount_depth"), 1.0 - 60.0 / 70.0));
        assert!(close(feature(&v, "promo_order_share"), 0.5));
        assert!(close(feature(&v, "full_price_value_share"), 20.0 / 60.0));
        // Mean interval 10 days; 10 days since the last order: overdue ratio 1.
        assert!(close(feature(&v, "interorder_days_log"), 11f64.ln()));
        assert!(close(feature(&v, "overdue_ratio_log"), 2f64.ln()));
        assert!(close(feature(&v, "weekend_order_share"), 0.0));
        assert!(close(feature(&v, "tenure_days_log"), 21f64.ln()));
        assert!(close(feature(&v, "recency_days_log"), 11f64.ln()));
        assert!(close(feature(&v, "net_value_log"), 61f64.ln()));
        assert!(close(feature(&v, "dormancy_share"), 10.0 / 21.0));
        assert!(close(feature(&v, "digital_order_share"), 1.0));
        assert!(close(feature(&v, "avg_unit_price_log"), 16f64.ln()));
        assert!(close(feature(&v, "max_unit_price_log"), 21f64.ln()));
        // Two categories, each picked once: novelty capped at 1 (the sketch reads 2 as
        // 384·ln(384/382) = 2.0052). Products: p1 twice; the sketch reads 1 as
        // 1024·ln(1024/1023).
        assert!(close(feature(&v, "category_novelty"), 1.0));
        assert!(close(feature(&v, "categories_per_order_log"), 2f64.ln()));
        let one_product = 1024.0 * (1024f64 / 1023.0).ln();
        assert!(close(
            feature(&v, "repeat_line_share"),
            1.0 - one_product / 2.0
        ));
        // Two active weeks out of those from the first order's week to the read week.
        let first = at(T0).week_index();
        let now = at(T0 + 20 * DAY).week_index();
        let window = (now - first + 1) as f64;
        assert!(close(feature(&v, "active_week_share"), 2.0 / window));
        // No support or engagement data: absent, not zero.
        assert_eq!(feature(&v, "mean_complexity"), None);
        assert_eq!(feature(&v, "monthly_engagements_log"), None);
        // Returns: none, yet defined as 0 for a customer with orders.
        assert!(close(feature(&v, "return_order_rate"), 0.0));
        // Short half-life 5 days: orders_short = 2^-4 + 2^-2, long = 0.75.
        let short_monthly = LN2 / 5.0 * DAYS_PER_MONTH;
        let expected = (1.0 + (0.0625 + 0.25) * short_monthly).ln() - (1.0 + 0.75 * monthly).ln();
        assert!(close(feature(&v, "order_momentum"), expected));
    }

    #[test]
    fn cadence_needs_two_orders_at_different_times() {
        let p = params();
        let mut s = CustomerState::default();
        s.apply(&order("1", T0, 10.0, 10.0, "a", "p"), &p);
        let v = FeatureVector::compute(&s, at(T0 + DAY), &p);
        assert_eq!(feature(&v, "interorder_days_log"), None);
        assert_eq!(feature(&v, "weekend_order_share"), None);
        s.apply(&order("2", T0, 10.0, 10.0, "a", "p"), &p);
        let v = FeatureVector::compute(&s, at(T0 + DAY), &p);
        assert_eq!(feature(&v, "interorder_days_log"), None);
    }

    #[test]
    fn returns_support_and_engagement_by_hand() {
        let p = params();
        let mut s = CustomerState::default();
        s.apply(&order("1", T0, 100.0, 100.0, "a", "p"), &p);
        s.apply(
            &event(
                "r",
                T0 + DAY,
                EventBody::Return(Return {
                    order_id: Some("1".into()),
                    amount: 25.0,
                    reason: None,
                }),
            ),
            &p,
        );
        for (i, (topic, cx)) in [("how_to", 5.0), ("delivery", 1.0), ("delivery", 3.0)]
            .into_iter()
            .enumerate()
        {
            s.apply(
                &event(
                    &format!("s{i}"),
                    T0,
                    EventBody::SupportContact(SupportContact {
                        topic: topic.into(),
                        complexity: cx,
                    }),
                ),
                &p,
            );
        }
        for (i, (channel, action)) in [
            (MessageChannel::Email, EngagementAction::Open),
            (MessageChannel::Push, EngagementAction::Click),
            (MessageChannel::Sms, EngagementAction::Unsubscribe),
        ]
        .into_iter()
        .enumerate()
        {
            s.apply(
                &event(
                    &format!("e{i}"),
                    T0,
                    EventBody::Engagement(Engagement { channel, action }),
                ),
                &p,
            );
        }
        let v = FeatureVector::compute(&s, at(T0 + DAY), &p);
        assert!(close(feature(&v, "return_order_rate"), 1.0));
        assert!(close(feature(&v, "return_value_share"), 0.25));
        // Both decayed sums are read at day 1; the order is one day older than the refund.
        let order_weight = 2f64.powf(-0.1);
        assert!(close(
            feature(&v, "recent_return_share"),
            25.0 / (100.0 * order_weight)
        ));
        assert!(close(feature(&v, "net_value_log"), 76f64.ln()));
        assert!(close(feature(&v, "mean_complexity"), (3.0 - 1.0) / 4.0));
        assert!(close(feature(&v, "contacts_per_order_log"), 4f64.ln()));
        assert!(close(feature(&v, "product_help_rate"), 0.5));
        let topics = linear_topics(2);
        assert!(close(feature(&v, "topic_diversity"), topics / 3.0));
        assert!(close(feature(&v, "mobile_share"), 2.0 / 3.0));
        assert!(close(feature(&v, "optout_share"), 0.25));
        let monthly = LN2 / 10.0 * DAYS_PER_MONTH;
        let engaged = 2.0 * 2f64.powf(-0.1);
        assert!(close(
            feature(&v, "monthly_engagements_log"),
            (engaged * monthly).ln_1p()
        ));
    }

    fn linear_topics(set: u32) -> f64 {
        crate::domain::sketch::linear_count_estimate(set, 32)
    }

    #[test]
    fn gather_reports_absent_features() {
        let v = FeatureVector::compute(&CustomerState::default(), at(T0), &params());
        let ids = [FeatureId(0), FeatureId(1)];
        let mut out = [0.0; 2];
        assert!(!v.gather(&ids, &mut out));
    }

    #[test]
    fn markdown_table_has_a_row_per_feature() {
        let table = markdown_table();
        assert_eq!(table.lines().count(), FEATURE_COUNT + 2);
        assert!(table.contains("| purchase_frequency | `monthly_orders_log` |"));
    }
}
