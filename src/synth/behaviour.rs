//! Individual behaviour: the noisy traits a customer draws from their persona, and the draws
//! both the history planner and the live stream make from them (order lines, returns, support
//! contacts), so the two produce the same kind of customer.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp1, Poisson, StandardNormal};

use super::catalogue::{Catalogue, CATEGORIES};
use super::persona::{Persona, TOPICS};
use super::season::{self, Hours};

/// Independent random streams, so adding a draw to one stage never shifts the draws of another
/// (which would change every customer downstream and make diffs of generated data useless).
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub(crate) enum Stream {
    Catalogue = 1,
    Traits = 2,
    Plan = 3,
    Adjust = 4,
    Content = 5,
    Live = 6,
}

/// The random stream for one stage and one index (usually a customer number).
pub(crate) fn rng_for(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    let key = xxhash_rust::xxh3::xxh3_64_with_seed(&(stream as u64).to_le_bytes(), seed);
    let mut rng = ChaCha8Rng::seed_from_u64(key);
    rng.set_stream(index);
    rng
}

/// How many order channels personas weight (web, app, store, phone).
pub(crate) const CHANNEL_COUNT: usize = 4;
/// Index of the app in the order-channel weights.
const APP: usize = 1;

/// Return reasons.
pub(crate) const REASONS: [&str; 6] = [
    "wrong_size",
    "damaged",
    "not_as_described",
    "changed_mind",
    "late_delivery",
    "defective",
];
const REASON_WEIGHTS: [f64; 6] = [0.25, 0.12, 0.18, 0.25, 0.08, 0.12];
/// Serial returners send back what they never meant to keep.
const SERIAL_REASON_WEIGHTS: [f64; 6] = [0.35, 0.05, 0.15, 0.4, 0.02, 0.03];

/// Topic weights of a contact that follows an order.
const ORDER_TOPICS: [f64; 8] = [0.4, 0.15, 0.35, 0.0, 0.0, 0.0, 0.1, 0.0];
/// ... and of one that follows a return.
const RETURN_TOPICS: [f64; 8] = [0.15, 0.35, 0.15, 0.0, 0.0, 0.0, 0.35, 0.0];
/// How much harder than the customer's usual a contact on each topic is.
const TOPIC_COMPLEXITY: [f64; 8] = [0.0, 0.3, -0.6, 0.0, -0.2, 0.8, 0.9, -0.4];

/// Days a churned customer still opens messages.
pub(crate) const ENGAGEMENT_TAIL_DAYS: u32 = 45;
/// Days a churned customer may still contact support (about their last orders).
pub(crate) const SUPPORT_TAIL_DAYS: u32 = 30;

/// Most favourite products a customer keeps.
const FAVOURITES: usize = 8;

/// One customer's behaviour, drawn once from their persona.
#[derive(Debug, Clone)]
pub(crate) struct Traits {
    pub persona: Persona,
    /// Day (since the shop's start) of the first order.
    pub acquired: u32,
    /// Day the persona's trajectory (decay, churn) runs from: the acquisition, or the day a
    /// live stream redrew the persona.
    pub since: u32,
    /// Day from which the customer is gone, if they churn.
    pub churn_day: Option<u32>,
    /// Time constant of declining activity in days, 0 for none.
    pub decay_days: f64,
    /// Orders per week before the shop's calibration scale.
    pub order_rate: f64,
    pub extra_lines: f64,
    pub extra_units: f64,
    pub tier: f64,
    pub loyalty: f64,
    pub discount: f64,
    pub returns: f64,
    pub full_return: f64,
    pub support_per_week: f64,
    pub order_contact: f64,
    pub complexity: f64,
    pub opens_per_week: [f64; 4],
    pub click: f64,
    pub unsubscribe_per_week: f64,
    /// Message channels subscribed at sign-up, one bit per `MessageChannel::index`.
    pub subscribed: u8,
    /// Cumulative weights over order channels.
    pub channel_cdf: [f64; CHANNEL_COUNT],
    /// Favourite categories, most preferred first.
    pub categories: Box<[u16]>,
}

