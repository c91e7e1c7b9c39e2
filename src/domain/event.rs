//! Typed customer events: the one shape every input (CSV row groups, Kafka JSON) is parsed into
//! before it touches per-customer state.
//!
//! Parsing happens at the edge (`batch::ingest` for files, the daemon's decoder for Kafka); once
//! an [`Event`] exists its invariants hold: a non-empty customer id, a sane event time, finite
//! non-negative money and quantities.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::time::EventTime;

/// Largest quantity on one line. Beyond it a value is a unit or parsing mistake, and sums of
/// such values would overflow to infinity.
pub const MAX_QUANTITY: f64 = 1e9;
/// Largest price or amount accepted, for the same reason.
pub const MAX_AMOUNT: f64 = 1e12;

/// Longest customer id accepted. Ids are RocksDB keys and CSV cells; anything longer is almost
/// certainly a mis-mapped column (a free-text field, a JSON blob).
pub const MAX_CUSTOMER_ID_LEN: usize = 128;

/// Why a raw value could not become a domain value. Each variant is a reason a dead letter or a
/// bad-row report can name.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EventError {
    /// The customer id is missing or blank.
    #[error("customer id is empty")]
    EmptyCustomerId,
    /// The customer id is longer than [`MAX_CUSTOMER_ID_LEN`].
    #[error("customer id is {0} bytes, longer than the {MAX_CUSTOMER_ID_LEN}-byte limit")]
    CustomerIdTooLong(usize),
    /// The customer id contains a control character.
    #[error("customer id contains a control character")]
    CustomerIdControlChar,
    /// A numeric field is NaN or infinite.
    #[error("{field} is not a finite number")]
    NotFinite {
        /// The field's name.
        field: &'static str,
    },
    /// A field that must be >= 0 is negative.
    #[error("{field} is negative ({value})")]
    Negative {
        /// The field's name.
        field: &'static str,
        /// The offending value.
        value: f64,
    },
    /// A value so large it can only be a mistake (see [`MAX_QUANTITY`], [`MAX_AMOUNT`]).
    #[error("{field} {value} is implausibly large")]
    Implausible {
        /// The field's name.
        field: &'static str,
        /// The offending value.
        value: f64,
    },
    /// A quantity of zero on an order line: nothing was bought.
    #[error("quantity is zero")]
    ZeroQuantity,
    /// An order without lines.
    #[error("order has no lines")]
    EmptyOrder,
    /// A support complexity outside 1..=5.
    #[error("complexity {0} is outside 1..=5")]
    Complexity(f64),
    /// A value that should name one of a fixed set does not.
    #[error("unknown {field} {value:?}")]
    Unknown {
        /// The field's name.
        field: &'static str,
        /// The value seen.
        value: String,
    },
}

/// A customer id, validated once at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(Box<str>);

impl CustomerId {
    /// Trims surrounding white space and checks the id is non-empty, short and printable.
    pub fn parse(raw: &str) -> Result<Self, EventError> {
        Self::check(raw).map(|id| Self(id.into()))
    }

