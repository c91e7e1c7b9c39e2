//! Per-customer rolling state: everything the 13 axes need, updated one event at a time.
//!
//! Sits between parsing and feature extraction: `Event` → [`CustomerState::apply`] →
//! `features::FeatureVector`. The batch commands keep one state per customer in memory; the
//! daemon keeps them in RocksDB, serialized with [`CustomerState::encode`].
//!
//! ## Why the update commutes
//! Every field is a sum, a count, a min/max, a bit-OR or a last-writer-wins register keyed by
//! event time. Decayed sums are stored *as of* `decay_ref`, the latest event time applied:
//! - an event newer than `decay_ref` first decays the sums forward to its own time, then adds;
//! - an event older than `decay_ref` adds its value already decayed by `2^(-(ref - t)/h)`.
//!
//! Either way a value `v` at time `t` contributes `v · 2^(-(T - t)/h)` at any later read time
//! `T`, so a late or out-of-order event lands exactly where it would have in order (up to
//! floating-point rounding).
//!
//! ## De-duplication
//! The hashes of the last [`DEDUP_WINDOW`] event ids are kept; an event whose id is among them
//! is ignored. In the daemon, exactly-once state comes from storing input offsets with the state
//! (see the pipeline); this window catches the same event *published* twice by an upstream
//! retry, which arrives close together. A duplicate arriving after more than
//! [`DEDUP_WINDOW`] newer events of the same customer is not caught.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::event::{EngagementAction, Event, EventBody, MessageChannel, Order};
use super::sketch::{item_hash, linear_count_estimate, LinearCounter};
use super::time::EventTime;

/// How many recent event ids each customer remembers for de-duplication.
pub const DEDUP_WINDOW: usize = 8;

/// Weeks of activity kept in the weekly bitmap.
pub const WEEK_BITS: i64 = 64;

/// Version byte written in front of every encoded state, so a future layout can be migrated.
pub const STATE_CODEC_VERSION: u8 = 1;

const CATEGORY_SEED: u64 = 0xca7e_9041;
const PRODUCT_SEED: u64 = 0x9d0d_0c75;
const TOPIC_SEED: u64 = 0x7091_c5ee;

/// Parameters that shape the state. They must be identical wherever one state is updated and
/// read; snapshots record them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateParams {
    /// Half-life of the rolling (decayed) figures, in days.
    pub half_life_days: f64,
    /// Half-life of the short-window figures used by the loyalty trajectory, as a fraction of
    /// `half_life_days`.
    pub short_half_life_ratio: f64,
}

impl Default for StateParams {
    fn default() -> Self {
        Self {
            half_life_days: 90.0,
            short_half_life_ratio: 1.0 / 3.0,
        }
    }
}

impl crate::domain::section::Section for StateParams {
    const KEY: &'static str = "features";

    fn problems(&self) -> Result<(), String> {
        self.validate().map_err(|e| e.to_string())
    }
}

/// Why state parameters were refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StateParamsError {
    /// A half-life that is not a positive finite number of days.
    #[error("half-life must be a positive number of days, got {0}")]
    HalfLife(f64),
    /// A short-window ratio outside (0, 1).
    #[error("short half-life ratio must be in (0, 1), got {0}")]
    ShortRatio(f64),
}

impl StateParams {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), StateParamsError> {
        if !(self.half_life_days.is_finite() && self.half_life_days > 0.0) {
            return Err(StateParamsError::HalfLife(self.half_life_days));
        }
        if !(self.short_half_life_ratio > 0.0 && self.short_half_life_ratio < 1.0) {
            return Err(StateParamsError::ShortRatio(self.short_half_life_ratio));
        }
        Ok(())
    }

    /// Long half-life in seconds.
    pub fn half_life_seconds(&self) -> f64 {
        self.half_life_days * 86_400.0
    }

    /// Short half-life in seconds.
    pub fn short_half_life_seconds(&self) -> f64 {
        self.half_life_seconds() * self.short_half_life_ratio
    }
}

/// Event-time-decayed sums, all expressed as of [`CustomerState::decay_ref`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Decayed {
    /// Orders, long half-life.
    pub orders: f64,
    /// Revenue, long half-life.
    pub revenue: f64,
    /// Orders, short half-life.
    pub orders_short: f64,
    /// Revenue, short half-life.
    pub revenue_short: f64,
    /// Refunded value, long half-life.
    pub returned: f64,
    /// Support contacts, long half-life.
    pub contacts: f64,
    /// Engagements (opens and clicks), long half-life.
    pub engagements: f64,
}

