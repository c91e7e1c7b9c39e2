//! The rows of a file, split into fields and parsed on a thread of their own, ahead of the
//! reader that groups them into events (the parent module).
//!
//! Everything about a row that depends on the row alone is worked out here: the fields'
//! trimmed text, the checked customer id, the event time, the numbers, the
//! event's body and its id's fingerprint, an order line and its group. The reader's thread
//! keeps what depends on the rows before: the customers' numbers, the open orders and the
//! counts. That splits a file's work about evenly between the two threads, where the reader
//! alone used to be the slowest stage of the pipeline.

use compact_str::CompactString;
use csv::StringRecord;

use crate::batch::mapping::{Field, FileKind, ResolvedColumns};
use crate::domain::event::{
    event_id_hash, CustomerId, Engagement, EngagementAction, Event, EventBody, EventError,
    MessageChannel, OrderChannel, OrderLine, Return, SupportContact,
};
use crate::domain::time::{EventTime, FUTURE_SLACK_SECONDS};

/// A CSV reader over the file.
pub(super) type InputCsv = csv::Reader<Box<dyn std::io::Read + Send>>;

/// Rows the tokeniser hands over at once, and chunks of them waiting.
pub(super) const ROWS_PER_CHUNK: usize = 1_024;
pub(super) const ROW_CHUNKS_WAITING: usize = 4;

/// One row as the tokeniser read it: its fields and what they parse to, or why they could not
/// be read.
pub(super) struct Tokenised {
    /// The line the reader was on before the row (for an error without a position).
    pub(super) line: u64,
    pub(super) record: StringRecord,
    pub(super) read: RowRead,
}

/// What became of a row the tokeniser read.
pub(super) enum RowRead {
    /// Nothing yet, or taken by the reader.
    Taken,
    /// The CSV layer could not read the row.
    Unreadable(csv::Error),
    /// The row, parsed.
    Parsed(Result<Parsed, RowError>),
}

/// A chunk of rows: the first `len` are filled. Chunks go back to the tokeniser once read, so
/// the records' buffers are reused rather than allocated for every row.
pub(super) struct Rows {
    pub(super) rows: Vec<Tokenised>,
    pub(super) len: usize,
}

/// Splits the file's rows into fields (the CSV layer: quoting, UTF-8, line numbers) and parses
/// them, a chunk at a time, for the reader to group on its own thread. Stops at the end of the
/// file, after an I/O error, or when the reader stops taking chunks.
pub(super) fn tokenise(
    mut csv: InputCsv,
    mut parser: RowParser,
    to_reader: &std::sync::mpsc::SyncSender<Rows>,
    spent: &std::sync::mpsc::Receiver<Rows>,
) {
    loop {
        let mut chunk = spent.try_recv().unwrap_or_else(|_| Rows {
            rows: Vec::with_capacity(ROWS_PER_CHUNK),
            len: 0,
        });
        let mut end = false;
        while chunk.len < ROWS_PER_CHUNK {
            if chunk.len == chunk.rows.len() {
                chunk.rows.push(Tokenised {
                    line: 0,
                    record: StringRecord::new(),
                    read: RowRead::Taken,
                });
            }
            let row = &mut chunk.rows[chunk.len];
            row.line = csv.position().line() + u64::from(csv.position().line() == 0);
            match csv.read_record(&mut row.record) {
                Ok(false) => {
                    end = true;
                    break;
                }
                Ok(true) => row.read = RowRead::Parsed(parser.parse(&row.record)),
                Err(err) => {
                    end = matches!(err.kind(), csv::ErrorKind::Io(_));
                    row.read = RowRead::Unreadable(err);
                }
            }
            chunk.len += 1;
            if end {
                break;
            }
        }
        if (chunk.len > 0 && to_reader.send(chunk).is_err()) || end {
            return;
        }
    }
}

/// Why a row did not become (part of) an event.
pub(super) enum RowError {
    /// A bad row, with the reason.
    Bad(String),
    /// A good row after the as-of time: left out on purpose, counted apart.
    AfterAsOf,
}

