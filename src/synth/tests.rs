//! Unit tests of the synthetic shop: seeded, checked against hand-worked values and the CSV round trip.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;
use crate::domain::event::{EngagementAction, EventBody, OrderChannel};

fn params(customers: usize, order_lines: usize, days: u32, seed: u64) -> ShopParams {
    ShopParams {
        customers,
        order_lines,
        days,
        seed,
        ..ShopParams::default()
    }
}

/// The default shop, generated once for the tests that only read it.
fn default_shop() -> &'static (Shop, Vec<Event>) {
    static SHOP: OnceLock<(Shop, Vec<Event>)> = OnceLock::new();
    SHOP.get_or_init(|| {
        let shop = Shop::new(ShopParams::default()).unwrap();
        let events = shop.history().collect();
        (shop, events)
    })
}

fn line_count(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| match &e.body {
            EventBody::Order(o) => o.lines.len(),
            _ => 0,
        })
        .sum()
}

fn order_total(event: &Event) -> f64 {
    match &event.body {
        EventBody::Order(o) => o.lines.iter().map(|l| l.amount()).sum(),
        _ => 0.0,
    }
}

#[test]
fn default_params_are_as_documented() {
    let p = ShopParams::default();
    assert_eq!(
        (p.customers, p.order_lines, p.days, p.seed),
        (10_000, 100_000, 365, 42)
    );
    assert_eq!(p.start.to_rfc3339(), "2024-01-01T00:00:00Z");
    assert_eq!(p.mix, PersonaMix::default());
}

#[test]
fn same_seed_gives_identical_events_and_files() {
    let p = params(1_500, 15_000, 120, 7);
    let a = Shop::new(p.clone()).unwrap();
    let b = Shop::new(p.clone()).unwrap();
    let events_a: Vec<Event> = a.history().collect();
    assert_eq!(events_a, b.history().collect::<Vec<_>>());

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sum_a = write_csv(&a, dir_a.path()).unwrap();
    let sum_b = write_csv(&b, dir_b.path()).unwrap();
    for (fa, fb) in sum_a.files.iter().zip(&sum_b.files) {
        assert_eq!(
            std::fs::read(fa).unwrap(),
            std::fs::read(fb).unwrap(),
            "{fa:?}"
        );
    }

    let c = Shop::new(ShopParams { seed: 8, ..p }).unwrap();
    let events_c: Vec<Event> = c.history().collect();
    assert_ne!(events_a, events_c);
    let dir_c = tempfile::tempdir().unwrap();
    let sum_c = write_csv(&c, dir_c.path()).unwrap();
    assert_ne!(
        std::fs::read(&sum_a.files[0]).unwrap(),
        std::fs::read(&sum_c.files[0]).unwrap()
    );
    // Same line total whatever the seed.
    assert_eq!(sum_c.order_lines, 15_000);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn order_lines_add_up_exactly(
        customers in 1usize..300,
        extra in 0usize..4_000,
        days in 1u32..400,
        seed in any::<u64>(),
    ) {
        let shop = Shop::new(params(customers, customers + extra, days, seed)).unwrap();
        let events: Vec<Event> = shop.history().collect();
        prop_assert_eq!(line_count(&events), customers + extra);
        let mut buyers = HashSet::new();
        for e in &events {
            if let EventBody::Order(o) = &e.body {
                prop_assert!(!o.lines.is_empty());
                buyers.insert(e.customer_id.clone());
            }
        }
        prop_assert_eq!(buyers.len(), customers);
    }

    #[test]
    fn shifted_mix_is_always_far(weights in proptest::collection::vec(0.0f64..10.0, Persona::COUNT)) {
        let pairs: Vec<(Persona, f64)> = Persona::ALL.into_iter().zip(weights).collect();
        if let Ok(mix) = PersonaMix::new(&pairs) {
            prop_assert!(mix.shifted().distance(&mix) >= PersonaMix::MIN_SHIFT);
        }
    }
}