impl Decayed {
    fn scale(&mut self, long: f64, short: f64) {
        self.orders *= long;
        self.revenue *= long;
        self.returned *= long;
        self.contacts *= long;
        self.engagements *= long;
        self.orders_short *= short;
        self.revenue_short *= short;
    }
}

/// Last-writer-wins opt-out register for one messaging channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptState {
    /// Event time of the latest subscribe or unsubscribe.
    pub at: i64,
    /// Whether that latest change was an unsubscribe.
    pub unsubscribed: bool,
}

impl OptState {
    /// Keeps the later change; at the same second an unsubscribe wins, so the register does not
    /// depend on arrival order and errs on the side of not messaging.
    fn merge(current: Option<Self>, incoming: Self) -> Self {
        match current {
            None => incoming,
            Some(cur) => match incoming.at.cmp(&cur.at) {
                std::cmp::Ordering::Greater => incoming,
                std::cmp::Ordering::Less => cur,
                std::cmp::Ordering::Equal => Self {
                    at: cur.at,
                    unsubscribed: cur.unsubscribed || incoming.unsubscribed,
                },
            },
        }
    }
}

/// Ring of recent event-id hashes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecentIds {
    ids: [u64; DEDUP_WINDOW],
    next: u8,
    len: u8,
}

impl RecentIds {
    fn contains(&self, hash: u64) -> bool {
        self.ids[..usize::from(self.len)].contains(&hash)
    }

    fn push(&mut self, hash: u64) {
        self.ids[usize::from(self.next)] = hash;
        self.next = ((usize::from(self.next) + 1) % DEDUP_WINDOW) as u8;
        self.len = (usize::from(self.len) + 1).min(DEDUP_WINDOW) as u8;
    }
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The event changed the state.
    Applied,
    /// The event id was seen recently; the state is unchanged.
    Duplicate,
}

/// Why an encoded state could not be read.
#[derive(Debug, Error)]
pub enum StateCodecError {
    /// Empty input.
    #[error("encoded state is empty")]
    Empty,
    /// Written by a newer or unknown layout.
    #[error("encoded state has codec version {0}, this build reads {STATE_CODEC_VERSION}")]
    Version(u8),
    /// Corrupt bytes.
    #[error("encoded state is corrupt: {0}")]
    Corrupt(#[from] postcard::Error),
}

/// Everything remembered about one customer. See the module docs for the update rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    /// Earliest event time of any kind.
    pub first_seen: Option<i64>,
    /// Latest event time of any kind; also the reference time of [`Decayed`].
    pub decay_ref: Option<i64>,
    /// Decayed sums as of `decay_ref`.
    pub decayed: Decayed,

    /// Orders applied.
    pub orders: u32,
    /// Earliest order time.
    pub first_order: Option<i64>,
    /// Latest order time.
    pub last_order: Option<i64>,
    /// Order lines.
    pub lines: u32,
    /// Units bought.
    pub units: f64,
    /// Money paid for orders (before returns).
    pub revenue: f64,
    /// Highest unit price paid.
    pub max_unit_price: f64,
    /// Orders placed on a Saturday or Sunday (UTC).
    pub weekend_orders: u32,

    /// Lines whose list price is known.
    pub priced_lines: u32,
    /// Of those, lines bought below list price.
    pub discounted_lines: u32,
    /// Money paid on lines whose list price is known.
    pub priced_paid: f64,
    /// List value of those lines.
    pub priced_list: f64,
    /// Money paid on lines bought at full price.
    pub full_price_paid: f64,
    /// Orders with at least one line whose list price is known.
    pub priced_orders: u32,
    /// Orders in which every priced line was discounted.
    pub promo_orders: u32,

    /// Orders whose channel is known.
    pub channel_orders: u32,
    /// Of those, placed on the web or in the app.
    pub digital_orders: u32,

    /// Orders with at least one categorised line.
    pub categorised_orders: u32,
    /// Sum over orders of the distinct categories in the order.
    pub category_picks: u32,
    /// Distinct categories ever bought.
    pub categories: LinearCounter<48>,
    /// Lines with a product id.
    pub product_lines: u32,
    /// Distinct products ever bought.
    pub products: LinearCounter<128>,

    /// Week index of bit 0 of `week_bits`.
    pub week_anchor: i64,
    /// Bit i set: an order in week `week_anchor - i`.
    pub week_bits: u64,

    /// Returns applied.
    pub returns: u32,
    /// Money refunded.
    pub returned_value: f64,