impl From<String> for RowError {
    fn from(reason: String) -> Self {
        Self::Bad(reason)
    }
}

impl From<&str> for RowError {
    fn from(reason: &str) -> Self {
        Self::Bad(reason.to_owned())
    }
}

/// A piece of a record's text, as a byte range of [`StringRecord::as_slice`], so that a parsed
/// row can travel with its record without copying the text out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// The span of `text`, which must be a slice of `record`'s text.
    fn of(record: &StringRecord, text: &str) -> Self {
        let whole = record.as_slice().as_bytes().as_ptr_range();
        debug_assert!(
            whole.start <= text.as_ptr() && text.as_bytes().as_ptr_range().end <= whole.end,
            "{text:?} is not a slice of the record"
        );
        let start = text.as_ptr() as usize - whole.start as usize;
        Self {
            start,
            end: start + text.len(),
        }
    }

    /// The text of the span in `record`.
    pub(super) fn text(self, record: &StringRecord) -> &str {
        &record.as_slice()[self.start..self.end]
    }
}

/// A row parsed, before the reader groups or numbers anything.
pub(super) struct Parsed {
    /// The customer id, checked as [`CustomerId::parse`] checks it.
    pub(super) customer: Span,
    pub(super) event_time: EventTime,
    pub(super) row: ParsedRow,
}

/// What a parsed row holds besides its customer and time.
pub(super) enum ParsedRow {
    /// A single-row event (returns, support and engagement files): the fingerprint of its id
    /// and its body.
    Event { id_hash: u64, body: EventBody },
    /// A line of an order: it joins the open order of its group, or opens one.
    OrderLine(Box<LineOfOrder>),
    /// A return line of an orders file: its event, grouped with the return lines of the same
    /// order and time (the group's key).
    ReturnLine { event: Box<Event>, key: String },
}

/// A line of an order, as [`ParsedRow::OrderLine`] holds it.
pub(super) struct LineOfOrder {
    /// The order id, if the file has one.
    pub(super) order_id: Option<Span>,
    /// The group's key: the order id, or the time as written (a basket).
    pub(super) key: Span,
    pub(super) group: GroupId,
    pub(super) line: OrderLine,
    pub(super) channel: Option<OrderChannel>,
    /// A zero quantity read as one unit (`zero_quantity_paid_as_one`).
    pub(super) zero_as_one: bool,
}

/// An order group: whether it holds returns, and a hash of the customer id and order key.
pub(super) type GroupId = (bool, u64);

/// A group's id: whether it holds returns (returns and orders are grouped apart, so a return
/// line between two lines of an order does not split the order), and a hash of the customer
/// and the order key.
pub(super) fn group_id(is_return: bool, customer: &str, key: &str) -> GroupId {
    let customer = xxhash_rust::xxh3::xxh3_64(customer.as_bytes());
    (
        is_return,
        xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), customer),
    )
}

/// A checked customer id (see [`RowParser::common`]) as the event's.
pub(super) fn owned_id(customer: &str) -> Result<CustomerId, RowError> {
    CustomerId::parse(customer).map_err(|e| RowError::Bad(format!("bad customer_id: {e}")))
}

/// Fields a file can map, by [`Field`]'s position.
const FIELDS: usize = Field::Action as usize + 1;

/// Parses the rows of one file.
pub(super) struct RowParser {
    kind: FileKind,
    /// The column of each field the file has, by [`Field`]'s position.
    columns: [Option<usize>; FIELDS],
    zero_quantity_paid_as_one: bool,
    until: Option<i64>,
    now: i64,
    /// Where an event id is written out to be fingerprinted, reused from row to row.
    id_text: String,
}

impl RowParser {
    /// A parser for a file of `kind` with columns `cols`. Rows after `until` (unix seconds)
    /// are left out, and rows further than a day past `now` are refused.
    pub(super) fn new(
        kind: FileKind,
        cols: &ResolvedColumns,
        zero_quantity_paid_as_one: bool,
        (until, now): (Option<i64>, i64),
    ) -> Self {
        let mut columns = [None; FIELDS];
        for &(field, _) in kind.fields() {
            columns[field as usize] = cols.get(field);
        }
        Self {
            kind,
            columns,
            zero_quantity_paid_as_one,
            until,
            now,
            id_text: String::new(),
        }
    }

