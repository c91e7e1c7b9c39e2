//! The live stream: the shop carried on past its history, one simulated day at a time.
//!
//! Unlike the history, which plans each customer's whole period at once to hit an exact line
//! count, the stream steps through days and draws each active customer's activity for the day,
//! so the persona mix can change between days. Rates are the history's (same calibration
//! scale), so a stream continues the history without a visible break.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::domain::event::{CustomerId, Event};
use crate::domain::time::EventTime;

use super::behaviour::{
    self, draw_lines, draw_order_contact, draw_return, draw_topic, poisson, rng_for, total_cents,
    Favourites, Stream, Traits, ENGAGEMENT_TAIL_DAYS, SUPPORT_TAIL_DAYS,
};
use super::catalogue::Catalogue;
use super::events::{self, Kind, CLICK, OPEN, SUBSCRIBE, UNSUBSCRIBE};
use super::persona::{Persona, PersonaMix};
use super::season::{self, day_factor};
use super::Shop;

const DAY: i64 = 86_400;

/// An endless stream of events after a shop's history, in event-time order, one simulated day
/// at a time. Made by [`Shop::live`].
///
/// New customers keep arriving (at half the history's average acquisition rate) with personas
/// drawn from the current mix; [`LiveStream::set_mix`] changes that mix and redraws the persona
/// of a share of the existing customers, which is how the streaming demo induces drift.
///
/// The history's own follow-ups that fall after its end (returns of its last orders, which
/// refer to the history's order ids, and the contacts they cause) come out of the stream on
/// their days, so returns and contacts do not dip at the hand-over.
///
/// Event ids carry the stream's seed (`o-L7-00000001`, `r-L7-…`, `s-L7-…`, `e-L7-…`), so they
/// never collide with the history's, and replaying a stream with the same seed and the same
/// `set_mix` calls repeats them exactly (de-duplication then makes a replay a no-op). The
/// stream ends only when simulated time reaches the last accepted event time (year 2100).
pub struct LiveStream {
    catalogue: Arc<Catalogue>,
    start: i64,
    seed: u64,
    /// The next day to generate.
    day: u32,
    scale: f64,
    arrivals_per_day: f64,
    mix: PersonaMix,
    rng: ChaCha8Rng,
    customers: Vec<LiveCustomer>,
    ready: VecDeque<Event>,
    /// Events drawn for a later day than the one being generated (returns, follow-up contacts,
    /// clicks after midnight).
    pending: Vec<Timed>,
    next_seq: u64,
    numbers: [u64; 4],
    done: bool,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStream")
            .field("seed", &self.seed)
            .field("day", &self.day)
            .field("mix", &self.mix)
            .field("customers", &self.customers.len())
            .finish_non_exhaustive()
    }
}

struct LiveCustomer {
    id: CustomerId,
    traits: Traits,
    favourites: Favourites,
    subscribed: u8,
}

/// An event with its time in epoch seconds and a generation sequence number for ties.
struct Timed {
    t: i64,
    seq: u64,
    event: Event,
}

impl LiveStream {
    /// Share of the active customers whose persona is redrawn by [`LiveStream::set_mix`].
    pub const REDRAW_SHARE: f64 = 0.3;

    /// Daily chance that a customer opts back in to a message channel they are not subscribed
    /// to.
    const RESUBSCRIBE_PER_DAY: f64 = 0.001;