#[test]
fn minimal_line_budget_gives_one_single_line_order_each() {
    let shop = Shop::new(params(500, 500, 30, 3)).unwrap();
    let orders: Vec<Event> = shop
        .history()
        .filter(|e| matches!(e.body, EventBody::Order(_)))
        .collect();
    assert_eq!(orders.len(), 500);
    assert_eq!(line_count(&orders), 500);
}

#[test]
fn every_event_is_valid_and_inside_the_period() {
    let (shop, events) = default_shop();
    let start = shop.params().start.unix();
    let end = start + i64::from(shop.params().days) * 86_400;
    let known: HashSet<&CustomerId> = shop.customer_ids().iter().collect();
    let mut ids = HashSet::new();
    let mut last = start;
    for e in events {
        e.validate().unwrap();
        let t = e.event_time.unix();
        assert!((start..end).contains(&t), "{e:?}");
        assert!(t >= last, "out of order: {e:?}");
        last = t;
        assert!(
            ids.insert(e.event_id.clone()),
            "duplicate id {}",
            e.event_id
        );
        assert!(known.contains(&e.customer_id));
        if let EventBody::Order(o) = &e.body {
            assert_eq!(o.order_id.as_deref(), Some(e.event_id.as_str()));
            let channel = o.channel.unwrap();
            let hour = t.rem_euclid(86_400) / 3600;
            if channel == OrderChannel::Store {
                assert!((9..20).contains(&hour), "store order at {hour}h");
            }
            for l in &o.lines {
                let list = l.list_price.unwrap();
                assert!(l.unit_price <= list && l.unit_price > 0.0);
                assert!(l.unit_price >= list * 0.6 - 0.01, "more than 40% off");
                assert!(l.quantity >= 1.0 && l.quantity.fract() == 0.0);
                assert!(l.product_id.is_some() && l.category.is_some());
            }
        }
    }
    assert_eq!(line_count(events), shop.params().order_lines);
    assert!(events[0].event_id.starts_with("o-"));
}

#[test]
fn returns_refer_to_earlier_orders_of_the_same_customer() {
    let (_, events) = default_shop();
    let mut orders = HashMap::new();
    let mut returns = 0;
    for e in events {
        match &e.body {
            EventBody::Order(o) => {
                let id = o.order_id.clone().unwrap();
                orders.insert(id, (e.customer_id.clone(), e.event_time, order_total(e)));
            }
            EventBody::Return(r) => {
                returns += 1;
                let (customer, time, total) = &orders[r.order_id.as_deref().unwrap()];
                assert_eq!(customer, &e.customer_id);
                assert!(*time < e.event_time);
                assert!(
                    r.amount > 0.0 && r.amount <= total + 1e-6,
                    "{r:?} of {total}"
                );
                assert!(r.reason.is_some());
            }
            _ => {}
        }
    }
    assert!(returns > 100);
}

#[test]
fn every_kind_and_value_appears() {
    let (_, events) = default_shop();
    let mut kinds = HashSet::new();
    let mut channels = HashSet::new();
    let mut actions = HashSet::new();
    let mut topics = HashSet::new();
    let mut complexities = HashSet::new();
    for e in events {
        kinds.insert(e.body.kind());
        match &e.body {
            EventBody::Order(o) => {
                channels.insert(format!("{:?}", o.channel));
            }
            EventBody::Engagement(g) => {
                channels.insert(format!("{:?}", g.channel));
                actions.insert(format!("{:?}", g.action));
            }
            EventBody::SupportContact(s) => {
                topics.insert(s.topic.clone());
                complexities.insert(s.complexity as u8);
            }
            EventBody::Return(_) => {}
        }
    }
    assert_eq!(kinds.len(), 4);
    assert_eq!(channels.len(), 8, "{channels:?}");
    assert_eq!(actions.len(), 4);
    assert_eq!(topics.len(), 8);
    assert_eq!(complexities, (1..=5).collect());
}