impl Traits {
    /// Draws a customer of the persona acquired on the given day.
    pub(crate) fn draw(
        persona: Persona,
        acquired: u32,
        catalogue: &Catalogue,
        rng: &mut impl Rng,
    ) -> Self {
        let p = persona.profile();
        let churn_day = (rng.random::<f64>() < p.churn).then(|| {
            let after = p.churn_after_days * rng.sample::<f64, _>(Exp1);
            acquired.saturating_add((after.min(1e6) as u32).max(1))
        });
        let mut channel_cdf = [0.0; CHANNEL_COUNT];
        let mut acc = 0.0;
        for (slot, w) in channel_cdf.iter_mut().zip(p.channels) {
            acc += w * log_normal(rng, 0.6);
            *slot = acc;
        }
        let app_share = (channel_cdf[APP] - channel_cdf[APP - 1]) / acc;
        let app_user = rng.random::<f64>() < (0.15 + 1.6 * app_share).min(1.0);
        let subscribe_odds = [0.85, 0.25, if app_user { 0.7 } else { 0.0 }, 0.0];
        let mut subscribed = 0u8;
        for (bit, odds) in subscribe_odds.iter().enumerate() {
            if rng.random::<f64>() < *odds {
                subscribed |= 1 << bit;
            }
        }
        // In-app messages reach every app user; there is no opting in.
        if app_user {
            subscribed |= 1 << 3;
        }
        let breadth = (p.breadth * log_normal(rng, 0.35)).round().clamp(1.0, 60.0) as usize;
        Self {
            persona,
            acquired,
            since: acquired,
            churn_day,
            decay_days: p.decay_days * log_normal(rng, 0.3),
            order_rate: p.orders_per_week * log_normal(rng, p.order_rate_sigma),
            extra_lines: p.extra_lines * log_normal(rng, 0.3),
            extra_units: p.extra_units * log_normal(rng, 0.3),
            tier: (p.price_tier + 0.1 * normal(rng)).clamp(0.02, 0.98),
            loyalty: jitter(p.loyalty, 0.5, rng),
            discount: jitter(p.discount, 0.5, rng),
            returns: jitter(p.returns, 0.5, rng),
            full_return: jitter(p.full_return, 0.4, rng),
            support_per_week: p.support_per_week * log_normal(rng, 0.5),
            order_contact: jitter(p.order_contact, 0.5, rng),
            complexity: (p.complexity + 0.35 * normal(rng)).clamp(1.0, 5.0),
            opens_per_week: p.opens_per_week.map(|o| o * log_normal(rng, 0.5)),
            click: jitter(p.click, 0.5, rng),
            unsubscribe_per_week: p.unsubscribe_per_week * log_normal(rng, 0.5),
            subscribed,
            channel_cdf,
            categories: favourite_categories(persona, breadth, catalogue, rng),
        }
    }

    /// Activity multiplier on `day` (fractional days since the shop's start), below 1 for
    /// customers who fade out.
    pub(crate) fn decay_at(&self, day: f64) -> f64 {
        if self.decay_days > 0.0 {
            (-(day - f64::from(self.since)).max(0.0) / self.decay_days).exp()
        } else {
            1.0
        }
    }

    /// Whether the customer still orders on `day`.
    pub(crate) fn active_on(&self, day: u32) -> bool {
        self.reachable_on(day, 0)
    }

    /// Whether the customer can still act on `day` when activity of this sort lingers `tail`
    /// days past churn (a churned customer still opens the odd e-mail).
    pub(crate) fn reachable_on(&self, day: u32, tail: u32) -> bool {
        day >= self.acquired && self.churn_day.is_none_or(|c| day < c.saturating_add(tail))
    }

    /// The channel of the next order: an index into web, app, store, phone.
    pub(crate) fn channel(&self, rng: &mut impl Rng) -> u8 {
        super::catalogue::pick(&self.channel_cdf, rng) as u8
    }
}

/// Hours at which orders through a channel are placed.
pub(crate) fn channel_hours(channel: u8) -> &'static Hours {
    match channel {
        2 => &season::STORE_HOURS,
        3 => &season::OFFICE_HOURS,
        _ => &season::ONLINE_HOURS,
    }
}

fn favourite_categories(
    persona: Persona,
    breadth: usize,
    catalogue: &Catalogue,
    rng: &mut impl Rng,
) -> Box<[u16]> {
    let breadth = breadth.min(CATEGORIES);
    let mut chosen: Vec<u16> = Vec::with_capacity(breadth);
    // Rejection keeps popular categories likelier; the cap stops broad customers spinning on
    // the long tail once the popular ones are taken.
    let mut attempts = 0;
    while chosen.len() < breadth && attempts < breadth * 20 {
        attempts += 1;
        let c = catalogue.category_for(persona, rng);
        if !chosen.contains(&c) {
            chosen.push(c);
        }
    }
    chosen.into_boxed_slice()
}

/// Products a customer keeps coming back to, in the order first bought.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Favourites {
    items: [u32; FAVOURITES],
    len: u8,
}

