//! Writing a shop's history as the four CSV files the batch subcommands ingest.
//!
//! Rows come straight from the compact records rather than from [`crate::domain::event::Event`]s:
//! at a million lines, skipping the per-line string allocations is most of the speed. The ids and
//! values are the same as [`Shop::history`] gives.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::behaviour::REASONS;
use super::events::{Kind, ACTION_NAMES, MESSAGE_CHANNEL_NAMES, ORDER_CHANNEL_NAMES};
use super::history::Rec;
use super::persona::TOPICS;
use super::{Shop, SynthError};

/// Column names of `orders.csv` (one row per order line); read by name elsewhere.
pub const ORDERS_HEADER: [&str; 9] = [
    "order_id",
    "customer_id",
    "event_time",
    "product_id",
    "category",
    "quantity",
    "unit_price",
    "list_price",
    "channel",
];
/// Column names of `returns.csv`.
pub const RETURNS_HEADER: [&str; 6] = [
    "return_id",
    "customer_id",
    "event_time",
    "order_id",
    "amount",
    "reason",
];
/// Column names of `support.csv`.
pub const SUPPORT_HEADER: [&str; 5] = [
    "contact_id",
    "customer_id",
    "event_time",
    "topic",
    "complexity",
];
/// Column names of `engagement.csv`.
pub const ENGAGEMENT_HEADER: [&str; 5] =
    ["event_id", "customer_id", "event_time", "channel", "action"];

/// What [`write_csv`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvSummary {
    /// Customers (all of whom have at least one order).
    pub customers: usize,
    /// Orders.
    pub orders: usize,
    /// Order lines: the rows of `orders.csv`.
    pub order_lines: usize,
    /// Rows of `returns.csv`.
    pub returns: usize,
    /// Rows of `support.csv`.
    pub support_contacts: usize,
    /// Rows of `engagement.csv`.
    pub engagements: usize,
    /// The files written: orders, returns, support, engagement.
    pub files: Vec<PathBuf>,
}

