//! Planning the full history of a shop, customer by customer, into compact records.
//!
//! The steps, each on its own random stream so they stay independent:
//! 1. traits: persona, acquisition day and noisy behaviour for every customer;
//! 2. calibration: one shop-wide scale on order rates so the expected number of order lines
//!    matches the target;
//! 3. plan: order times and line counts (a non-homogeneous Poisson process over each customer's
//!    active days, shaped by seasonality and decay);
//! 4. adjust: random orders gain or lose a line until the total is exact;
//! 5. content: lines, returns, support contacts and messaging per customer;
//! 6. sort: all records by time, then numbering in that order.
//!
//! Records are 16 bytes and lines 12, so a million-line history stays well under 100 MB;
//! [`crate::domain::event::Event`]s are only built while iterating.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::Exp1;

use super::behaviour::{
    self, draw_lines, draw_order_contact, draw_return, draw_topic, poisson, rng_for, Favourites,
    LineRec, ReturnDraw, Stream, Traits, ENGAGEMENT_TAIL_DAYS, SUPPORT_TAIL_DAYS,
};
use super::catalogue::Catalogue;
use super::events::{Kind, CLICK, OPEN, SUBSCRIBE, UNSUBSCRIBE};
use super::season::{self, day_factor};
use super::ShopParams;

const DAY: u32 = 86_400;

/// One event in compact form. `idx` indexes `orders` or `returns` for those kinds and is a
/// running number for the others, so (t, cust, kind, idx) is unique and sorting is
/// deterministic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rec {
    /// Seconds since the shop's start.
    pub t: u32,
    pub cust: u32,
    pub idx: u32,
    pub kind: Kind,
    /// Order: channel; support: topic; engagement: message channel.
    pub a: u8,
    /// Support: complexity; engagement: action.
    pub b: u8,
}

impl Rec {
    fn key(&self) -> u128 {
        (u128::from(self.t) << 96)
            | (u128::from(self.cust) << 64)
            | (u128::from(self.kind as u8) << 32)
            | u128::from(self.idx)
    }
}

/// An order's lines, as a range of `History::lines`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OrderRec {
    pub first_line: u32,
    pub lines: u32,
}

/// A return of (part of) an order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReturnRec {
    pub order: u32,
    pub amount_cents: u64,
    pub reason: u8,
}

/// A return or support contact that follows an order of the history but falls after its end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spill {
    /// Seconds since the shop's start; at or past the history's end.
    pub t: u32,
    pub cust: u32,
    pub kind: Kind,
    /// Return: the order it refers to.
    pub order: u32,
    /// Return: amount.
    pub amount_cents: u64,
    /// Return: reason; support: topic.
    pub a: u8,
    /// Support: complexity.
    pub b: u8,
}

/// What the live stream needs to carry a customer on where the history left them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EndState {
    pub favourites: Favourites,
    /// Message channels subscribed at the end of the history.
    pub subscribed: u8,
}

/// The generated history.
#[derive(Debug)]
pub(crate) struct History {
    pub traits: Vec<Traits>,
    pub end: Vec<EndState>,
    pub orders: Vec<OrderRec>,
    pub lines: Vec<LineRec>,
    pub returns: Vec<ReturnRec>,
    /// Every event, in event-time order.
    pub recs: Vec<Rec>,
    /// Follow-ups past the end, in generation order, for the live stream.
    pub spill: Vec<Spill>,
    /// 1-based number of each order in event-time order (its id).
    pub order_number: Vec<u32>,
    /// Multiplier on persona order rates that hit the line target.
    pub scale: f64,
}

/// A planned order before its content is drawn.
#[derive(Debug, Clone, Copy)]
struct Plan {
    t: u32,
    cust: u32,
    lines: u32,
    channel: u8,
}