#[test]
fn persona_shares_follow_the_mix() {
    let shop = Shop::new(params(20_000, 20_000, 30, 11)).unwrap();
    let mut counts = [0usize; Persona::COUNT];
    for id in shop.customer_ids() {
        counts[shop.persona_of(id).unwrap().index()] += 1;
    }
    let mix = &shop.params().mix;
    for p in Persona::ALL {
        let share = counts[p.index()] as f64 / 20_000.0;
        assert!((share - mix.share(p)).abs() < 0.015, "{p}: {share}");
    }

    let mix: PersonaMix = "big_spender=1,explorer=3".parse().unwrap();
    let shop = Shop::new(ShopParams {
        mix,
        ..params(4_000, 4_000, 30, 12)
    })
    .unwrap();
    let explorers = shop
        .customer_ids()
        .iter()
        .filter(|id| shop.persona_of(id) == Some(Persona::Explorer))
        .count();
    let spenders = shop
        .customer_ids()
        .iter()
        .filter(|id| shop.persona_of(id) == Some(Persona::BigSpender))
        .count();
    assert_eq!(explorers + spenders, 4_000);
    assert!((explorers as f64 / 4_000.0 - 0.75).abs() < 0.03);
    assert_eq!(
        shop.persona_of(&CustomerId::parse("C0004001").unwrap()),
        None
    );
    assert_eq!(shop.persona_of(&CustomerId::parse("C1").unwrap()), None);
}

/// Per-persona averages over the default shop.
#[derive(Default, Debug)]
struct Stats {
    lines: f64,
    discounted: f64,
    repeat_product_lines: f64,
    spend: f64,
    orders: f64,
    returns: f64,
    support: f64,
    customers: f64,
    last_order_day: f64,
}

fn persona_stats() -> HashMap<Persona, Stats> {
    let (shop, events) = default_shop();
    let mut stats: HashMap<Persona, Stats> = HashMap::new();
    let mut bought: HashMap<&CustomerId, HashSet<&str>> = HashMap::new();
    let mut last: HashMap<&CustomerId, f64> = HashMap::new();
    for id in shop.customer_ids() {
        stats
            .entry(shop.persona_of(id).unwrap())
            .or_default()
            .customers += 1.0;
    }
    for e in events {
        let s = stats
            .entry(shop.persona_of(&e.customer_id).unwrap())
            .or_default();
        match &e.body {
            EventBody::Order(o) => {
                s.orders += 1.0;
                let seen = bought.entry(&e.customer_id).or_default();
                for l in &o.lines {
                    s.lines += 1.0;
                    s.spend += l.amount();
                    s.discounted += f64::from(u8::from(l.is_discounted() == Some(true)));
                    let product = l.product_id.as_deref().unwrap();
                    s.repeat_product_lines += f64::from(u8::from(!seen.insert(product)));
                }
                last.insert(&e.customer_id, e.event_time.days_since(shop.params().start));
            }
            EventBody::Return(_) => s.returns += 1.0,
            EventBody::SupportContact(_) => s.support += 1.0,
            EventBody::Engagement(_) => {}
        }
    }
    for (id, day) in last {
        stats
            .entry(shop.persona_of(id).unwrap())
            .or_default()
            .last_order_day += day;
    }
    stats
}

fn leader(stats: &HashMap<Persona, Stats>, f: impl Fn(&Stats) -> f64) -> Persona {
    Persona::ALL
        .into_iter()
        .max_by(|a, b| f(&stats[a]).total_cmp(&f(&stats[b])))
        .unwrap()
}

#[test]
fn personas_stand_apart() {
    let s = persona_stats();
    assert_eq!(
        leader(&s, |x| x.discounted / x.lines),
        Persona::BargainHunter
    );
    assert_eq!(leader(&s, |x| x.spend / x.lines), Persona::BigSpender);
    assert_eq!(leader(&s, |x| x.spend / x.customers), Persona::BigSpender);
    assert_eq!(
        leader(&s, |x| x.returns / x.orders),
        Persona::SerialReturner
    );
    assert_eq!(leader(&s, |x| x.support / x.customers), Persona::HelpSeeker);
    assert_eq!(
        leader(&s, |x| x.orders / x.customers),
        Persona::LoyalRegular
    );
    assert_eq!(
        leader(&s, |x| x.repeat_product_lines / x.lines),
        Persona::LoyalRegular
    );
    assert_eq!(
        leader(&s, |x| -x.repeat_product_lines / x.lines),
        Persona::Explorer
    );
    assert_eq!(
        leader(&s, |x| -x.last_order_day / x.customers),
        Persona::Lapsing
    );
    assert_eq!(
        leader(&s, |x| x.last_order_day / x.customers),
        Persona::NewCustomer
    );
    assert_eq!(leader(&s, |x| -x.orders / x.customers), Persona::Occasional);
}