/// Writes `orders.csv` (one row per order line), `returns.csv`, `support.csv` and
/// `engagement.csv` into `dir` (created if missing, files replaced). Rows are in event-time
/// order, times are `YYYY-MM-DD HH:MM:SS` in UTC, money has two decimals.
pub fn write_csv(shop: &Shop, dir: &Path) -> Result<CsvSummary, SynthError> {
    fs::create_dir_all(dir).map_err(|source| SynthError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files = CsvFiles::create(dir)?;
    let h = &shop.history;
    let start = shop.params.start.unix();
    let mut clock = Clock::default();
    let mut numbers = [0u32; 4];
    let mut id = String::new();
    for rec in &h.recs {
        let n = &mut numbers[rec.kind as usize];
        *n += 1;
        id.clear();
        let _ = write!(id, "{}-{:08}", rec.kind.prefix(), *n);
        let time = clock.format(start + i64::from(rec.t));
        let customer = shop.ids[rec.cust as usize].as_str().as_bytes();
        files.write(shop, rec, [id.as_bytes(), customer, time])?;
    }
    let files = files.finish()?;
    Ok(CsvSummary {
        customers: shop.ids.len(),
        orders: h.orders.len(),
        order_lines: h.lines.len(),
        returns: numbers[Kind::Return as usize] as usize,
        support_contacts: numbers[Kind::Support as usize] as usize,
        engagements: numbers[Kind::Engagement as usize] as usize,
        files,
    })
}

/// The four files, and scratch cells reused so that formatting a row allocates nothing.
struct CsvFiles {
    orders: Out,
    returns: Out,
    support: Out,
    engagement: Out,
    other: String,
    a: String,
    b: String,
}

impl CsvFiles {
    /// Creates the four files in `dir`, each with its header.
    fn create(dir: &Path) -> Result<Self, SynthError> {
        Ok(Self {
            orders: Out::create(dir.join("orders.csv"), &ORDERS_HEADER)?,
            returns: Out::create(dir.join("returns.csv"), &RETURNS_HEADER)?,
            support: Out::create(dir.join("support.csv"), &SUPPORT_HEADER)?,
            engagement: Out::create(dir.join("engagement.csv"), &ENGAGEMENT_HEADER)?,
            other: String::new(),
            a: String::new(),
            b: String::new(),
        })
    }

    /// Writes one record's rows; `head` is its id, customer and time, the first three cells
    /// of every file.
    fn write(&mut self, shop: &Shop, rec: &Rec, head: [&[u8]; 3]) -> Result<(), SynthError> {
        let h = &shop.history;
        let [id, customer, time] = head;
        match rec.kind {
            Kind::Order => self.order_rows(shop, rec, head)?,
            Kind::Return => {
                let ret = h.returns[rec.idx as usize];
                self.other.clear();
                let _ = write!(self.other, "o-{:08}", h.order_number[ret.order as usize]);
                money(&mut self.a, ret.amount_cents);
                let reason = REASONS[usize::from(ret.reason) % REASONS.len()];
                self.returns.row(&[
                    id,
                    customer,
                    time,
                    self.other.as_bytes(),
                    self.a.as_bytes(),
                    reason.as_bytes(),
                ])?;
            }
            Kind::Support => {
                let topic = TOPICS[usize::from(rec.a) % TOPICS.len()];
                self.other.clear();
                let _ = write!(self.other, "{}", rec.b.clamp(1, 5));
                self.support
                    .row(&[id, customer, time, topic.as_bytes(), self.other.as_bytes()])?;
            }
            Kind::Engagement => {
                self.engagement.row(&[
                    id,
                    customer,
                    time,
                    MESSAGE_CHANNEL_NAMES[usize::from(rec.a) % 4].as_bytes(),
                    ACTION_NAMES[usize::from(rec.b) % 4].as_bytes(),
                ])?;
            }
        }
        Ok(())
    }

    /// One row per line of an order.
    fn order_rows(&mut self, shop: &Shop, rec: &Rec, head: [&[u8]; 3]) -> Result<(), SynthError> {
        let (h, catalogue) = (&shop.history, &shop.catalogue);
        let [id, customer, time] = head;
        let order = h.orders[rec.idx as usize];
        let from = order.first_line as usize;
        let channel = ORDER_CHANNEL_NAMES[usize::from(rec.a) % 4].as_bytes();
        for line in &h.lines[from..from + order.lines as usize] {
            let product = &catalogue.products[line.product as usize];
            let category = &catalogue.categories[usize::from(product.category)].name;
            self.other.clear();
            let _ = write!(self.other, "{}", line.quantity);
            money(&mut self.a, u64::from(line.unit_cents));
            money(&mut self.b, u64::from(product.list_cents));
            self.orders.row(&[
                id,
                customer,
                time,
                product.id.as_bytes(),
                category.as_bytes(),
                self.other.as_bytes(),
                self.a.as_bytes(),
                self.b.as_bytes(),
                channel,
            ])?;
        }
        Ok(())
    }

    /// Flushes the files; returns their paths: orders, returns, support, engagement.
    fn finish(self) -> Result<Vec<PathBuf>, SynthError> {
        Ok(vec![
            self.orders.finish()?,
            self.returns.finish()?,
            self.support.finish()?,
            self.engagement.finish()?,
        ])
    }
}

/// One output file and its path, for error messages.
struct Out {
    path: PathBuf,
    writer: csv::Writer<File>,
}

impl Out {
    fn create(path: PathBuf, header: &[&str]) -> Result<Self, SynthError> {
        let file = File::create(&path).map_err(|source| SynthError::Io {
            path: path.clone(),
            source,
        })?;
        let writer = csv::WriterBuilder::new()
            .buffer_capacity(1 << 20)
            .from_writer(file);
        let mut out = Self { path, writer };
        let header: Vec<&[u8]> = header.iter().map(|h| h.as_bytes()).collect();
        out.row(&header)?;
        Ok(out)
    }

    fn row(&mut self, fields: &[&[u8]]) -> Result<(), SynthError> {
        self.writer
            .write_record(fields)
            .map_err(|source| SynthError::Csv {
                path: self.path.clone(),
                source,
            })
    }

    fn finish(mut self) -> Result<PathBuf, SynthError> {
        self.writer.flush().map_err(|source| SynthError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.path)
    }
}

/// Writes cents as a decimal amount with two places.
fn money(out: &mut String, cents: u64) {
    out.clear();
    let _ = write!(out, "{}.{:02}", cents / 100, cents % 100);
}

/// Formats epoch seconds as `YYYY-MM-DD HH:MM:SS`, reusing the date part while the day stays
/// the same (rows are in time order, so it nearly always does).
#[derive(Default)]
struct Clock {
    day: Option<i64>,
    text: String,
}

impl Clock {
    fn format(&mut self, seconds: i64) -> &[u8] {
        let day = seconds.div_euclid(86_400);
        let second = seconds.rem_euclid(86_400);
        if self.day != Some(day) {
            self.day = Some(day);
            let (y, m, d) = civil_from_days(day);
            self.text.clear();
            let _ = write!(self.text, "{y:04}-{m:02}-{d:02} ");
        }
        self.text.truncate(11);
        let _ = write!(
            self.text,
            "{:02}:{:02}:{:02}",
            second / 3600,
            second / 60 % 60,
            second % 60
        );
        self.text.as_bytes()
    }
}

/// Proleptic Gregorian date of a day number since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::EventTime;

    #[test]
    fn clock_matches_chrono() {
        let mut clock = Clock::default();
        for t in [
            0i64,
            951_782_400,
            1_704_067_199,
            1_709_251_200 + 3_723,
            4_102_444_799,
        ] {
            let expected = EventTime::from_unix(t.max(631_152_000))
                .map(|e| e.to_rfc3339().replace('T', " ").replace('Z', ""))
                .unwrap_or_default();
            let got = String::from_utf8_lossy(clock.format(t.max(631_152_000))).into_owned();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn money_has_two_decimals() {
        let mut s = String::new();
        money(&mut s, 5);
        assert_eq!(s, "0.05");
        money(&mut s, 123_400);
        assert_eq!(s, "1234.00");
    }
}