/// Generates the history of a shop; `params` must have passed validation.
pub(crate) fn build(params: &ShopParams, catalogue: &Catalogue) -> History {
    let days = params.days;
    let start = params.start.unix();
    let traits: Vec<Traits> = (0..params.customers)
        .map(|i| {
            let mut rng = rng_for(params.seed, Stream::Traits, i as u64);
            let persona = params.mix.sample(&mut rng);
            let acquired = persona.profile().acquisition.draw(days, &mut rng);
            Traits::draw(persona, acquired, catalogue, &mut rng)
        })
        .collect();

    // prefix[d] = sum of the day factors of days 0..d, so the expected orders over any span of
    // days is a difference and a day can be drawn by bisection.
    let mut prefix = Vec::with_capacity(days as usize + 1);
    prefix.push(0.0);
    for d in 0..days {
        let last = prefix[d as usize];
        prefix.push(last + day_factor(start + i64::from(d) * i64::from(DAY)));
    }

    let scale = calibrate(&traits, &prefix, days, params.order_lines);
    let mut plans = plan_orders(params, &traits, &prefix, scale);
    adjust(&mut plans, params.order_lines, params.seed);

    let mut history = History {
        traits,
        end: Vec::with_capacity(params.customers),
        orders: Vec::with_capacity(plans.len()),
        lines: Vec::with_capacity(params.order_lines),
        returns: Vec::new(),
        recs: Vec::with_capacity(plans.len() * 4),
        spill: Vec::new(),
        order_number: Vec::new(),
        scale,
    };
    let mut counters = Counters::default();
    let mut from = 0;
    for cust in 0..params.customers {
        let to = from + plans[from..].partition_point(|p| p.cust as usize == cust);
        content(
            params,
            catalogue,
            cust,
            &plans[from..to],
            &mut history,
            &mut counters,
        );
        from = to;
    }

    history.recs.sort_unstable_by_key(Rec::key);
    history.order_number = vec![0; history.orders.len()];
    let mut n = 0;
    for rec in history.recs.iter().filter(|r| r.kind == Kind::Order) {
        n += 1;
        history.order_number[rec.idx as usize] = n;
    }
    history
}

/// Expected extra orders (beyond the first) of a customer at scale 1.
fn expected_orders(t: &Traits, prefix: &[f64], days: u32) -> f64 {
    let end = active_end(t, days);
    let per_day = t.order_rate / 7.0;
    if t.decay_days > 0.0 {
        (t.acquired..end)
            .map(|d| (prefix[d as usize + 1] - prefix[d as usize]) * t.decay_at(f64::from(d)))
            .sum::<f64>()
            * per_day
    } else {
        (prefix[end as usize] - prefix[t.acquired as usize]) * per_day
    }
}

/// First day past a customer's ordering life within the period.
fn active_end(t: &Traits, days: u32) -> u32 {
    t.churn_day
        .map_or(days, |c| c.min(days))
        .max(t.acquired + 1)
}

/// The scale on order rates whose expected total of lines is `target`. Every customer's first
/// order is fixed, so only the remainder is spread by rate.
fn calibrate(traits: &[Traits], prefix: &[f64], days: u32, target: usize) -> f64 {
    let mut fixed = 0.0;
    let mut per_scale = 0.0;
    for t in traits {
        let lines_per_order = 1.0 + t.extra_lines;
        fixed += lines_per_order;
        per_scale += expected_orders(t, prefix, days) * lines_per_order;
    }
    if per_scale > 0.0 {
        ((target as f64 - fixed) / per_scale).max(0.0)
    } else {
        0.0
    }
}

fn plan_orders(params: &ShopParams, traits: &[Traits], prefix: &[f64], scale: f64) -> Vec<Plan> {
    let mut plans = Vec::with_capacity(params.order_lines / 2 + params.customers);
    for (cust, t) in traits.iter().enumerate() {
        let mut rng = rng_for(params.seed, Stream::Plan, cust as u64);
        let from = plans.len();
        let mut plan = |day: u32, rng: &mut rand_chacha::ChaCha8Rng| {
            let channel = t.channel(rng);
            let tod = season::time_of_day(behaviour::channel_hours(channel), rng);
            plans.push(Plan {
                t: day * DAY + tod,
                cust: cust as u32,
                lines: 1 + poisson(t.extra_lines, rng),
                channel,
            });
        };
        plan(t.acquired, &mut rng);
        let end = active_end(t, params.days);
        let lo = prefix[t.acquired as usize];
        let hi = prefix[end as usize];
        // Thinning: candidates at the undecayed rate, each kept with the decay of its day.
        let candidates = poisson(scale * t.order_rate / 7.0 * (hi - lo), &mut rng);
        for _ in 0..candidates {
            let u = lo + rng.random::<f64>() * (hi - lo);
            let day = (prefix.partition_point(|&c| c <= u) as u32)
                .saturating_sub(1)
                .clamp(t.acquired, end - 1);
            if t.decay_days > 0.0 && rng.random::<f64>() >= t.decay_at(f64::from(day)) {
                continue;
            }
            plan(day, &mut rng);
        }
        plans[from..].sort_unstable_by_key(|p| (p.t, p.channel, p.lines));
    }
    plans
}