#[test]
fn orders_peak_on_weekends_and_in_december() {
    let (shop, events) = default_shop();
    let start = shop.params().start;
    let mut by_weekday = [0.0; 7];
    let mut by_month = [0.0; 12];
    for e in events
        .iter()
        .filter(|e| matches!(e.body, EventBody::Order(_)))
    {
        by_weekday[e.event_time.weekday() as usize] += 1.0;
        let month = e.event_time.to_rfc3339()[5..7].parse::<usize>().unwrap();
        by_month[month - 1] += 1.0;
    }
    let weekend = (by_weekday[5] + by_weekday[6]) / 2.0;
    let weekdays = by_weekday[..5].iter().sum::<f64>() / 5.0;
    assert!(weekend > 1.15 * weekdays, "{by_weekday:?}");
    // The customer base grows over the year, so compare with the neighbouring months.
    assert!(by_month[11] > 1.2 * by_month[10], "{by_month:?}");
    assert!(
        by_month[6] < by_month[5] && by_month[7] < by_month[8],
        "{by_month:?}"
    );
    assert_eq!(start.weekday(), 0);
}

#[test]
fn csv_files_match_the_history() {
    let shop = Shop::new(params(800, 8_000, 90, 5)).unwrap();
    let events: Vec<Event> = shop.history().collect();
    let dir = tempfile::tempdir().unwrap();
    let summary = write_csv(&shop, dir.path()).unwrap();
    let names: Vec<String> = summary
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["orders.csv", "returns.csv", "support.csv", "engagement.csv"]
    );

    let orders = read_csv_rows(&summary.files[0], &ORDERS_HEADER);
    let returns = read_csv_rows(&summary.files[1], &RETURNS_HEADER);
    let support = read_csv_rows(&summary.files[2], &SUPPORT_HEADER);
    let engagement = read_csv_rows(&summary.files[3], &ENGAGEMENT_HEADER);
    assert_eq!(summary.customers, 800);
    assert_eq!(orders.len(), 8_000);
    assert_eq!(summary.order_lines, 8_000);
    assert_eq!(returns.len(), summary.returns);
    assert_eq!(support.len(), summary.support_contacts);
    assert_eq!(engagement.len(), summary.engagements);

    let mut rows = [
        orders.iter(),
        returns.iter(),
        support.iter(),
        engagement.iter(),
    ];
    let mut order_count = 0;
    for e in &events {
        if matches!(e.body, EventBody::Order(_)) {
            order_count += 1;
        }
        for (file, expected) in expected_csv_rows(e) {
            let row = rows[file].next().unwrap();
            assert_eq!(row, &expected[..]);
        }
    }
    assert_eq!(order_count, summary.orders);
    assert!(rows[0].next().is_none() && rows[3].next().is_none());
    // Times written are the domain's own parseable format.
    assert!(EventTime::parse(&orders[0][2]).is_ok());
}

/// The data rows of a CSV file, after checking its header.
fn read_csv_rows(path: &std::path::Path, header: &[&str]) -> Vec<csv::StringRecord> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    assert_eq!(reader.headers().unwrap(), header);
    reader.records().map(Result::unwrap).collect()
}