    /// What [`CustomerId::parse`] would keep of `raw` (trimmed), checked, without allocating.
    pub fn check(raw: &str) -> Result<&str, EventError> {
        let id = raw.trim();
        if id.is_empty() {
            return Err(EventError::EmptyCustomerId);
        }
        if id.len() > MAX_CUSTOMER_ID_LEN {
            return Err(EventError::CustomerIdTooLong(id.len()));
        }
        if id.chars().any(char::is_control) {
            return Err(EventError::CustomerIdControlChar);
        }
        Ok(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CustomerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CustomerId {
    type Error = EventError;
    /// Keeps `value`'s own buffer when there is nothing to trim (every decoded event's id
    /// passes here: one allocation, not two).
    fn try_from(value: String) -> Result<Self, Self::Error> {
        if Self::check(&value)?.len() == value.len() {
            Ok(Self(value.into_boxed_str()))
        } else {
            Self::parse(&value)
        }
    }
}

impl From<CustomerId> for String {
    fn from(id: CustomerId) -> Self {
        id.0.into()
    }
}

/// The channel an order was placed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderChannel {
    /// Website.
    Web,
    /// Mobile app.
    App,
    /// Physical store.
    Store,
    /// Phone or catalogue order.
    Phone,
    /// Marketplace or anything else.
    Other,
}

impl OrderChannel {
    /// Whether the order was placed online (web or app).
    pub fn is_digital(self) -> bool {
        matches!(self, Self::Web | Self::App)
    }

    /// Parses common spellings case-insensitively ("online" is web, "mobile" is app, "pos" is
    /// store).
    pub fn parse(raw: &str) -> Result<Self, EventError> {
        with_ascii_lowercase(raw.trim(), |lower| match lower {
            "web" | "online" | "website" | "ecommerce" | "e-commerce" => Ok(Self::Web),
            "app" | "mobile" | "mobile_app" | "ios" | "android" => Ok(Self::App),
            "store" | "pos" | "retail" | "offline" | "in_store" | "instore" => Ok(Self::Store),
            "phone" | "call" | "catalog" | "catalogue" => Ok(Self::Phone),
            "other" | "marketplace" => Ok(Self::Other),
            other => Err(EventError::Unknown {
                field: "channel",
                value: other.to_owned(),
            }),
        })
    }
}

/// Calls `f` with `raw` in ASCII lower case, without allocating for the short words the
/// channel and action parsers look for (the batch reader parses one or two per row).
fn with_ascii_lowercase<R>(raw: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; 32];
    if raw.len() <= buf.len() {
        let lower = &mut buf[..raw.len()];
        lower.copy_from_slice(raw.as_bytes());
        lower.make_ascii_lowercase();
        // ASCII case changes keep UTF-8 valid.
        if let Ok(lower) = std::str::from_utf8(lower) {
            return f(lower);
        }
    }
    f(&raw.to_ascii_lowercase())
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    /// Product id, when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<CompactString>,
    /// Product category, when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<CompactString>,
    /// Units bought; > 0.
    pub quantity: f64,
    /// Price paid per unit, after discounts; >= 0.
    pub unit_price: f64,
    /// Undiscounted price per unit, when the source has one (or a discount it can be derived
    /// from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_price: Option<f64>,
}

impl OrderLine {
    /// What was paid for the line.
    pub fn amount(&self) -> f64 {
        self.quantity * self.unit_price
    }

    /// The line's value at list price, if known. A list price below the paid price (a data
    /// error in many exports) counts as no discount.
    pub fn list_amount(&self) -> Option<f64> {
        self.list_price
            .map(|list| self.quantity * list.max(self.unit_price))
    }

    /// Whether the line was bought below list price. Half a percent of slack absorbs rounding in
    /// exports that store rounded unit prices.
    pub fn is_discounted(&self) -> Option<bool> {
        self.list_price
            .map(|list| self.unit_price < list * (1.0 - 0.005))
    }

    /// Checks the line's numeric invariants.
    pub fn validate(&self) -> Result<(), EventError> {
        finite_non_negative("quantity", self.quantity)?;
        if self.quantity == 0.0 {
            return Err(EventError::ZeroQuantity);
        }
        at_most("quantity", self.quantity, MAX_QUANTITY)?;
        finite_non_negative("unit_price", self.unit_price)?;
        at_most("unit_price", self.unit_price, MAX_AMOUNT)?;
        at_most("line amount", self.amount(), MAX_AMOUNT)?;
        if let Some(list) = self.list_price {
            finite_non_negative("list_price", list)?;
            at_most("list_price", list, MAX_AMOUNT)?;
            at_most("line list amount", self.quantity * list, MAX_AMOUNT)?;
        }
        Ok(())
    }
}

/// A purchase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// The order's id in the source system, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// Where it was placed, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<OrderChannel>,
    /// The order's lines; at least one.
    pub lines: Vec<OrderLine>,
}

