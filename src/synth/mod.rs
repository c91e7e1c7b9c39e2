//! Seeded synthetic shop: a deterministic simulator of a shop's customers and everything they
//! do (orders, returns, support contacts, messaging), for when no real export is at hand.
//!
//! It feeds three consumers:
//! - the batch subcommands, through [`write_csv`], which writes the four CSV files they ingest;
//! - the benchmarks, through [`Shop::history`] (exact order-line counts make runs comparable);
//! - later the streaming demo, through [`Shop::live`]: events after the history, published live
//!   to Kafka at a configurable rate, where [`LiveStream::set_mix`] with
//!   [`PersonaMix::shifted`] induces drift.
//!
//! Every customer has a hidden [`Persona`] with its own order rate, basket size, price level,
//! category breadth, product loyalty, discount affinity, return rate, support needs, messaging
//! engagement, preferred channel and lifecycle, each drawn with per-customer noise. Orders follow
//! weekly (weekend peak) and yearly (December peak, summer dip) seasonality. The same
//! [`ShopParams`] always give the same shop, byte for byte.

mod behaviour;
mod catalogue;
mod csv_out;
mod events;
pub mod fixtures;
mod history;
mod live;
mod persona;
pub mod scores;
mod season;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::event::{CustomerId, Event, EventError};
use crate::domain::time::EventTime;

pub use csv_out::{
    write_csv, CsvSummary, ENGAGEMENT_HEADER, ORDERS_HEADER, RETURNS_HEADER, SUPPORT_HEADER,
};
pub use live::LiveStream;
pub use persona::{MixError, Persona, PersonaMix};

use behaviour::{rng_for, Stream};
use catalogue::Catalogue;
use events::Kind;
use history::{History, Rec};

/// Most customers a shop may have (ids are numbered with 7 digits, and memory grows with it).
pub const MAX_CUSTOMERS: usize = 10_000_000;
/// Most order lines a shop may have; the history takes roughly 60 bytes per line.
pub const MAX_ORDER_LINES: usize = 20_000_000;
/// Longest simulated period in days.
pub const MAX_DAYS: u32 = 36_500;

const DAY: i64 = 86_400;
/// 2024-01-01T00:00:00Z.
const DEFAULT_START: i64 = 1_704_067_200;

/// What to simulate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShopParams {
    /// Number of customers; each places at least one order.
    pub customers: usize,
    /// Exact number of order lines across all orders of the history. At least `customers`,
    /// since every customer's first order has at least one line.
    pub order_lines: usize,
    /// First moment of the history; must be a midnight (UTC).
    pub start: EventTime,
    /// Length of the history in days; events fall in `[start, start + days)`.
    pub days: u32,
    /// Seed of every random draw.
    pub seed: u64,
    /// Share of each persona among the customers.
    pub mix: PersonaMix,
}

impl Default for ShopParams {
    /// 10,000 customers, 100,000 lines, a year from 2024-01-01, seed 42, the default mix.
    fn default() -> Self {
        Self {
            customers: 10_000,
            order_lines: 100_000,
            // The constant is inside the accepted range, so the fallback is never taken.
            start: EventTime::from_unix(DEFAULT_START).unwrap_or_else(|_| EventTime::now()),
            days: 365,
            seed: 42,
            mix: PersonaMix::default(),
        }
    }
}

/// Why a shop could not be generated or written.
#[derive(Debug, Error)]
pub enum SynthError {
    /// `customers` is 0.
    #[error("customers must be at least 1")]
    NoCustomers,
    /// `customers` is above [`MAX_CUSTOMERS`].
    #[error("customers {0} is above the limit of {MAX_CUSTOMERS}")]
    TooManyCustomers(usize),
    /// `days` is 0.
    #[error("days must be at least 1")]
    NoDays,
    /// `days` is above [`MAX_DAYS`].
    #[error("days {0} is above the limit of {MAX_DAYS}")]
    TooManyDays(u32),
    /// Fewer order lines than customers.
    #[error(
        "order_lines {lines} is below customers {customers}: every customer places at least \
         one order of at least one line"
    )]
    TooFewLines {
        /// Lines asked for.
        lines: usize,
        /// Customers asked for.
        customers: usize,
    },
    /// `order_lines` is above [`MAX_ORDER_LINES`].
    #[error("order_lines {0} is above the limit of {MAX_ORDER_LINES}")]
    TooManyLines(usize),
    /// `start` is not a midnight.
    #[error("start {0} is not a midnight (UTC)")]
    StartNotMidnight(EventTime),
    /// The period runs past the last accepted event time.
    #[error("a period of {days} days from {start} runs past the last accepted event time")]
    PeriodOutOfRange {
        /// The start asked for.
        start: EventTime,
        /// The length asked for.
        days: u32,
    },
    /// A generated customer id was refused (a bug: generated ids are always valid).
    #[error("generated customer id refused: {0}")]
    CustomerId(#[from] EventError),
    /// A file or directory could not be created or written.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A CSV writer failed.
    #[error("cannot write {}: {source}", path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: csv::Error,
    },
}