/// The rows `write_csv` should write for an event: (file, in `summary.files` order; cells).
fn expected_csv_rows(e: &Event) -> Vec<(usize, Vec<String>)> {
    let time = |e: &Event| e.event_time.to_rfc3339().replace('T', " ").replace('Z', "");
    let money = |x: f64| format!("{x:.2}");
    match &e.body {
        EventBody::Order(o) => o
            .lines
            .iter()
            .map(|l| {
                let channel = format!("{:?}", o.channel.unwrap()).to_lowercase();
                let expected = vec![
                    e.event_id.clone(),
                    e.customer_id.to_string(),
                    time(e),
                    l.product_id.clone().unwrap().into(),
                    l.category.clone().unwrap().into(),
                    format!("{}", l.quantity),
                    money(l.unit_price),
                    money(l.list_price.unwrap()),
                    channel,
                ];
                (0, expected)
            })
            .collect(),
        EventBody::Return(r) => {
            let expected = vec![
                e.event_id.clone(),
                e.customer_id.to_string(),
                time(e),
                r.order_id.clone().unwrap(),
                money(r.amount),
                r.reason.clone().unwrap(),
            ];
            vec![(1, expected)]
        }
        EventBody::SupportContact(s) => {
            let expected = vec![
                e.event_id.clone(),
                e.customer_id.to_string(),
                time(e),
                s.topic.clone(),
                format!("{}", s.complexity),
            ];
            vec![(2, expected)]
        }
        EventBody::Engagement(g) => {
            let json = |v: String| v.trim_matches('"').to_owned();
            let expected = vec![
                e.event_id.clone(),
                e.customer_id.to_string(),
                time(e),
                json(serde_json::to_string(&g.channel).unwrap()),
                json(serde_json::to_string(&g.action).unwrap()),
            ];
            vec![(3, expected)]
        }
    }
}

#[test]
fn mix_strings_parse_and_round_trip() {
    let mix: PersonaMix = " Big_Spender = 0.3, bargain_hunter=0.2 ,occasional=0.5,"
        .parse()
        .unwrap();
    assert!((mix.share(Persona::BigSpender) - 0.3).abs() < 1e-12);
    assert_eq!(mix.share(Persona::LoyalRegular), 0.0);
    let back: PersonaMix = mix.to_string().parse().unwrap();
    assert!(back.distance(&mix) < 1e-6);
    let default_back: PersonaMix = PersonaMix::default().to_string().parse().unwrap();
    assert!(default_back.distance(&PersonaMix::default()) < 1e-6);
    let weights: PersonaMix = "explorer=2,lapsing=6".parse().unwrap();
    assert!((weights.share(Persona::Lapsing) - 0.75).abs() < 1e-12);
    for p in Persona::ALL {
        assert_eq!(p.name().parse::<Persona>().unwrap(), p);
        assert_eq!(p.to_string(), p.name());
    }
    let json = serde_json::to_string(&mix).unwrap();
    assert_eq!(serde_json::from_str::<PersonaMix>(&json).unwrap(), mix);
}

#[test]
fn bad_mix_strings_say_what_is_wrong() {
    let err = |s: &str| s.parse::<PersonaMix>().unwrap_err();
    assert_eq!(err(""), MixError::Empty);
    assert_eq!(err(" , "), MixError::Empty);
    assert_eq!(
        err("big_spender"),
        MixError::MissingWeight {
            entry: "big_spender".into()
        }
    );
    let unknown = err("whale=1");
    assert_eq!(
        unknown,
        MixError::UnknownPersona {
            name: "whale".into()
        }
    );
    assert!(unknown.to_string().contains("serial_returner"), "{unknown}");
    assert_eq!(
        err("explorer=lots"),
        MixError::BadWeight {
            persona: Persona::Explorer,
            text: "lots".into()
        }
    );
    assert!(matches!(
        err("explorer=-1"),
        MixError::InvalidWeight {
            persona: Persona::Explorer,
            ..
        }
    ));
    assert!(matches!(
        err("explorer=NaN"),
        MixError::InvalidWeight { .. }
    ));
    assert_eq!(
        err("explorer=1,explorer=2"),
        MixError::Duplicate {
            persona: Persona::Explorer
        }
    );
    assert_eq!(err("explorer=0,lapsing=0"), MixError::ZeroTotal);
}