impl Favourites {
    fn pick(&self, rng: &mut impl Rng) -> Option<u32> {
        (self.len > 0).then(|| self.items[rng.random_range(0..usize::from(self.len))])
    }

    fn remember(&mut self, product: u32, rng: &mut impl Rng) {
        let len = usize::from(self.len);
        if self.items[..len].contains(&product) {
            return;
        }
        if len < FAVOURITES {
            self.items[len] = product;
            self.len += 1;
        } else if rng.random::<f64>() < 0.2 {
            // Tastes move slowly: an occasional new product displaces an old favourite.
            self.items[rng.random_range(0..FAVOURITES)] = product;
        }
    }
}

/// An order line in compact form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LineRec {
    pub product: u32,
    pub quantity: u16,
    pub unit_cents: u32,
}

/// Draws `n` lines of one order.
pub(crate) fn draw_lines(
    n: usize,
    traits: &Traits,
    favourites: &mut Favourites,
    catalogue: &Catalogue,
    rng: &mut impl Rng,
    out: &mut Vec<LineRec>,
) {
    let first = out.len();
    for _ in 0..n {
        let mut product = choose_product(traits, favourites, catalogue, rng);
        // A second pick avoids most duplicate lines without ever looping.
        if out[first..].iter().any(|l| l.product == product) {
            product = choose_product(traits, favourites, catalogue, rng);
        }
        favourites.remember(product, rng);
        let list = catalogue.products[product as usize].list_cents;
        let promo = rng.random::<f64>() < traits.discount;
        let unit_cents = if promo {
            let off = 10 + 5 * rng.random_range(0..=6u32);
            // Rounded to the cent; never above list because off >= 10%.
            ((u64::from(list) * u64::from(100 - off) + 50) / 100) as u32
        } else {
            list
        };
        let mut quantity = 1 + poisson(traits.extra_units, rng);
        if promo {
            // Deals are what people stock up on.
            quantity += poisson(traits.extra_units * 0.5, rng);
        }
        if rng.random::<f64>() < 0.015 {
            quantity = rng.random_range(4..=12);
        }
        out.push(LineRec {
            product,
            quantity: quantity.min(99) as u16,
            unit_cents,
        });
    }
}

fn choose_product(
    traits: &Traits,
    favourites: &Favourites,
    catalogue: &Catalogue,
    rng: &mut impl Rng,
) -> u32 {
    if rng.random::<f64>() < traits.loyalty {
        if let Some(p) = favourites.pick(rng) {
            return p;
        }
    }
    let category = if traits.categories.is_empty() || rng.random::<f64>() < 0.05 {
        // Even focused customers stray now and then.
        catalogue.popular_category(rng)
    } else {
        // Skewed to the first favourites: most of a customer's spend is in a couple of
        // categories even when they buy from many.
        let k = traits.categories.len();
        let at = (rng.random::<f64>().powf(1.8) * k as f64) as usize;
        traits.categories[at.min(k - 1)]
    };
    catalogue.product_near_tier(category, traits.tier, rng)
}

/// Total paid for an order, in cents.
pub(crate) fn total_cents(lines: &[LineRec]) -> u64 {
    lines
        .iter()
        .map(|l| u64::from(l.quantity) * u64::from(l.unit_cents))
        .sum()
}

/// A return drawn for an order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReturnDraw {
    /// Days after the order's day.
    pub after_days: u32,
    /// Seconds since midnight of that day.
    pub time_of_day: u32,
    pub amount_cents: u64,
    pub reason: u8,
}

/// Whether (and how much of) an order comes back: the whole order or some units of one line,
/// a few days later. The amount never exceeds the order's total.
pub(crate) fn draw_return(
    traits: &Traits,
    lines: &[LineRec],
    rng: &mut impl Rng,
) -> Option<ReturnDraw> {
    if lines.is_empty() || rng.random::<f64>() >= traits.returns {
        return None;
    }
    let amount_cents = if rng.random::<f64>() < traits.full_return {
        total_cents(lines)
    } else {
        let line = lines[rng.random_range(0..lines.len())];
        let units = rng.random_range(1..=line.quantity.max(1));
        u64::from(units) * u64::from(line.unit_cents)
    };
    let weights = if traits.persona == Persona::SerialReturner {
        &SERIAL_REASON_WEIGHTS
    } else {
        &REASON_WEIGHTS
    };
    let after_days = 2 + (5.0 * log_normal(rng, 0.5)).min(28.0) as u32;
    Some(ReturnDraw {
        after_days,
        time_of_day: season::time_of_day(&season::OFFICE_HOURS, rng),
        amount_cents,
        reason: weighted(weights, rng) as u8,
    })
}