    pub(super) fn new(shop: &Shop, from_day: u32, seed: u64) -> Self {
        let h = &shop.history;
        let customers = shop
            .ids
            .iter()
            .zip(&h.traits)
            .zip(&h.end)
            .map(|((id, traits), end)| LiveCustomer {
                id: id.clone(),
                traits: traits.clone(),
                favourites: end.favourites,
                subscribed: end.subscribed,
            })
            .collect();
        let p = &shop.params;
        let mut stream = Self {
            catalogue: Arc::clone(&shop.catalogue),
            start: p.start.unix(),
            seed,
            day: from_day,
            scale: h.scale,
            // The history's customers arrived over its whole period; half that pace keeps the
            // base growing slowly instead of doubling every period.
            arrivals_per_day: 0.5 * p.customers as f64 / f64::from(p.days.max(30)),
            mix: p.mix.clone(),
            rng: rng_for(p.seed ^ seed.rotate_left(17), Stream::Live, seed),
            customers,
            ready: VecDeque::new(),
            pending: Vec::new(),
            next_seq: 0,
            numbers: [0; 4],
            done: false,
        };
        stream.adopt_spill(shop, from_day);
        stream
    }

    /// Queues the history's follow-ups that fall on or after `from_day`: returns of orders
    /// near its end (still referring to the history's order ids) and the contacts they cause.
    fn adopt_spill(&mut self, shop: &Shop, from_day: u32) {
        let h = &shop.history;
        let first = i64::from(from_day) * DAY;
        let mut out = Vec::new();
        for s in h.spill.iter().filter(|s| i64::from(s.t) >= first) {
            let t = self.start + i64::from(s.t);
            let customer = shop.ids[s.cust as usize].clone();
            if s.kind == Kind::Return {
                let id = self.id(Kind::Return);
                let order_id = events::history_id(Kind::Order, h.order_number[s.order as usize]);
                self.push(
                    t,
                    |time| events::refund(id, customer, time, order_id, s.amount_cents, s.a),
                    &mut out,
                );
            } else {
                let id = self.id(Kind::Support);
                self.push(
                    t,
                    |time| events::support(id, customer, time, s.a, s.b),
                    &mut out,
                );
            }
        }
        self.pending.extend(out);
    }

    /// The persona mix new customers are drawn from.
    pub fn mix(&self) -> &PersonaMix {
        &self.mix
    }

    /// Changes the persona mix. New customers arriving from the next generated day on are
    /// drawn from it, and [`LiveStream::REDRAW_SHARE`] of the customers active now get a
    /// persona redrawn from it (with fresh traits; ids, favourites and subscriptions kept).
    /// Events of the day already generated keep their old personas.
    pub fn set_mix(&mut self, mix: PersonaMix) {
        self.shift_mix(mix, Self::REDRAW_SHARE, 1.0);
    }

    /// [`LiveStream::set_mix`], with `redraw` (0 to 1) of the active customers redrawn and
    /// new customers arriving `arrivals` times as often from now on (an acquisition campaign
    /// that brings the new mix in): a shift as strong as a demonstration needs to show within
    /// minutes.
    pub fn shift_mix(&mut self, mix: PersonaMix, redraw: f64, arrivals: f64) {
        self.arrivals_per_day *= arrivals.max(0.0);
        self.mix = mix;
        let day = self.day;
        for c in &mut self.customers {
            if !c.traits.active_on(day) || self.rng.random::<f64>() >= redraw {
                continue;
            }
            let persona = self.mix.sample(&mut self.rng);
            let acquired = c.traits.acquired;
            // Drawn as if acquired today so churn and decay run from the change.
            let mut traits = Traits::draw(persona, day, &self.catalogue, &mut self.rng);
            traits.acquired = acquired;
            c.traits = traits;
        }
    }

    /// The current persona of a customer (of the history or arrived in the stream).
    pub fn persona_of(&self, id: &CustomerId) -> Option<Persona> {
        let n = events::customer_number(id)?;
        self.customers.get(n).map(|c| c.traits.persona)
    }

    /// Customers so far, history and arrivals.
    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    /// The first day (since the shop's start) not generated yet; the events being returned
    /// belong to the day before.
    pub fn next_day(&self) -> u32 {
        self.day
    }

    fn id(&mut self, kind: Kind) -> String {
        let n = &mut self.numbers[kind as usize];
        *n += 1;
        format!("{}-L{}-{:08}", kind.prefix(), self.seed, *n)
    }