impl ShopParams {
    /// Checks the parameters; see [`SynthError`] for what is refused.
    pub fn validate(&self) -> Result<(), SynthError> {
        if self.customers == 0 {
            return Err(SynthError::NoCustomers);
        }
        if self.customers > MAX_CUSTOMERS {
            return Err(SynthError::TooManyCustomers(self.customers));
        }
        if self.days == 0 {
            return Err(SynthError::NoDays);
        }
        if self.days > MAX_DAYS {
            return Err(SynthError::TooManyDays(self.days));
        }
        if self.order_lines < self.customers {
            return Err(SynthError::TooFewLines {
                lines: self.order_lines,
                customers: self.customers,
            });
        }
        if self.order_lines > MAX_ORDER_LINES {
            return Err(SynthError::TooManyLines(self.order_lines));
        }
        if self.start.unix().rem_euclid(DAY) != 0 {
            return Err(SynthError::StartNotMidnight(self.start));
        }
        let last = self.start.unix() + i64::from(self.days) * DAY - 1;
        if EventTime::from_unix(last).is_err() {
            return Err(SynthError::PeriodOutOfRange {
                start: self.start,
                days: self.days,
            });
        }
        Ok(())
    }
}

/// A generated shop: its catalogue, customers and full history, held compactly.
pub struct Shop {
    params: ShopParams,
    catalogue: Arc<Catalogue>,
    ids: Vec<CustomerId>,
    history: History,
}

impl std::fmt::Debug for Shop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shop")
            .field("params", &self.params)
            .field("orders", &self.history.orders.len())
            .field("events", &self.history.recs.len())
            .finish_non_exhaustive()
    }
}

impl Shop {
    /// Validates the parameters and generates the whole history (about half a second per
    /// million order lines in a release build; the history is kept in compact form and events
    /// are built while iterating).
    pub fn new(params: ShopParams) -> Result<Shop, SynthError> {
        params.validate()?;
        let ids = (0..params.customers)
            .map(|i| CustomerId::parse(&events::customer_label(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let catalogue = Catalogue::generate(&mut rng_for(params.seed, Stream::Catalogue, 0));
        let history = history::build(&params, &catalogue);
        Ok(Shop {
            params,
            catalogue: Arc::new(catalogue),
            ids,
            history,
        })
    }

    /// The parameters the shop was generated from.
    pub fn params(&self) -> &ShopParams {
        &self.params
    }

    /// The full history in event-time order; events at the same second are ordered by customer,
    /// then kind (order, return, support, engagement), then generation order. The order lines of
    /// all orders add up to exactly `params.order_lines`. Ids are numbered per kind in this
    /// order: `o-00000001`, `r-…`, `s-…`, `e-…`. Returns and support contacts that follow the
    /// last orders but fall after the end are not part of it; [`Shop::live`] emits them.
    pub fn history(&self) -> impl Iterator<Item = Event> + '_ {
        let mut numbers = [0u32; 4];
        self.history.recs.iter().filter_map(move |rec| {
            let n = &mut numbers[rec.kind as usize];
            *n += 1;
            self.event(rec, *n)
        })
    }

    /// Builds the event of a record; `None` only for a time outside the accepted range, which
    /// validation rules out.
    fn event(&self, rec: &Rec, number: u32) -> Option<Event> {
        let time = EventTime::from_unix(self.params.start.unix() + i64::from(rec.t)).ok()?;
        let customer = self.ids[rec.cust as usize].clone();
        let id = events::history_id(rec.kind, number);
        let h = &self.history;
        Some(match rec.kind {
            Kind::Order => {
                let order = h.orders[rec.idx as usize];
                let from = order.first_line as usize;
                let lines = &h.lines[from..from + order.lines as usize];
                events::order(id, customer, time, rec.a, lines, &self.catalogue)
            }
            Kind::Return => {
                let ret = h.returns[rec.idx as usize];
                let order_id = events::history_id(Kind::Order, h.order_number[ret.order as usize]);
                events::refund(id, customer, time, order_id, ret.amount_cents, ret.reason)
            }
            Kind::Support => events::support(id, customer, time, rec.a, rec.b),
            Kind::Engagement => events::engagement(id, customer, time, rec.a, rec.b),
        })
    }

    /// Events after the history, for live streaming; starts the day after the history ends.
    /// See [`LiveStream`].
    pub fn live(&self, seed: u64) -> LiveStream {
        self.live_from(self.params.days, seed)
    }

    /// Events for live streaming from `from_day` (days since `params.start`) on. A day inside
    /// the history is moved to its end, since the history already covers it; a later day
    /// leaves a gap in which customers who were due to churn have churned.
    pub fn live_from(&self, from_day: u32, seed: u64) -> LiveStream {
        LiveStream::new(self, from_day.max(self.params.days), seed)
    }

    /// Every customer's id, in number order (`C0000001` first).
    pub fn customer_ids(&self) -> &[CustomerId] {
        &self.ids
    }

    /// Every customer's state after the whole history, aligned with [`Shop::customer_ids`],
    /// and the time of the last event: what a backfill would load, and what discovery, the
    /// demo, tests and benchmarks start from.
    pub fn history_states(
        &self,
        params: &crate::domain::state::StateParams,
    ) -> (Vec<crate::domain::state::CustomerState>, Option<EventTime>) {
        let mut states = vec![crate::domain::state::CustomerState::default(); self.ids.len()];
        let mut last = None;
        for event in self.history() {
            // The customer number is the index into `ids` (both in number order).
            if let Some(n) = events::customer_number(&event.customer_id) {
                if let Some(state) = states.get_mut(n) {
                    state.apply(&event, params);
                }
            }
            last = Some(event.event_time);
        }
        (states, last)
    }

    /// The persona of a customer of the history, if the id is one.
    pub fn persona_of(&self, id: &CustomerId) -> Option<Persona> {
        let n = events::customer_number(id)?;
        self.history.traits.get(n).map(|t| t.persona)
    }
}