    /// Support contacts.
    pub contacts: u32,
    /// Sum of contact complexities (1..=5 each).
    pub complexity_sum: f64,
    /// Contacts about how a product works.
    pub help_contacts: u32,
    /// Distinct-topic sketch (32 bits).
    pub topics: u32,

    /// Engagements of any action.
    pub engagements: u32,
    /// Opens.
    pub opens: u32,
    /// Clicks.
    pub clicks: u32,
    /// Engagements on a mobile channel.
    pub mobile_engagements: u32,
    /// Opt-out register per messaging channel, indexed by [`MessageChannel::index`].
    pub opt: [Option<OptState>; 4],

    /// Recent event-id hashes, for de-duplication.
    pub recent: RecentIds,
}

impl CustomerState {
    /// Applies one event. Returns [`ApplyOutcome::Duplicate`] without touching the state when
    /// the event id was applied recently.
    pub fn apply(&mut self, event: &Event, params: &StateParams) -> ApplyOutcome {
        self.apply_parts(event.id_hash(), event.event_time, &event.body, params)
    }

    /// [`CustomerState::apply`] of an event given by its parts: the fingerprint of its id
    /// ([`Event::id_hash`]), its time and its body. For readers that never build the event
    /// itself.
    pub fn apply_parts(
        &mut self,
        id_hash: u64,
        event_time: EventTime,
        body: &EventBody,
        params: &StateParams,
    ) -> ApplyOutcome {
        if self.recent.contains(id_hash) {
            return ApplyOutcome::Duplicate;
        }
        self.recent.push(id_hash);

        let t = event_time.unix();
        self.first_seen = Some(self.first_seen.map_or(t, |f| f.min(t)));
        // Weight of a value at time t relative to decay_ref, after moving decay_ref forward
        // to t when the event is the newest seen.
        let (w_long, w_short) = self.advance_decay(t, params);

        match body {
            EventBody::Order(order) => self.apply_order(order, event_time, w_long, w_short),
            EventBody::Return(ret) => {
                self.returns += 1;
                self.returned_value += ret.amount;
                self.decayed.returned += ret.amount * w_long;
            }
            EventBody::SupportContact(contact) => {
                self.contacts += 1;
                self.complexity_sum += contact.complexity;
                if contact.is_product_help() {
                    self.help_contacts += 1;
                }
                let topic = contact.topic.trim().to_ascii_lowercase();
                self.topics |= 1 << (item_hash(&topic, TOPIC_SEED) % 32);
                self.decayed.contacts += w_long;
            }
            EventBody::Engagement(engagement) => {
                self.engagements += 1;
                if engagement.channel.is_mobile() {
                    self.mobile_engagements += 1;
                }
                match engagement.action {
                    EngagementAction::Open => {
                        self.opens += 1;
                        self.decayed.engagements += w_long;
                    }
                    EngagementAction::Click => {
                        self.clicks += 1;
                        self.decayed.engagements += w_long;
                    }
                    EngagementAction::Unsubscribe | EngagementAction::Subscribe => {
                        let slot = &mut self.opt[engagement.channel.index()];
                        *slot = Some(OptState::merge(
                            *slot,
                            OptState {
                                at: t,
                                unsubscribed: engagement.action == EngagementAction::Unsubscribe,
                            },
                        ));
                    }
                }
            }
        }
        ApplyOutcome::Applied
    }

    /// Moves `decay_ref` forward to `t` if `t` is newer, and returns the long and short decay
    /// weights of a value at `t` relative to the (new) `decay_ref`.
    fn advance_decay(&mut self, t: i64, params: &StateParams) -> (f64, f64) {
        let h = params.half_life_seconds();
        let hs = params.short_half_life_seconds();
        match self.decay_ref {
            None => {
                self.decay_ref = Some(t);
                (1.0, 1.0)
            }
            Some(r) if t > r => {
                let dt = (t - r) as f64;
                self.decayed.scale(decay(dt, h), decay(dt, hs));
                self.decay_ref = Some(t);
                (1.0, 1.0)
            }
            Some(r) => {
                let dt = (r - t) as f64;
                (decay(dt, h), decay(dt, hs))
            }
        }
    }