/// Money given back for (part of) an earlier order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Return {
    /// The order the return refers to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// Amount refunded; >= 0.
    pub amount: f64,
    /// Free-text reason, when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A support contact (ticket, chat, call).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupportContact {
    /// What the contact was about, e.g. `delivery`, `billing`, `product_question`.
    pub topic: String,
    /// How hard it was to resolve, 1 (trivial) to 5 (escalated, multi-step).
    pub complexity: f64,
}

impl SupportContact {
    /// Topics that show the customer needed help understanding a product, used by the
    /// product-knowledge axis.
    pub const PRODUCT_HELP_TOPICS: [&'static str; 6] = [
        "product_question",
        "how_to",
        "usage",
        "setup",
        "technical",
        "compatibility",
    ];

    /// Whether the topic is a request for product help.
    pub fn is_product_help(&self) -> bool {
        let topic = self.topic.trim().to_ascii_lowercase();
        Self::PRODUCT_HELP_TOPICS.contains(&topic.as_str())
    }
}

/// A messaging channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageChannel {
    /// E-mail.
    Email,
    /// Text message.
    Sms,
    /// Mobile push notification.
    Push,
    /// In-app message.
    InApp,
}

impl MessageChannel {
    /// All channels, in the order state arrays index them.
    pub const ALL: [MessageChannel; 4] = [Self::Email, Self::Sms, Self::Push, Self::InApp];

    /// Index into per-channel state arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the channel reaches a phone rather than an inbox.
    pub fn is_mobile(self) -> bool {
        !matches!(self, Self::Email)
    }

    /// Parses common spellings case-insensitively.
    pub fn parse(raw: &str) -> Result<Self, EventError> {
        with_ascii_lowercase(raw.trim(), |lower| match lower {
            "email" | "e-mail" | "mail" => Ok(Self::Email),
            "sms" | "text" | "mms" => Ok(Self::Sms),
            "push" | "notification" => Ok(Self::Push),
            "in_app" | "inapp" | "in-app" | "app" => Ok(Self::InApp),
            other => Err(EventError::Unknown {
                field: "channel",
                value: other.to_owned(),
            }),
        })
    }
}

/// What the customer did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngagementAction {
    /// Opened or viewed the message.
    Open,
    /// Clicked through.
    Click,
    /// Opted out of the channel.
    Unsubscribe,
    /// Opted (back) in to the channel.
    Subscribe,
}

impl EngagementAction {
    /// Parses common spellings case-insensitively.
    pub fn parse(raw: &str) -> Result<Self, EventError> {
        with_ascii_lowercase(raw.trim(), |lower| match lower {
            "open" | "opened" | "view" | "viewed" | "read" => Ok(Self::Open),
            "click" | "clicked" | "tap" | "tapped" => Ok(Self::Click),
            "unsubscribe" | "unsubscribed" | "opt_out" | "optout" | "opt-out" => {
                Ok(Self::Unsubscribe)
            }
            "subscribe" | "subscribed" | "opt_in" | "optin" | "opt-in" => Ok(Self::Subscribe),
            other => Err(EventError::Unknown {
                field: "action",
                value: other.to_owned(),
            }),
        })
    }
}

/// An interaction with a marketing or service message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engagement {
    /// Which channel the message came through.
    pub channel: MessageChannel,
    /// What the customer did.
    pub action: EngagementAction,
}

/// The kind-specific part of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A purchase.
    Order(Order),
    /// A refund.
    Return(Return),
    /// A support contact.
    SupportContact(SupportContact),
    /// A messaging interaction.
    Engagement(Engagement),
}