    /// Parses one row.
    pub(super) fn parse(&mut self, record: &StringRecord) -> Result<Parsed, RowError> {
        match self.kind {
            FileKind::Orders => self.order_row(record),
            FileKind::Returns => {
                let common = self.common(record)?;
                let amount = self
                    .number(record, Field::Amount)?
                    .ok_or("missing amount: empty")?
                    .abs();
                let body = EventBody::Return(Return {
                    order_id: self.text(record, Field::OrderId).map(str::to_owned),
                    amount,
                    reason: self.text(record, Field::Reason).map(str::to_owned),
                });
                self.single(("return", Field::ReturnId), record, common, body)
            }
            FileKind::Support => {
                let common = self.common(record)?;
                let topic = self
                    .text(record, Field::Topic)
                    .ok_or("missing topic: empty")?
                    .to_owned();
                let complexity = self
                    .number(record, Field::Complexity)?
                    .ok_or("missing complexity: empty")?;
                let body = EventBody::SupportContact(SupportContact { topic, complexity });
                self.single(("support", Field::ContactId), record, common, body)
            }
            FileKind::Engagement => {
                let common = self.common(record)?;
                let channel =
                    MessageChannel::parse(self.text(record, Field::Channel).unwrap_or(""))
                        .map_err(|e| format!("bad channel: {e}"))?;
                let action =
                    EngagementAction::parse(self.text(record, Field::Action).unwrap_or(""))
                        .map_err(|e| format!("bad action: {e}"))?;
                let body = EventBody::Engagement(Engagement { channel, action });
                self.single(("engagement", Field::EventId), record, common, body)
            }
        }
    }