/// Makes the total of lines exactly `target`: first drops random repeat orders if there are
/// more orders than lines allowed (each order needs a line), then moves single lines.
fn adjust(plans: &mut Vec<Plan>, target: usize, seed: u64) {
    let mut rng = rng_for(seed, Stream::Adjust, 0);
    if plans.len() > target {
        // A customer's earliest order is their acquisition and must stay.
        let mut repeats: Vec<usize> = (1..plans.len())
            .filter(|&i| plans[i].cust == plans[i - 1].cust)
            .collect();
        for _ in 0..plans.len() - target {
            if repeats.is_empty() {
                break;
            }
            let i = repeats.swap_remove(rng.random_range(0..repeats.len()));
            plans[i].lines = 0;
        }
        plans.retain(|p| p.lines > 0);
    }
    let mut total: usize = plans.iter().map(|p| p.lines as usize).sum();
    if total > target {
        let mut multi: Vec<usize> = (0..plans.len()).filter(|&i| plans[i].lines > 1).collect();
        while total > target && !multi.is_empty() {
            let j = rng.random_range(0..multi.len());
            let i = multi[j];
            plans[i].lines -= 1;
            total -= 1;
            if plans[i].lines == 1 {
                multi.swap_remove(j);
            }
        }
    }
    while total < target && !plans.is_empty() {
        let i = rng.random_range(0..plans.len());
        plans[i].lines += 1;
        total += 1;
    }
}

#[derive(Default)]
struct Counters {
    support: u32,
    engagement: u32,
}

/// Draws everything one customer does, given their planned orders.
fn content(
    params: &ShopParams,
    catalogue: &Catalogue,
    cust: usize,
    plans: &[Plan],
    h: &mut History,
    counters: &mut Counters,
) {
    let History {
        traits,
        end,
        orders,
        lines,
        returns,
        recs,
        spill,
        ..
    } = h;
    let t = &traits[cust];
    let mut draw = CustomerDraw {
        t,
        rng: rng_for(params.seed, Stream::Content, cust as u64),
        cust: cust as u32,
        horizon: params.days * DAY,
        orders,
        lines,
        returns,
        recs,
        spill,
        counters,
    };
    let mut favourites = Favourites::default();
    for plan in plans {
        draw.order(plan, catalogue, &mut favourites);
    }
    draw.loose_contacts(params.days);

    let signup = plans.first().map_or(t.acquired * DAY, |p| p.t);
    let subscribed = messaging(
        params,
        t,
        draw.cust,
        signup,
        &mut draw.rng,
        draw.recs,
        draw.counters,
    );
    end.push(EndState {
        favourites,
        subscribed,
    });
}

/// One customer's content being drawn: their traits and random stream, and the parts of the
/// history their records go to.
struct CustomerDraw<'a> {
    t: &'a Traits,
    rng: ChaCha8Rng,
    cust: u32,
    /// The history's end, in seconds since the shop's start.
    horizon: u32,
    orders: &'a mut Vec<OrderRec>,
    lines: &'a mut Vec<LineRec>,
    returns: &'a mut Vec<ReturnRec>,
    recs: &'a mut Vec<Rec>,
    spill: &'a mut Vec<Spill>,
    counters: &'a mut Counters,
}