#[test]
fn shifted_mix_differs() {
    let mix = PersonaMix::default();
    let shifted = mix.shifted();
    assert!(shifted.distance(&mix) >= PersonaMix::MIN_SHIFT);
    assert!(shifted.share(Persona::BargainHunter) > mix.share(Persona::BargainHunter));
    assert!(shifted.share(Persona::LoyalRegular) < mix.share(Persona::LoyalRegular));
    for p in Persona::ALL {
        let only = PersonaMix::only(p);
        assert!(
            only.shifted().distance(&only) >= PersonaMix::MIN_SHIFT,
            "{p}"
        );
    }
}

#[test]
fn bad_params_are_refused() {
    let ok = params(10, 100, 10, 1);
    let check = |p: ShopParams| Shop::new(p).unwrap_err();
    assert!(matches!(
        check(ShopParams {
            customers: 0,
            ..ok.clone()
        }),
        SynthError::NoCustomers
    ));
    assert!(matches!(
        check(ShopParams {
            days: 0,
            ..ok.clone()
        }),
        SynthError::NoDays
    ));
    assert!(matches!(
        check(ShopParams {
            order_lines: 9,
            ..ok.clone()
        }),
        SynthError::TooFewLines {
            lines: 9,
            customers: 10
        }
    ));
    assert!(matches!(
        check(ShopParams {
            order_lines: MAX_ORDER_LINES + 1,
            ..ok.clone()
        }),
        SynthError::TooManyLines(_)
    ));
    assert!(matches!(
        check(ShopParams {
            start: EventTime::parse("2024-01-01 10:00:00").unwrap(),
            ..ok.clone()
        }),
        SynthError::StartNotMidnight(_)
    ));
    assert!(matches!(
        check(ShopParams {
            start: EventTime::parse("2099-12-01").unwrap(),
            days: 60,
            ..ok.clone()
        }),
        SynthError::PeriodOutOfRange { .. }
    ));
    assert!(Shop::new(ok).is_ok());
}

fn live_shop() -> Shop {
    Shop::new(params(2_000, 20_000, 120, 21)).unwrap()
}

#[test]
fn live_stream_continues_the_history_in_order() {
    let shop = live_shop();
    let history: Vec<Event> = shop.history().collect();
    let history_ids: HashSet<&str> = history.iter().map(|e| e.event_id.as_str()).collect();
    let end = shop.params().start.unix() + 120 * 86_400;
    let horizon = end + 40 * 86_400;
    let events: Vec<Event> = shop
        .live(7)
        .take_while(|e| e.event_time.unix() < horizon)
        .collect();
    assert!(events.len() > 1_000, "{}", events.len());
    let mut last = end;
    let mut ids = HashSet::new();
    let mut orders: HashMap<String, _> = history
        .iter()
        .filter(|e| matches!(e.body, EventBody::Order(_)))
        .map(|e| {
            (
                e.event_id.clone(),
                (e.customer_id.clone(), e.event_time, order_total(e)),
            )
        })
        .collect();
    let mut kinds = HashSet::new();
    let mut returns_of_history_orders = 0;
    for e in &events {
        e.validate().unwrap();
        assert!(e.event_time.unix() >= last, "out of order: {e:?}");
        last = e.event_time.unix();
        assert!(ids.insert(e.event_id.clone()));
        assert!(!history_ids.contains(e.event_id.as_str()));
        kinds.insert(e.body.kind());
        match &e.body {
            EventBody::Order(o) => {
                orders.insert(
                    o.order_id.clone().unwrap(),
                    (e.customer_id.clone(), e.event_time, order_total(e)),
                );
            }
            EventBody::Return(r) => {
                let order_id = r.order_id.as_deref().unwrap();
                let (customer, time, total) = &orders[order_id];
                assert_eq!(customer, &e.customer_id);
                assert!(*time < e.event_time && r.amount <= total + 1e-6);
                returns_of_history_orders += usize::from(history_ids.contains(order_id));
            }
            _ => {}
        }
        // Events travel to Kafka as JSON.
        let json = serde_json::to_string(e).unwrap();
        assert_eq!(&serde_json::from_str::<Event>(&json).unwrap(), e);
    }
    assert_eq!(kinds.len(), 4);
    // Returns of the history's last orders come first in the stream.
    assert!(returns_of_history_orders > 0);

    let again: Vec<Event> = shop.live(7).take(events.len()).collect();
    assert_eq!(again, events);
    let other: Vec<Event> = shop.live(8).take(100).collect();
    assert_ne!(other[..], events[..100]);

    let later = shop.live_from(200, 7).next().unwrap();
    assert!(later.event_time.unix() >= shop.params().start.unix() + 200 * 86_400);
    let clamped = shop.live_from(3, 7).next().unwrap();
    assert_eq!(clamped, events[0]);
}