    /// A field's text, trimmed; `None` when the file lacks the field or the row leaves it
    /// empty.
    fn text<'r>(&self, record: &'r StringRecord, field: Field) -> Option<&'r str> {
        self.columns[field as usize]
            .and_then(|i| record.get(i))
            .map(trim)
            .filter(|s| !s.is_empty())
    }

    fn number(&self, record: &StringRecord, field: Field) -> Result<Option<f64>, String> {
        match self.text(record, field) {
            None => Ok(None),
            Some(raw) => {
                let value: f64 = parse_number(raw)
                    .ok_or_else(|| format!("bad number in {}: {raw:?}", field.as_str()))?;
                if !value.is_finite() {
                    return Err(format!(
                        "bad number in {}: {raw:?} is not finite",
                        field.as_str()
                    ));
                }
                Ok(Some(value))
            }
        }
    }

    /// The fields every row has: the customer id (checked, as [`CustomerId::parse`] keeps
    /// it), the event time, and the time as written.
    fn common<'r>(
        &self,
        record: &'r StringRecord,
    ) -> Result<(&'r str, EventTime, &'r str), RowError> {
        let customer = CustomerId::check(self.text(record, Field::CustomerId).unwrap_or(""))
            .map_err(|e| format!("bad customer_id: {e}"))?;
        let raw_time = self
            .text(record, Field::EventTime)
            .ok_or_else(|| "missing event_time: empty".to_owned())?;
        let time = EventTime::parse(raw_time).map_err(|e| format!("bad event_time: {e}"))?;
        if time.unix() > self.now + FUTURE_SLACK_SECONDS {
            return Err(format!("bad event_time: {raw_time:?} is in the future").into());
        }
        if self.until.is_some_and(|until| time.unix() > until) {
            return Err(RowError::AfterAsOf);
        }
        Ok((customer, time, raw_time))
    }

    /// A parsed row of `customer` at `event_time`.
    fn parsed(
        record: &StringRecord,
        customer: &str,
        event_time: EventTime,
        row: ParsedRow,
    ) -> Parsed {
        Parsed {
            customer: Span::of(record, customer),
            event_time,
            row,
        }
    }

    /// A single-row event of `kind` from the row's common fields and its body. Its id is
    /// `<kind>:<id>` from the file's `id_field` column, or a hash of the row when the file
    /// has none (see [`content_hash`]).
    fn single(
        &mut self,
        (kind, id_field): (&str, Field),
        record: &StringRecord,
        (customer, event_time, raw_time): (&str, EventTime, &str),
        body: EventBody,
    ) -> Result<Parsed, RowError> {
        body.validate().map_err(|e| describe(&e))?;
        self.id_text.clear();
        self.id_text.push_str(kind);
        self.id_text.push(':');
        match self.text(record, id_field) {
            Some(id) => self.id_text.push_str(id),
            None => {
                use std::fmt::Write as _;
                let content = content_hash(record);
                // Writing to a String cannot fail.
                let _ = write!(self.id_text, "{customer}:{raw_time}:{content:016x}");
            }
        }
        let id_hash = event_id_hash(&self.id_text);
        let row = ParsedRow::Event { id_hash, body };
        Ok(Self::parsed(record, customer, event_time, row))
    }

    fn order_row(&self, record: &StringRecord) -> Result<Parsed, RowError> {
        let (customer, event_time, raw_time) = self.common(record)?;
        let is_return = self.is_return(record)?;
        let mut quantity = self.number(record, Field::Quantity)?.unwrap_or(1.0);
        let unit_price = self.number(record, Field::UnitPrice)?;
        let line_total = self.number(record, Field::LineTotal)?;
        // Counted once the line is part of an order (it may still be refused there).
        let zero_as_one = !is_return
            && quantity == 0.0
            && self.zero_quantity_paid_as_one
            && line_total.is_some_and(|t| t > 0.0);
        if zero_as_one {
            quantity = 1.0;
        }
        if unit_price.is_none() && line_total.is_none() {
            return Err("missing price: unit_price and line_total are both empty".into());
        }
        if is_return {
            let amount = line_total
                .or_else(|| unit_price.map(|p| p * quantity))
                .unwrap_or(0.0)
                .abs();
            // One return per order and time: a second, later partial return of the same order
            // is a second event, not a duplicate of the first.
            let key = match self.text(record, Field::OrderId) {
                Some(order) => format!("{order}@{raw_time}"),
                None => raw_time.to_owned(),
            };
            let event = Event {
                event_id: format!("order-return:{key}"),
                customer_id: owned_id(customer)?,
                event_time,
                body: EventBody::Return(Return {
                    order_id: self.text(record, Field::OrderId).map(str::to_owned),
                    amount,
                    reason: None,
                }),
            };
            let row = ParsedRow::ReturnLine {
                event: Box::new(event),
                key,
            };
            return Ok(Self::parsed(record, customer, event_time, row));
        }
        let line = self.order_line(record, quantity, unit_price, line_total)?;
        let channel = match self.text(record, Field::Channel) {
            None => None,
            Some(raw) => Some(OrderChannel::parse(raw).map_err(|e| format!("bad channel: {e}"))?),
        };
        let order_id = self.text(record, Field::OrderId);
        let key = order_id.unwrap_or(raw_time);
        let row = ParsedRow::OrderLine(Box::new(LineOfOrder {
            order_id: order_id.map(|id| Span::of(record, id)),
            key: Span::of(record, key),
            group: group_id(false, customer, key),
            line,
            channel,
            zero_as_one,
        }));
        Ok(Self::parsed(record, customer, event_time, row))
    }

    /// Whether an orders row is a return, by its event type; without one it is an order.
    fn is_return(&self, record: &StringRecord) -> Result<bool, RowError> {
        match self.text(record, Field::EventType) {
            None => Ok(false),
            Some(t) => match t.to_ascii_lowercase().as_str() {
                "order" | "sale" | "purchase" | "sold" | "buy" => Ok(false),
                "return" | "refund" | "returned" | "credit" => Ok(true),
                other => Err(
                    format!("bad event_type: {other:?} is neither an order nor a return").into(),
                ),
            },
        }
    }

    /// The line of a row that is not a return, with the unit price taken from the line
    /// total and the list price from the discount when the file lacks them.
    fn order_line(
        &self,
        record: &StringRecord,
        quantity: f64,
        unit_price: Option<f64>,
        line_total: Option<f64>,
    ) -> Result<OrderLine, RowError> {
        if quantity < 0.0 {
            return Err(
                format!("negative quantity: {quantity} on a line that is not a return").into(),
            );
        }
        if quantity == 0.0 {
            return Err(
                "zero quantity: nothing was bought (--zero-quantity-paid-as-one reads a zero quantity with a positive line total as one unit)"
                    .into(),
            );
        }
        let unit_price = match (unit_price, line_total) {
            (Some(p), _) => p,
            (None, Some(total)) => total / quantity,
            (None, None) => 0.0,
        };
        let list_price = match (
            self.number(record, Field::ListPrice)?,
            self.number(record, Field::Discount)?,
        ) {
            (Some(list), _) => Some(list),
            // Discounts are a line amount; exports disagree on their sign.
            (None, Some(discount)) => Some(unit_price + discount.abs() / quantity),
            (None, None) => None,
        };
        let order_line = OrderLine {
            product_id: self.text(record, Field::ProductId).map(CompactString::from),
            category: self.text(record, Field::Category).map(CompactString::from),
            quantity,
            unit_price,
            list_price,
        };
        order_line.validate().map_err(|e| describe(&e))?;
        Ok(order_line)
    }
}