    fn push(&mut self, t: i64, event: impl FnOnce(EventTime) -> Event, out: &mut Vec<Timed>) {
        // Times are checked against the range before a day is generated; a follow-up event
        // beyond it is simply never emitted.
        if let Ok(time) = EventTime::from_unix(t) {
            let seq = self.next_seq;
            self.next_seq += 1;
            out.push(Timed {
                t,
                seq,
                event: event(time),
            });
        }
    }

    fn generate_day(&mut self) {
        let day = self.day;
        let day_start = self.start + i64::from(day) * DAY;
        if EventTime::from_unix(day_start + DAY - 1).is_err() {
            self.done = true;
            return;
        }
        self.day += 1;
        let factor = day_factor(day_start);
        let mut out = Vec::new();

        let arrivals = poisson(self.arrivals_per_day * factor, &mut self.rng);
        for _ in 0..arrivals {
            self.arrive(day, &mut out);
        }
        for i in 0..self.customers.len() {
            self.customer_day(i, day, factor, &mut out);
        }

        let day_end = day_start + DAY;
        let mut today = Vec::with_capacity(out.len());
        for timed in out.into_iter().chain(std::mem::take(&mut self.pending)) {
            if timed.t < day_end {
                today.push(timed);
            } else {
                self.pending.push(timed);
            }
        }
        today.sort_unstable_by_key(|e| (e.t, e.seq));
        self.ready.extend(today.into_iter().map(|e| e.event));
    }

    /// A new customer: drawn from the current mix, first order today, opt-ins at checkout.
    fn arrive(&mut self, day: u32, out: &mut Vec<Timed>) {
        let persona = self.mix.sample(&mut self.rng);
        let traits = Traits::draw(persona, day, &self.catalogue, &mut self.rng);
        // Generated labels always pass validation; were one refused, the arrival is skipped.
        let Ok(id) = CustomerId::parse(&events::customer_label(self.customers.len())) else {
            return;
        };
        let subscribed = traits.subscribed;
        self.customers.push(LiveCustomer {
            id,
            traits,
            favourites: Favourites::default(),
            subscribed,
        });
        let i = self.customers.len() - 1;
        let at = self.order(i, day, out);
        for channel in 0..3u8 {
            if subscribed & (1 << channel) != 0 {
                let t = at + self.rng.random_range(30..1800);
                self.engage(i, t, channel, SUBSCRIBE, out);
            }
        }
    }

    fn customer_day(&mut self, i: usize, day: u32, factor: f64, out: &mut Vec<Timed>) {
        let c = &self.customers[i];
        let t = &c.traits;
        if !t.reachable_on(day, ENGAGEMENT_TAIL_DAYS) || t.acquired == day {
            // Arrivals got their day in `arrive`.
            return;
        }
        let decay = t.decay_at(f64::from(day));
        let orders = if t.active_on(day) {
            poisson(
                t.order_rate * self.scale / 7.0 * factor * decay,
                &mut self.rng,
            )
        } else {
            0
        };
        let contacts = if t.reachable_on(day, SUPPORT_TAIL_DAYS) {
            poisson(t.support_per_week / 7.0 * decay, &mut self.rng)
        } else {
            0
        };
        let opens = t.opens_per_week.map(|o| o / 7.0 * decay);
        let click = t.click;
        let unsubscribe = t.unsubscribe_per_week / 7.0;
        let subscribed = c.subscribed;

        for _ in 0..orders {
            self.order(i, day, out);
        }
        for _ in 0..contacts {
            let (topic, complexity) = draw_topic(&self.customers[i].traits, &mut self.rng);
            let t = self.at(day, &season::OFFICE_HOURS);
            self.contact(i, t, topic, complexity, out);
        }
        for channel in 0..4u8 {
            let bit = 1 << channel;
            if subscribed & bit == 0 {
                if channel != 3 && self.rng.random::<f64>() < Self::RESUBSCRIBE_PER_DAY {
                    let t = self.at(day, &season::MESSAGE_HOURS);
                    self.engage(i, t, channel, SUBSCRIBE, out);
                    self.customers[i].subscribed |= bit;
                }
                continue;
            }
            for _ in 0..poisson(opens[usize::from(channel)], &mut self.rng) {
                let t = self.at(day, &season::MESSAGE_HOURS);
                self.engage(i, t, channel, OPEN, out);
                if self.rng.random::<f64>() < click {
                    let later = t + self.rng.random_range(5..1800);
                    self.engage(i, later, channel, CLICK, out);
                }
            }
            if self.rng.random::<f64>() < unsubscribe {
                let t = self.at(day, &season::MESSAGE_HOURS);
                self.engage(i, t, channel, UNSUBSCRIBE, out);
                self.customers[i].subscribed &= !bit;
            }
        }
    }