/// Share of the live orders of `days` days, from the stream's position on, placed by customers
/// whose current persona is `persona`.
fn order_share(live: &mut LiveStream, start: i64, days: i64, persona: Persona) -> f64 {
    let until = start + (i64::from(live.next_day()) + days) * 86_400;
    let (mut all, mut theirs) = (0.0, 0.0);
    while let Some(e) = live.next() {
        if e.event_time.unix() >= until {
            break;
        }
        if matches!(e.body, EventBody::Order(_)) {
            all += 1.0;
            if live.persona_of(&e.customer_id) == Some(persona) {
                theirs += 1.0;
            }
        }
    }
    theirs / all
}

#[test]
fn set_mix_changes_who_is_active() {
    let shop = live_shop();
    let start = shop.params().start.unix();
    let mut live = shop.live(3);
    let before = order_share(&mut live, start, 30, Persona::BargainHunter);
    let arrivals_before = live.customers();
    live.set_mix(PersonaMix::only(Persona::BargainHunter));
    assert_eq!(live.mix(), &PersonaMix::only(Persona::BargainHunter));
    // Drop the rest of the day generated before the change.
    let boundary = start + i64::from(live.next_day()) * 86_400;
    let mut first_after = None;
    for e in live.by_ref() {
        if e.event_time.unix() >= boundary {
            first_after = Some(e);
            break;
        }
    }
    assert!(first_after.is_some());
    let after = order_share(&mut live, start, 30, Persona::BargainHunter);
    assert!(after > before + 0.15, "before {before}, after {after}");
    // Arrivals after the change are all bargain hunters.
    for n in arrivals_before + 1..live.customers() {
        let id = CustomerId::parse(&format!("C{:07}", n + 1)).unwrap();
        assert_eq!(live.persona_of(&id), Some(Persona::BargainHunter));
    }
    assert!(live.customers() > arrivals_before);
}

#[test]
fn live_stream_keeps_messaging_going() {
    let shop = live_shop();
    let actions: HashSet<String> = shop
        .live(1)
        .take(20_000)
        .filter_map(|e| match e.body {
            EventBody::Engagement(g) => Some(format!("{:?}", g.action)),
            _ => None,
        })
        .collect();
    assert!(actions.contains(&format!("{:?}", EngagementAction::Open)));
    assert!(actions.contains(&format!("{:?}", EngagementAction::Click)));
    assert!(actions.contains(&format!("{:?}", EngagementAction::Subscribe)));
}

#[test]
fn shop_and_stream_can_move_to_other_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Shop>();
    send::<LiveStream>();
}

#[test]
fn history_states_are_the_history_applied_per_customer() {
    let shop = Shop::new(ShopParams {
        customers: 40,
        order_lines: 600,
        days: 60,
        ..ShopParams::default()
    })
    .unwrap();
    let params = crate::domain::state::StateParams::default();
    let (states, last) = shop.history_states(&params);
    assert_eq!(states.len(), 40);
    let mut by_hand = std::collections::BTreeMap::new();
    for e in shop.history() {
        by_hand
            .entry(e.customer_id.clone())
            .or_insert_with(crate::domain::state::CustomerState::default)
            .apply(&e, &params);
    }
    for (id, state) in shop.customer_ids().iter().zip(&states) {
        assert_eq!(Some(state), by_hand.get(id), "{id}");
    }
    assert_eq!(last, shop.history().last().map(|e| e.event_time));
}