impl CustomerDraw<'_> {
    /// Draws a planned order's lines, then its return and the support contacts that follow
    /// it or its return.
    fn order(&mut self, plan: &Plan, catalogue: &Catalogue, favourites: &mut Favourites) {
        let t = self.t;
        let order = self.orders.len() as u32;
        let first_line = self.lines.len();
        draw_lines(
            plan.lines as usize,
            t,
            favourites,
            catalogue,
            &mut self.rng,
            self.lines,
        );
        self.orders.push(OrderRec {
            first_line: first_line as u32,
            lines: plan.lines,
        });
        self.recs.push(Rec {
            t: plan.t,
            cust: self.cust,
            idx: order,
            kind: Kind::Order,
            a: plan.channel,
            b: 0,
        });
        let day = plan.t / DAY;
        if let Some(r) = draw_return(t, &self.lines[first_line..], &mut self.rng) {
            let return_day = day + r.after_days;
            let time = return_day.saturating_mul(DAY).saturating_add(r.time_of_day);
            let contact = draw_order_contact(t, true, &mut self.rng);
            self.return_at(time, order, &r);
            if let Some(s) = contact {
                let at = (return_day + s.after_days) * DAY + s.time_of_day;
                self.support_at(at, s.topic, s.complexity);
            }
        }
        if let Some(s) = draw_order_contact(t, false, &mut self.rng) {
            let at = (day + s.after_days) * DAY + s.time_of_day;
            self.support_at(at, s.topic, s.complexity);
        }
    }

    /// Contacts not tied to an order, over the reachable span, thinned by decay.
    fn loose_contacts(&mut self, days: u32) {
        let t = self.t;
        let support_end = reach_end(t, days, SUPPORT_TAIL_DAYS);
        let span = support_end.saturating_sub(t.acquired);
        for _ in 0..poisson(t.support_per_week / 7.0 * f64::from(span), &mut self.rng) {
            let day = t.acquired + self.rng.random_range(0..span.max(1));
            let (topic, complexity) = draw_topic(t, &mut self.rng);
            let tod = season::time_of_day(&season::OFFICE_HOURS, &mut self.rng);
            if self.rng.random::<f64>() < t.decay_at(f64::from(day)) {
                self.support_at(day * DAY + tod, topic, complexity);
            }
        }
    }

    /// Records a return of `order` at `time`. Follow-ups of orders near the end fall after the
    /// history; they are spilled for the live stream, which emits them first, so returns and
    /// contacts do not dip at the hand-over.
    fn return_at(&mut self, time: u32, order: u32, r: &ReturnDraw) {
        if time < self.horizon {
            self.returns.push(ReturnRec {
                order,
                amount_cents: r.amount_cents,
                reason: r.reason,
            });
            self.recs.push(Rec {
                t: time,
                cust: self.cust,
                idx: self.returns.len() as u32 - 1,
                kind: Kind::Return,
                a: 0,
                b: 0,
            });
        } else {
            self.spill.push(Spill {
                t: time,
                cust: self.cust,
                kind: Kind::Return,
                order,
                amount_cents: r.amount_cents,
                a: r.reason,
                b: 0,
            });
        }
    }

    /// Records a support contact at `time`, or spills it past the history's end as
    /// [`Self::return_at`] does.
    fn support_at(&mut self, time: u32, topic: u8, complexity: u8) {
        if time < self.horizon {
            self.counters.support += 1;
            self.recs.push(Rec {
                t: time,
                cust: self.cust,
                idx: self.counters.support,
                kind: Kind::Support,
                a: topic,
                b: complexity,
            });
        } else {
            self.spill.push(Spill {
                t: time,
                cust: self.cust,
                kind: Kind::Support,
                order: 0,
                amount_cents: 0,
                a: topic,
                b: complexity,
            });
        }
    }
}

/// First day the customer can no longer act with the given tail after churn, within the period.
fn reach_end(t: &Traits, days: u32, tail: u32) -> u32 {
    t.churn_day
        .map_or(days, |c| c.saturating_add(tail).min(days))
        .max(t.acquired + 1)
}