    /// A random time on `day` following the hour profile, in epoch seconds.
    fn at(&mut self, day: u32, hours: &season::Hours) -> i64 {
        self.start + i64::from(day) * DAY + i64::from(season::time_of_day(hours, &mut self.rng))
    }

    /// Places an order for customer `i` on `day` with its return and contacts; returns its time.
    fn order(&mut self, i: usize, day: u32, out: &mut Vec<Timed>) -> i64 {
        let channel = self.customers[i].traits.channel(&mut self.rng);
        let t = self.at(day, behaviour::channel_hours(channel));
        let c = &mut self.customers[i];
        let n = 1 + poisson(c.traits.extra_lines, &mut self.rng) as usize;
        let mut lines = Vec::with_capacity(n);
        draw_lines(
            n,
            &c.traits,
            &mut c.favourites,
            &self.catalogue,
            &mut self.rng,
            &mut lines,
        );
        let ret = draw_return(&c.traits, &lines, &mut self.rng);
        let after_return = ret.and_then(|_| draw_order_contact(&c.traits, true, &mut self.rng));
        let contact = draw_order_contact(&c.traits, false, &mut self.rng);
        let customer = c.id.clone();

        let order_id = self.id(Kind::Order);
        let catalogue = Arc::clone(&self.catalogue);
        let (id, cust) = (order_id.clone(), customer.clone());
        self.push(
            t,
            |time| events::order(id, cust, time, channel, &lines, &catalogue),
            out,
        );
        if let Some(r) = ret {
            debug_assert!(r.amount_cents <= total_cents(&lines));
            let return_day = day + r.after_days;
            let rt = self.start + i64::from(return_day) * DAY + i64::from(r.time_of_day);
            let id = self.id(Kind::Return);
            let cust = customer.clone();
            self.push(
                rt,
                |time| events::refund(id, cust, time, order_id, r.amount_cents, r.reason),
                out,
            );
            if let Some(s) = after_return {
                let st = self.start
                    + i64::from(return_day + s.after_days) * DAY
                    + i64::from(s.time_of_day);
                self.contact(i, st, s.topic, s.complexity, out);
            }
        }
        if let Some(s) = contact {
            let st = self.start + i64::from(day + s.after_days) * DAY + i64::from(s.time_of_day);
            self.contact(i, st, s.topic, s.complexity, out);
        }
        t
    }

    fn contact(&mut self, i: usize, t: i64, topic: u8, complexity: u8, out: &mut Vec<Timed>) {
        let id = self.id(Kind::Support);
        let customer = self.customers[i].id.clone();
        self.push(
            t,
            |time| events::support(id, customer, time, topic, complexity),
            out,
        );
    }

    fn engage(&mut self, i: usize, t: i64, channel: u8, action: u8, out: &mut Vec<Timed>) {
        let id = self.id(Kind::Engagement);
        let customer = self.customers[i].id.clone();
        self.push(
            t,
            |time| events::engagement(id, customer, time, channel, action),
            out,
        );
    }
}

impl Iterator for LiveStream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            self.generate_day();
        }
    }
}