/// A support contact drawn for an order (or its return).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ContactDraw {
    /// Days after the order's (or return's) day, at least 1.
    pub after_days: u32,
    pub time_of_day: u32,
    pub topic: u8,
    pub complexity: u8,
}

/// Whether an order or a return leads to a support contact, and about what.
pub(crate) fn draw_order_contact(
    traits: &Traits,
    after_return: bool,
    rng: &mut impl Rng,
) -> Option<ContactDraw> {
    let odds = if after_return {
        // A return is itself a reason to call: billing questions, complaints.
        (traits.order_contact * 3.0).min(0.9)
    } else {
        traits.order_contact
    };
    if rng.random::<f64>() >= odds {
        return None;
    }
    let weights = if after_return {
        &RETURN_TOPICS
    } else {
        &ORDER_TOPICS
    };
    let topic = weighted(weights, rng) as u8;
    Some(ContactDraw {
        after_days: rng.random_range(1..=6),
        time_of_day: season::time_of_day(&season::OFFICE_HOURS, rng),
        topic,
        complexity: complexity(traits, topic, rng),
    })
}

/// Topic and complexity of a contact not tied to an order.
pub(crate) fn draw_topic(traits: &Traits, rng: &mut impl Rng) -> (u8, u8) {
    let topic = weighted(&traits.persona.profile().topics, rng) as u8;
    (topic, complexity(traits, topic, rng))
}

fn complexity(traits: &Traits, topic: u8, rng: &mut impl Rng) -> u8 {
    let mean = traits.complexity + TOPIC_COMPLEXITY[usize::from(topic) % TOPICS.len()];
    (mean + 0.8 * normal(rng)).round().clamp(1.0, 5.0) as u8
}

/// Index drawn with probability proportional to its weight.
pub(crate) fn weighted(weights: &[f64], rng: &mut impl Rng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

/// Poisson draw. Inversion for small means: exact, cheap, and one uniform per draw at most a
/// handful of steps; the library's sampler for large ones.
pub(crate) fn poisson(mean: f64, rng: &mut impl Rng) -> u32 {
    if mean.is_nan() || mean <= 0.0 {
        return 0;
    }
    if mean < 30.0 {
        let mut p = (-mean).exp();
        let mut cdf = p;
        let u: f64 = rng.random();
        let mut k = 0u32;
        let cap = (mean * 10.0) as u32 + 50;
        while u > cdf && k < cap {
            k += 1;
            p *= mean / f64::from(k);
            cdf += p;
        }
        return k;
    }
    match Poisson::new(mean) {
        Ok(dist) => dist.sample(rng).min(f64::from(u32::MAX)) as u32,
        Err(_) => mean.round().min(f64::from(u32::MAX)) as u32,
    }
}

pub(crate) fn normal(rng: &mut impl Rng) -> f64 {
    rng.sample(StandardNormal)
}

/// Median-1 log-normal multiplier.
pub(crate) fn log_normal(rng: &mut impl Rng, sigma: f64) -> f64 {
    (sigma * normal(rng)).exp()
}

/// A probability moved on the logit scale, so it stays inside (0, 1) and 0 stays 0.
fn jitter(p: f64, sigma: f64, rng: &mut impl Rng) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    let logit = (p / (1.0 - p)).ln() + sigma * normal(rng);
    1.0 / (1.0 + (-logit).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_mean_is_about_right() {
        let mut rng = rng_for(1, Stream::Plan, 0);
        for mean in [0.3, 2.5, 45.0] {
            let n = 20_000;
            let total: u64 = (0..n).map(|_| u64::from(poisson(mean, &mut rng))).sum();
            let got = total as f64 / f64::from(n);
            assert!((got - mean).abs() < 0.05 * mean + 0.02, "{mean}: {got}");
        }
        assert_eq!(poisson(0.0, &mut rng), 0);
    }

    #[test]
    fn streams_are_independent() {
        let a: u64 = rng_for(1, Stream::Plan, 0).random();
        let b: u64 = rng_for(1, Stream::Plan, 1).random();
        let c: u64 = rng_for(1, Stream::Content, 0).random();
        let d: u64 = rng_for(2, Stream::Plan, 0).random();
        assert!(a != b && a != c && a != d);
        assert_eq!(a, rng_for(1, Stream::Plan, 0).random::<u64>());
    }
}