/// Messaging per channel as alternating subscribed and unsubscribed spells: opens (and clicks)
/// while subscribed, an unsubscribe ending a spell, sometimes a re-subscribe starting another.
/// Returns the channels still subscribed at the end.
fn messaging(
    params: &ShopParams,
    t: &Traits,
    cust: u32,
    signup: u32,
    rng: &mut impl Rng,
    recs: &mut Vec<Rec>,
    counters: &mut Counters,
) -> u8 {
    let mut messages = Messaging {
        t,
        cust,
        horizon: params.days * DAY,
        end: reach_end(t, params.days, ENGAGEMENT_TAIL_DAYS) * DAY,
        recs,
        counters,
    };
    let mut still = 0u8;
    for channel in 0..4u8 {
        if messages.channel(channel, signup, rng) {
            still |= 1 << channel;
        }
    }
    still
}

/// One customer's messaging being drawn, and where its records go.
struct Messaging<'a> {
    t: &'a Traits,
    cust: u32,
    /// The history's end: engagement after it is not recorded.
    horizon: u32,
    /// The end of the customer's reach, in seconds since the shop's start.
    end: u32,
    recs: &'a mut Vec<Rec>,
    counters: &'a mut Counters,
}

impl Messaging<'_> {
    /// Records an engagement that falls inside the history.
    fn emit(&mut self, time: u32, channel: u8, action: u8) {
        if time < self.horizon {
            self.counters.engagement += 1;
            self.recs.push(Rec {
                t: time,
                cust: self.cust,
                idx: self.counters.engagement,
                kind: Kind::Engagement,
                a: channel,
                b: action,
            });
        }
    }

    /// One channel's spells from sign-up on; returns whether it is subscribed at the end.
    fn channel(&mut self, channel: u8, signup: u32, rng: &mut impl Rng) -> bool {
        let (t, end) = (self.t, self.end);
        let in_app = channel == 3;
        let mut subscribed = t.subscribed & (1 << channel) != 0;
        let mut cursor = signup;
        if subscribed && !in_app {
            // Opt-in at checkout, minutes after the first order.
            cursor = signup + rng.random_range(30..1800);
            self.emit(cursor, channel, SUBSCRIBE);
        } else if !subscribed && !in_app && rng.random::<f64>() < 0.08 && end > signup {
            cursor = rng.random_range(signup..end);
            self.emit(cursor, channel, SUBSCRIBE);
            subscribed = true;
        }
        while subscribed && cursor < end {
            let unsubscribe_at = if t.unsubscribe_per_week > 0.0 {
                let days = rng.sample::<f64, _>(Exp1) * 7.0 / t.unsubscribe_per_week;
                f64::from(cursor) + days * f64::from(DAY)
            } else {
                f64::INFINITY
            };
            let spell_end = unsubscribe_at.min(f64::from(end)) as u32;
            self.opens(channel, cursor, spell_end, rng);
            if unsubscribe_at >= f64::from(end) {
                break;
            }
            self.emit(spell_end, channel, UNSUBSCRIBE);
            subscribed = false;
            if !in_app && rng.random::<f64>() < 0.2 {
                let back = spell_end + rng.random_range(20..120) * DAY;
                if back < end {
                    self.emit(back, channel, SUBSCRIBE);
                    subscribed = true;
                    cursor = back;
                }
            }
        }
        subscribed
    }

    /// Opens (and their clicks) of one subscribed spell, from `cursor` to `spell_end`.
    fn opens(&mut self, channel: u8, cursor: u32, spell_end: u32, rng: &mut impl Rng) {
        let t = self.t;
        let rate = t.opens_per_week[usize::from(channel)] / 7.0;
        let first_day = cursor / DAY;
        let spell_days = spell_end.div_ceil(DAY).saturating_sub(first_day).max(1);
        for _ in 0..poisson(rate * f64::from(spell_end - cursor) / f64::from(DAY), rng) {
            let day = first_day + rng.random_range(0..spell_days);
            let at = day * DAY + season::time_of_day(&season::MESSAGE_HOURS, rng);
            let keep = rng.random::<f64>() < t.decay_at(f64::from(day));
            let click = rng.random::<f64>() < t.click;
            let click_after = rng.random_range(5..1800);
            // Opens drawn on the spell's partial first or last day can fall outside it.
            if !keep || at < cursor || at >= spell_end {
                continue;
            }
            self.emit(at, channel, OPEN);
            if click {
                self.emit(at + click_after, channel, CLICK);
            }
        }
    }
}