impl EventBody {
    /// The kind's name, as used in metrics labels and reports.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Order(_) => EventKind::Order,
            Self::Return(_) => EventKind::Return,
            Self::SupportContact(_) => EventKind::SupportContact,
            Self::Engagement(_) => EventKind::Engagement,
        }
    }

    /// Checks every numeric invariant of the body.
    pub fn validate(&self) -> Result<(), EventError> {
        match self {
            EventBody::Order(order) => {
                if order.lines.is_empty() {
                    return Err(EventError::EmptyOrder);
                }
                order.lines.iter().try_for_each(OrderLine::validate)
            }
            EventBody::Return(ret) => {
                finite_non_negative("amount", ret.amount)?;
                at_most("amount", ret.amount, MAX_AMOUNT)
            }
            EventBody::SupportContact(contact) => {
                if !contact.complexity.is_finite() {
                    return Err(EventError::NotFinite {
                        field: "complexity",
                    });
                }
                if !(1.0..=5.0).contains(&contact.complexity) {
                    return Err(EventError::Complexity(contact.complexity));
                }
                Ok(())
            }
            EventBody::Engagement(_) => Ok(()),
        }
    }
}

/// The four kinds of event, without payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A purchase.
    Order,
    /// A refund.
    Return,
    /// A support contact.
    SupportContact,
    /// A messaging interaction.
    Engagement,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 4] = [
        Self::Order,
        Self::Return,
        Self::SupportContact,
        Self::Engagement,
    ];

    /// The kind as a label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Order => "order",
            Self::Return => "return",
            Self::SupportContact => "support_contact",
            Self::Engagement => "engagement",
        }
    }
}

/// One customer event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id of the event in its source; applying the same id twice is a no-op.
    pub event_id: String,
    /// Whose event it is.
    pub customer_id: CustomerId,
    /// When it happened, from the payload (never the broker's timestamp).
    pub event_time: EventTime,
    /// What happened.
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// Checks every numeric invariant of the body. Ids and times are checked when they are
    /// parsed.
    pub fn validate(&self) -> Result<(), EventError> {
        self.body.validate()
    }

    /// The 64-bit fingerprint of the event id used for de-duplication in customer state.
    pub fn id_hash(&self) -> u64 {
        event_id_hash(&self.event_id)
    }
}

/// Stable 64-bit hash of an event id. Stable across builds and platforms: it is persisted in
/// customer state.
pub fn event_id_hash(event_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(event_id.as_bytes(), 0x5e6d_e17d)
}

fn at_most(field: &'static str, value: f64, max: f64) -> Result<(), EventError> {
    if value > max {
        return Err(EventError::Implausible { field, value });
    }
    Ok(())
}

fn finite_non_negative(field: &'static str, value: f64) -> Result<(), EventError> {
    if !value.is_finite() {
        return Err(EventError::NotFinite { field });
    }
    if value < 0.0 {
        return Err(EventError::Negative { field, value });
    }
    Ok(())
}

