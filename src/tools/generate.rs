//! `segmentd generate`: writes a seeded synthetic shop as CSV files the other batch commands
//! read without any column mapping.

use std::time::Instant;

use anyhow::Context;

use std::path::PathBuf;

use crate::domain::time::EventTime;
use crate::synth::{write_csv, PersonaMix, Shop, ShopParams};
use clap::Args;

use crate::batch::text::count;

/// `segmentd generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Customers.
    #[arg(long, default_value_t = 10_000)]
    pub customers: usize,
    /// Order lines, exactly.
    #[arg(long, default_value_t = 100_000)]
    pub order_lines: usize,
    /// Days of history.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// First day (YYYY-MM-DD).
    #[arg(long, default_value = "2024-01-01")]
    pub start: String,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Persona mix, e.g. "big_spender=0.3,bargain_hunter=0.2" (default: the built-in mix).
    #[arg(long)]
    pub mix: Option<String>,
    /// Also write this many conversion scores (scores.csv, with conversions.csv) for
    /// `segmentd audiences`.
    #[arg(long, default_value_t = 0)]
    pub scores: usize,
    /// Products the scores are spread over.
    #[arg(long, default_value_t = 200)]
    pub products: usize,
    /// Visitors the scores belong to.
    #[arg(long, default_value_t = 100_000)]
    pub visitors: usize,
    /// Output directory.
    #[arg(long, short, value_name = "DIR", default_value = "shop")]
    pub out_dir: PathBuf,
    /// Also write the shop's history as the daemon's input events, one per line in time
    /// order, as `customer_id<TAB>event JSON` (events.jsonl): ready for
    /// `kcat -P -K '\t'`.
    #[arg(long)]
    pub events: bool,
}

/// Writes the shop's history as keyed input events (see [`GenerateArgs::events`]).
fn write_events(shop: &Shop, path: &std::path::Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut n = 0;
    for event in shop.history() {
        out.write_all(event.customer_id.as_str().as_bytes())?;
        out.write_all(b"\t")?;
        serde_json::to_writer(&mut out, &event)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// Runs the generator and prints what it wrote.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let start = EventTime::parse(&args.start).context("--start")?;
    let mix = match &args.mix {
        Some(text) => text.parse::<PersonaMix>().context("--mix")?,
        None => PersonaMix::default(),
    };
    let shop = Shop::new(ShopParams {
        customers: args.customers,
        order_lines: args.order_lines,
        start,
        days: args.days,
        seed: args.seed,
        mix,
    })?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let summary = write_csv(&shop, &args.out_dir)?;
    println!(
        "generated {} customers: {} orders ({} lines), {} returns, {} support contacts, {} engagements in {:.2} s",
        count(summary.customers as u64),
        count(summary.orders as u64),
        count(summary.order_lines as u64),
        count(summary.returns as u64),
        count(summary.support_contacts as u64),
        count(summary.engagements as u64),
        started.elapsed().as_secs_f64()
    );
    for file in &summary.files {
        println!("  {}", file.display());
    }
    if args.events {
        let path = args.out_dir.join("events.jsonl");
        let events =
            write_events(&shop, &path).with_context(|| format!("writing {}", path.display()))?;
        println!("  {} ({} events)", path.display(), count(events));
    }
    if args.scores > 0 {
        let started = Instant::now();
        let params = crate::synth::scores::ScoreParams {
            scores: args.scores,
            products: args.products,
            visitors: args.visitors,
            start,
            days: args.days,
            seed: args.seed,
        };
        let (scores, conversions) = crate::synth::scores::write_scores(&params, &args.out_dir)
            .with_context(|| format!("writing scores into {}", args.out_dir.display()))?;
        println!(
            "generated {} scores of {} visitors over {} products ({} conversions) in {:.2} s",
            count(scores),
            count(args.visitors as u64),
            count(args.products as u64),
            count(conversions),
            started.elapsed().as_secs_f64()
        );
        for name in ["scores.csv", "conversions.csv"] {
            println!("  {}", args.out_dir.join(name).display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Event;
    use crate::synth::ShopParams;

    #[test]
    fn events_file_holds_the_history_keyed_by_customer() {
        let shop = Shop::new(ShopParams {
            customers: 30,
            order_lines: 300,
            days: 30,
            seed: 5,
            ..ShopParams::default()
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let written = write_events(&shop, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<Event> = text
            .lines()
            .map(|line| {
                let (key, json) = line.split_once('\t').unwrap();
                let event: Event = serde_json::from_str(json).unwrap();
                assert_eq!(key, event.customer_id.as_str());
                event
            })
            .collect();
        assert_eq!(events.len() as u64, written);
        assert_eq!(events, shop.history().collect::<Vec<_>>());
    }
}