/// `text` without surrounding white space, as [`str::trim`] gives it. Nearly every field
/// starts and ends with a printable ASCII character, which no white space is: those are
/// returned as they are, without [`str::trim`]'s walk through the characters.
fn trim(text: &str) -> &str {
    let printable = |b: Option<&u8>| b.is_some_and(|&b| b > b' ' && b.is_ascii());
    let bytes = text.as_bytes();
    if printable(bytes.first()) && printable(bytes.last()) {
        text
    } else {
        text.trim()
    }
}

fn describe(e: &EventError) -> String {
    match e {
        EventError::NotFinite { field } | EventError::Negative { field, .. } => {
            format!("bad {field}: {e}")
        }
        EventError::ZeroQuantity => format!("zero quantity: {e}"),
        EventError::Implausible { field, .. } => format!("implausible {field}: {e}"),
        EventError::Complexity(_) => format!("bad complexity: {e}"),
        other => format!("invalid event: {other}"),
    }
}

/// Parses a number the way exports write them: optional thousands separators are not accepted
/// (ambiguous with decimal commas), `NaN` and `inf` parse and are then refused as not finite.
fn parse_number(raw: &str) -> Option<f64> {
    let raw = raw.strip_prefix('$').unwrap_or(raw);
    raw.parse::<f64>().ok()
}

/// For rows that carry no event id, the event id is `<kind>:<customer>:<time>:<this hash>`:
/// a hash of the row's content, so an identical row repeated (a double export) counts once,
/// while different rows at the same time do not.
fn content_hash(record: &StringRecord) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for field in record.iter() {
        h.update(field.as_bytes());
        h.update(&[0x1f]);
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_agrees_with_str_trim() {
        let texts = [
            "",
            " ",
            "a",
            " a",
            "a ",
            "\ta\r",
            "\u{b}a",
            "a\u{b}",
            "\u{a0}a",
            "a\u{3000}",
            "é",
            " é ",
            "a b",
            "\u{7f}",
            "~",
        ];
        for text in texts {
            assert_eq!(trim(text), text.trim(), "{text:?}");
        }
    }

    #[test]
    fn a_span_gives_back_its_text() {
        let record = StringRecord::from(vec!["o-1", " C42 ", "2024-01-01"]);
        let customer = trim(record.get(1).unwrap());
        let span = Span::of(&record, customer);
        assert_eq!(span.text(&record), "C42");
        assert_eq!(
            Span::of(&record, record.get(2).unwrap()).text(&record),
            "2024-01-01"
        );
    }

    #[test]
    fn every_field_a_file_maps_has_a_column_slot() {
        for kind in FileKind::ALL {
            for &(field, _) in kind.fields() {
                assert!((field as usize) < FIELDS, "{field:?}");
            }
        }
    }
}