/// A one-line order (1 unit at 10.00, no product, category or channel), for tests across the
/// crate.
#[cfg(test)]
pub(crate) fn test_order(customer: &str, event_id: &str, time: EventTime) -> Event {
    Event {
        event_id: event_id.into(),
        customer_id: CustomerId::parse(customer).expect("test customer id"),
        event_time: time,
        body: EventBody::Order(Order {
            order_id: None,
            channel: None,
            lines: vec![OrderLine {
                product_id: None,
                category: None,
                quantity: 1.0,
                unit_price: 10.0,
                list_price: None,
            }],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_parse_case_insensitively_short_or_long() {
        assert_eq!(
            MessageChannel::parse("  E-Mail "),
            Ok(MessageChannel::Email)
        );
        assert_eq!(
            EngagementAction::parse("OPT-OUT"),
            Ok(EngagementAction::Unsubscribe)
        );
        assert_eq!(OrderChannel::parse("Android"), Ok(OrderChannel::App));
        // Longer than the stack buffer, and not ASCII: lower-cased the same way.
        let long = "Carrier-Pigeon-Delivered-By-Hand-At-Dawn";
        assert_eq!(
            MessageChannel::parse(long),
            Err(EventError::Unknown {
                field: "channel",
                value: long.to_ascii_lowercase(),
            })
        );
        assert_eq!(
            EngagementAction::parse("Ouvrir-É"),
            Err(EventError::Unknown {
                field: "action",
                value: "ouvrir-É".to_owned(),
            })
        );
    }

    #[test]
    fn customer_id_is_trimmed_and_checked() {
        assert_eq!(CustomerId::parse("  c-1 ").unwrap().as_str(), "c-1");
        assert_eq!(CustomerId::parse("   "), Err(EventError::EmptyCustomerId));
        assert_eq!(
            CustomerId::parse(&"x".repeat(129)),
            Err(EventError::CustomerIdTooLong(129))
        );
        assert_eq!(
            CustomerId::parse("a\u{0}b"),
            Err(EventError::CustomerIdControlChar)
        );
        // Decoded ids go through the same checks, with or without white space to trim.
        let decoded = |json: &str| serde_json::from_str::<CustomerId>(json);
        assert_eq!(decoded(r#""c-1""#).unwrap().as_str(), "c-1");
        assert_eq!(decoded(r#"" c-1 ""#).unwrap().as_str(), "c-1");
        assert!(decoded(r#""   ""#).is_err());
        assert!(decoded(r#""a\u0000b""#).is_err());
    }

    #[test]
    fn order_json_round_trips_with_kind_tag() {
        let json = r#"{"event_id":"o-1","customer_id":"c1","event_time":"2024-03-01T10:00:00Z",
            "kind":"order","channel":"web","lines":[{"product_id":"p1","category":"tea",
            "quantity":2,"unit_price":3.5,"list_price":4.0}]}"#;
        let event: Event = serde_json::from_str(json).unwrap();
        assert_eq!(event.body.kind(), EventKind::Order);
        let EventBody::Order(order) = &event.body else {
            panic!("not an order")
        };
        assert_eq!(order.lines[0].amount(), 7.0);
        assert_eq!(order.lines[0].list_amount(), Some(8.0));
        assert_eq!(order.lines[0].is_discounted(), Some(true));
        let back: Event = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn a_lines_text_writes_as_the_string_it_read_whatever_its_length() {
        // Short texts are held inline and longer ones on the heap: both are plain strings on
        // the wire, escapes included.
        let long = "product-with-an-id-longer-than-twenty-four-bytes";
        let json = format!(
            r#"{{"product_id":"{long}","category":"t\"ea","quantity":1.0,"unit_price":2.0}}"#
        );
        let line: OrderLine = serde_json::from_str(&json).unwrap();
        assert_eq!(line.product_id.as_deref(), Some(long));
        assert_eq!(line.category.as_deref(), Some("t\"ea"));
        assert_eq!(serde_json::to_string(&line).unwrap(), json);
    }

    #[test]
    fn validation_rejects_bad_numbers() {
        let line = |q: f64, p: f64| OrderLine {
            product_id: None,
            category: None,
            quantity: q,
            unit_price: p,
            list_price: None,
        };
        assert_eq!(
            line(f64::NAN, 1.0).validate(),
            Err(EventError::NotFinite { field: "quantity" })
        );
        assert_eq!(line(0.0, 1.0).validate(), Err(EventError::ZeroQuantity));
        assert!(matches!(
            line(1.0, -2.0).validate(),
            Err(EventError::Negative {
                field: "unit_price",
                ..
            })
        ));
        assert!(line(1.0, 0.0).validate().is_ok());
        // Finite on their own, but their product would dominate every sum it enters.
        assert!(matches!(
            line(1e8, 1e8).validate(),
            Err(EventError::Implausible {
                field: "line amount",
                ..
            })
        ));
        assert!(matches!(
            line(1e10, 1.0).validate(),
            Err(EventError::Implausible {
                field: "quantity",
                ..
            })
        ));
    }

    #[test]
    fn list_price_below_paid_is_no_discount() {
        let line = OrderLine {
            product_id: None,
            category: None,
            quantity: 2.0,
            unit_price: 5.0,
            list_price: Some(4.0),
        };
        assert_eq!(line.list_amount(), Some(10.0));
        assert_eq!(line.is_discounted(), Some(false));
    }
}