    fn apply_order(&mut self, order: &Order, time: EventTime, w_long: f64, w_short: f64) {
        let t = time.unix();
        self.orders += 1;
        self.first_order = Some(self.first_order.map_or(t, |f| f.min(t)));
        self.last_order = Some(self.last_order.map_or(t, |l| l.max(t)));
        if time.weekday() >= 5 {
            self.weekend_orders += 1;
        }
        if let Some(channel) = order.channel {
            self.channel_orders += 1;
            if channel.is_digital() {
                self.digital_orders += 1;
            }
        }
        self.mark_week(time.week_index());

        let mut amount = 0.0;
        let mut priced = 0u32;
        let mut discounted = 0u32;
        // Orders have a handful of lines; a small vector beats a hash set here.
        let mut order_categories: Vec<u64> = Vec::new();
        for line in &order.lines {
            let line_amount = line.amount();
            amount += line_amount;
            self.lines += 1;
            self.units += line.quantity;
            self.max_unit_price = self.max_unit_price.max(line.unit_price);
            if let (Some(list), Some(is_discounted)) = (line.list_amount(), line.is_discounted()) {
                priced += 1;
                self.priced_paid += line_amount;
                self.priced_list += list;
                if is_discounted {
                    discounted += 1;
                } else {
                    self.full_price_paid += line_amount;
                }
            }
            if let Some(category) = line.category.as_deref() {
                let h = item_hash(category, CATEGORY_SEED);
                if !order_categories.contains(&h) {
                    order_categories.push(h);
                    self.categories.insert_hash(h);
                }
            }
            if let Some(product) = line.product_id.as_deref() {
                self.product_lines += 1;
                self.products.insert_hash(item_hash(product, PRODUCT_SEED));
            }
        }
        self.revenue += amount;
        self.priced_lines += priced;
        self.discounted_lines += discounted;
        if priced > 0 {
            self.priced_orders += 1;
            if discounted == priced {
                self.promo_orders += 1;
            }
        }
        if !order_categories.is_empty() {
            self.categorised_orders += 1;
            self.category_picks += order_categories.len() as u32;
        }
        self.decayed.orders += w_long;
        self.decayed.revenue += amount * w_long;
        self.decayed.orders_short += w_short;
        self.decayed.revenue_short += amount * w_short;
    }

    fn mark_week(&mut self, week: i64) {
        if self.week_bits == 0 {
            self.week_anchor = week;
            self.week_bits = 1;
            return;
        }
        if week > self.week_anchor {
            let shift = week - self.week_anchor;
            self.week_bits = if shift >= WEEK_BITS {
                0
            } else {
                self.week_bits << shift
            };
            self.week_anchor = week;
            self.week_bits |= 1;
        } else if self.week_anchor - week < WEEK_BITS {
            self.week_bits |= 1 << (self.week_anchor - week);
        }
    }

    /// The weekly activity bitmap re-anchored at `week` (bit 0 = that week), dropping weeks that
    /// fall out of the window.
    pub fn weeks_as_of(&self, week: i64) -> u64 {
        let shift = week - self.week_anchor;
        if shift <= 0 {
            self.week_bits
        } else if shift >= WEEK_BITS {
            0
        } else {
            self.week_bits << shift
        }
    }

    /// The time of the customer's latest event: the time the daemon reads their features at
    /// when no event is in hand (sweeps, re-clustering, backfills).
    pub fn last_event_time(&self) -> Option<EventTime> {
        self.decay_ref.and_then(|t| EventTime::from_unix(t).ok())
    }

    /// Lifetime value used to stratify samples: money paid minus money refunded, never below 0.
    pub fn lifetime_value(&self) -> f64 {
        (self.revenue - self.returned_value).max(0.0)
    }

    /// Estimated distinct support topics.
    pub fn distinct_topics(&self) -> f64 {
        linear_count_estimate(self.topics.count_ones(), 32)
    }

    /// Number of messaging channels the customer is currently opted out of.
    pub fn opted_out_channels(&self) -> usize {
        self.opt.iter().flatten().filter(|o| o.unsubscribed).count()
    }

    /// Serializes the state: a version byte, then the postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(STATE_CODEC_VERSION, self)
    }

    /// Reads a state written by [`CustomerState::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, StateCodecError> {
        let (&version, body) = bytes.split_first().ok_or(StateCodecError::Empty)?;
        if version != STATE_CODEC_VERSION {
            return Err(StateCodecError::Version(version));
        }
        Ok(postcard::from_bytes(body)?)
    }
}

/// A version byte, then `value`'s postcard encoding, in a vector of exactly that length.
///
/// The encoding is written into a scratch buffer kept per thread and copied out once. Encoding
/// straight into a fresh vector grows it from one byte through every power of two up to the
/// record's size (about nine reallocations and copies for a 433-byte state), and every event
/// encodes its customer's record.
pub(crate) fn encode_versioned<T: Serialize + ?Sized>(version: u8, value: &T) -> Vec<u8> {
    thread_local! {
        static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut buffer = scratch.take();
        buffer.clear();
        buffer.push(version);
        // postcard only fails on writer errors; a Vec writer cannot fail.
        let buffer = postcard::to_extend(value, buffer).unwrap_or_else(|_| vec![version]);
        let bytes = buffer.clone();
        scratch.set(buffer);
        bytes
    })
}

/// `2^(-dt/h)`.
pub fn decay(dt_seconds: f64, half_life_seconds: f64) -> f64 {
    (-dt_seconds / half_life_seconds * std::f64::consts::LN_2).exp()
}

/// Channels indexed like [`CustomerState::opt`], re-exported for readers of the state.
pub const OPT_CHANNELS: [MessageChannel; 4] = MessageChannel::ALL;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{CustomerId, Engagement, OrderLine, Return, SupportContact};

    const DAY: i64 = 86_400;
    // 2024-01-01T00:00:00Z, a Monday.
    const T0: i64 = 1_704_067_200;

    fn order(id: &str, t: i64, lines: &[(f64, f64, Option<f64>, &str, &str)]) -> Event {
        Event {
            event_id: id.into(),
            customer_id: CustomerId::parse("c").unwrap(),
            event_time: EventTime::from_unix(t).unwrap(),
            body: EventBody::Order(Order {
                order_id: Some(id.into()),
                channel: None,
                lines: lines
                    .iter()
                    .map(|(q, p, list, cat, prod)| OrderLine {
                        product_id: Some((*prod).into()),
                        category: Some((*cat).into()),
                        quantity: *q,
                        unit_price: *p,
                        list_price: *list,
                    })
                    .collect(),
            }),
        }
    }

    fn params() -> StateParams {
        StateParams {
            half_life_days: 10.0,
            short_half_life_ratio: 0.5,
        }
    }

    #[test]
    fn decayed_sums_halve_per_half_life() {
        let mut s = CustomerState::default();
        s.apply(&order("a", T0, &[(1.0, 100.0, None, "x", "p")]), &params());
        // Ten days later (one long half-life, two short ones) another order of 50.
        s.apply(
            &order("b", T0 + 10 * DAY, &[(1.0, 50.0, None, "x", "p")]),
            &params(),
        );
        assert_eq!(s.decay_ref, Some(T0 + 10 * DAY));
        assert!((s.decayed.orders - 1.5).abs() < 1e-12);
        assert!((s.decayed.revenue - (100.0 * 0.5 + 50.0)).abs() < 1e-9);
        assert!((s.decayed.orders_short - 1.25).abs() < 1e-12);
        assert!((s.decayed.revenue_short - (100.0 * 0.25 + 50.0)).abs() < 1e-9);
    }

    #[test]
    fn late_event_lands_as_if_in_order() {
        let a = order("a", T0, &[(2.0, 10.0, Some(12.0), "x", "p1")]);
        let b = order("b", T0 + 3 * DAY, &[(1.0, 5.0, Some(5.0), "y", "p2")]);
        let c = order("c", T0 + 20 * DAY, &[(1.0, 7.0, None, "x", "p1")]);
        let mut in_order = CustomerState::default();
        for e in [&a, &b, &c] {
            in_order.apply(e, &params());
        }
        let mut shuffled = CustomerState::default();
        for e in [&c, &a, &b] {
            shuffled.apply(e, &params());
        }
        assert!((in_order.decayed.revenue - shuffled.decayed.revenue).abs() < 1e-9);
        assert!((in_order.decayed.orders_short - shuffled.decayed.orders_short).abs() < 1e-12);
        // Everything but the rounding of the decayed sums and the dedup ring is identical.
        let strip = |s: &CustomerState| CustomerState {
            decayed: Decayed::default(),
            recent: RecentIds::default(),
            ..s.clone()
        };
        assert_eq!(strip(&in_order), strip(&shuffled));
        // By hand: revenue as of day 20 = 20·2^-2 + 5·2^-1.7 + 7.
        let expected = 20.0 * 0.25 + 5.0 * 2f64.powf(-1.7) + 7.0;
        assert!((in_order.decayed.revenue - expected).abs() < 1e-9);
    }

    #[test]
    fn the_same_event_id_counts_once() {
        let a = order("a", T0, &[(1.0, 10.0, None, "x", "p")]);
        let mut s = CustomerState::default();
        assert_eq!(s.apply(&a, &params()), ApplyOutcome::Applied);
        let once = s.clone();
        assert_eq!(s.apply(&a, &params()), ApplyOutcome::Duplicate);
        assert_eq!(s, once);
        assert_eq!(s.orders, 1);
    }

    #[test]
    fn a_duplicate_further_back_than_the_window_is_applied() {
        // The documented limit of the window: after DEDUP_WINDOW newer events the id is
        // forgotten, and the same event counts again. Within it, it is caught.
        let a = order("a", T0, &[(1.0, 10.0, None, "x", "p")]);
        let mut s = CustomerState::default();
        s.apply(&a, &params());
        for i in 0..DEDUP_WINDOW - 1 {
            let other = order(&format!("b{i}"), T0 + 60, &[(1.0, 1.0, None, "x", "p")]);
            assert_eq!(s.apply(&other, &params()), ApplyOutcome::Applied);
        }
        assert_eq!(s.apply(&a, &params()), ApplyOutcome::Duplicate);
        let last = order("c", T0 + 120, &[(1.0, 1.0, None, "x", "p")]);
        assert_eq!(s.apply(&last, &params()), ApplyOutcome::Applied);
        assert_eq!(s.orders, DEDUP_WINDOW as u32 + 1);
        assert_eq!(s.apply(&a, &params()), ApplyOutcome::Applied);
        assert_eq!(s.orders, DEDUP_WINDOW as u32 + 2);
    }

    #[test]
    fn order_counters_by_hand() {
        let mut s = CustomerState::default();
        // Two lines in category x (one discounted), one in y; a Saturday.
        let sat = T0 + 5 * DAY;
        s.apply(
            &order(
                "a",
                sat,
                &[
                    (2.0, 8.0, Some(10.0), "x", "p1"),
                    (1.0, 10.0, Some(10.0), "x", "p2"),
                    (1.0, 4.0, None, "y", "p1"),
                ],
            ),
            &params(),
        );
        assert_eq!(s.orders, 1);
        assert_eq!(s.lines, 3);
        assert_eq!(s.units, 4.0);
        assert_eq!(s.revenue, 30.0);
        assert_eq!(s.max_unit_price, 10.0);
        assert_eq!(s.weekend_orders, 1);
        assert_eq!(s.priced_lines, 2);
        assert_eq!(s.discounted_lines, 1);
        assert_eq!(s.priced_paid, 26.0);
        assert_eq!(s.priced_list, 30.0);
        assert_eq!(s.full_price_paid, 10.0);
        assert_eq!(s.priced_orders, 1);
        assert_eq!(s.promo_orders, 0);
        assert_eq!(s.category_picks, 2);
        assert_eq!(s.categories.set_bits(), 2);
        assert_eq!(s.product_lines, 3);
        assert_eq!(s.products.set_bits(), 2);
        assert_eq!(s.week_bits, 1);
    }

    #[test]
    fn week_bitmap_shifts_and_forgets() {
        let mut s = CustomerState::default();
        s.mark_week(100);
        s.mark_week(102);
        assert_eq!(s.week_bits, 0b101);
        s.mark_week(101);
        assert_eq!(s.week_bits, 0b111);
        assert_eq!(s.weeks_as_of(104), 0b11100);
        s.mark_week(102 - 64); // outside the window: forgotten, as it would have been in order
        assert_eq!(s.week_bits, 0b111);
        s.mark_week(102 + 64);
        assert_eq!(s.week_bits, 1);
    }

    #[test]
    fn opt_out_is_last_writer_wins_by_event_time() {
        let engage = |id: &str, t: i64, action| Event {
            event_id: id.into(),
            customer_id: CustomerId::parse("c").unwrap(),
            event_time: EventTime::from_unix(t).unwrap(),
            body: EventBody::Engagement(Engagement {
                channel: MessageChannel::Sms,
                action,
            }),
        };
        let unsub = engage("u", T0 + DAY, EngagementAction::Unsubscribe);
        let resub = engage("s", T0 + 2 * DAY, EngagementAction::Subscribe);
        let mut a = CustomerState::default();
        a.apply(&unsub, &params());
        a.apply(&resub, &params());
        let mut b = CustomerState::default();
        b.apply(&resub, &params());
        b.apply(&unsub, &params());
        assert_eq!(a.opted_out_channels(), 0);
        assert_eq!(a.opt, b.opt);
    }

    #[test]
    fn returns_and_support_accumulate() {
        let mut s = CustomerState::default();
        let base = |id: &str, body| Event {
            event_id: id.into(),
            customer_id: CustomerId::parse("c").unwrap(),
            event_time: EventTime::from_unix(T0).unwrap(),
            body,
        };
        s.apply(
            &base(
                "r",
                EventBody::Return(Return {
                    order_id: None,
                    amount: 12.5,
                    reason: None,
                }),
            ),
            &params(),
        );
        s.apply(
            &base(
                "s1",
                EventBody::SupportContact(SupportContact {
                    topic: "How_To".into(),
                    complexity: 4.0,
                }),
            ),
            &params(),
        );
        s.apply(
            &base(
                "s2",
                EventBody::SupportContact(SupportContact {
                    topic: "delivery".into(),
                    complexity: 2.0,
                }),
            ),
            &params(),
        );
        assert_eq!(s.returns, 1);
        assert_eq!(s.returned_value, 12.5);
        assert_eq!(s.contacts, 2);
        assert_eq!(s.complexity_sum, 6.0);
        assert_eq!(s.help_contacts, 1);
        assert_eq!(s.topics.count_ones(), 2);
        assert_eq!(s.decayed.contacts, 2.0);
    }

    /// The scratch buffer behind `encode` is reused: consecutive encodings on one thread give
    /// exactly the bytes of encoding each into a fresh vector, with nothing of the one before.
    #[test]
    fn encodings_on_one_thread_do_not_share_bytes() {
        let p = StateParams::default();
        let mut big = CustomerState::default();
        for o in 0..20i64 {
            big.apply(
                &order(
                    &format!("o{o}"),
                    T0 + o * DAY,
                    &[(2.0, 9.5, None, "cat", "prod")],
                ),
                &p,
            );
        }
        let small = CustomerState::default();
        for state in [&big, &small, &big] {
            let fresh = postcard::to_extend(state, vec![STATE_CODEC_VERSION]).unwrap();
            assert_eq!(state.encode(), fresh);
        }
        assert!(small.encode().len() < big.encode().len());
    }

    /// A customer with every kind of data and a lot of it: 300 orders of 5 lines over two
    /// years, 1,000 distinct products in 150 categories, returns, contacts, and opt-outs on
    /// every channel. Its encoded state must stay within the 512-byte budget.
    #[test]
    fn a_heavy_customer_encodes_within_512_bytes() {
        let p = StateParams::default();
        let mut s = CustomerState::default();
        for o in 0..300i64 {
            let t = T0 + o * 2 * DAY + 3_600 * (o % 7);
            let lines: Vec<(f64, f64, Option<f64>, String, String)> = (0..5)
                .map(|l| {
                    let n = o * 5 + l;
                    (
                        1.0 + (n % 3) as f64,
                        4.99 + (n % 17) as f64,
                        Some(5.99 + (n % 17) as f64),
                        format!("cat-{}", n % 150),
                        format!("prod-{}", n % 1000),
                    )
                })
                .collect();
            let refs: Vec<(f64, f64, Option<f64>, &str, &str)> = lines
                .iter()
                .map(|(q, u, l, c, pr)| (*q, *u, *l, c.as_str(), pr.as_str()))
                .collect();
            s.apply(&order(&format!("o{o}"), t, &refs), &p);
            if o % 6 == 0 {
                s.apply(
                    &Event {
                        event_id: format!("r{o}"),
                        customer_id: CustomerId::parse("c").unwrap(),
                        event_time: EventTime::from_unix(t + 3 * DAY).unwrap(),
                        body: EventBody::Return(Return {
                            order_id: Some(format!("o{o}")),
                            amount: 12.34,
                            reason: None,
                        }),
                    },
                    &p,
                );
            }
            if o % 10 == 0 {
                s.apply(
                    &Event {
                        event_id: format!("s{o}"),
                        customer_id: CustomerId::parse("c").unwrap(),
                        event_time: EventTime::from_unix(t + DAY).unwrap(),
                        body: EventBody::SupportContact(SupportContact {
                            topic: ["delivery", "how_to", "billing"][(o % 3) as usize].into(),
                            complexity: 3.0,
                        }),
                    },
                    &p,
                );
            }
        }
        for (i, channel) in MessageChannel::ALL.into_iter().enumerate() {
            s.apply(
                &Event {
                    event_id: format!("u{i}"),
                    customer_id: CustomerId::parse("c").unwrap(),
                    event_time: EventTime::from_unix(T0 + 500 * DAY).unwrap(),
                    body: EventBody::Engagement(Engagement {
                        channel,
                        action: EngagementAction::Unsubscribe,
                    }),
                },
                &p,
            );
        }
        let encoded = s.encode();
        eprintln!("heavy customer state: {} bytes encoded", encoded.len());
        assert!(
            encoded.len() <= 512,
            "encoded state is {} bytes",
            encoded.len()
        );
        assert_eq!(CustomerState::decode(&encoded).unwrap(), s);
    }

    /// Numbers equal to a relative 1e-9 (decayed sums round differently in another order);
    /// everything else exactly.
    fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        use serde_json::Value::*;
        match (a, b) {
            (Number(x), Number(y)) => {
                let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
            }
            (Array(x), Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
            }
            (Object(x), Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
            }
            _ => a == b,
        }
    }

    fn arb_event() -> impl proptest::strategy::Strategy<Value = (i64, u8, u8, u8, u8)> {
        // (day offset within two years, kind, product, category, amount)
        (0i64..730, 0u8..5, 0u8..60, 0u8..12, 1u8..200)
    }

    fn make_event(
        i: usize,
        (day, kind, product, category, amount): (i64, u8, u8, u8, u8),
    ) -> Event {
        // Few distinct times of day, so events often share a second (tie rules matter).
        let t = T0 + day * DAY + (i as i64 % 3) * 3_600;
        let body = match kind {
            0 | 1 => EventBody::Order(Order {
                order_id: None,
                channel: Some(if kind == 0 {
                    crate::domain::event::OrderChannel::Web
                } else {
                    crate::domain::event::OrderChannel::Store
                }),
                lines: (0..=(amount % 3))
                    .map(|l| OrderLine {
                        product_id: Some(format!("p{}", product.wrapping_add(l)).into()),
                        category: Some(format!("c{category}").into()),
                        quantity: 1.0 + f64::from(l),
                        unit_price: f64::from(amount) / 4.0,
                        list_price: (amount % 2 == 0).then_some(f64::from(amount) / 3.0),
                    })
                    .collect(),
            }),
            2 => EventBody::Return(Return {
                order_id: None,
                amount: f64::from(amount) / 10.0,
                reason: None,
            }),
            3 => EventBody::SupportContact(SupportContact {
                topic: ["delivery", "how_to", "billing", "technical"][usize::from(product % 4)]
                    .into(),
                complexity: f64::from(1 + amount % 5),
            }),
            _ => EventBody::Engagement(Engagement {
                channel: MessageChannel::ALL[usize::from(product % 4)],
                action: [
                    EngagementAction::Open,
                    EngagementAction::Click,
                    EngagementAction::Unsubscribe,
                    EngagementAction::Subscribe,
                ][usize::from(category % 4)],
            }),
        };
        Event {
            event_id: format!("e{i}"),
            customer_id: CustomerId::parse("c").unwrap(),
            event_time: EventTime::from_unix(t).unwrap(),
            body,
        }
    }

    use proptest::prelude::{prop_assert, Just, Strategy};

    proptest::proptest! {
        /// The state is the same whatever order the events arrive in.
        #[test]
        fn state_does_not_depend_on_arrival_order(
            (raw, order) in proptest::collection::vec(arb_event(), 1..60)
                .prop_flat_map(|raw| {
                    let n = raw.len();
                    (Just(raw), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
                })
        ) {
            let events: Vec<Event> = raw.into_iter().enumerate().map(|(i, r)| make_event(i, r)).collect();
            let p = params();
            let mut in_order = CustomerState::default();
            for e in &events {
                in_order.apply(e, &p);
            }
            let mut shuffled = CustomerState::default();
            for &i in &order {
                shuffled.apply(&events[i], &p);
            }
            // The dedup ring holds the last ids seen, which depend on arrival order by design.
            in_order.recent = RecentIds::default();
            shuffled.recent = RecentIds::default();
            let a = serde_json::to_value(&in_order).unwrap();
            let b = serde_json::to_value(&shuffled).unwrap();
            prop_assert!(same_json(&a, &b), "{a}\n!=\n{b}");
        }
    }

    #[test]
    fn codec_round_trips_and_checks_version() {
        let mut s = CustomerState::default();
        s.apply(
            &order("a", T0, &[(1.0, 10.0, Some(11.0), "x", "p")]),
            &params(),
        );
        let bytes = s.encode();
        assert_eq!(bytes[0], STATE_CODEC_VERSION);
        assert_eq!(CustomerState::decode(&bytes).unwrap(), s);
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(matches!(
            CustomerState::decode(&bad),
            Err(StateCodecError::Version(9))
        ));
        assert!(CustomerState::decode(&bytes[..bytes.len() / 2]).is_err());
        assert!(matches!(
            CustomerState::decode(&[]),
            Err(StateCodecError::Empty)
        ));
    }
}
